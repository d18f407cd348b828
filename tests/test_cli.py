"""`dkm-hf inspect` and `dkm-hf plot` on a saved palettized checkpoint."""

from __future__ import annotations

import json
import re
import struct
import time
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel
from transformers.utils import logging

import dkm_hf
from dkm_hf.cli import main
from dkm_hf.integrations.safetensors_files import checkpoint_files, read_header

logging.set_verbosity_error()
logging.disable_progress_bar()


def _data_bytes(path) -> int:
    blob = path.read_bytes()
    return len(blob) - 8 - struct.unpack("<Q", blob[:8])[0]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    dense = tmp_path_factory.mktemp("dense")
    GPT2LMHeadModel(GPT2Config(vocab_size=100, n_embd=32, n_layer=1, n_head=4, n_positions=32)).save_pretrained(dense)
    config = dkm_hf.DKMConfig(
        bits=3,
        weight_threshold=0,
        per_channel_scale=True,
        overrides={
            r".*mlp\.c_fc": {"bits": 2, "cluster_dim": 2, "granularity": "per_grouped_channel", "group_size": 8}
        },
    )
    model = dkm_hf.palettize(AutoModelForCausalLM.from_pretrained(dense, dkm_config=config))
    out = tmp_path_factory.mktemp("palettized")
    model.save_pretrained(out)
    return out, dense


def test_console_script_is_declared():
    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "dkm-hf"]
    assert script.value == "dkm_hf.cli:main"


def test_inspect_prints_layers_and_totals(checkpoint, capsys):
    out, dense = checkpoint
    assert main(["inspect", str(out), "--json"]) == 0
    text = capsys.readouterr().out
    header = read_header(out / "model.safetensors").tensors
    rows = {line.split(" | ")[0].strip("| "): line for line in text.splitlines() if line.startswith("| transformer")}
    assert len(rows) == 6
    c_fc = rows["transformer.h.0.mlp.c_fc"].split(" | ")
    assert c_fc[1:6] == ["32x128", "2", "2", "grouped (16 LUTs)", "yes"]
    assert int(c_fc[6]) <= 16 * 4  # at most 2**bits distinct vectors per LUT
    expected = sum(
        header[f"transformer.h.0.mlp.c_fc.{s}"].nbytes for s in ("weight_lut", "weight_indices", "weight_scale")
    )
    assert c_fc[7] == f"{expected:,}"
    wpe = rows["transformer.wpe"].split(" | ")
    assert wpe[1:7] == ["32x32", "3", "1", "per_tensor", "yes", "8"]
    assert re.search(r"\| lm_head \| 100x32 \| +\| +\| tied to transformer\.wte \|", text)
    totals = json.loads(text.strip().splitlines()[-1])
    # every byte of the file's data section is accounted for, and the fp32 figure is the dense checkpoint's size
    assert totals["checkpoint_bytes"] == _data_bytes(out / "model.safetensors")
    assert totals["dense_fp32_bytes"] == _data_bytes(dense / "model.safetensors")
    assert totals["dense_fp16_bytes"] * 2 == totals["dense_fp32_bytes"]
    ratio = totals["dense_fp32_bytes"] / totals["checkpoint_bytes"]
    assert ratio > 5
    assert f"compression {ratio:.2f}x" in text
    assert f"checkpoint: {totals['checkpoint_bytes']:,} bytes" in text
    assert f"{(out / 'model.safetensors').stat().st_size:,} bytes with their headers" in text


def test_inspect_refuses_a_dense_checkpoint(checkpoint, capsys):
    assert main(["inspect", str(checkpoint[1])]) == 2
    assert "does not describe a dkm_hf palettized checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize("chunk", [8, 24, 2**22])
