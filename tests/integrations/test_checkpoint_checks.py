"""Palettized checkpoints: exact round trips, size on disk, validation errors, atomic and sharded saves."""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageClassification,
    BertConfig,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    ResNetConfig,
    ResNetForImageClassification,
)
from transformers.utils import logging

import dkm_hf
from dkm_hf import PalettizedCheckpointError
from dkm_hf.config import CheckpointRecord
from dkm_hf.integrations.checkpoint_checks import check_palettized_headers, check_save_id, checksum
from dkm_hf.integrations.safetensors_files import NameTable, SafetensorsHeader, TensorEntry, read_header, read_headers
from dkm_hf.integrations.summary import summarize
from dkm_hf.nn.layout import layouts_from_records
from dkm_hf.ops.packing import packed_size

logging.set_verbosity_error()
logging.disable_progress_bar()

GROUP_SIZE = 2  # divides every channel count of the tiny models below


def _bert():
    return BertModel(
        BertConfig(
            vocab_size=100,
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=32,
        )
    )


def _gpt2():
    return GPT2LMHeadModel(GPT2Config(vocab_size=100, n_embd=32, n_layer=1, n_head=4, n_positions=32))


def _resnet():
    config = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", num_labels=2)
    return ResNetForImageClassification(config)


# name -> (builder, Auto class, inputs, modules left dense because cluster_dim=2 does not divide their features)
ARCHS = {
    "bert": (_bert, AutoModel, lambda: {"input_ids": torch.randint(0, 100, (2, 9))}, None),
    "gpt2": (_gpt2, AutoModelForCausalLM, lambda: {"input_ids": torch.randint(0, 100, (2, 9))}, None),
    "resnet": (
        _resnet,
        AutoModelForImageClassification,
        lambda: {"pixel_values": torch.randn(2, 3, 32, 32)},
        ["resnet.embedder.embedder.convolution"],  # 3 x 7 x 7 = 147 features
    ),
}


def _output(model, inputs):
    out = model(**inputs)
    return out.logits if "logits" in out else out.last_hidden_state


@pytest.fixture(scope="module")
def dense_dirs(tmp_path_factory):
    dirs = {}
    for name, (build, *_rest) in ARCHS.items():
        torch.manual_seed(0)
        path = tmp_path_factory.mktemp(f"dense-{name}")
        build().save_pretrained(path)
        dirs[name] = path
    return dirs


def _palettized(dense_dir, arch, **config):
    _, auto, _, skip = ARCHS[arch]
    config = {"weight_threshold": 0, "modules_to_not_convert": skip, **config}
    model = auto.from_pretrained(dense_dir, dkm_config=dkm_hf.DKMConfig(**config))
    return dkm_hf.palettize(model)


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("granularity", ["per_tensor", "per_grouped_channel"])
@pytest.mark.parametrize("cluster_dim", [1, 2])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_round_trip_is_exact(dense_dirs, tmp_path, arch, granularity, cluster_dim, bits):
    group_size = GROUP_SIZE if granularity == "per_grouped_channel" else None
    model = _palettized(
        dense_dirs[arch], arch, bits=bits, cluster_dim=cluster_dim, granularity=granularity, group_size=group_size
    )
    inputs = ARCHS[arch][2]()
    with torch.no_grad():
        expected = _output(model, inputs)
    model.save_pretrained(tmp_path / "out")
    reloaded, info = ARCHS[arch][1].from_pretrained(tmp_path / "out", output_loading_info=True)
    assert all(not keys for keys in (info["missing_keys"], info["unexpected_keys"], info["mismatched_keys"]))
    with torch.no_grad():
        assert torch.equal(_output(reloaded.eval(), inputs), expected)
    modules = reloaded.config.quantization_config.record.modules
    layers = [r for r in modules.values() if "tied_to" not in r]
    assert layers and all(r["bits"] == bits and r["cluster_dim"] == cluster_dim for r in layers)
    if granularity == "per_grouped_channel":
        assert all(r["groups"] * GROUP_SIZE in r["shape"][:2] for r in layers)  # Conv1D: (in, out)
        assert max(r["groups"] for r in layers) >= 8
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        assert f.metadata()["dkm_format_version"] == "2"
        assert f.metadata()["dkm_save_id"] == reloaded.config.quantization_config.record.save_id
        assert not any(k.endswith(".weight") and k.removesuffix(".weight") in modules for k in f.keys())


