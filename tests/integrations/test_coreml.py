"""Core ML export (`dkm_hf.export.to_coreml`, `dkm-hf export --coreml`): the saved program, read back, holds every
clustered weight as a `constexpr_lut_to_dense` op with dkm_hf's own LUT and indices, decoding exactly to the module's
weight, and no clustered weight as a float constant. Core ML cannot predict on Linux, so the program is decoded here,
independently of coremltools' own decoding."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import TINY, tiny_inputs, tiny_model
from torch import nn
from transformers.utils import logging

import dkm_hf
from dkm_hf import DKMConfig
from dkm_hf.cli import main
from dkm_hf.export import to_coreml
from dkm_hf.integrations.coreml import METADATA_KEY
from dkm_hf.ops.packing import unpack_indices

ct = pytest.importorskip("coremltools")
from coremltools.converters.mil.frontend.milproto.load import load as load_program  # noqa: E402
from coremltools.optimize._utils import restore_elements_from_packed_bits  # noqa: E402

logging.set_verbosity_error()
logging.disable_progress_bar()
# torch.export's pytree in coremltools' conversion path (torch 2.13 is newer than coremltools 9.0 tested)
pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning")


def palettized(name: str, **config) -> nn.Module:
    model = tiny_model(name).eval()
    dkm_hf.prepare(model, dkm_hf.DKMConfig(weight_threshold=256, **config))
    return dkm_hf.palettize(model)


def read_back(path):
    """The saved package's MIL program (as Core ML would load it), its ops by name and dkm_hf's module -> op map."""
    mlmodel = ct.models.MLModel(str(path), skip_model_load=True)
    spec = mlmodel.get_spec()
    program = load_program(spec, spec.specificationVersion, mlmodel.weights_dir)
    ops = list(program.functions["main"].operations)
    return ops, {op.name: op for op in ops}, json.loads(mlmodel.user_defined_metadata[METADATA_KEY])


def value(var) -> np.ndarray:
    """A constant or a constexpr_blockwise_shift_scale of constants, in float64 (exact for fp16/fp32 products)."""
    op = var.op
    if op.op_type == "constexpr_blockwise_shift_scale":
        data, scale = value(op.data), op.scale.val.astype(np.float64)
        for axis, (n, m) in enumerate(zip(data.shape, scale.shape)):
            scale = np.repeat(scale, n // m, axis=axis)
        assert op.offset is None or not np.any(op.offset.val)
        return data * scale
    assert op.op_type == "const", op.op_type
    return np.asarray(var.val).astype(np.float64)


def decode(op) -> tuple[np.ndarray, np.ndarray]:
    """The dense weight a constexpr_lut_to_dense op (and a scale op after it) holds, and its indices."""
    lut = value(op.lut)
    if op.lut.rank == 1:  # the iOS16 op: one LUT, packed indices
        nbits = int(np.log2(lut.shape[0]))
        shape = tuple(op.shape.val)
        indices = restore_elements_from_packed_bits(op.indices.val, nbits, int(np.prod(shape))).reshape(shape)
        return lut[indices], indices
    indices, d = op.indices.val.astype(np.int64), lut.shape[-1]
    grid = np.indices(indices.shape)
    groups = tuple(g // (indices.shape[i] // lut.shape[i]) for i, g in enumerate(grid))
    vectors = lut[groups + (indices,)]  # indices.shape + (d,)
    if d > 1:
        axis = int(op.vector_axis.val)
        vectors = np.moveaxis(vectors, -1, axis + 1)
        shape = list(indices.shape)
        shape[axis] *= d
        vectors = vectors.reshape(shape)
    else:
        vectors = vectors[..., 0]
    children = op.outputs[0].child_ops
    if len(children) == 1 and children[0].op_type == "constexpr_blockwise_shift_scale":  # iOS26 order
        scale = children[0].scale.val.astype(np.float64)
        for axis, (n, m) in enumerate(zip(vectors.shape, scale.shape)):
            scale = np.repeat(scale, n // m, axis=axis)
        vectors = vectors * scale
    return vectors, indices


def own_indices(module) -> np.ndarray:
    lay = module.layout
    rows = unpack_indices(module.weight_indices, lay.bits, lay.vectors).view(lay.channels, -1).numpy()
    return rows.T if lay.transposed else rows


def check_package(model, path, index_bits=(1, 2, 3, 4, 6, 8)) -> dict:
    """Every palettized module: its op decodes exactly to its weight and holds its own indices (in the narrowest
    index type Core ML has, the LUT padded); no float copy of a clustered weight."""
    ops, by_name, mapping = read_back(path)
    modules = dkm_hf.palettized_modules(model)
    assert sorted(mapping) == sorted(n for n, _ in modules)
    for name, module in modules:
        op = by_name[mapping[name]]
        assert op.op_type == "constexpr_lut_to_dense"
        entries = op.lut.shape[-2] if op.lut.rank > 1 else op.lut.shape[0]
        assert entries == 2 ** min(b for b in index_bits if b >= module.layout.bits), name
        dense, indices = decode(op)
        weight = module.weight.detach().double().numpy()
        assert dense.shape == weight.shape, name
        assert np.array_equal(dense, weight), name
        source = module.tied_source or module
        assert np.array_equal(indices.reshape(own_indices(source).shape), own_indices(source)), name
    # no float constant made only of a clustered weight's values: a copy, or a part folded by coremltools
    values = [np.unique(m.weight.detach().half().float().numpy()) for _, m in modules]
    floats = [  # the constants a layer reads at run time (not the LUTs and scales of constexpr ops)
        np.asarray(op.outputs[0].val)
        for op in ops
        if op.op_type == "const" and any(not c.op_type.startswith("constexpr") for c in op.outputs[0].child_ops)
    ]
    copies = [
        v.shape
        for v in floats
        if v.dtype.kind == "f" and v.size >= 64 and len(np.unique(v)) > 1 and any(np.isin(v, u).all() for u in values)
    ]
    assert copies == []
    lut_ops = [op for op in ops if op.op_type == "constexpr_lut_to_dense"]
    assert len(lut_ops) == len({mapping[n] for n, _ in modules})
    return {"lut_ops": len(lut_ops), "ops": {op.op_type for op in ops}}


CASES = {
    "bert-per-tensor-4bit-5bit-embeddings": ("bert", {"overrides": {r".*embeddings.*": {"bits": 5}}}),
    "bert-per-row-3bit-bf16-fp32-precision": (
        "bert",
        {"bits": 3, "granularity": "per_grouped_channel", "group_size": 1, "lut_dtype": "bfloat16"},
    ),
    "llama-tied-grouped-vectors": (
        "llama",
        {
            "granularity": "per_grouped_channel",
            "group_size": 16,
            "cluster_dim": 2,
            "overrides": {r".*embed_tokens": {"granularity": "per_tensor", "group_size": None}},
        },
    ),
    "gpt2-conv1d-transposed-grouped-vectors-scales": (  # transformers' Conv1D stores its weight (in, out)
        "gpt2",
        {
            "bits": 3,
            "per_channel_scale": True,
            "cluster_dim": 2,
            "granularity": "per_grouped_channel",
            "group_size": 32,
            "overrides": {r".*wte": {"granularity": "per_tensor", "group_size": None}},
        },
    ),
    "mobilenet-scales-depthwise-vectors": (
        "mobilenet_v2",
        {"bits": 2, "per_channel_scale": True, "overrides": {r".*conv_3x3.*": {"cluster_dim": 3}}},
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_export_holds_own_luts_and_indices(case, tmp_path):
    family, config = CASES[case]
    model = palettized(family, **config)
    path = tmp_path / "model.mlpackage"
    options = {"compute_precision": ct.precision.FLOAT32} if config.get("lut_dtype") == "bfloat16" else {}
    mlmodel = to_coreml(model, tiny_inputs(family, 1), path, **options)
    assert isinstance(mlmodel, ct.models.MLModel) and path.is_dir()
    found = check_package(model, path)
    owners = [m for _, m in dkm_hf.palettized_modules(model) if m.tied_source is None]
    assert found["lut_ops"] == len(owners)
    if family in ("llama", "gpt2"):  # the tie is one op both the embedding gather and the lm_head matmul read
        _, _, mapping = read_back(path)
        assert mapping["lm_head"] == mapping["model.embed_tokens" if family == "llama" else "transformer.wte"]
        assert len(dkm_hf.palettized_modules(model)) == len(owners) + 1
    if config.get("per_channel_scale"):
        assert "constexpr_blockwise_shift_scale" in found["ops"]


def test_ios17_per_tensor_uses_the_ios16_op_from_a_directory(tmp_path):
    model = palettized("bert", bits=3)
    model.save_pretrained(tmp_path / "palettized")
    path = tmp_path / "model.mlpackage"
    to_coreml(tmp_path / "palettized", tiny_inputs("bert", 1), path, minimum_deployment_target="iOS17")
    ops, by_name, mapping = read_back(path)
    assert all(by_name[op].lut.rank == 1 for op in mapping.values())
    check_package(model, path, index_bits=(1, 2, 4, 6, 8))  # 3 bits stored as 4


@pytest.mark.parametrize(
    "family, config, target, message",
    [
        ("llama", CASES["llama-tied-grouped-vectors"][1], "iOS17", "model.layers.0.self_attn.q_proj: 2 LUT groups"),
        ("bert", {"per_channel_scale": True}, "iOS16", "bert.embeddings.word_embeddings: per-channel scales"),
        ("bert", {}, "iOS15", "need iOS16 / macOS13"),
        ("bert", {}, "iOS99", "unknown Core ML deployment target 'iOS99'"),
    ],
)
def test_unsupported_layout_or_target_names_the_module(family, config, target, message):
    model = palettized(family, **config)
    with pytest.raises(ValueError, match=message.replace(".", r"\.").replace("(", r"\(")):
        to_coreml(model, tiny_inputs(family, 1), "unused.mlpackage", minimum_deployment_target=target)


def test_wide_luts_under_fp16_precision_warn():
    model = palettized("bert", lut_dtype="float32")
    with pytest.warns(UserWarning, match=r"float32 / bfloat16 LUTs: Core ML's fp16 compute precision stores them"):
        with pytest.raises(ValueError, match=r"example_inputs\['input_ids'\] must be a torch.Tensor, got list"):
            to_coreml(model, {"input_ids": [1, 2]}, "unused.mlpackage")


def test_vectors_across_kernel_axes_are_refused():
    model = nn.Sequential(nn.Conv2d(4, 8, 3))
    dkm_hf.prepare(model, dkm_hf.DKMConfig(cluster_dim=2, weight_threshold=0))
    dkm_hf.palettize(model)
    with pytest.raises(ValueError, match=r"0: its cluster_dim=2 vectors cross an axis of its weight \(8, 4, 3, 3\)"):
        to_coreml(model, {"input": torch.randn(1, 4, 8, 8)}, "unused.mlpackage")


def test_not_palettized_models_are_refused():
    cls, make_config = TINY["bert"]
    with pytest.raises(ValueError, match="no palettized modules"):
        to_coreml(cls(make_config()), tiny_inputs("bert", 1), "unused.mlpackage")
    model = cls(make_config())
    dkm_hf.prepare(model, dkm_hf.DKMConfig(weight_threshold=256))
    with pytest.raises(ValueError, match="palettize"):
        to_coreml(model, tiny_inputs("bert", 1), "unused.mlpackage")


def test_cli_exports_a_checkpoint_directory(tmp_path, capsys):
    model = palettized("bert")
    model.save_pretrained(tmp_path / "palettized")
    out = tmp_path / "out.mlpackage"
    capsys.readouterr()
    assert (
        main(["export", "--coreml", str(tmp_path / "palettized"), str(out), "--example-shape", "input_ids=1x9"]) == 0
    )
    printed = capsys.readouterr().out
    assert "constexpr_lut_to_dense" in printed and str(out) in printed
    check_package(model, out)


@pytest.mark.parametrize(
    "args, message",
    [
        (["export", "{dir}", "{out}"], "choose the format: --coreml"),
        (["export", "--coreml", "{dir}", "{out}", "--example-shape", "input_ids=1xa"], "--example-shape"),
        (["export", "--coreml", "{dense}", "{out}"], "not a palettized dkm_hf checkpoint"),
        (["export", "--coreml", "{dir}", "{out}", "--target", "iOS99"], "unknown Core ML deployment target"),
        (["export", "--coreml", "{dir}", "{out}.zip"], "saved as an .mlpackage directory"),
        (
            ["export", "--coreml", "{dir}", "{out}", "--example-shape", "input_ids=1x100000000"],
            "input_ids=1x100000000: 100000000 tokens, more than the model's max_position_embeddings (512)",
        ),
        (
            [
                "export",
                "--coreml",
                "{dir}",
                "{out}",
                "--example-shape",
                "input_ids=1x9",
                "--example-shape",
                "attention_mask=1x5",
            ],
            "cannot run on the example inputs (input_ids=1x9, attention_mask=1x5)",
        ),
    ],
)
def test_cli_bad_input_exits_2_with_one_line(args, message, tiny_dir, tmp_path, capsys):
    palettized("bert").save_pretrained(tmp_path / "palettized")
    names = {"dir": str(tmp_path / "palettized"), "out": str(tmp_path / "o.mlpackage"), "dense": tiny_dir("bert")}
    capsys.readouterr()
    assert main([a.format(**names) for a in args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and err.startswith("dkm-hf export:")
    assert not (tmp_path / "o.mlpackage").exists()


@pytest.mark.parametrize(
    "layout",
    [{"granularity": "per_grouped_channel", "group_size": 1}, {"per_channel_scale": True}],
    ids=["luts-per-row", "per-channel-scales"],
)
def test_stacked_experts_with_luts_per_row_are_refused_by_name(layout):
    """Mixtral's experts with a LUT per row (or per-channel scales: a ViT's (1, n, d) position embedding too) passed
    the layout check and failed inside coremltools ('indices' not divisible by 'lut', no weight named): refused
    before conversion, naming them."""
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    config = MixtralConfig(
        vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
    )  # fmt: skip
    dkm = dkm_hf.DKMConfig(bits=4, weight_threshold=0, **layout)
    model = dkm_hf.palettize(dkm_hf.prepare(MixtralForCausalLM(config), dkm))
    with pytest.raises(ValueError, match=r"mlp.experts.gate_up_proj: a weight of 2 channel axes \(4, 128, 32\)"):
        to_coreml(model, {"input_ids": torch.ones(1, 8, dtype=torch.long)}, "unused.mlpackage")


def test_cli_checks_the_example_shapes_before_loading_the_model(tmp_path, capsys, monkeypatch):
    """The model loaded before its config refused the shape: transformers' loading bar went to stderr with the one
    line the CLI promises (3 lines), and the load cost its time for nothing."""
    from dkm_hf import cli

    palettized("bert").save_pretrained(tmp_path / "palettized")
    loaded = []
    monkeypatch.setattr(cli, "load_palettized", lambda path: loaded.append(path))
    capsys.readouterr()
    args = ["export", "--coreml", str(tmp_path / "palettized"), str(tmp_path / "o.mlpackage")]
    assert main([*args, "--example-shape", "input_ids=1x100000"]) == 2
    assert loaded == [] and "more than the model's max_position_embeddings" in capsys.readouterr().err


def test_export_replaces_a_package_but_never_another_directory(tmp_path):
    """coremltools deletes whatever is at the path it saves to: a folder of the user's that is not a Core ML package
    is refused (before: emptied, the checkpoint inside it too); a package is replaced once the new one is whole."""
    model = palettized("bert", bits=3)
    folder = tmp_path / "work.mlpackage"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="exists and is not a Core ML package"):
        to_coreml(model, tiny_inputs("bert", 1), folder)
    assert (folder / "notes.txt").read_text() == "mine"
    path = tmp_path / "model.mlpackage"
    path.mkdir()  # an empty directory: nothing to lose
    for _ in range(2):
        to_coreml(model, tiny_inputs("bert", 1), path)
        check_package(model, path)
    (tmp_path / "link.mlpackage").symlink_to(path)  # a link: the package it names is replaced, nothing left beside
    to_coreml(model, tiny_inputs("bert", 1), tmp_path / "link.mlpackage")
    check_package(model, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.mlpackage", "model.mlpackage", "work.mlpackage"]


# Behaviours of dkm_hf/integrations/coreml.py no other test pinned (a mutation review)


def _coreml_model(**config):
    pytest.importorskip("coremltools")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    return dkm_hf.palettize(dkm_hf.prepare(model, DKMConfig(bits=2, weight_threshold=0, **config)))


def test_wide_luts_do_not_warn_under_float32_compute_precision(tmp_path):
    """The fp16-precision warning for float32 LUTs is the advice to pass compute_precision=FLOAT32; once passed,
    nothing is said."""
    import warnings

    import coremltools as ct

    from dkm_hf.integrations.coreml import to_coreml

    model = _coreml_model(lut_dtype="float32")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match="example_inputs must be a non-empty dict"):
            to_coreml(model, {}, str(tmp_path / "m.mlpackage"), compute_precision=ct.precision.FLOAT32)
    with pytest.warns(UserWarning, match="float32 / bfloat16 LUTs"):
        with pytest.raises(ValueError, match="example_inputs must be a non-empty dict"):
            to_coreml(model, {}, str(tmp_path / "m.mlpackage"))


def test_coreml_export_refuses_16_bit_parameters(tmp_path):
    """A bf16 model (its biases bf16) is refused before torch.export, naming model.float()."""
    from dkm_hf.integrations.coreml import to_coreml

    model = _coreml_model().to(torch.bfloat16)
    with pytest.raises(ValueError, match=r"Core ML export needs float32 parameters \(model.float\(\)\)"):
        to_coreml(model, {"input": torch.randn(1, 16)}, str(tmp_path / "m.mlpackage"))


def test_coreml_export_gives_the_model_back_in_its_training_mode(tmp_path):
    """The export runs the model in eval mode and gives it back in training mode, here after an export that failed in
    torch.export."""
    from dkm_hf.integrations.coreml import to_coreml

    model = _coreml_model().train()
    with pytest.raises(Exception):  # noqa: B017 - whatever torch.export raises for an input of the wrong width
        to_coreml(model, {"input": torch.randn(1, 7)}, str(tmp_path / "m.mlpackage"))
    assert model.training and all(m.training for m in model.modules())


def test_coreml_export_of_a_dkm_training_model_says_to_palettize_it(tmp_path):
    """A DKM training model is refused as such (the message without palettized modules also says "palettize")."""
    from dkm_hf.integrations.coreml import to_coreml

    pytest.importorskip("coremltools")
    model = dkm_hf.prepare(nn.Sequential(nn.Linear(16, 4)), DKMConfig(bits=2, weight_threshold=0))
    with pytest.raises(ValueError, match=r"still holds DKM \(training\) modules; dkm_hf.palettize\(model\) it first"):
        to_coreml(model, {"input": torch.randn(1, 16)}, str(tmp_path / "m.mlpackage"))


def test_coreml_example_inputs_the_forward_does_not_take_are_refused_by_name(tmp_path):
    """An example input the forward has no parameter for is refused by name, not left to fail inside torch.export."""
    from dkm_hf.integrations.coreml import to_coreml

    model = _coreml_model()
    with pytest.raises(ValueError, match=r"example_inputs\['input_ids'\]: Sequential.forward takes no 'input_ids'"):
        to_coreml(model, {"input_ids": torch.randn(1, 16)}, str(tmp_path / "m.mlpackage"))
