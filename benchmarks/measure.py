"""Helpers shared by the benchmark scripts: RSS probes, timed steps, child processes, machine description.

Peak memory of torch code is not visible to tracemalloc, so every measured variant runs in a fresh child process.
The child resets the kernel's peak-RSS counter (VmHWM, via /proc/self/clear_refs) right before the measured part,
so the import and setup peaks do not hide the training peak; the reported number is the peak RSS increase over the
RSS at that point.
"""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time

RESULT_PREFIX = "BENCH_RESULT "
PROGRESS_PREFIX = "BENCH_PROGRESS "


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+)", f.read()).group(1))


def rss_mb() -> float:
    return _status_kb("VmRSS") / 1024


def reset_peak_rss() -> float:
    """Reset the peak-RSS counter; returns the current RSS in MB (the baseline of the next peak)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return rss_mb()


def warm_up_torch() -> None:
    """One tiny forward/backward and optimiser step, so lazy imports and one-off allocations of torch (optimisers
    import parts of torch._dynamo on first use) are not counted as training memory."""
    import torch

    layer = torch.nn.Linear(8, 8)
    for opt in (torch.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9), torch.optim.AdamW(layer.parameters())):
        layer(torch.randn(4, 8)).sum().backward()
        opt.step()
        opt.zero_grad()


def peak_rss_mb() -> float:
    return _status_kb("VmHWM") / 1024


def memory_baseline(cuda: bool) -> tuple[float, int]:
    """Reset the peak counters; returns (RSS in MB, allocated GPU bytes or 0): the baseline of `peak_increase`."""
    gpu = 0
    if cuda:
        import torch

        torch.cuda.reset_peak_memory_stats()
        gpu = torch.cuda.memory_allocated()
    return reset_peak_rss(), gpu


def peak_increase(cuda: bool, baseline: tuple[float, int]) -> dict:
    """Peak memory over `memory_baseline`: the GPU's own peak (plus the host's) on CUDA, else the peak RSS."""
    host = peak_rss_mb() - baseline[0]
    if not cuda:
        return {"peak_increase_mb": host}
    import torch

    gpu = (torch.cuda.max_memory_allocated() - baseline[1]) / 2**20
    return {"peak_increase_mb": gpu, "host_peak_increase_mb": host}


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def progress(message: str) -> None:
    """A line the parent keeps if the child does not finish (first-step time of a run that later times out)."""
    print(PROGRESS_PREFIX + message, flush=True)


def emit(result: dict) -> None:
    """Print a child's result for `run_child` to pick up."""
    print(RESULT_PREFIX + json.dumps(result), flush=True)


# Threads of every child (OMP/MKL/torch). One thread by default: on a machine shared with other jobs, two OpenMP
# threads competing for two busy cores make step times swing by 10x; single-threaded numbers are reproducible.
CHILD_THREADS = int(os.environ.get("BENCH_THREADS", "1"))


def run_child(argv: list[str], timeout_s: float, rss_cap_gb: float | None = None) -> dict:
    """Run `python argv...` with CHILD_THREADS threads and return the dict it `emit`ted.

    The parent polls the child's RSS; a child past `timeout_s` or above `rss_cap_gb` is killed and reported as
    {"status": "timeout" | "rss_cap", ...} instead.
    """
    threads = str(CHILD_THREADS)
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen([sys.executable, *argv], stdout=log, stderr=subprocess.STDOUT, text=True, env=env)
        start, peak_kb, status = time.perf_counter(), 0, None
        while proc.poll() is None:
            try:
                with open(f"/proc/{proc.pid}/status") as f:
                    peak_kb = max(peak_kb, int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1)))
            except (OSError, AttributeError):
                pass
            if time.perf_counter() - start > timeout_s:
                status = "timeout"
            elif rss_cap_gb is not None and peak_kb > rss_cap_gb * 1024**2:
                status = "rss_cap"
            if status:
                proc.kill()
                proc.wait()
                break
            time.sleep(0.1)
        log.seek(0)
        lines = log.read().splitlines()
    elapsed = time.perf_counter() - start
    for line in reversed(lines):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX) :]) | {"status": "ok", "wall_s": elapsed}
    return {
        "status": status or "failed",
        "wall_s": elapsed,
        "child_peak_rss_mb": peak_kb / 1024,
        "returncode": proc.returncode,  # -9 without a timeout or cap of ours: the kernel's out-of-memory killer
        "progress": [line for line in lines if line.startswith(PROGRESS_PREFIX)][-5:],
        "log_tail": "\n".join(lines[-15:]),
    }


def alternate_seconds(argv_of, names, rounds: int, timeout_s: float, what: str) -> dict[str, list[float]]:
    """Each name's child (`argv_of(name)`) run `rounds` times, the names alternating round by round: their emitted
    "seconds" per name. Exits naming `what` and the child when one does not finish."""
    results: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(rounds):
        for name in names:
            res = run_child(argv_of(name), timeout_s)
            if res["status"] != "ok":
                sys.exit(f"{what} {name} at {CHILD_THREADS} threads: {res['status']}\n{res.get('log_tail', '')}")
            results[name].append(res["seconds"])
    return results


def machine_description() -> dict:
    import torch
    import transformers

    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = re.search(r"model name\s*:\s*(.*)", f.read()).group(1).strip()
    except (OSError, AttributeError):
        pass
    with open("/proc/meminfo") as f:
        mem_gb = int(re.search(r"MemTotal:\s+(\d+)", f.read()).group(1)) / 1024**2
    try:
        import coremltools

        ct = coremltools.__version__
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        ct = None
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "benchmark_threads": CHILD_THREADS,
        "ram_gb": round(mem_gb, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "coremltools": ct,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }


def fmt(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def markdown_table(header: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(fmt(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(out)