@pytest.mark.parametrize(("bits", "cluster_dim"), [(2, 1), (3, 1), (4, 2), (3, 2), (8, 1)])
def test_size_on_disk_matches_information_content(tmp_path, bits, cluster_dim):
    torch.manual_seed(0)
    dense = tmp_path / "dense"
    BertModel(
        BertConfig(vocab_size=64, hidden_size=64, num_hidden_layers=1, num_attention_heads=4, intermediate_size=128)
    ).save_pretrained(dense)
    targets = ["intermediate.dense", "output.dense", "word_embeddings"]
    model = AutoModel.from_pretrained(
        dense, dkm_config=dkm_hf.DKMConfig(bits=bits, cluster_dim=cluster_dim, target_modules=targets)
    )
    dkm_hf.palettize(model).save_pretrained(tmp_path / "out")
    header = read_header(tmp_path / "out" / "model.safetensors").tensors
    modules = model.config.quantization_config.record.modules
    assert len(modules) == 4  # attention.output.dense matches output.dense too
    for name, record in modules.items():
        n = math.prod(record["shape"])
        lut = header[f"{name}.weight_lut"]
        assert lut.nbytes == 2**bits * cluster_dim * 2  # one fp16 LUT
        on_disk = lut.nbytes + header[f"{name}.weight_indices"].nbytes
        bound = n * bits / (8 * cluster_dim) + lut.nbytes
        assert header[f"{name}.weight_indices"].nbytes == packed_size(n // cluster_dim, bits)
        assert on_disk <= 1.02 * bound, (name, on_disk, bound)
    summary = summarize(tmp_path / "out")
    assert summary.clustered_bytes == sum(
        header[f"{n}.{s}"].nbytes for n in modules for s in ("weight_lut", "weight_indices")
    )
    assert (
        summary.total_bytes
        == os.path.getsize(tmp_path / "out" / "model.safetensors")
        - 8
        - struct.unpack("<Q", open(tmp_path / "out" / "model.safetensors", "rb").read(8))[0]
    )


# -- validation ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gpt2_checkpoint(dense_dirs, tmp_path_factory):
    """A GPT-2 checkpoint with per-channel scales (Conv1D stores (in, out)) and mixed bits, saved once."""
    model = _palettized(
        dense_dirs["gpt2"],
        "gpt2",
        bits=3,
        per_channel_scale=True,
        overrides={r".*mlp\.c_fc": {"bits": 4, "granularity": "per_grouped_channel", "group_size": 4}},
    )
    path = tmp_path_factory.mktemp("gpt2-pal")
    model.save_pretrained(path)
    return path, model


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _rewrite(path: Path, edit) -> None:
    tensors = load_file(path / "model.safetensors")
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        metadata = f.metadata()
    edit(tensors, metadata)
    save_file(tensors, path / "model.safetensors", metadata=metadata)


def _load(path):
    return AutoModelForCausalLM.from_pretrained(path)


CASES = {
    "lut shape": (
        lambda t, m: t.__setitem__("transformer.h.0.attn.c_proj.weight_lut", torch.zeros(1, 16, 1).half()),
        r"transformer\.h\.0\.attn\.c_proj\.weight_lut: shape \[1, 16, 1\], expected \[1, 8, 1\]",
    ),
    "lut dtype": (
        lambda t, m: t.__setitem__("transformer.wte.weight_lut", t["transformer.wte.weight_lut"].bfloat16()),
        r"transformer\.wte\.weight_lut: dtype BF16, expected F16",
    ),
    "indices dtype": (
        lambda t, m: t.__setitem__(
            "transformer.wpe.weight_indices", t["transformer.wpe.weight_indices"].to(torch.int8)
        ),
        r"transformer\.wpe\.weight_indices: dtype I8, packed indices must be U8",
    ),
    "indices short": (
        lambda t, m: t.__setitem__("transformer.wpe.weight_indices", t["transformer.wpe.weight_indices"][:-3].clone()),
        r"transformer\.wpe\.weight_indices: shape \[381\], expected \[384\]",
    ),
    "indices 2-D": (
        lambda t, m: t.__setitem__("transformer.wpe.weight_indices", t["transformer.wpe.weight_indices"].view(3, -1)),
        r"transformer\.wpe\.weight_indices: shape \[3, 128\], expected \[384\]",
    ),
    "scale as (in, 1) on Conv1D": (
        lambda t, m: t.__setitem__("transformer.h.0.attn.c_attn.weight_scale", torch.ones(32, 1).half()),
        r"transformer\.h\.0\.attn\.c_attn\.weight_scale: shape \[32, 1\], expected \[96, 1\]",
    ),
    "scale missing": (
        lambda t, m: t.pop("transformer.h.0.mlp.c_proj.weight_scale"),
        r"transformer\.h\.0\.mlp\.c_proj\.weight_scale: missing",
    ),
    "lut missing": (
        lambda t, m: t.pop("transformer.h.0.mlp.c_fc.weight_lut"),
        r"transformer\.h\.0\.mlp\.c_fc\.weight_lut: missing",
    ),
    "dense weight instead": (
        lambda t, m: t.__setitem__("transformer.h.0.attn.c_proj.weight", torch.zeros(32, 32)),
        r"transformer\.h\.0\.attn\.c_proj\.weight: palettized module .* not a dense weight",
    ),
    "stray lut": (
        lambda t, m: t.__setitem__("lm_head.weight_lut", torch.zeros(1, 8, 1).half()),
        r"lm_head\.weight_lut: a palettized buffer of a module that config\.json does not list",
    ),
    "format version": (
        lambda t, m: m.__setitem__("dkm_format_version", "3"),
        r"dkm_format_version='3': this dkm_hf reads versions 1 and 2 only",
    ),
    "no format version": (lambda t, m: m.pop("dkm_format_version"), r"no `dkm_format_version`"),
    # a version 1 file's checksums are optional: relabelling the files alone must not lift version 2's checks
    "format version relabelled": (
        lambda t, m: m.__setitem__("dkm_format_version", "1"),
        r"format_version 2 .* written as dkm_format_version='1'; dkm_hf writes the two alike",
    ),
    "nan lut": (
        lambda t, m: t["transformer.h.0.attn.c_attn.weight_lut"].view(-1).__setitem__(3, float("nan")),
        r"transformer\.h\.0\.attn\.c_attn\.weight_lut: 1 value\(s\) are NaN or infinite",
    ),
    "unclustered tensor of integers": (
        lambda t, m: t.__setitem__("transformer.ln_f.weight", t["transformer.ln_f.weight"].to(torch.int32)),
        r"transformer\.ln_f\.weight: dtype I32 in the checkpoint, the model has torch\.float32",
    ),
    "inf scale": (
        lambda t, m: t["transformer.wte.weight_scale"].view(-1).__setitem__(0, float("inf")),
        r"transformer\.wte\.weight_scale: 1 value\(s\) are NaN or infinite",
    ),
}


def test_names_are_found_with_or_without_the_base_prefix():
    table = NameTable({"bert.encoder.x.weight": 1, "pooler.dense.weight": 2, "a.head.w": 3, "b.head.w": 4, "w": 5})
    assert table.find("bert.encoder.x.weight") == 1
    assert table.find("encoder.x.weight") == 1  # the checkpoint has the base prefix, the key not
    assert table.find("bert.pooler.dense.weight") == 2  # the key has it, the checkpoint not
    assert table.find("head.w") is None  # two candidates
    assert table.find("coder.x.weight") is None  # whole dot-separated parts only
    assert table.find("model.w") == 5 and table.find("x") is None


@pytest.mark.parametrize("case", list(CASES))
def test_bad_checkpoint_is_refused_with_the_tensor_named(gpt2_checkpoint, tmp_path, case):
    edit, message = CASES[case]
    path = _copy(gpt2_checkpoint[0], tmp_path / "ckpt")
    _rewrite(path, edit)
    with pytest.raises(PalettizedCheckpointError, match=message):
        _load(path)


def _raw(path: Path) -> tuple[dict, bytes]:
    raw = (path / "model.safetensors").read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + length]), raw[8 + length :]