def test_entry_counts_read_in_chunks_match_the_whole_indices(checkpoint, monkeypatch, chunk):
    """`dkm-hf inspect` counts the LUT entries a layer uses a chunk of indices at a time (it unpacked a layer's
    indices whole as int64, then gathered and sorted a value per weight: gigabytes for a checkpoint of megabytes);
    chunks that end inside a LUT group count as the whole."""
    from dkm_hf import cli
    from dkm_hf.ops.packing import unpack_indices

    monkeypatch.setattr(cli, "INDEX_CHUNK", chunk)
    summary = cli.load_summary(str(checkpoint[0]))
    for name, layout in summary.layouts.items():
        if layout.tied_to is not None:
            continue
        packed = cli._tensor(summary, name, "weight_indices")
        index = unpack_indices(packed, layout.bits, layout.vectors).view(layout.groups, -1)
        keys = torch.arange(layout.groups).unsqueeze(1) * 2**layout.bits + index
        expected = torch.bincount(keys.reshape(-1), minlength=layout.groups * 2**layout.bits)
        assert torch.equal(cli.entry_counts(summary, name), expected)
        lut = cli._tensor(summary, name, "weight_lut")
        values = lut[torch.arange(layout.groups).unsqueeze(1), index].reshape(-1, layout.cluster_dim)
        assert cli.distinct_values(summary, name) == torch.unique(values, dim=0).shape[0]


@pytest.mark.parametrize("with_original", [True, False])
def test_plot_writes_a_png(checkpoint, tmp_path, capsys, with_original):
    out, dense = checkpoint
    png = tmp_path / "plots" / "hist.png"
    args = ["plot", str(out), "--out", str(png), "--layers", r"h\.0\.(attn\.c_attn|mlp)"]
    assert main(args + (["--original", str(dense)] if with_original else [])) == 0
    assert "(3 layer(s))" in capsys.readouterr().out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(png) as image:
        width, height = image.size
        assert width > 300 and height > 200
        assert len(set(image.convert("L").getdata())) > 10  # something is drawn


