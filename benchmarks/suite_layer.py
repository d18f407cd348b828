"""Layer suite: Sequential(Linear(768, 3072), ReLU, Linear(3072, 10)) trained with dkm_hf, coremltools and unclustered.

2/4/8 bits, cluster_dim 1 and 2, 3 and 5 DKM iterations, batch 64, SGD: first step (including centroid
initialisation), median steady step and peak memory increase, one fresh process (`child_layer`) per variant, on the
CPU or (--device cuda) the GPU. `report_layer` writes its RESULTS.md table.
"""

from __future__ import annotations

import time

from common import COREMLTOOLS_ANCHORS, have_coremltools, outcome, run_suite_child
from measure import CHILD_THREADS, emit, markdown_table, median, memory_baseline, peak_increase, warm_up_torch


def child_layer(spec: dict) -> None:
    import torch
    from torch import nn

    torch.manual_seed(0)
    device = torch.device(spec.get("device", "cpu"))
    cuda = device.type == "cuda"
    model = nn.Sequential(nn.Linear(768, 3072), nn.ReLU(), nn.Linear(3072, 10)).to(device)
    x, y = torch.randn(64, 768, device=device), torch.randint(0, 10, (64,), device=device)
    impl, bits, cdim, iters = spec["impl"], spec.get("bits"), spec.get("cluster_dim"), spec.get("iters")
    # Libraries are imported before the peak-RSS reset: their import is not part of the training memory.
    if impl == "dkm_hf":
        import dkm_hf
    elif impl == "coremltools":
        from coremltools.optimize.torch.palettization import (
            DKMPalettizer,
            DKMPalettizerConfig,
            ModuleDKMPalettizerConfig,
        )
    step_hook = None
    warm_up_torch()

    def sync():
        if cuda:
            torch.cuda.synchronize()

    if cuda:  # the GPU's own peak: allocations over the plain model and its data
        (torch.ones(8, device=device) * 2).sum().item()
        sync()
    baseline = memory_baseline(cuda)
    start = time.perf_counter()
    if impl == "dkm_hf":
        config = dkm_hf.DKMConfig(bits=bits, cluster_dim=cdim, max_iters=iters, tau=1e-4, tau_scale="absolute")
        dkm_hf.prepare(model, config)
    elif impl == "coremltools":
        module_config = ModuleDKMPalettizerConfig(
            n_bits=bits, cluster_dim=cdim, kmeans_max_iter=iters, palett_tau=1e-4
        )
        palettizer = DKMPalettizer(model, DKMPalettizerConfig(global_config=module_config))
        model = palettizer.prepare()
        step_hook = palettizer.step
    sync()
    prepare_s = time.perf_counter() - start
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step():
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step_hook is not None:
            step_hook()
        sync()

    times = []
    for _ in range(spec["steps"] + 1):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    result = {"prepare_s": prepare_s, "first_s": prepare_s + times[0], "step_s": median(times[1:])}
    emit(result | peak_increase(cuda, baseline))


def layer_variants(quick: bool) -> list[dict]:
    """--quick: every bit width at 3 iterations, 4 bits at 5 too; 8 bits with cluster_dim 2 (256 2-d centroids,
    tens of seconds per step) and most coremltools runs (minutes each) only in the full run."""
    variants = []
    for bits in (2, 4, 8):
        for cdim in (1, 2):
            for iters in (3, 5):
                if quick and ((iters == 5 and (bits, cdim) != (4, 1)) or (bits, cdim) == (8, 2)):
                    continue
                variants.append({"impl": "dkm_hf", "bits": bits, "cluster_dim": cdim, "iters": iters})
                if quick and (cdim, iters) == (1, 3) and bits in (4, 8):
                    variants.append({"impl": "coremltools", "bits": bits, "cluster_dim": cdim, "iters": iters})
                elif not quick and (iters == 3 or (bits, cdim) == (4, 1)):
                    variants.append({"impl": "coremltools", "bits": bits, "cluster_dim": cdim, "iters": iters})
    return variants