def _write_raw(path: Path, header: dict, data: bytes) -> None:
    blob = json.dumps(header).encode()
    (path / "model.safetensors").write_bytes(struct.pack("<Q", len(blob)) + blob + data)


def _drop_all_checksums(header, data, config):
    header["__metadata__"] = {k: v for k, v in header["__metadata__"].items() if not k.startswith("dkm_crc32:")}
    return data


def _drop_one_checksum_and_change_its_byte(header, data, config):
    name = "transformer.h.0.attn.c_proj.weight_lut"
    del header["__metadata__"][f"dkm_crc32:{name}"]
    at = header[name]["data_offsets"][0]
    return data[:at] + bytes([data[at] ^ 0x40]) + data[at + 1 :]


def _relabel_float16_as_bfloat16(header, data, config):
    """The same bytes read as bfloat16: every LUT and scale (and config.json's lut_dtype) relabelled."""
    for name, entry in header.items():
        if (
            name != "__metadata__"
            and entry["dtype"] == "F16"
            and name.rsplit(".", 1)[1] in ("weight_lut", "weight_scale")
        ):
            entry["dtype"] = "BF16"
    config["quantization_config"]["lut_dtype"] = "bfloat16"
    return data


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (_drop_all_checksums, r"transformer\.\S+\.weight_\w+: no `dkm_crc32:"),
        (_drop_one_checksum_and_change_its_byte, r"transformer\.h\.0\.attn\.c_proj\.weight_lut: no `dkm_crc32:"),
        (_relabel_float16_as_bfloat16, r"transformer\.\S+\.weight_(lut|scale): checksum \w+ does not match"),
    ],
)
def test_every_palettized_tensor_must_match_its_checksum_with_dtype_and_shape(
    gpt2_checkpoint, tmp_path, edit, message
):
    """Since format version 2 a checksum is required for every palettized tensor and covers its dtype and shape."""
    path = _copy(gpt2_checkpoint[0], tmp_path / "ckpt")
    header, data = _raw(path)
    config = json.loads((path / "config.json").read_text())
    _write_raw(path, header, edit(header, data, config))
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(PalettizedCheckpointError, match=message):
        _load(path)


