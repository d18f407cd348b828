"""The example scripts end to end on tiny models and data built here (a few training steps each).

What is asserted: results.json / results.md are written, each compressed variant's checkpoint on disk is
palettized (LUT + packed indices), and the accuracy the script reports for it is the accuracy of that checkpoint
reloaded with a plain `from_pretrained` (recomputed here).
"""

from __future__ import annotations

import csv
import importlib.util
import json
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from transformers import (
    AutoModelForImageClassification,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    BertTokenizerFast,
    MobileNetV2Config,
    MobileNetV2ForImageClassification,
)

import dkm_hf  # noqa: F401

ROOT = Path(__file__).resolve().parent.parent
WORDS = "good great fine nice bad awful poor sad the a movie film plot cast was is very really".split()


def load_script(relative: str):
    spec = importlib.util.spec_from_file_location(Path(relative).stem, ROOT / relative)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


def check_compressed(results: dict, out: Path, bits: list[int]) -> None:
    assert (out / "results.json").is_file() and (out / "results.md").is_file()
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(results))
    markdown = (out / "results.md").read_text()
    assert [v["bits"] for v in results["variants"]] == bits
    for variant in results["variants"]:
        folder = Path(variant["checkpoint"])
        assert folder.parent == out
        config = json.loads((folder / "config.json").read_text())
        assert config["quantization_config"]["format"] == "palettized"
        assert config["quantization_config"]["bits"] == variant["bits"]
        assert variant["checkpoint_format"] == "palettized"
        with safe_open(str(folder / "model.safetensors"), "pt") as f:
            keys = list(f.keys())
        assert any(k.endswith("weight_lut") for k in keys) and any(k.endswith("weight_indices") for k in keys)
        assert variant["bytes"] == (folder / "model.safetensors").stat().st_size
        assert variant["bytes"] < results["dense"]["bytes"]
        assert variant["compression"] == pytest.approx(results["dense"]["bytes"] / variant["bytes"])
        assert f"DKM {variant['bits']}-bit" in markdown
        assert 0.0 <= variant["accuracy"] <= 1.0


# -- GLUE-style text classification ----------------------------------------------------------------------------------
def tiny_text_model(folder: Path) -> str:
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(folder / "vocab.txt"))
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, num_labels=2
    )
    model_dir = folder / "tiny-bert"
    BertForSequenceClassification(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    return str(model_dir)


def sentiment_csv(path: Path, n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.choice(["negative", "positive"])
        mood = WORDS[:4] if label == "positive" else WORDS[4:8]
        text = " ".join(rng.choice(WORDS[8:]) for _ in range(4)) + " " + rng.choice(mood)
        rows.append({"text": text, "label": label})
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["text", "label"])
        writer.writeheader()
        writer.writerows(rows)
    return rows


def test_glue_example(tmp_path):
    glue = load_script("examples/glue/run_glue_dkm.py")
    model = tiny_text_model(tmp_path)
    sentiment_csv(tmp_path / "train.csv", 48, seed=0)
    validation = sentiment_csv(tmp_path / "validation.csv", 24, seed=1)
    out = tmp_path / "out"
    # The tiny model's Linear layers have 1,024-1,184 weights: cluster them too.
    argv = f"--model_name_or_path {model} --train_file {tmp_path / 'train.csv'} "
    argv += f"--validation_file {tmp_path / 'validation.csv'} --output_dir {out} --weight_threshold 512 "
    argv += "--bits 4 --tau 0.05 --dense_num_train_epochs 1 --num_train_epochs 1 --per_device_train_batch_size 16 "
    argv += "--max_seq_length 16 --logging_steps 1 --eval_soft false"
    results = glue.main(argv.split())
    check_compressed(results, out, [4])
    assert results["dense"]["checkpoint"] == str(out / "dense")
    assert "control" in results and 0.0 <= results["control"]["accuracy"] <= 1.0

    # The reported accuracy is that of the palettized checkpoint reloaded from disk.
    folder = results["variants"][0]["checkpoint"]
    reloaded = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    assert dkm_hf.palettized_modules(reloaded) and not dkm_hf.dkm_modules(reloaded)
    assert reloaded.config.label2id == {"negative": 0, "positive": 1}
    tokenizer = AutoTokenizer.from_pretrained(folder)
    batch = tokenizer(
        [r["text"] for r in validation], padding=True, truncation=True, max_length=16, return_tensors="pt"
    )
    with torch.no_grad():
        predictions = reloaded(**batch).logits.argmax(-1)
    labels = torch.tensor([reloaded.config.label2id[r["label"]] for r in validation])
    assert results["variants"][0]["accuracy"] == pytest.approx((predictions == labels).float().mean().item())


# -- image classification ---------------------------------------------------------------------------------------------
def tiny_vision_model(folder: Path) -> str:
    torch.manual_seed(0)
    config = MobileNetV2Config(
        depth_multiplier=0.25, finegrained_output=False, image_size=32, tf_padding=False, num_labels=5
    )
    model_dir = folder / "tiny-mobilenet"
    MobileNetV2ForImageClassification(config).save_pretrained(model_dir)
    return str(model_dir)


def image_folder(root: Path, per_class: int, seed: int) -> None:
    """Two classes: reddish and bluish noise, as PNG files in root/<label>/."""
    rng = np.random.default_rng(seed)
    for c, name in enumerate(["blue", "red"]):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 120, (20, 20, 3), dtype=np.uint8)
            pixels[..., 2 * (1 - c)] += 120
            Image.fromarray(pixels).save(root / name / f"{i}.png")