def suite_layer(quick: bool, device: str = "cpu") -> dict:
    steps, slow_steps = (4, 2) if quick else (10, 3)  # slow: coremltools and cluster_dim 2
    ct = have_coremltools()
    notes = [] if ct else ["coremltools is not installed (pip install coremltools==9.0): its columns are skipped."]
    plain_spec = {"impl": "plain", "steps": steps, "device": device}
    plain = run_suite_child("layer", plain_spec, timeout_s=300)
    print("plain", plain, flush=True)
    runs = []
    for v in layer_variants(quick):
        if v["impl"] == "coremltools" and not ct:
            continue
        slow = v["impl"] == "coremltools" or v["cluster_dim"] > 1
        spec = v | {"steps": slow_steps if slow else steps, "device": device}
        big = v["impl"] == "coremltools" and v["bits"] == 8
        timeout = 120 if big else (900 if v["impl"] == "coremltools" else 600)
        res = run_suite_child("layer", spec, timeout_s=timeout, rss_cap_gb=8 if big else 20)
        runs.append(v | {"result": res})
        print(v, {k: r for k, r in res.items() if k != "log_tail"}, flush=True)
    if ct:
        notes.append("coremltools 8-bit runs with a 120 s timeout and an 8 GB RSS cap; " + COREMLTOOLS_ANCHORS + ".")
    return {
        "plain": plain,
        "runs": runs,
        "steps": steps,
        "slow_steps": slow_steps,
        "threads": CHILD_THREADS,
        "device": device,
        "notes": notes,
    }


def report_layer(data: dict) -> str:
    plain = data["plain"]
    by_key = {}
    for run in data["runs"]:
        by_key.setdefault((run["bits"], run["cluster_dim"], run["iters"]), {})[run["impl"]] = run["result"]
    rows = []
    for (bits, cdim, iters), res in sorted(by_key.items()):
        d, c = res.get("dkm_hf"), res.get("coremltools")
        d_ok, c_ok = d is not None and d["status"] == "ok", c is not None and c["status"] == "ok"

        def cell(r, key, scale=1.0):
            return r[key] * scale if r is not None and r["status"] == "ok" else None

        rows.append(
            [
                f"{bits}/{cdim}",
                iters,
                cell(d, "first_s"),
                cell(d, "step_s", 1e3),
                cell(d, "peak_increase_mb"),
                cell(c, "first_s") if c_ok else (outcome(c) if c else "not run"),
                cell(c, "step_s", 1e3),
                cell(c, "peak_increase_mb"),
                c["step_s"] / d["step_s"] if c_ok and d_ok else None,
                c["peak_increase_mb"] / max(d["peak_increase_mb"], 1.0) if c_ok and d_ok else None,
                c["first_s"] / d["first_s"] if c_ok and d_ok else None,
            ]
        )
    header = [
        "bits/dim",
        "iters",
        "dkm_hf first (s)",
        "dkm_hf step (ms)",
        "dkm_hf peak +MB",
        "coremltools first (s)",
        "coremltools step (ms)",
        "coremltools peak +MB",
        "step ratio ct/dkm_hf",
        "memory ratio ct/dkm_hf",
        "first-step ratio ct/dkm_hf",
    ]
    plain_line = (
        f"Plain model (no clustering): first step {plain['first_s'] * 1e3:.1f} ms, median step "
        f"{plain['step_s'] * 1e3:.1f} ms, peak RSS increase {plain['peak_increase_mb']:.0f} MB."
        if plain["status"] == "ok"
        else f"Plain model: {plain['status']}"
    )
    device = data.get("device", "cpu")
    memory = (
        "Peak increase is of torch.cuda.max_memory_allocated over the plain model with its data"
        if device == "cuda"
        else "Peak RSS increase is over the RSS of the plain model with its data"
    )
    return (
        f"Device: {device}. Sequential(Linear(768, 3072), ReLU, Linear(3072, 10)), batch 64, SGD(momentum 0.9), "
        "tau 1e-4, "
        f"{data['steps']} steady steps (coremltools and cluster_dim 2: {data.get('slow_steps', 3)}), "
        f"{data.get('threads', 1)} thread(s). First step includes preparing the model "
        f"(centroid initialisation). {memory}, one fresh process per row.\n\n"
        + markdown_table(header, rows)
        + "\n\n"
        + plain_line
        + "\n"
    )