def test_format_version_1_files_load_without_checksums(gpt2_checkpoint, tmp_path):
    """Files written by releases of format version 1 (no save id, optional checksums over the bytes) still load."""
    path = _copy(gpt2_checkpoint[0], tmp_path / "ckpt")
    header, data = _raw(path)
    metadata = header["__metadata__"]
    metadata.pop("dkm_save_id")
    metadata["dkm_format_version"] = "1"
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"]["format_version"] = 1
    config["quantization_config"].pop("save_id")
    (path / "config.json").write_text(json.dumps(config))
    model, x = gpt2_checkpoint[1], torch.randint(0, 100, (2, 7))
    for name in [k for k in metadata if k.startswith("dkm_crc32:")]:  # bytes-only checksums of version 1
        module, buffer = name.removeprefix("dkm_crc32:").rsplit(".", 1)
        metadata[name] = checksum(getattr(model.get_submodule(module), buffer), version=1)
    _write_raw(path, header, data)
    assert torch.equal(_logits(_load(path), x), _logits(model, x))
    _write_raw(path, header, _drop_all_checksums(header, data, config))
    assert torch.equal(_logits(_load(path), x), _logits(model, x))


def test_a_training_checkpoint_with_a_non_finite_clustered_weight_is_refused_by_name(dense_dirs, tmp_path):
    """Loaded with its centroids, a clustered weight skips k-means (which refuses NaN): a NaN in it loaded silently,
    the model in eval mode snapped it to a centroid, and the first training forward made its LUT all NaN."""
    model = AutoModelForCausalLM.from_pretrained(dense_dirs["gpt2"], dkm_config=dkm_hf.DKMConfig(bits=2))
    model.save_pretrained(tmp_path / "train")
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "train") is not None
    _rewrite(tmp_path / "train", lambda t, m: t["transformer.h.0.mlp.c_fc.weight"].view(-1).__setitem__(5, math.nan))
    with pytest.raises(
        PalettizedCheckpointError, match=r"^transformer\.h\.0\.mlp\.c_fc\.weight: 1 value\(s\) are NaN"
    ):
        AutoModelForCausalLM.from_pretrained(tmp_path / "train")