def test_vision_example(tmp_path):
    vision = load_script("examples/vision/run_image_classification_dkm.py")
    model = tiny_vision_model(tmp_path)
    image_folder(tmp_path / "train", 12, seed=0)
    image_folder(tmp_path / "val", 6, seed=1)
    out = tmp_path / "out"
    argv = f"--model_name_or_path {model} --train_dir {tmp_path / 'train'} --validation_dir {tmp_path / 'val'} "
    argv += f"--output_dir {out} --image_size 32 --bits 4 2 --weight_threshold 512 --tau 0.05 --control false "
    argv += "--dense_num_train_epochs 1 --num_train_epochs 1 --per_device_train_batch_size 8 --logging_steps 1"
    argv += " --eval_soft false"
    results = vision.main(argv.split())
    check_compressed(results, out, [4, 2])
    assert "control" not in results

    # Recompute the 2-bit accuracy from the checkpoint on disk (the script's preprocessing: resize + ImageNet norm).
    folder = results["variants"][1]["checkpoint"]
    reloaded = AutoModelForImageClassification.from_pretrained(folder).eval()
    assert dkm_hf.palettized_modules(reloaded)
    assert reloaded.config.id2label == {0: "blue", 1: "red"}
    mean, std = np.array(vision.IMAGENET_MEAN, np.float32), np.array(vision.IMAGENET_STD, np.float32)
    pixels, labels = [], []
    for c, name in enumerate(["blue", "red"]):
        for path in sorted((tmp_path / "val" / name).glob("*.png")):
            image = Image.open(path).convert("RGB").resize((32, 32), Image.BILINEAR)
            pixels.append(((np.asarray(image, np.float32) / 255 - mean) / std).transpose(2, 0, 1))
            labels.append(c)
    with torch.no_grad():
        predictions = reloaded(torch.from_numpy(np.stack(pixels))).logits.argmax(-1)
    expected = (predictions == torch.tensor(labels)).float().mean().item()
    assert results["variants"][1]["accuracy"] == pytest.approx(expected)


