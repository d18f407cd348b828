"""`dkm-hf inspect` and `dkm-hf plot` on a saved palettized checkpoint."""

from __future__ import annotations

import json
import re
import struct
from importlib.metadata import entry_points

import pytest
import torch
from PIL import Image
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel
from transformers.utils import logging

import dkm_hf
from dkm_hf.cli import main
from dkm_hf.integrations.safetensors_files import read_header

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


def test_inspect_refuses_a_dense_checkpoint(checkpoint, capsys):
    assert main(["inspect", str(checkpoint[1])]) == 2
    assert "does not describe a dkm_hf palettized checkpoint" in capsys.readouterr().err


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


def test_plot_with_no_matching_layer_fails_cleanly(checkpoint, tmp_path, capsys):
    assert main(["plot", str(checkpoint[0]), "--out", str(tmp_path / "x.png"), "--layers", "nope"]) == 2
    assert "no palettized layer matches 'nope'" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()