@pytest.mark.parametrize(
    ("edit", "error"),
    [
        (
            {"per_channel_scale": False},
            r"per-channel scales \(\['transformer\.wte\.weight_scale'.*trained with per_channel_scale=True",
        ),
        ({"bits": 2}, r"centroids: F32 of shape \[1, 8, 1\], expected a float tensor of shape \[1, 4, 1\]"),
    ],
    ids=["scales-of-a-config-without", "centroids-of-other-bits"],
)
def test_a_training_checkpoint_under_an_edited_config_is_refused_naming_the_state(dense_dirs, tmp_path, edit, error):
    """A training checkpoint's DKM state that its config.json no longer describes: per-channel scales of a config
    without them (they would be dropped and the weights trained unscaled), centroids of other bits (transformers'
    generic size mismatch otherwise)."""
    config = dkm_hf.DKMConfig(bits=3, weight_threshold=0, per_channel_scale=True)
    AutoModelForCausalLM.from_pretrained(dense_dirs["gpt2"], dkm_config=config).save_pretrained(tmp_path / "train")
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "train") is not None
    config = json.loads((tmp_path / "train" / "config.json").read_text())
    config["quantization_config"].update(edit)
    (tmp_path / "train" / "config.json").write_text(json.dumps(config))
    with pytest.raises(PalettizedCheckpointError, match=error):
        AutoModelForCausalLM.from_pretrained(tmp_path / "train")


def test_a_scale_of_a_module_config_json_declares_unscaled_is_refused(gpt2_checkpoint, tmp_path):
    """Palettized files with a per-channel scale for a module whose record in config.json was edited to
    per_channel_scale=False: the scale would be dropped and the weight decoded unscaled."""
    path = _copy(gpt2_checkpoint[0], tmp_path / "ckpt")
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"]["modules"]["transformer.h.0.attn.c_proj"]["per_channel_scale"] = False
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        PalettizedCheckpointError,
        match=r"c_proj\.weight_scale: module 'transformer\.h\.0\.attn\.c_proj' has per_channel_scale=False",
    ):
        _load(path)


def test_padding_bits_must_be_zero(tmp_path):
    """74 indices of 3 bits fill 9 blocks of 8 and 2 of a 10th: its last 18 bits are padding and must stay zero."""
    torch.manual_seed(0)
    BertModel(
        BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=37)
    ).save_pretrained(tmp_path / "dense")
    config = dkm_hf.DKMConfig(bits=3, cluster_dim=16, weight_threshold=0, target_modules=["intermediate.dense"])
    model = dkm_hf.palettize(AutoModel.from_pretrained(tmp_path / "dense", dkm_config=config))
    model.save_pretrained(tmp_path / "ok")
    key = "encoder.layer.0.intermediate.dense.weight_indices"
    assert load_file(tmp_path / "ok" / "model.safetensors")[key].numel() == packed_size(74, 3) == 30
    for bit in (0, 7):
        path = _copy(tmp_path / "ok", tmp_path / f"bad{bit}")
        _rewrite(path, lambda t, m: t[key].view(-1).__setitem__(-1, t[key][-1] | (1 << bit)))
        with pytest.raises(PalettizedCheckpointError, match=r"intermediate\.dense\.weight_indices: non-zero padding"):
            AutoModel.from_pretrained(path)
    x = torch.randint(0, 99, (1, 5))
    assert torch.equal(AutoModel.from_pretrained(tmp_path / "ok")(x).last_hidden_state, model(x).last_hidden_state)


def test_pickle_checkpoints_are_refused(gpt2_checkpoint, tmp_path):
    path = _copy(gpt2_checkpoint[0], tmp_path / "ckpt")
    torch.save(load_file(path / "model.safetensors"), path / "pytorch_model.bin")
    (path / "model.safetensors").unlink()
    with pytest.raises(PalettizedCheckpointError, match=r"pytorch_model\.bin: .*never unpickles"):
        _load(path)