def test_plot_writes_the_file_it_names(checkpoint, tmp_path, capsys):
    """An --out without a suffix is written under that name, a PNG (matplotlib wrote `hist.png` while the command
    printed `wrote hist`)."""
    assert main(["plot", str(checkpoint[0]), "--out", str(tmp_path / "hist"), "--layers", r"h\.0\.mlp"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hist"] and "wrote " + str(tmp_path / "hist") in (
        capsys.readouterr().out
    )
    assert (tmp_path / "hist").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_with_no_matching_layer_fails_cleanly(checkpoint, tmp_path, capsys):
    assert main(["plot", str(checkpoint[0]), "--out", str(tmp_path / "x.png"), "--layers", "nope"]) == 2
    assert "no palettized layer matches 'nope'" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def _damage(src, tmp_path, edit_config=None, edit_tensors=None, index=None):
    """A copy of the checkpoint with config.json, the tensors or a shard index changed."""
    import shutil

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    path = tmp_path / "damaged"
    shutil.copytree(src, path)
    if edit_config is not None:
        config = json.loads((path / "config.json").read_text())
        edit_config(config["quantization_config"])
        (path / "config.json").write_text(json.dumps(config))
    if edit_tensors is not None:
        with safe_open(str(path / "model.safetensors"), "pt") as f:
            metadata = f.metadata()
        tensors = load_file(path / "model.safetensors")
        edit_tensors(tensors, metadata)
        save_file(tensors, path / "model.safetensors", metadata)
    if index is not None:
        (path / "model.safetensors.index.json").write_text(index)
        (path / "model.safetensors").rename(path / "model-00001-of-00001.safetensors")
    return path


LUT = "transformer.h.0.attn.c_proj.weight_lut"
BAD_INPUTS = {
    "index without weight_map": ({"index": json.dumps({"metadata": {}})}, "not a valid shard index"),
    "index not json": ({"index": "{oops"}, "not a valid shard index"),
    "index naming a file with a NUL byte": (
        {"index": json.dumps({"weight_map": {LUT: "model\u0000.safetensors"}})},
        r"model\.safetensors\.index\.json: weight_map values must be file names, got 'model\\x00\.safetensors'",
    ),
    "tied_to a list": (
        {"edit_config": lambda q: q["modules"].__setitem__("lm_head", {"tied_to": ["transformer.wte"]})},
        "malformed tie record",
    ),
    "tied_to unknown": (
        {"edit_config": lambda q: q["modules"].__setitem__("lm_head", {"tied_to": "nope"})},
        "is tied to 'nope'",
    ),
    "missing LUT": ({"edit_tensors": lambda t, m: t.pop(LUT)}, "weight_lut: missing"),
    "groups mismatch": (
        {"edit_config": lambda q: q["modules"]["transformer.h.0.attn.c_proj"].__setitem__("groups", 2)},
        r"weight_lut: shape \[1, 8, 1\], expected \[2, 8, 1\]",
    ),
    "bits not an int": (
        {"edit_config": lambda q: q["modules"]["transformer.h.0.attn.c_proj"].__setitem__("bits", "3")},
        "needs a positive integer 'bits'",
    ),
    "no config": ({"edit_config": lambda q: q.clear()}, "does not describe a dkm_hf palettized checkpoint"),
    "a newer format": (  # from_pretrained refuses it; inspect printed every layer "ok"
        {"edit_config": lambda q: q.__setitem__("format_version", 99)},
        "format_version must be 1 or 2 .* upgrade dkm_hf",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
@pytest.mark.parametrize("command", ["inspect", "plot"])
def test_bad_input_exits_2_with_one_line(checkpoint, tmp_path, capsys, case, command):
    """12.9: every bad input ends in exit status 2 and one line naming the directory and the problem."""
    kwargs, message = BAD_INPUTS[case]
    path = _damage(checkpoint[0], tmp_path, **kwargs)
    args = [command, str(path)] + (["--out", str(tmp_path / "x.png")] if command == "plot" else [])
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(path) in err and re.search(message, err), err


def test_bad_header_and_bad_regex_exit_2(checkpoint, tmp_path, capsys):
    path = _damage(checkpoint[0], tmp_path)
    blob = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(blob[:8] + b"{not json" + blob[17:])
    assert main(["inspect", str(path)]) == 2
    assert "model.safetensors: the safetensors header is not valid JSON" in capsys.readouterr().err
    args = ["plot", str(checkpoint[0]), "--out", str(tmp_path / "x.png"), "--layers", "(unclosed"]
    assert main(args) == 2
    assert "--layers '(unclosed' is not a valid regex" in capsys.readouterr().err


@pytest.mark.parametrize("damage", ["nan", "inf", "checksum"])
def test_damaged_values_are_flagged_not_printed_as_normal(checkpoint, tmp_path, capsys, damage):
    """12.9: NaN/inf LUT entries, set padding bits and checksum mismatches: the row says DAMAGED, exit status 1."""

    def edit(tensors, metadata):
        if damage in ("nan", "inf"):
            tensors[LUT].view(-1)[0] = float(damage)
        else:
            tensors[LUT].view(-1)[1] += 0.5

    path = _damage(checkpoint[0], tmp_path, edit_tensors=edit)
    assert main(["inspect", str(path), "--json"]) == 1
    out = capsys.readouterr().out
    damaged = [line for line in out.splitlines() if "DAMAGED" in line and line.startswith("| ")]
    assert len(damaged) == 1
    assert json.loads(out.strip().splitlines()[-1])["damaged_layers"] == 1
    assert ("checksum mismatch" if damage == "checksum" else "NaN/inf in weight_lut") in damaged[0]


@pytest.mark.parametrize("padding", ["last", "first"])
def test_set_padding_bits_are_flagged(tmp_path, capsys, padding):
    """74 3-bit indices leave 18 padding bits in the last block; a set one is flagged, the last one and the first
    (here without checksums, as in a checkpoint written before they existed)."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoModel, BertConfig, BertModel

    from dkm_hf.ops.packing import pack_indices, unpack_indices

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=99, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=37
    )
    BertModel(config).save_pretrained(tmp_path / "dense")
    dkm = dkm_hf.DKMConfig(bits=3, cluster_dim=16, weight_threshold=0, target_modules=["intermediate.dense"])
    dkm_hf.palettize(AutoModel.from_pretrained(tmp_path / "dense", dkm_config=dkm)).save_pretrained(tmp_path / "p")
    tensors = load_file(tmp_path / "p" / "model.safetensors")
    packed = tensors["encoder.layer.0.intermediate.dense.weight_indices"]
    if padding == "last":
        packed[-1] |= 0x80
    else:  # index 2 of the last block of 8 (74 = 9 * 8 + 2) is the first that pads
        block = unpack_indices(packed[-3:].clone(), 3, 8)
        assert not block[2:].any()
        block[2] = 1
        packed[-3:] = pack_indices(block, 3)
    save_file(tensors, tmp_path / "p" / "model.safetensors", {"dkm_format": "palettized", "dkm_format_version": "1"})
    assert main(["inspect", str(tmp_path / "p")]) == 1
    assert "DAMAGED: padding bits set" in capsys.readouterr().out


def test_inspect_reads_the_files_from_pretrained_loads(checkpoint, tmp_path, capsys):
    """model.safetensors wins over a shard index next to it, in transformers' loading and in `inspect` alike."""
    import shutil

    out, dense = checkpoint
    path = tmp_path / "both"
    shutil.copytree(out, path)
    shutil.copy(dense / "model.safetensors", path / "model-00001-of-00001.safetensors")
    keys = read_header(dense / "model.safetensors").tensors
    index = {"metadata": {}, "weight_map": dict.fromkeys(keys, "model-00001-of-00001.safetensors")}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    assert checkpoint_files(path) == [str(path / "model.safetensors")]
    assert main(["inspect", str(path)]) == 0
    assert "| transformer.h.0.mlp.c_fc | 32x128 | 2 |" in capsys.readouterr().out
    loaded = AutoModelForCausalLM.from_pretrained(path)
    x = torch.randint(0, 100, (1, 7))
    assert torch.equal(loaded(x).logits, AutoModelForCausalLM.from_pretrained(out)(x).logits)


def test_inspect_reads_an_index_without_metadata_that_loading_refuses(checkpoint, tmp_path, capsys):
    """transformers reads the index's "metadata" (a bare KeyError without it), so loading refuses such an index by
    name; `inspect` never needs it and reads the checkpoint as before."""
    import shutil

    path = tmp_path / "sharded"
    shutil.copytree(checkpoint[0], path)
    (path / "model.safetensors").rename(path / "model-00001-of-00001.safetensors")
    keys = read_header(path / "model-00001-of-00001.safetensors").tensors
    index = {"weight_map": dict.fromkeys(keys, "model-00001-of-00001.safetensors")}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    assert main(["inspect", str(path)]) == 0
    assert "| transformer.h.0.mlp.c_fc | 32x128 | 2 |" in capsys.readouterr().out
    with pytest.raises(dkm_hf.PalettizedCheckpointError, match=r"index\.json: no 'metadata' object beside"):
        AutoModelForCausalLM.from_pretrained(path)


def _cpu_seconds(call) -> float:
    start = time.process_time()
    call()
    return time.process_time() - start


def test_inspect_cost_grows_with_the_header_not_with_layers_times_header(checkpoint, tmp_path, capsys):
    """A header padded with 100,000 empty tensors: `inspect` parses each file's header once and looks names up in
    O(log n), so it costs about one parse (it cost one parse per tensor read and a scan per lookup: 8x here)."""
    import shutil

    path = tmp_path / "padded"
    shutil.copytree(checkpoint[0], path)
    blob = (path / "model.safetensors").read_bytes()
    length = struct.unpack("<Q", blob[:8])[0]
    header = json.loads(blob[8 : 8 + length])
    header.update({f"empty.{i}": {"dtype": "U8", "shape": [0], "data_offsets": [0, 0]} for i in range(100_000)})
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    (path / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + blob[8 + length :])
    assert main(["inspect", str(checkpoint[0])]) == 0
    expected = capsys.readouterr().out
    parse = min(_cpu_seconds(lambda: read_header(path / "model.safetensors")) for _ in range(2))
    inspect = _cpu_seconds(lambda: main(["inspect", str(path)]))
    headers = re.compile(r", [\d,]+ bytes with their headers")  # the padded header's bytes, the one line that differs
    assert headers.sub("", capsys.readouterr().out) == headers.sub("", expected)
    assert inspect < 3 * parse + 1.0, (inspect, parse)


def test_variants_folders_and_file_names(checkpoint, tmp_path, capsys):
    """A checkpoint saved with variant= is inspected as the plain one (before: 'no model.safetensors'); export of a
    folder that is not there is refused at once (before: 31 s of Hub retries); plot --out naming a folder is refused
    (before: it wrote a hidden '.png' inside)."""
    out, _ = checkpoint
    model = AutoModelForCausalLM.from_pretrained(out)
    model.save_pretrained(tmp_path / "variant", variant="v1")
    assert main(["inspect", str(out)]) == 0
    plain = capsys.readouterr().out
    assert main(["inspect", str(tmp_path / "variant")]) == 0
    assert capsys.readouterr().out.splitlines()[1:] == plain.splitlines()[1:]  # all but the folder's name
    start = time.perf_counter()
    assert main(["export", "--coreml", str(tmp_path / "missing"), str(tmp_path / "m.mlpackage")]) == 2
    assert "is not a folder" in capsys.readouterr().err and time.perf_counter() - start < 10
    (tmp_path / "plots").mkdir()
    for target in (tmp_path / "plots", f"{tmp_path / 'plots'}/"):
        assert main(["plot", str(out), "--out", str(target)]) == 2
        assert "is a folder, not a file name" in capsys.readouterr().err
    assert not list((tmp_path / "plots").iterdir())


def test_inspect_reads_a_config_without_a_format_version(checkpoint, tmp_path, capsys):
    """from_pretrained takes the current format for a quantization_config without format_version; inspect read
    the record's fields by position, took the modules for the version and refused the checkpoint."""
    path = _damage(checkpoint[0], tmp_path, edit_config=lambda q: q.pop("format_version"))
    assert main(["inspect", str(path)]) == 0, capsys.readouterr().err


FORMAT1 = Path(__file__).resolve().parent / "fixtures" / "format1" / "palettized"


def test_inspect_reads_a_format_1_checkpoint_as_undamaged(capsys):
    """Format 1 checksums cover the bytes only: `inspect` checks them as such, not as version 2's (which would flag
    every layer of an intact checkpoint as damaged)."""
    assert main(["inspect", str(FORMAT1)]) == 0
    out = capsys.readouterr().out
    assert "DAMAGED" not in out and "| ok |" in out


def test_example_inputs_may_fill_the_models_positions_exactly():
    import pytest
    from transformers import LlamaConfig

    from dkm_hf.cli import example_inputs

    config = LlamaConfig(vocab_size=50, max_position_embeddings=16)
    assert example_inputs(config, {"input_ids": (1, 16)})["input_ids"].shape == (1, 16)
    assert example_inputs(config, {})["input_ids"].shape == (1, 16)  # the default 128 capped at the model's 16
    with pytest.raises(ValueError, match="17 tokens, more than the model's max_position_embeddings \\(16\\)"):
        example_inputs(config, {"input_ids": (1, 17)})


def test_an_unknown_lut_dtype_exits_2_with_one_line(tmp_path, capsys):
    import json
    import shutil

    target = tmp_path / "ckpt"
    shutil.copytree(FORMAT1, target)
    config = json.loads((target / "config.json").read_text())
    config["quantization_config"]["lut_dtype"] = "int8"
    (target / "config.json").write_text(json.dumps(config))
    assert main(["inspect", str(target)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown lut_dtype 'int8'" in err[0]