# -- causal language modelling ---------------------------------------------------------------------------------------
def tiny_causal_model(folder: Path) -> str:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {word: i for i, word in enumerate(["[UNK]", "[EOS]", *WORDS])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", eos_token="[EOS]")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=True, bos_token_id=1, eos_token_id=1, pad_token_id=1,
    )  # fmt: skip
    model_dir = folder / "tiny-llama"
    LlamaForCausalLM(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    return str(model_dir)


def test_causal_lm_example(tmp_path, monkeypatch):
    clm = load_script("examples/causal_lm/run_clm_dkm.py")
    model = tiny_causal_model(tmp_path)
    rng = random.Random(0)
    for name, n in (("train.txt", 40), ("validation.txt", 10), ("other.txt", 10)):
        words = WORDS if name != "other.txt" else WORDS[::-1][:5]  # another kind of text: a few words only
        docs = [" ".join(rng.choice(words) for _ in range(rng.randint(8, 30))) for _ in range(n)]
        (tmp_path / name).write_text("\n\n".join(docs))
    out = tmp_path / "out"
    argv = f"--model_name_or_path {model} --train_file {tmp_path / 'train.txt'} --other_file {tmp_path / 'other.txt'} "
    argv += f"--validation_file {tmp_path / 'validation.txt'} --output_dir {out} --bits 4 --weight_threshold 512 "
    argv += "--block_size 16 --eval_tokens 64 --max_steps 3 --logging_steps 1 --new_tokens 4 --prompt good"
    import dkm_hf
    from dkm_hf.integrations import quantizer

    initialised = []
    plain_init, weighted_init = quantizer.kmeans_all, dkm_hf.init_centroids
    monkeypatch.setattr(quantizer, "kmeans_all", lambda m: initialised.append(("plain", plain_init(m))))
    monkeypatch.setattr(dkm_hf, "init_centroids", lambda m, f: initialised.append(("weighted", weighted_init(m, f))))
    results = clm.main(argv.split())
    names = [row["model"] for row in results["rows"]]
    control_name = "control: the recipe without clustering (lr 0.0003, 3 steps)"
    assert names == ["dense", control_name, "post-training k-means + GPTQ 4-bit", "DKM 4-bit, reloaded from disk"]
    # post-training k-means and DKM start from one k-means initialisation, importance-weighted by default
    assert [kind for kind, _ in initialised] == ["weighted"] and results["recipe"]["importance_batches"] == 16
    # the recipe as it ran: 4 bits anneals tau to a tenth of its start (cosine)
    assert results["recipe"]["lr_scheduler_type"] == "cosine"  # the schedule's name, not its enum's repr
    per_bits = results["recipe"]["per_bits"]["4"]
    assert (per_bits["tau_schedule"], per_bits["tau_end"], per_bits["tau_end_ratio"]) == ("cosine", None, 0.1)
    # and a width per layer from 3 to 6 bits within the size of 4 bits for all (dkm_hf.allocate_bits)
    assert per_bits["bit_choices"] == [3, 4, 5, 6] and set(per_bits["layers_per_width"]) > {"4"}
    dense, control, ptq, dkm = results["rows"]
    assert ptq["control"] == dkm["control"] == control_name and dense["control"] is None
    assert dkm["bytes"] < dense["bytes"] and ptq["bytes"] < dense["bytes"] and control["bytes"] is None
    # every row on both texts; the table gives each row's ratio to the dense model and to the control
    assert all(row["other_perplexity"] > 1 and row["perplexity"] > 1 for row in results["rows"])
    markdown = (out / "results.md").read_text()
    assert (out / "results.json").is_file() and "| DKM 4-bit, reloaded from disk |" in markdown
    vs_control = f"{dkm['perplexity'] / control['perplexity']:.2f}x"
    vs_control_other = f"{dkm['other_perplexity'] / control['other_perplexity']:.2f}x"
    line = next(row for row in markdown.splitlines() if row.startswith("| DKM 4-bit"))
    assert line.split(" | ")[3] == vs_control and line.split(" | ")[6] == vs_control_other
    assert (
        f"DKM 4-bit, reloaded from disk: clustering costs {vs_control} on the held-out text of the training data and "
        f"{vs_control_other} on {out.parent / 'other.txt'} in perplexity against fine-tuning alone" in markdown
    )
    assert all(isinstance(row["generation"], str) for row in results["rows"])

    # The reported perplexity is that of the palettized checkpoint reloaded from disk, on the same held-out blocks.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = out / "compressed-4bit"
    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert config["format"] == "palettized" and config["modules"]["lm_head"] == {"tied_to": "model.embed_tokens"}
    assert config["modules"]["model.embed_tokens"]["bits"] == 8  # the recipe's embeddings: 8 bits per tensor
    assert config["modules"]["model.layers.0.mlp.up_proj"]["groups"] == 64  # per-row LUTs
    tokenizer = AutoTokenizer.from_pretrained(folder)
    held = clm.to_blocks(tokenizer, clm.documents(str(tmp_path / "validation.txt")), 16)[:4]
    reloaded = AutoModelForCausalLM.from_pretrained(folder)
    assert dkm["perplexity"] == pytest.approx(clm.perplexity(reloaded, held))


def test_causal_lm_example_distilled_control(tmp_path):
    """With --distill both the DKM row and its control train against the dense model (the control with the same
    distillation loss and no clustering): the control differs from the undistilled one of the same recipe."""
    clm = load_script("examples/causal_lm/run_clm_dkm.py")
    model = tiny_causal_model(tmp_path)
    rng = random.Random(0)
    docs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 30))) for _ in range(40)]
    (tmp_path / "train.txt").write_text("\n\n".join(docs))
    controls = []
    for distill in ([], ["--distill", "--distill_alpha", "0.9"]):
        argv = ["--model_name_or_path", model, "--train_file", str(tmp_path / "train.txt"), "--output_dir",
                str(tmp_path / f"out{len(distill)}"), "--bits", "4", "--weight_threshold", "512", "--block_size", "16",
                "--eval_tokens", "64", "--max_steps", "2", "--new_tokens", "2", "--other_file",
                str(tmp_path / "train.txt"), *distill]  # fmt: skip
        results = clm.main(argv)
        assert results["recipe"]["distill"] == bool(distill)
        controls.append(results["rows"][1])
    assert [row["model"].startswith("control") for row in controls] == [True, True]
    assert controls[0]["perplexity"] != controls[1]["perplexity"]