@pytest.mark.parametrize("cut", [4, 100, -1])
def test_truncated_file_is_refused(gpt2_checkpoint, tmp_path, cut):
    path = _copy(gpt2_checkpoint[0], tmp_path / "ckpt")
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[:cut])
    with pytest.raises(PalettizedCheckpointError, match=r"model\.safetensors: .*truncated"):
        _load(path)


def test_unclustered_shapes_are_checked_against_the_model(gpt2_checkpoint, tmp_path):
    """With the meta-device model at hand, every other tensor's shape and kind is checked as well."""
    path = _copy(gpt2_checkpoint[0], tmp_path / "ckpt")
    _rewrite(path, lambda t, m: t.__setitem__("transformer.ln_f.bias", t["transformer.ln_f.bias"].view(4, 8)))
    config = gpt2_checkpoint[1].config
    with torch.device("meta"):
        meta = GPT2LMHeadModel(GPT2Config(**{k: v for k, v in config.to_dict().items() if k != "quantization_config"}))
    header = read_headers([str(path / "model.safetensors")])
    layouts = layouts_from_records(
        config.quantization_config.record.modules, lambda name: "attn" in name or "mlp" in name
    )
    check_palettized_headers(header, layouts, "float16")  # without the model it cannot tell
    with pytest.raises(PalettizedCheckpointError, match=r"transformer\.ln_f\.bias: shape \[4, 8\] in the checkpoint"):
        check_palettized_headers(header, layouts, "float16", meta)


def test_config_version_is_checked(gpt2_checkpoint, tmp_path):
    path = _copy(gpt2_checkpoint[0], tmp_path / "ckpt")
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"]["format_version"] = 7
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="format_version must be 1 or 2"):
        _load(path)


# -- saving ----------------------------------------------------------------------------------------------------------
def _logits(model, x):
    with torch.no_grad():
        return model(x).logits


def test_sharded_save_round_trips(gpt2_checkpoint, tmp_path):
    model = gpt2_checkpoint[1]
    model.save_pretrained(tmp_path / "sharded", max_shard_size="2KB")
    files = sorted(p.name for p in (tmp_path / "sharded").glob("model-*.safetensors"))
    assert len(files) >= 3
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == files
    x = torch.randint(0, 100, (2, 7))
    assert torch.equal(_logits(_load(tmp_path / "sharded"), x), _logits(model, x))
    assert summarize(tmp_path / "sharded").total_bytes == summarize(gpt2_checkpoint[0]).total_bytes
    # saving unsharded into the same directory leaves no stale shard behind
    model.save_pretrained(tmp_path / "sharded")
    assert sorted(p.name for p in (tmp_path / "sharded").iterdir()) == [
        "README.md",
        "config.json",
        "generation_config.json",
        "model.safetensors",
    ]
    assert torch.equal(_logits(_load(tmp_path / "sharded"), x), _logits(model, x))


