"""`gptq_snap`: the weights snapped onto their centroids with GPTQ's error compensation (`snap_rows` per weight)."""

from __future__ import annotations

import pytest
import torch
from conftest import AUTO, PER_ROW_2BIT, tiny_lm_batches
from torch import nn

import dkm_hf
from dkm_hf import DKMConfig
from dkm_hf.surgery.gptq import inverse_factor, snap_rows


def _snap(rows, lut, hessian, **kwargs):
    return lut.gather(1, snap_rows(rows, lut, hessian, **kwargs))


def _nearest(rows: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    return lut.gather(1, (rows[:, :, None] - lut[:, None, :]).abs().argmin(-1))


def test_snap_rows_is_the_optimal_brain_quantizer_on_two_features():
    """Two features: the first snaps to its nearest value, and the second moves by the OBQ update
    -(w_1 - q_1) [H^-1]_12 / [H^-1]_11 before it snaps (float64, no damping)."""
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(64, 2, generator=g, dtype=torch.float64)
    lut = torch.randn(64, 4, generator=g, dtype=torch.float64).sort(1).values
    a = torch.randn(2, 2, generator=g, dtype=torch.float64)
    hessian = a @ a.t() + 0.5 * torch.eye(2, dtype=torch.float64)
    inverse = torch.linalg.inv(hessian)
    q1 = _nearest(rows[:, :1], lut)[:, 0]
    moved = rows[:, 1] - (rows[:, 0] - q1) * inverse[0, 1] / inverse[0, 0]
    q2 = _nearest(moved[:, None], lut)[:, 0]
    out = _snap(rows, lut, hessian, damp=0.0).double()
    snapped = _snap(rows.float(), lut.float(), hessian.float(), damp=0.0)
    expected = torch.stack([q1, q2], 1)
    torch.testing.assert_close(out, expected.float().double(), rtol=0, atol=1e-6)
    assert (snapped.double() - expected).abs().max() < 1e-6
    assert (q2 != _nearest(rows[:, 1:], lut)[:, 0]).any()  # the update changed some choices


@pytest.mark.parametrize("act_order", [False, True])
def test_snap_rows_kernel_equals_the_torch_loop(monkeypatch, act_order):
    """The C++ loop inside each block of features (dkm_gptq.cpp) makes the torch loop's choices to the bit: 300
    features (two full blocks of 128 and a partial one), per-row LUTs with a repeated value (ties go to the first, as
    argmin), correlated inputs, at one thread and at two; a CUDA or no-compiler run takes the torch loop."""
    gptq = pytest.importorskip("dkm_hf.surgery.gptq")
    kernel = gptq.fused.cpu_kernels()
    if kernel is None:
        pytest.skip("the CPU extension is not available")
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(96, 300, generator=g) * 0.05
    lut = torch.randn(96, 16, generator=g).sort(1).values * 0.05
    lut[:, 5] = lut[:, 4]  # equal values: the first index wins in both loops
    x = torch.randn(512, 300, generator=g) @ (torch.eye(300) + 0.3 * torch.randn(300, 300, generator=g))
    hessian = x.t() @ x
    calls = []

    class Counting:
        def gptq_block(self, *args):
            calls.append(args[0].shape)
            return kernel.gptq_block(*args)

    threads = torch.get_num_threads()
    try:
        fast = []
        for n in (1, 2):
            torch.set_num_threads(n)
            monkeypatch.setattr(gptq.fused, "cpu_kernels", lambda: Counting())
            fast.append(snap_rows(rows, lut, hessian, act_order=act_order))
        monkeypatch.setattr(gptq.fused, "cpu_kernels", lambda: None)
        slow = snap_rows(rows, lut, hessian, act_order=act_order)
    finally:
        torch.set_num_threads(threads)
    assert [tuple(shape) for shape in calls] == [(96, 128), (96, 128), (96, 44)] * 2
    assert torch.equal(fast[0], slow) and torch.equal(fast[1], slow)
    nearest = (rows[:, :, None] - lut[:, None, :]).abs().argmin(-1)
    assert (slow != nearest).float().mean() > 0.1  # the compensation changed many choices: the loops did work
    assert not (slow == 5).any()  # the second of two equal values is never chosen


@pytest.mark.parametrize("act_order", [False, True])
def test_snap_rows_with_uncorrelated_inputs_is_nearest_rounding(act_order):
    """A diagonal H (inputs with uncorrelated features) spreads nothing: every weight goes to its nearest value; a
    feature that never saw an input (H_jj = 0) too."""
    g = torch.Generator().manual_seed(1)
    rows = torch.randn(16, 300, generator=g)
    lut = torch.randn(16, 8, generator=g)
    diagonal = torch.rand(300, generator=g) + 0.1
    diagonal[[3, 150]] = 0
    out = _snap(rows, lut, torch.diag(diagonal), block_size=64, act_order=act_order)
    torch.testing.assert_close(out, _nearest(rows, lut), rtol=0, atol=0)


@pytest.mark.parametrize("act_order", [False, True])
def test_snap_rows_keeps_the_layer_output_closer_than_nearest_rounding(act_order):
    """Correlated inputs: the output error ||X (W - Q)^T|| on the inputs H came from is well below nearest
    rounding's, and every weight is one of its channel's values; blocks of any size give the same result. In the
    order of decreasing input energy (`act_order`) the features come back to their own places."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(512, 48, generator=g) @ torch.randn(48, 96, generator=g)  # rank 48 of 96 features
    x *= torch.linspace(0.1, 3.0, 96)  # features of unequal energy
    x += 0.05 * torch.randn(512, 96, generator=g)
    rows = torch.randn(32, 96, generator=g)
    lut = torch.quantile(rows, torch.linspace(0.05, 0.95, 8), dim=1).t().contiguous()  # (32, 8) per row
    hessian = x.t() @ x
    out = _snap(rows, lut, hessian, act_order=act_order)
    nearest = _nearest(rows, lut)
    gptq_error = (x @ (rows - out).t()).square().sum()
    nearest_error = (x @ (rows - nearest).t()).square().sum()
    assert gptq_error < 0.7 * nearest_error, (gptq_error, nearest_error)
    assert ((out[:, :, None] - lut[:, None, :]).abs().amin(-1) == 0).all()
    torch.testing.assert_close(_snap(rows, lut, hessian, block_size=7, act_order=act_order), out, rtol=0, atol=1e-5)
    if act_order:  # the same as permuting the features by hand
        order = hessian.diagonal().argsort(descending=True)
        by_hand = _snap(rows[:, order], lut, hessian[order][:, order], block_size=7)
        torch.testing.assert_close(out[:, order], by_hand, rtol=0, atol=1e-5)


def _hard_loss(model, batches) -> float:
    model.eval()
    with torch.no_grad():
        return sum(model(**b).loss.item() for b in batches) / len(batches)


@torch.no_grad()
def _dense_inputs(model, batches, names) -> dict[str, torch.Tensor]:
    """The inputs the dense model gives each named layer over `batches`, (tokens, features)."""
    states = dict(dkm_hf.dkm_modules(model))
    inputs = {name: [] for name in names}
    hooks = [states[n].module.register_forward_pre_hook(lambda m, a, n=n: inputs[n].append(a[0])) for n in names]
    for state in states.values():
        state.dkm_enabled = False
    model.eval()
    for batch in batches:
        model(**batch)
    for hook in hooks:
        hook.remove()
    for state in states.values():
        state.dkm_enabled = True
    return {name: torch.cat([t.reshape(-1, t.shape[-1]) for t in ts]) for name, ts in inputs.items()}


def _output_error(model, inputs, dense, snapped) -> float:
    """sum over the layers of ||X (W - W_snapped)^T||^2 on their dense inputs X."""
    states = dict(dkm_hf.dkm_modules(model))
    rows = {name: states[name].layout.to_rows(dense[name] - snapped[name]) for name in inputs}
    return sum((inputs[name] @ rows[name].t()).square().sum().item() for name in inputs)


@pytest.mark.parametrize("per_channel_scale", [False, True])
def test_gptq_snap_on_a_tiny_llama(tiny_dir, per_channel_scale):
    """Every Linear weight ends on its centroids (the hard model is the weight itself), the calibration loss of the
    hard model is below nearest snapping's, the tied embedding / LM head are left and named, the model's mode and
    clustering flags are restored, and chunks of H give the same weights as one pass."""
    path = tiny_dir("llama")
    config = DKMConfig(**PER_ROW_2BIT, per_channel_scale=per_channel_scale)
    model = AUTO["llama"].from_pretrained(path, dkm_config=config)
    before = _hard_loss(model, tiny_lm_batches())
    linear = [name for name, _ in dkm_hf.dkm_modules(model) if name not in ("model.embed_tokens", "lm_head")]
    inputs = _dense_inputs(model, tiny_lm_batches(), linear)
    states = dict(dkm_hf.dkm_modules(model))
    dense = {name: states[name].weight.detach().clone() for name in linear}
    nearest = {name: states[name].hard_weight().clone() for name in linear}
    twin = AUTO["llama"].from_pretrained(path, dkm_config=config)
    model.train()
    skipped = dkm_hf.gptq_snap(model, tiny_lm_batches())
    assert model.training and all(state.dkm_enabled for _, state in dkm_hf.dkm_modules(model))
    names = dict(dkm_hf.dkm_modules(model))
    assert set(skipped) == {"model.embed_tokens", "lm_head"} and "LUT" in skipped["lm_head"]
    snapped = [name for name in names if name not in skipped]
    assert len(snapped) == 7 * model.config.num_hidden_layers
    for name in snapped:
        state = names[name]
        torch.testing.assert_close(state.hard_weight(), state.weight.detach(), rtol=0, atol=1e-6)
    after = _hard_loss(model, tiny_lm_batches())
    assert after < before, (after, before)
    gptq = {name: states[name].weight.detach().clone() for name in linear}
    gptq_error, nearest_error = _output_error(model, inputs, dense, gptq), _output_error(model, inputs, dense, nearest)
    assert gptq_error < 0.8 * nearest_error, (gptq_error, nearest_error)
    dkm_hf.gptq_snap(twin, tiny_lm_batches(), max_hessian_bytes=1)  # one layer per chunk
    twins = dict(dkm_hf.dkm_modules(twin))
    for name in snapped:
        torch.testing.assert_close(twins[name].weight, names[name].weight, rtol=0, atol=0)


def test_gptq_snap_on_gpt2_conv1d(tiny_dir):
    """transformers' Conv1D stores (in, out): its rows are the columns, its features the input's last dimension."""
    path = tiny_dir("gpt2")
    model = AUTO["gpt2"].from_pretrained(path, dkm_config=DKMConfig(**PER_ROW_2BIT))
    batches = tiny_lm_batches(name="gpt2")
    states = dict(dkm_hf.dkm_modules(model))
    conv = [name for name, state in states.items() if state.layout.transposed]
    inputs = _dense_inputs(model, batches, conv)
    dense = {name: states[name].weight.detach().clone() for name in conv}
    nearest = {name: states[name].hard_weight().clone() for name in conv}
    skipped = dkm_hf.gptq_snap(model, batches)
    assert conv and not any(name in skipped for name in conv)
    for name in conv:
        torch.testing.assert_close(states[name].hard_weight(), states[name].weight.detach(), rtol=0, atol=1e-6)
    snapped = {name: states[name].weight.detach().clone() for name in conv}
    assert _output_error(model, inputs, dense, snapped) < 0.8 * _output_error(model, inputs, dense, nearest)


def test_gptq_snap_bad_input(tiny_dir):
    path = tiny_dir("llama")
    with pytest.raises(ValueError, match="no batch"):
        dkm_hf.gptq_snap(AUTO["llama"].from_pretrained(path, dkm_config=DKMConfig(**PER_ROW_2BIT)), [])
    with pytest.raises(ValueError, match="DKM modules"):
        dkm_hf.gptq_snap(AUTO["llama"].from_pretrained(path), tiny_lm_batches())
    prepared = dkm_hf.prepare(AUTO["llama"].from_pretrained(path), DKMConfig(**PER_ROW_2BIT), init=False)
    weights = {n: p.detach().clone() for n, p in prepared.named_parameters()}
    with pytest.raises(ValueError, match="init_centroids"):
        dkm_hf.gptq_snap(prepared, tiny_lm_batches())
    dkm_hf.init_centroids(prepared)
    weights = {n: p.detach().clone() for n, p in prepared.named_parameters()}
    for option, value in [
        ("damp", -0.01), ("damp", float("nan")), ("damp", "0.01"), ("block_size", 0), ("block_size", 64.0),
        ("max_hessian_bytes", 0),
    ]:  # fmt: skip
        with pytest.raises(ValueError, match=f"{option} must be"):
            dkm_hf.gptq_snap(prepared, tiny_lm_batches(), **{option: value})
    assert all(torch.equal(p, weights[n]) for n, p in prepared.named_parameters())


def test_snap_rows_without_damping_falls_back_on_a_singular_gram_matrix():
    """damp=0 is GPTQ without damping; a rank-deficient H (fewer inputs than features) gets the fallback damping
    and every weight still lands on one of its row's values."""
    torch.manual_seed(0)
    x = torch.randn(3, 8)  # 3 samples, 8 features: rank 3
    rows, lut = torch.randn(5, 8), torch.randn(5, 4)
    indices = snap_rows(rows, lut, x.t() @ x, damp=0)
    assert indices.shape == (5, 8) and int(indices.min()) >= 0 and int(indices.max()) < 4
    full = torch.randn(64, 8)  # full rank: damp 0 runs undamped and differs from the damped result
    assert not torch.equal(snap_rows(rows, lut, full.t() @ full, damp=0), snap_rows(rows, lut, full.t() @ full, 1.0))


def test_gptq_snap_bfloat16_weights(tiny_dir):
    """A bf16 model keeps bf16 weights, each on a centroid as the LUT stores it (its hard weight is the weight)."""
    config = DKMConfig(**PER_ROW_2BIT)
    model = AUTO["llama"].from_pretrained(tiny_dir("llama"), dkm_config=config, dtype=torch.bfloat16)
    skipped = dkm_hf.gptq_snap(model, tiny_lm_batches())
    snapped = [(name, state) for name, state in dkm_hf.dkm_modules(model) if name not in skipped]
    assert len(snapped) == 7 * model.config.num_hidden_layers
    for name, state in snapped:
        assert state.weight.dtype == torch.bfloat16, name
        torch.testing.assert_close(state.hard_weight(), state.weight.detach(), rtol=0, atol=0)


def test_snap_rows_with_a_dead_feature_does_not_depend_on_the_inputs_scale():
    """A feature that never sees an input (H_jj = 0) used to count as 1.0 in the mean diagonal that sets the damping:
    with small inputs the damping swamped H (GPTQ's error 0.996 of nearest rounding at input scale 1e-4, 0.888 at 1).
    The choices must be the same at every scale, as they are without a dead feature."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 16, generator=g) @ torch.randn(16, 16, generator=g)
    x[:, 5] = 0.0
    rows, lut = torch.randn(8, 16, generator=g), torch.randn(8, 4, generator=g).sort(1).values
    # powers of two: every float operation scales exactly, so the choices may be compared exactly
    chosen = [_snap(rows, lut, (x * scale).t() @ (x * scale)) for scale in (1.0, 2.0**-7, 2.0**-13)]
    assert all(torch.equal(c, chosen[0]) for c in chosen[1:])
    assert not torch.equal(chosen[0], _nearest(rows, lut))  # the compensation did something


def test_snap_rows_refuses_a_gram_matrix_that_damping_cannot_fix():
    """A Gram matrix with NaN (inputs that overflowed) is refused with a ValueError that says so."""
    hessian = torch.eye(4)
    hessian[1, 2] = hessian[2, 1] = float("nan")
    with pytest.raises(ValueError, match="not positive definite"):
        snap_rows(torch.randn(3, 4), torch.randn(3, 2), hessian)


def test_gptq_grams_shared_by_layers_of_one_input(tiny_dir):
    """q / k / v and gate / up read one tensor: their Gram matrices are that tensor's X^T X, computed by hand."""
    from dkm_hf.surgery.gptq import _grams

    model = AUTO["llama"].from_pretrained(tiny_dir("llama"), dkm_config=DKMConfig(**PER_ROW_2BIT))
    states = dict(dkm_hf.dkm_modules(model))
    layer = "model.layers.0"
    names = [f"{layer}.self_attn.{p}_proj" for p in "qkvo"] + [f"{layer}.mlp.{p}_proj" for p in ("gate", "up", "down")]
    inputs = _dense_inputs(model, tiny_lm_batches(), names)
    for state in states.values():
        state.dkm_enabled = False
    model.eval()
    grams = _grams(model, [(n, states[n]) for n in names], tiny_lm_batches(), None, torch.device("cpu"))
    for name in names:
        x = inputs[name].float()
        torch.testing.assert_close(grams[name], x.t() @ x, rtol=1e-5, atol=1e-4)
    q, gate = grams[f"{layer}.self_attn.q_proj"], grams[f"{layer}.mlp.gate_proj"]
    assert torch.equal(grams[f"{layer}.self_attn.k_proj"], q) and torch.equal(grams[f"{layer}.self_attn.v_proj"], q)
    assert torch.equal(grams[f"{layer}.mlp.up_proj"], gate)
    assert grams[f"{layer}.self_attn.k_proj"].data_ptr() != q.data_ptr()  # each layer owns its matrix


def test_gptq_snap_reuses_the_hessians_it_is_given(tiny_dir):
    """A dict passed as `hessians` collects every snapped weight's Gram matrix; a second model of the same dense
    weights (another bit width) snapped with it runs no forward pass and gets what a pass of its own gives; a
    matrix of the wrong size is refused naming the weight, before anything changes."""
    path = tiny_dir("llama")
    calls = []

    def forward(model, batch):
        calls.append(1)
        model(**batch)

    hessians: dict[str, torch.Tensor] = {}
    first = AUTO["llama"].from_pretrained(path, dkm_config=DKMConfig(**PER_ROW_2BIT))
    skipped = dkm_hf.gptq_snap(first, tiny_lm_batches(), forward=forward, hessians=hessians)
    snapped = [name for name, _ in dkm_hf.dkm_modules(first) if name not in skipped]
    assert sorted(hessians) == sorted(snapped) and len(calls) == len(tiny_lm_batches())
    saved = {name: h.clone() for name, h in hessians.items()}
    config = DKMConfig(**{**PER_ROW_2BIT, "bits": 3})
    cached, fresh = (AUTO["llama"].from_pretrained(path, dkm_config=config) for _ in range(2))
    calls.clear()
    assert dkm_hf.gptq_snap(cached, tiny_lm_batches(), forward=forward, hessians=hessians) == skipped
    assert not calls and all(torch.equal(hessians[n], saved[n]) for n in saved)  # used, not consumed or changed
    dkm_hf.gptq_snap(fresh, tiny_lm_batches())
    ours, theirs = dict(dkm_hf.dkm_modules(cached)), dict(dkm_hf.dkm_modules(fresh))
    for name in snapped:
        torch.testing.assert_close(ours[name].weight, theirs[name].weight, rtol=0, atol=0)
    wrong = {**saved, snapped[0]: torch.eye(3)}
    weights = {n: p.detach().clone() for n, p in fresh.named_parameters()}
    with pytest.raises(ValueError, match=f"{snapped[0]}.*input features"):
        dkm_hf.gptq_snap(fresh, tiny_lm_batches(), hessians=wrong)
    with pytest.raises(ValueError, match=f"{snapped[0]}.*list"):
        dkm_hf.gptq_snap(fresh, tiny_lm_batches(), hessians={**saved, snapped[0]: [[1.0]]})
    with pytest.raises(ValueError, match=f"{snapped[0]}.*non-finite"):
        dkm_hf.gptq_snap(fresh, tiny_lm_batches(), hessians={**saved, snapped[0]: saved[snapped[0]] * float("nan")})
    with pytest.raises(ValueError, match="must be a dict"):
        dkm_hf.gptq_snap(fresh, tiny_lm_batches(), hessians=list(saved.values()))
    assert all(torch.equal(p, weights[n]) for n, p in fresh.named_parameters())


def test_gptq_grams_leave_padded_positions_out(tiny_dir):
    """A batch of sequences right-padded to one length with their attention_mask gives the Gram matrices of the
    same sequences fed one by one unpadded (the pad positions' hidden states were added to X^T X), and an empty
    list of batches is enough when every Gram matrix is given."""
    path = tiny_dir("llama")
    ids = tiny_lm_batches(1)[0]["input_ids"]
    lengths = [ids.shape[1], ids.shape[1] - 5]
    mask = torch.zeros_like(ids)
    for row, length in enumerate(lengths):
        mask[row, :length] = 1
    padded = [{"input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask}]
    alone = [{"input_ids": ids[row : row + 1, :length]} for row, length in enumerate(lengths)]
    grams = {}
    for batches in (padded, alone):
        model = AUTO["llama"].from_pretrained(path, dkm_config=DKMConfig(**PER_ROW_2BIT))
        grams[len(batches)] = hessians = {}
        dkm_hf.gptq_snap(model, batches, hessians=hessians)
    assert grams[1].keys() == grams[2].keys() and len(grams[1]) > 0
    for name, h in grams[2].items():  # float32 sums of 3-7 rows in another order
        torch.testing.assert_close(grams[1][name], h, rtol=1e-5, atol=1e-5 * h.diagonal().max().item())
    model = AUTO["llama"].from_pretrained(path, dkm_config=DKMConfig(**PER_ROW_2BIT))
    skipped = dkm_hf.gptq_snap(model, [], hessians=grams[2])
    assert len(skipped) + len(grams[2]) == len(dkm_hf.dkm_modules(model))
    with pytest.raises(ValueError, match="gave no batch"):
        dkm_hf.gptq_snap(model, [], hessians={})


def test_gptq_grams_skip_the_output_head_after_the_first_batch(tiny_dir):
    """The LM head (vocabulary x tokens logits) runs on the first calibration batch only, and the Gram matrices of
    the last decoder layer, which reads what comes before the head, are those of every batch."""
    from dkm_hf.surgery.gptq import _grams

    model = AUTO["llama"].from_pretrained(tiny_dir("llama"), dkm_config=DKMConfig(**PER_ROW_2BIT))
    states = dict(dkm_hf.dkm_modules(model))
    last = f"model.layers.{model.config.num_hidden_layers - 1}"
    names = [f"{last}.self_attn.{p}_proj" for p in "qkvo"] + [f"{last}.mlp.{p}_proj" for p in ("gate", "up", "down")]
    batches = tiny_lm_batches()
    assert len(batches) > 1
    inputs = _dense_inputs(model, batches, names)
    for state in states.values():
        state.dkm_enabled = False
    model.eval()
    head_runs = []
    model.get_output_embeddings().register_forward_hook(lambda *_: head_runs.append(1))
    grams = _grams(model, [(n, states[n]) for n in names], batches, None, torch.device("cpu"))
    assert len(head_runs) == 1
    for name in names:
        x = inputs[name].float()
        torch.testing.assert_close(grams[name], x.t() @ x, rtol=1e-5, atol=1e-4)


def test_gptq_grams_run_the_head_when_a_layer_follows_it():
    """A model whose `get_output_embeddings()` runs before one of the layers snapped keeps running it: that layer's
    inputs come after it; one whose `get_output_embeddings()` raises runs whole too."""
    from dkm_hf.surgery.gptq import _grams

    class HeadInTheMiddle(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.first, self.head, self.last = (torch.nn.Linear(64, 64) for _ in range(3))
            self.refuse = False

        def get_output_embeddings(self):
            if self.refuse:
                raise NotImplementedError
            return self.head

        def forward(self, x):
            return self.last(self.head(self.first(x)))

    torch.manual_seed(0)
    model = dkm_hf.prepare(HeadInTheMiddle(), DKMConfig(bits=2, weight_threshold=0, modules_to_not_convert=["head"]))
    states = dict(dkm_hf.dkm_modules(model))
    assert sorted(states) == ["first", "last"]
    batches = [{"x": torch.randn(5, 64)} for _ in range(3)]
    for state in states.values():
        state.dkm_enabled = False
    grams = _grams(model, [("last", states["last"])], batches, None, torch.device("cpu"))
    with torch.no_grad():
        x = torch.cat([model.head(model.first(b["x"])) for b in batches])
    torch.testing.assert_close(grams["last"], x.t() @ x, rtol=1e-5, atol=1e-4)
    model.refuse = True  # a model that cannot say which module is its head: every batch runs whole
    torch.testing.assert_close(_grams(model, [("last", states["last"])], batches, None, torch.device("cpu"))["last"],
                               grams["last"], rtol=0, atol=0)  # fmt: skip


@pytest.mark.parametrize("act_order", [False, True])
def test_layers_of_one_input_share_one_factorisation(tiny_dir, monkeypatch, act_order):
    """q / k / v and gate / up have equal Gram matrices: (H + damping)^-1 is factored once for each group (four
    factorisations a decoder layer instead of seven), and every choice is the one a factorisation per weight makes."""
    from dkm_hf.surgery import gptq

    config = DKMConfig(**PER_ROW_2BIT)
    models = [AUTO["llama"].from_pretrained(tiny_dir("llama"), dkm_config=config) for _ in range(2)]
    calls = []
    factor = gptq.inverse_factor
    monkeypatch.setattr(gptq, "inverse_factor", lambda *a: calls.append(a[0].shape) or factor(*a))
    dkm_hf.gptq_snap(models[0], tiny_lm_batches(), act_order=act_order)
    assert len(calls) == 4 * models[0].config.num_hidden_layers
    monkeypatch.setattr(gptq.torch, "equal", lambda a, b: False)  # no sharing: one factorisation per weight
    dkm_hf.gptq_snap(models[1], tiny_lm_batches(), act_order=act_order)
    assert len(calls) == 11 * models[0].config.num_hidden_layers
    monkeypatch.undo()
    for (name, a), (_, b) in zip(dkm_hf.dkm_modules(models[0]), dkm_hf.dkm_modules(models[1])):
        assert torch.equal(a.weight, b.weight), name


def test_gptq_grams_leave_padding_out_of_flattened_inputs():
    """Qwen2-MoE's shared expert reads the hidden states flattened to (batch * tokens, features): its Gram matrices
    leave the padded positions out too (before: relative difference 1.1-1.6 against the sequences fed alone)."""
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    def fresh():
        torch.manual_seed(0)
        config = Qwen2MoeConfig(
            vocab_size=99, hidden_size=32, intermediate_size=48, moe_intermediate_size=24,
            shared_expert_intermediate_size=48, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
            num_experts=4, num_experts_per_tok=2, pad_token_id=0, decoder_sparse_step=1, mlp_only_layers=[],
        )  # fmt: skip
        return dkm_hf.prepare(Qwen2MoeForCausalLM(config), DKMConfig(**PER_ROW_2BIT))

    ids = torch.randint(1, 99, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    padded = [{"input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask}]
    alone = [{"input_ids": ids[:1]}, {"input_ids": ids[1:, :4]}]
    grams = [{}, {}]
    for batches, hessians in zip((padded, alone), grams):
        dkm_hf.gptq_snap(fresh(), batches, hessians=hessians)
    shared = [name for name in grams[1] if "shared_expert" in name]
    assert len(shared) == 4
    skipped = dkm_hf.gptq_snap(fresh(), alone)  # the stacked experts, named for what they are
    assert skipped["model.layers.0.mlp.experts.gate_up_proj"] == "stacked experts (a LUT per expert and row)"
    for name in grams[1]:
        torch.testing.assert_close(grams[0][name], grams[1][name], rtol=1e-5, atol=1e-6)


def test_gptq_and_importance_restore_every_modules_mode_and_refuse_what_they_cannot_run(tiny_dir):
    """Each submodule's train / eval mode is put back (before: only the top module's); a model on the meta device
    is refused naming its weights, tuple batches without a function to run them are refused in one line, the
    importance pass runs under no_grad, and gptq_snap's write is one autograd sees (a forward awaiting backward)."""
    config = DKMConfig(**PER_ROW_2BIT)
    model = AUTO["llama"].from_pretrained(tiny_dir("llama"), dkm_config=config)
    model.train()
    model.model.layers[0].eval()
    with torch.no_grad():
        importance = dkm_hf.gradient_importance(model, tiny_lm_batches(2))
    assert all(bool(f.gt(0).any()) for f in importance.values())
    dkm_hf.gptq_snap(model, tiny_lm_batches(2))
    assert model.training and not model.model.layers[0].training and model.model.layers[1].training
    tuples = [tuple(b.values()) for b in tiny_lm_batches(2)]
    for call in (dkm_hf.gptq_snap, dkm_hf.gradient_importance):
        with pytest.raises(ValueError, match="batches must be dicts of model inputs, got a tuple"):
            call(model, tuples)
    loss = model(**tiny_lm_batches(1)[0]).loss  # a training forward, then the weights snapped before its backward
    dkm_hf.gptq_snap(model, tiny_lm_batches(2))
    with pytest.raises(RuntimeError, match="modified in place before backward"):
        loss.backward()
    meta = AUTO["llama"].from_pretrained(tiny_dir("llama"), dkm_config=config).to("meta")
    for call in (dkm_hf.gptq_snap, dkm_hf.gradient_importance):
        with pytest.raises(ValueError, match=r"needs the model's weights in memory; \['model.embed_tokens.weight'"):
            call(meta, tiny_lm_batches(2))


class _TiedLinears(nn.Module):
    """Two Linear layers sharing one weight, fed different inputs."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(16, 16, bias=False), nn.Linear(16, 16, bias=False)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.b(torch.relu(self.a(x)) * 3)


def test_the_source_of_a_tied_linear_pair_is_left_as_it_is():
    """GPTQ compensates for one layer's inputs; a weight that two layers share (as the source of the tie, not only
    its tied side) serves inputs of both, so it is reported and left unchanged."""
    torch.manual_seed(0)
    model = dkm_hf.prepare(_TiedLinears(), DKMConfig(**PER_ROW_2BIT))
    states = dict(dkm_hf.dkm_modules(model))
    assert states["b"].tied_source is states["a"]
    before = model.a.weight.detach().clone()
    x = torch.randn(32, 16)
    skipped = dkm_hf.gptq_snap(model, [x], forward=lambda m, batch: m(batch))
    assert skipped == {"a": "shares its LUT with another weight", "b": "shares its LUT with another weight"}
    assert torch.equal(model.a.weight.detach(), before)


def test_damping_is_raised_tenfold_up_to_three_times():
    """From damp=0: 1e-4, 1e-3 then 1e-2 of the mean diagonal before giving up. An H whose smallest eigenvalue is
    -0.5% of its mean diagonal needs the third raise."""
    hessian = torch.diag(torch.tensor([1.0, 1.0, 1.0, -0.005]))
    u, order = inverse_factor(hessian, damp=0)
    assert order is None and torch.isfinite(u).all()
    indices = snap_rows(torch.randn(3, 4), torch.randn(3, 2), hessian, damp=0)
    assert indices.shape == (3, 4)
    with pytest.raises(ValueError, match="not positive definite even with 0.01 x"):
        inverse_factor(torch.diag(torch.tensor([1.0, 1.0, 1.0, -0.05])), damp=0)