def test_causal_lm_example_importance_batches(tmp_path, monkeypatch):
    """--importance_batches N: the importance of the dense weights is computed once, over N training batches of the
    recipe's batch size, and weighs the k-means of every bit width's initialisation (post-training row and DKM) and
    the DKM loop of the per-row LUTs."""
    clm = load_script("examples/causal_lm/run_clm_dkm.py")
    model = tiny_causal_model(tmp_path)
    rng = random.Random(0)
    docs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 30))) for _ in range(40)]
    (tmp_path / "train.txt").write_text("\n\n".join(docs))
    import dkm_hf

    calls, inits, drawn = [], [], []
    gradient_importance, init_centroids = dkm_hf.gradient_importance, dkm_hf.init_centroids

    def counted(model, batches):
        batches = list(batches)
        calls.append([tuple(b["input_ids"].shape) for b in batches])
        drawn.append([b["input_ids"] for b in batches])
        return gradient_importance(model, batches)

    monkeypatch.setattr(dkm_hf, "gradient_importance", counted)
    given = []  # the importance each width's k-means got
    monkeypatch.setattr(
        dkm_hf, "init_centroids", lambda m, f: given.append(f) or inits.append(sorted(f)) or init_centroids(m, f)
    )
    weighted_loops = []
    set_importance = dkm_hf.set_importance
    monkeypatch.setattr(
        dkm_hf, "set_importance", lambda m, f: weighted_loops.append(sorted(f)) or set_importance(m, f)
    )
    from dkm_hf.surgery import convert

    kmeans_runs, kmeans_init_many = [], convert.kmeans_init_many

    def kmeans_counted(vectors, k, importance, **kwargs):
        kmeans_runs.append(all(f is not None for f in importance))
        return kmeans_init_many(vectors, k, importance=importance, **kwargs)

    monkeypatch.setattr(convert, "kmeans_init_many", kmeans_counted)
    snapped, given_hessians, act_orders, gptq_snap = [], [], [], dkm_hf.gptq_snap

    def gptq_counted(model, batches, hessians, act_order):
        snapped.append([b["input_ids"] for b in batches])
        given_hessians.append(dict(hessians))
        act_orders.append(act_order)
        return gptq_snap(model, batches, hessians=hessians, act_order=act_order)

    monkeypatch.setattr(dkm_hf, "gptq_snap", gptq_counted)
    argv = ["--model_name_or_path", model, "--train_file", str(tmp_path / "train.txt"), "--output_dir",
            str(tmp_path / "out"), "--bits", "4", "3", "--weight_threshold", "512", "--block_size", "16",
            "--eval_tokens", "64", "--max_steps", "1", "--new_tokens", "2", "--control", "false",
            "--importance_batches", "2", "--per_device_train_batch_size", "3", "--gptq_batches", "5"]  # fmt: skip
    results = clm.main(argv)
    # the weighted k-means is the only initialisation: no plain one at load first
    assert kmeans_runs and all(kmeans_runs)
    assert calls == [[(3, 16), (3, 16)]]
    assert len(inits) == 2 and inits[0] == inits[1] and "model.layers.0.mlp.up_proj" in inits[0]
    # the second width reads the importance the first computed back from the output folder, unchanged
    assert (tmp_path / "out" / "importance.safetensors").is_file() and given[0] is not given[1]
    assert all(torch.equal(given[0][name], given[1][name]) for name in inits[0])
    assert results["recipe"]["importance_batches"] == 2
    # the loop is weighted for the per-row LUTs only (the 8-bit per-tensor embedding keeps its fused / bucket path)
    assert (
        len(weighted_loops) == 2 and "model.embed_tokens" in inits[0] and "model.embed_tokens" not in weighted_loops[0]
    )
    assert set(weighted_loops[0]) == set(inits[0]) - {"model.embed_tokens"}
    assert [row["model"] for row in results["rows"]][1:] == [
        "post-training k-means + GPTQ 4-bit", "DKM 4-bit, reloaded from disk",
        "post-training k-means + GPTQ 3-bit", "DKM 3-bit, reloaded from disk",
    ]  # fmt: skip
    # GPTQ at every width, on --gptq_batches batches of the same seeded draw as the importance's
    assert len(snapped) == 2 and all([tuple(b.shape) for b in batches] == [(3, 16)] * 5 for batches in snapped)
    assert all(torch.equal(a, b) for a, b in zip(snapped[0][:2], drawn[0], strict=True))
    assert results["recipe"]["per_bits"]["3"]["gptq"] and results["recipe"]["per_bits"]["4"]["gptq"]
    assert act_orders == [False, True] and results["recipe"]["per_bits"]["3"]["gptq_act_order"]  # 3 bits: act-order
    # the first width computes the Gram matrices, the second reads them back from the output folder
    assert given_hessians[0] == {} and "model.layers.0.mlp.up_proj" in given_hessians[1]
    assert (tmp_path / "out" / "gptq-hessians-5.safetensors").is_file()
    # more batches asked for than the training set has: every block once, no empty batch
    argv[argv.index("--importance_batches") + 1] = "1000"
    del argv[argv.index("--bits") + 2]  # 4 bits only
    (tmp_path / "out" / "importance.safetensors").unlink()
    clm.main(argv)
    assert not (tmp_path / "out" / "importance.safetensors").exists()  # one width: nothing to keep it for
    rows = sum(shape[0] for shape in calls[1])
    assert 6 < rows < 3000 and len(calls[1]) == -(-rows // 3) and all(shape[0] > 0 for shape in calls[1])
    # 0: the plain recipe, one unweighted k-means at load, no importance pass, the plain loop
    argv[argv.index("--importance_batches") + 1] = "0"
    kmeans_runs.clear()
    results = clm.main(argv)
    assert results["recipe"]["importance_batches"] == 0 and len(calls) == 2 and len(weighted_loops) == 3
    assert kmeans_runs and not any(kmeans_runs) and len(snapped) == 4  # GPTQ on the plain k-means' centroids too
    results = clm.main(argv + ["--gptq", "false"])
    assert len(snapped) == 4 and results["rows"][1]["model"] == "post-training k-means 4-bit"


@pytest.mark.parametrize(
    "bad, message",
    [
        (["--gptq_batches", "0"], "--gptq_batches must be >= 1"),
        (["--importance_batches", "-1"], "--importance_batches and --new_tokens"),
        (["--block_size", "128", "--eval_tokens", "64"], "--eval_tokens >= --block_size"),
        (["--train_file", "missing.txt"], "--train_file missing.txt: no such file"),
        (["--bits", "4", "9"], r"DKMConfig.bits must be an integer in \[1, 8\].* 9"),
        (["--bits", "4", "4"], "--bits 4 4: each bit width once"),
        (["--overrides", '{".*embed": {"bits": 8}'], "--overrides is not JSON"),
        (["--overrides", '{"(": {"bits": 8}}'], "not a valid regex"),
        (["--granularity", "per_row"], "DKMConfig.granularity must be one of"),
        (["--bit_choices", "2 x"], r"--bit_choices must be widths in \[1, 8\] such as '2 3 4', or 'none': '2 x'"),
        (["--bit_choices", "2,9"], r"--bit_choices must be widths in \[1, 8\]"),
        (["--bit_choices", "2 3", "--importance_batches", "0"], "--bit_choices '2 3' needs the importance"),
    ],
)
def test_causal_lm_example_refuses_bad_arguments_before_any_row(tmp_path, bad, message):
    """Arguments the example cannot use are refused when parsed, before the dense model loads (not minutes later)."""
    clm = load_script("examples/causal_lm/run_clm_dkm.py")
    with pytest.raises(ValueError, match=message):
        clm.main(["--output_dir", str(tmp_path), "--model_name_or_path", str(tmp_path / "absent")] + bad)
    assert not (tmp_path / "results.json").exists()
    from dkm_common import parse_arguments

    model_args = parse_arguments(  # --gptq false needs no batches
        clm.ModelArguments, clm.DataArguments, clm.DKM_TRAINING_DEFAULTS,
        ["--output_dir", str(tmp_path), "--gptq", "false", "--gptq_batches", "0"],
    )[0]  # fmt: skip
    assert not model_args.gptq


def test_causal_lm_example_recipe_per_bit_width(tmp_path):
    clm = load_script("examples/causal_lm/run_clm_dkm.py")
    argv = ["--output_dir", str(tmp_path), "--max_steps", "3"]
    from dkm_common import parse_arguments

    model_args, _, dkm_args, training_args = parse_arguments(
        clm.ModelArguments, clm.DataArguments, clm.DKM_TRAINING_DEFAULTS, argv
    )

    def recipe(bits, extra=()):
        return clm.recipe_for(bits, model_args, dkm_args, training_args, argv + list(extra))

    four_model, four_dkm, four_train = recipe(4)
    assert (four_train.learning_rate, four_train.max_steps) == (3e-4, 3)
    assert four_dkm.config(4).settings_for("model.layers.0.mlp.up_proj").tau == 0.004  # DKMConfig's own: 0.01
    assert four_train.tau_end_ratio == 0.1  # 4 bits anneals tau too (DKMTrainer's default keeps it flat there)
    assert four_model.gptq and model_args.gptq  # GPTQ's snapping at every width by default
    assert not four_model.gptq_act_order
    # an end given on the command line replaces the recipe's: as a ratio, or as one tau for every layer
    assert recipe(4, ["--tau_end_ratio", "0.5"])[2].tau_end_ratio is None
    assert recipe(4, ["--tau_end=0.001"])[2].tau_end_ratio is None
    three_model, three_dkm, three_train = recipe(3)
    # 3 bits takes its measured learning rate and tau; --max_steps on the command line wins over the recipe's 30
    assert (three_train.learning_rate, three_train.max_steps) == (5e-4, 3) and three_model.gptq
    assert three_model.gptq_act_order and not recipe(3, ["--gptq_act_order", "false"])[0].gptq_act_order
    assert three_dkm.config(3).settings_for("model.layers.0.mlp.up_proj").tau == 0.005  # DKMConfig's own: 0.05
    assert three_dkm.config(3).kmeans_restarts == 4  # the example's choice for per-row LUTs
    # the recipe's tau is one tau for every layer, the 8-bit embedding's too (as measured)
    assert three_dkm.config(3).settings_for("model.embed_tokens").tau == 0.005
    assert recipe(3, ["--tau", "0.05"])[1].config(3).settings_for("model.layers.0.mlp.up_proj").tau == 0.05
    # an option given on the command line is left as parsed
    given = recipe(3, ["--learning_rate=1e-3"])[2]
    assert given.learning_rate == training_args.learning_rate != 5e-4


def test_sft_example(tmp_path):
    """TRL's SFTTrainer with DKM, one step on a tiny Llama: the saved folder is palettized and reloads."""
    pytest.importorskip("trl")
    sft = load_script("examples/causal_lm/sft_dkm.py")
    model = tiny_causal_model(tmp_path)
    rng = random.Random(0)
    docs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 30))) for _ in range(40)]
    (tmp_path / "train.txt").write_text("\n\n".join(docs))
    out = tmp_path / "out"
    argv = f"--model_name_or_path {model} --train_file {tmp_path / 'train.txt'} --output_dir {out} --bits 4 "
    argv += "--weight_threshold 512 --max_length 16 --max_steps 1 --logging_steps 1 --eval_examples 4 --new_tokens 4 "
    argv += "--prompt good --distill"
    results = sft.main(argv.split())
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["format"] == "palettized" and config["modules"]["model.embed_tokens"]["bits"] == 8
    assert results["palettized_weights"] > 0 and [step for step, _ in results["eval_loss"]] == [0, 1]
    assert results["bytes"] == (out / "model.safetensors").stat().st_size
    assert isinstance(results["generation"], str)