def test_failed_save_leaves_the_old_checkpoint_intact(gpt2_checkpoint, dense_dirs, tmp_path, monkeypatch):
    import transformers.modeling_utils as modeling_utils

    old_model = gpt2_checkpoint[1]
    target = tmp_path / "out"
    old_model.save_pretrained(target, max_shard_size="2KB")
    (target / "tokenizer.json").write_text("{}")
    (target / "checkpoint-10").mkdir()
    (target / "checkpoint-10" / "trainer_state.json").write_text("{}")
    before = {p.name: p.read_bytes() for p in target.iterdir() if p.is_file()}
    new_model = _palettized(dense_dirs["gpt2"], "gpt2", bits=2)
    real_save, calls = modeling_utils.safe_save_file, []

    def failing_save(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:
            raise OSError("disk full")
        real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(modeling_utils, "safe_save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        new_model.save_pretrained(target, max_shard_size="2KB")
    assert len(calls) == 2
    assert {p.name: p.read_bytes() for p in target.iterdir() if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary directory left behind
    x = torch.randint(0, 100, (2, 7))
    assert torch.equal(_logits(_load(target), x), _logits(old_model, x))

    monkeypatch.setattr(modeling_utils, "safe_save_file", real_save)
    new_model.save_pretrained(target)
    assert (target / "tokenizer.json").read_text() == "{}"
    assert (target / "checkpoint-10" / "trainer_state.json").exists()
    assert not list(target.glob("model-*"))
    assert torch.equal(_logits(_load(target), x), _logits(new_model, x))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert "| 2 | 1 | 2 |" in (target / "README.md").read_text()  # the card describes the new checkpoint


def test_model_card_is_written_unless_one_exists(gpt2_checkpoint, tmp_path):
    model = gpt2_checkpoint[1]
    card = (gpt2_checkpoint[0] / "README.md").read_text()
    summary = summarize(gpt2_checkpoint[0])
    assert f"| palettized (this one) | {summary.total_bytes:,} |" in card
    assert f"{summary.dense_bytes(4) / summary.total_bytes:.2f}x smaller" in card
    assert "| 3 | 1 | 3 | per tensor | yes | 5 | 12,416 |" in card
    assert "| 4 | 1 | 4 | 32 groups | yes | 1 | 4,096 |" in card
    assert "pip install dkm_hf" in card and "import dkm_hf" in card
    assert "AutoModelForCausalLM.from_pretrained(" in card
    assert "Tied: `lm_head` (shares `transformer.wte`)" in card
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "README.md").write_text("my own card")
    model.save_pretrained(tmp_path / "mine")
    assert (tmp_path / "mine" / "README.md").read_text() == "my own card"


def test_dense_models_save_as_before(dense_dirs, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(dense_dirs["gpt2"])
    model.save_pretrained(tmp_path / "dense")
    assert sorted(p.name for p in (tmp_path / "dense").iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
    ]


def test_format_2_files_without_a_save_id_are_refused():
    """Since format version 2 every file carries the save id: files of version 2 without one (and a config.json
    without one either) were not written whole by dkm_hf; version 1 files load without."""
    tensors = {"w.weight_lut": TensorEntry("w.weight_lut", "F16", (1, 4, 1), 0, 8, "model.safetensors")}
    record = CheckpointRecord("palettized", 2, {}, None)
    header = SafetensorsHeader(tensors, {"dkm_format": "palettized", "dkm_format_version": "2"})
    with pytest.raises(PalettizedCheckpointError, match="no `dkm_save_id` in the safetensors metadata of a format 2"):
        check_save_id(header, record)
    check_save_id(SafetensorsHeader(tensors, {"dkm_format": "palettized", "dkm_format_version": "1"}), record)


def _palettized_and_prepared():
    import torch
    from torch import nn

    import dkm_hf
    from dkm_hf import DKMConfig

    torch.manual_seed(0)
    config = DKMConfig(bits=2, weight_threshold=0)
    prepared = dkm_hf.prepare(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4)), config)
    palettized = dkm_hf.palettize(dkm_hf.prepare(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4)), config))
    return palettized, prepared


def test_version_1_files_with_a_save_id_must_carry_every_checksum():
    """Files written with a save id carry a checksum for every palettized tensor, whatever their version says."""
    from dkm_hf.integrations.checkpoint_checks import check_loaded

    palettized, _ = _palettized_and_prepared()
    with pytest.raises(PalettizedCheckpointError, match=r"0\.weight_lut: no `dkm_crc32:0\.weight_lut`"):
        check_loaded(palettized, {"dkm_format_version": "1", "dkm_save_id": "x"})
    check_loaded(palettized, {"dkm_format_version": "1"})  # written before checksums and save ids


def test_training_checkpoint_centroids_must_be_float():
    from dkm_hf.integrations.checkpoint_checks import carries_training_state
    from dkm_hf.nn.dkm import dkm_modules
    from dkm_hf.surgery.convert import weight_layouts

    _, prepared = _palettized_and_prepared()
    layouts = weight_layouts(dkm_modules(prepared))

    def header(dtype):
        tensors = {
            f"{n}.centroids": TensorEntry(f"{n}.centroids", dtype, tuple(lay.lut_shape), 0, 0, "m")
            for n, lay in layouts.items()
        }
        return SafetensorsHeader(tensors, {"dkm_format": "train"})

    assert carries_training_state(header("F32"), layouts)
    with pytest.raises(PalettizedCheckpointError, match="expected a float tensor"):
        carries_training_state(header("I32"), layouts)