def test_sft_example_resumes_and_refuses_bad_arguments(tmp_path):
    """--resume_from_checkpoint continues the run it names (before, the script restarted from step 0 and rewrote
    the checkpoints); a training file of another kind, a negative --eval_examples and a best-model rule without an
    evaluation are refused before any model loads."""
    pytest.importorskip("trl")
    sft = load_script("examples/causal_lm/sft_dkm.py")
    model = tiny_causal_model(tmp_path)
    rng = random.Random(0)
    (tmp_path / "train.txt").write_text("\n\n".join(" ".join(rng.choices(WORDS, k=12)) for _ in range(40)))
    out = tmp_path / "out"
    argv = f"--model_name_or_path {model} --train_file {tmp_path / 'train.txt'} --output_dir {out} --bits 4 "
    argv += "--weight_threshold 512 --max_length 16 --logging_steps 1 --eval_examples 0 --new_tokens 1 "
    argv += "--save_strategy steps --save_steps 2"
    sft.main(f"{argv} --max_steps 2".split())
    state = out / "checkpoint-2" / "trainer_state.json"
    written = state.stat().st_mtime_ns
    sft.main(f"{argv} --max_steps 3 --resume_from_checkpoint {out / 'checkpoint-2'}".split())
    assert state.stat().st_mtime_ns == written  # not trained (and saved) again
    history = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())["log_history"]
    assert [e["step"] for e in history if "loss" in e] == [1, 2, 3]
    assert json.loads(state.read_text())["log_history"] == history[:2]
    sft.main(f"{argv} --max_steps 4 --resume_from_checkpoint True".split())  # the newest: checkpoint-3
    history = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())["log_history"]
    assert [e["step"] for e in history if "loss" in e] == [1, 2, 3, 4]

    for bad, message in (
        (f"--train_file {tmp_path / 'train.csv'}", r"\.txt, \.json or \.jsonl expected"),
        (f"--train_file {tmp_path / 'missing.jsonl'}", "no such file"),
        ("--eval_examples -1", "must be >= 0"),
    ):
        with pytest.raises(ValueError, match=message):
            sft.main(f"--model_name_or_path {model} --output_dir {out} {bad}".split())
    with pytest.raises(SystemExit, match="needs an evaluation"):
        sft.main(f"{argv} --max_steps 1 --load_best_model_at_end true --eval_steps 2".split())


def test_token_gap_categories():
    """benchmarks/clm_token_gap.py: every predicted token in exactly one category, counted from the last EOS (the
    tokens of a block before its first EOS are not a document's start)."""
    gap = load_script("benchmarks/clm_token_gap.py")
    eos = 0
    block = torch.tensor([[5, 6, 7, eos, 8, 9, 10, 11, 12, eos, eos, 13]])
    masks = gap.categories(block, eos)
    assert torch.stack(list(masks.values())).sum(0).eq(1).all()
    targets = {name: block[0, 1:][mask[0]].tolist() for name, mask in masks.items()}
    assert targets == {
        "end of document (EOS)": [eos, eos, eos],
        "first token of a document": [8, 13],
        "2nd-4th token": [9, 10, 11],
        "the rest": [6, 7, 12],
    }


def test_examples_refuse_what_they_cannot_do(tmp_path):
    """The several-phase examples refuse --resume_from_checkpoint (it was ignored: a fresh run, even from a path
    that does not exist) and --max_eval_samples 0 (a KeyError after the dense fine-tune); an abbreviated option is
    refused (the parser took it, the per-width recipe did not see it and overrode it), a dashed one is the option;
    the causal-LM example refuses a text shorter than one block before any model work."""
    clm = load_script("examples/causal_lm/run_clm_dkm.py")
    from dkm_common import parse_arguments

    def parse(*extra):
        argv = ["--output_dir", str(tmp_path / "out"), *extra]
        return parse_arguments(clm.ModelArguments, clm.DataArguments, clm.DKM_TRAINING_DEFAULTS, argv), argv

    with pytest.raises(ValueError, match="--resume_from_checkpoint: this script runs several trainings"):
        parse("--resume_from_checkpoint", str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="not used by the HfArgumentParser: \\['--max_step'"):
        parse("--max_step", "1")
    (model_args, _, dkm_args, training_args), argv = parse("--max-steps", "1", "--learning-rate", "1e-5")
    three = clm.recipe_for(3, model_args, dkm_args, training_args, argv)[2]
    assert (three.max_steps, three.learning_rate) == (1, 1e-5)  # before: the 3-bit recipe's 30 and 5e-4
    glue = load_script("examples/glue/run_glue_dkm.py")
    with pytest.raises(ValueError, match="--max_eval_samples must be at least 1"):
        parse_arguments(
            glue.ModelArguments,
            glue.DataTrainingArguments,
            {},
            ["--output_dir", str(tmp_path), "--max_eval_samples", "0"],
        )
    model = tiny_causal_model(tmp_path)
    (tmp_path / "short.txt").write_text("good day")
    (tmp_path / "long.txt").write_text(" ".join(WORDS * 20))
    argv = ["--model_name_or_path", str(model), "--output_dir", str(tmp_path / "clm"), "--block_size", "16"]
    validation = ["--validation_file", str(tmp_path / "long.txt")]
    with pytest.raises(ValueError, match="the training text has fewer than --block_size 16 tokens"):
        clm.main(
            argv
            + validation
            + ["--train_file", str(tmp_path / "short.txt"), "--other_file", str(tmp_path / "long.txt")]
        )
    with pytest.raises(ValueError, match="the other text has fewer than --block_size 16 tokens"):
        clm.main(
            argv
            + validation
            + ["--train_file", str(tmp_path / "long.txt"), "--other_file", str(tmp_path / "short.txt")]
        )
    assert not (tmp_path / "clm" / "dense").exists()
    # without --validation_file the held-out documents are a seeded tenth of the training file's, never trained on
    # (before: the training text's first blocks, called held-out); one document cannot be split
    with pytest.raises(ValueError, match="fewer than 2 documents"):
        clm.main(argv + ["--train_file", str(tmp_path / "long.txt")])
    train, held = clm.split_documents([f"document {i}" for i in range(25)], seed=42)
    assert len(held) == 2 and len(train) == 23 and not set(train) & set(held)
    # --validation_file alone was ignored (the offline default text ran): refused, in both text examples
    with pytest.raises(ValueError, match="--validation_file needs --train_file"):
        parse(*validation)
    with pytest.raises(ValueError, match="--validation_file needs --train_file"):
        parse_arguments(
            glue.ModelArguments, glue.DataTrainingArguments, {}, ["--output_dir", str(tmp_path), *validation]
        )
    # an override that matches no weight is refused before the dense row (before: after the dense model and the
    # control had run); so is a layout that fits no weight, in the classification examples too
    bad_override = ["--overrides", '{"encoder.layers.*": {"bits": 2}}']
    with pytest.raises(ValueError, match="matches none of the"):
        clm.main(argv + validation + ["--train_file", str(tmp_path / "long.txt")] + bad_override)
    assert not (tmp_path / "clm" / "dense").exists()
    text_model = tiny_text_model(tmp_path)
    sentiment_csv(tmp_path / "train.csv", 16, seed=0)
    glue_argv = ["--model_name_or_path", str(text_model), "--train_file", str(tmp_path / "train.csv")]
    glue_argv += ["--output_dir", str(tmp_path / "glue"), "--cluster_dim", "7", "--weight_threshold", "512"]
    with pytest.raises(ValueError, match="cluster_dim=7 does not divide"):
        glue.main(glue_argv)
    assert not (tmp_path / "glue" / "dense").exists()
    gguf = load_script("examples/causal_lm/convert_gguf.py")
    with pytest.raises(SystemExit, match="is a file, not a directory"):  # transformers only logged it: exit 0
        gguf.convert(str(tmp_path / "short.txt"))


def test_glue_example_counts_labels_of_every_split(tmp_path):
    """An integer label seen only in the validation file gets its class (before: the head had the training labels'
    classes only, and evaluation failed with 'Target 2 is out of bounds' after the dense fine-tune)."""
    glue = load_script("examples/glue/run_glue_dkm.py")
    (tmp_path / "train.csv").write_text("text,label\n" + "".join(f"t{i},{i % 2}\n" for i in range(8)))
    (tmp_path / "dev.csv").write_text("text,label\na,0\nb,2\n")
    args = glue.DataTrainingArguments(
        train_file=str(tmp_path / "train.csv"), validation_file=str(tmp_path / "dev.csv")
    )
    _, keys, label_names = glue.load_data(args, seed=0)
    assert keys == ("text", None) and label_names == ["0", "1", "2"]
