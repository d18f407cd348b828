"""Atomic saves: a save killed at any point leaves the old or the new checkpoint, whole, at the target path."""

from __future__ import annotations

import errno
import itertools
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel
from transformers.utils import logging

import dkm_hf
from dkm_hf.integrations import saving

logging.set_verbosity_error()
logging.disable_progress_bar()

# Where the child process kills itself (SIGKILL unless noted), in the order a save passes them.
KILL_POINTS = {
    "writing": "after the first weight shard of the new checkpoint is written",
    "carry_over": "while the old directory's other files are linked into the new one",
    "model_card": "while the model card is written",
    "before_exchange": "right before the atomic exchange",
    "after_exchange": "right after the exchange, before the old copy is removed",
    "cleanup": "halfway through removing the old copy",
    "sigint_after_exchange": "Ctrl-C (KeyboardInterrupt) right after the exchange",
}

CHILD = textwrap.dedent(
    """
    import os, shutil, signal, sys
    import torch
    import transformers.modeling_utils as modeling_utils
    from transformers import AutoModelForCausalLM
    import dkm_hf
    from dkm_hf.integrations import model_card, saving

    target, source, point = sys.argv[1:4]
    model = AutoModelForCausalLM.from_pretrained(source)

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    if point == "writing":
        real = modeling_utils.safe_save_file
        def save(tensors, filename, metadata=None):
            real(tensors, filename, metadata=metadata)
            die()
        modeling_utils.safe_save_file = save
    elif point == "carry_over":
        real_link = saving._link_or_copy
        def link(a, b):
            real_link(a, b)
            die()
        saving._link_or_copy = link
    elif point == "model_card":
        def card(*args, **kwargs):
            die()
        import dkm_hf.integrations.transformers_patches as patches
        patches.write_model_card = card
    elif point in ("before_exchange", "after_exchange", "sigint_after_exchange", "cleanup"):
        real_exchange = saving.exchange
        def exchange(a, b):
            if point == "before_exchange":
                die()
            done = real_exchange(a, b)
            if point == "after_exchange":
                die()
            if point == "sigint_after_exchange":
                raise KeyboardInterrupt
            if point == "cleanup":
                files = sorted(os.listdir(a))
                os.remove(os.path.join(a, files[0]))
                die()
            return done
        saving.exchange = exchange
    model.save_pretrained(target, max_shard_size="4KB")
    print("saved")
    """
)


def _logits(model):
    with torch.no_grad():
        return model(torch.arange(12).view(2, 6)).logits


def _palettized(dense: Path, bits: int):
    return dkm_hf.palettize(
        AutoModelForCausalLM.from_pretrained(dense, dkm_config=dkm_hf.DKMConfig(bits=bits, weight_threshold=0))
    )


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("saving")
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=4, n_positions=16)).save_pretrained(
        root / "dense"
    )
    old, new = _palettized(root / "dense", 2), _palettized(root / "dense", 3)
    old.save_pretrained(root / "old", max_shard_size="4KB")
    (root / "old" / "tokenizer.json").write_text("{}")
    new.save_pretrained(root / "new")
    return root, _logits(old), _logits(new)


def _hidden(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.parent.iterdir() if ".dkm-" in p.name)


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_a_killed_save_leaves_a_whole_checkpoint(checkpoints, tmp_path, point):
    root, old_logits, new_logits = checkpoints
    target = tmp_path / "ckpt"
    shutil.copytree(root / "old", target)
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(target), str(root / "new"), point],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert "saved" not in proc.stdout, KILL_POINTS[point]  # the save really was interrupted
    logits = _logits(AutoModelForCausalLM.from_pretrained(target))
    expected = new_logits if point in ("after_exchange", "cleanup", "sigint_after_exchange") else old_logits
    assert torch.equal(logits, expected), KILL_POINTS[point]
    assert (target / "tokenizer.json").read_text() == "{}"
    # the next save removes what the killed one left behind
    AutoModelForCausalLM.from_pretrained(root / "new").save_pretrained(target)
    assert _hidden(target) == []
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(target)), new_logits)
    assert not list(target.glob("model-*"))  # no stale shard of the old checkpoint


def test_saving_into_the_working_directory_keeps_it(checkpoints, tmp_path, monkeypatch):
    root, _, new_logits = checkpoints
    target = tmp_path / "cwd"
    shutil.copytree(root / "old", target)
    monkeypatch.chdir(target)
    AutoModelForCausalLM.from_pretrained(root / "new").save_pretrained(".")
    assert Path(os.getcwd()).resolve() == target.resolve() and target.is_dir()
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(".")), new_logits)
    assert not list(target.glob("model-*")) and (target / "tokenizer.json").exists()
    assert _hidden(target) == []


def test_without_an_atomic_exchange_files_are_replaced_one_by_one(checkpoints, tmp_path, monkeypatch):
    root, _, new_logits = checkpoints
    target = tmp_path / "ckpt"
    shutil.copytree(root / "old", target)
    monkeypatch.setattr(saving, "exchange", lambda a, b: False)
    AutoModelForCausalLM.from_pretrained(root / "new").save_pretrained(target)
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(target)), new_logits)
    assert not list(target.glob("model-*")) and _hidden(target) == []


# -- every kill point of every path ----------------------------------------------------------------------------------
# The filesystem operations a save performs; a forked child is killed (SIGKILL) right before the k-th of them, for
# every k, until a child completes the save.
OPERATIONS = ("mkdir", "rename", "replace", "link", "symlink", "remove", "unlink", "rmdir")


def _inside(path, root: Path) -> bool:
    path = Path(os.path.abspath(path))
    return path == root or path.is_relative_to(root)


def _fail(code: int, *paths) -> None:
    raise OSError(code, os.strerror(code), *map(str, paths[:1]))


def _simulate_mount_point(monkeypatch, target: Path) -> None:
    """`target` on another filesystem than its parent: renames and links across its boundary fail with EXDEV."""
    for name in ("rename", "replace", "link"):
        real = getattr(os, name)

        def crossing(src, dst, *args, _real=real, **kwargs):
            if _inside(src, target) != _inside(dst, target):
                _fail(errno.EXDEV, src)
            return _real(src, dst, *args, **kwargs)

        monkeypatch.setattr(os, name, crossing)
    real_exchange = saving.exchange

    def exchange(a, b):
        if _inside(a, target) != _inside(b, target) or Path(b) == target:
            _fail(errno.EXDEV, a)
        return real_exchange(a, b)

    monkeypatch.setattr(saving, "exchange", exchange)


def _simulate_read_only_parent(monkeypatch, target: Path) -> None:
    """`target` is writable but its parent is not: nothing can be made, renamed or removed next to it (EROFS)."""

    def in_parent(path) -> bool:
        return Path(os.path.abspath(path)).parent == target.parent

    for name in ("mkdir", "rmdir", "unlink", "remove"):
        real = getattr(os, name)

        def guarded(path, *args, _real=real, **kwargs):
            if kwargs.get("dir_fd") is None and in_parent(path):
                _fail(errno.EROFS, path)
            return _real(path, *args, **kwargs)

        monkeypatch.setattr(os, name, guarded)
    for name in ("rename", "replace"):
        real = getattr(os, name)

        def guarded2(src, dst, *args, _real=real, **kwargs):
            if in_parent(src) or in_parent(dst):
                _fail(errno.EROFS, src)
            return _real(src, dst, *args, **kwargs)

        monkeypatch.setattr(os, name, guarded2)
    real_exchange = saving.exchange

    def exchange(a, b):
        if in_parent(a) or in_parent(b):
            _fail(errno.EROFS, a)
        return real_exchange(a, b)

    monkeypatch.setattr(saving, "exchange", exchange)


PATHS = {
    "exchange": "an existing target, exchanged atomically",
    "working_directory": "save_pretrained('.') from inside the target",
    "no_exchange": "a system or filesystem without an atomic exchange: files replaced in place",
    "mount_point": "the target is a mount point (EXDEV): files replaced in place",
    "read_only_parent": "the target's parent is read-only (EROFS): staged inside the target, replaced in place",
    "new_target": "a target that does not exist yet",
}
PAIRS = {  # old checkpoint -> new checkpoint
    "layout": ("sharded_2bit", "single_3bit"),
    "layout_back": ("single_3bit", "sharded_2bit"),
    "floats": ("sharded_2bit", "sharded_2bit_floats"),  # same layout and file names, other unclustered weights
}


@pytest.fixture(scope="module")
def variants(tmp_path_factory):
    """Checkpoint directories, the models to save and their logits."""
    root = tmp_path_factory.mktemp("variants")
    torch.manual_seed(0)
    dense = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=4, n_positions=16))
    dense.save_pretrained(root / "dense")
    with torch.no_grad():  # other biases and norms (in several shards); the same clustered weights, LUTs, checksums
        for parameter in dense.parameters():
            if parameter.dim() == 1:
                parameter.add_(0.1 * torch.randn_like(parameter))
    dense.save_pretrained(root / "dense_floats")
    made = {
        "sharded_2bit": (_palettized(root / "dense", 2), "4KB"),
        "single_3bit": (_palettized(root / "dense", 3), None),
        "sharded_2bit_floats": (_palettized(root / "dense_floats", 2), "4KB"),
    }
    out = {}
    for name, (model, shard) in made.items():
        model.save_pretrained(root / name, **({"max_shard_size": shard} if shard else {}))
        (root / name / "tokenizer.json").write_text("{}")
        out[name] = (root / name, model, shard, _logits(model))
    return out


def _state(target: Path, old, new) -> str:
    """'old', 'new', 'refused' (a PalettizedCheckpointError), 'absent', or what went wrong ('mixed', an exception)."""
    if not (target / "config.json").exists() and old is None:
        return "absent"
    try:
        logits = _logits(AutoModelForCausalLM.from_pretrained(target))
    except dkm_hf.PalettizedCheckpointError:
        return "refused"
    except Exception as err:  # noqa: BLE001 - anything else is a failure the test reports
        return f"{type(err).__name__}: {err}"
    if old is not None and torch.equal(logits, old):
        return "old"
    return "new" if torch.equal(logits, new) else "mixed"


def _no_exchange(monkeypatch, target: Path) -> None:
    monkeypatch.setattr(saving, "exchange", lambda a, b: False)


SIMULATIONS = {
    "no_exchange": _no_exchange,
    "mount_point": _simulate_mount_point,
    "read_only_parent": _simulate_read_only_parent,
}


def _save(model, target: Path, shard: str | None, path: str) -> None:
    """`model.save_pretrained(target)` on `path` (its simulated filesystem, or from inside the target)."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        if path in SIMULATIONS:
            SIMULATIONS[path](monkeypatch, target)
        if path == "working_directory":
            monkeypatch.chdir(target)
        model.save_pretrained("." if path == "working_directory" else target, max_shard_size=shard or "5GB")


def _killed_save(model, target: Path, shard: str | None, kill_at: int, path: str) -> bool:
    """Save `model` in a forked child killed right before its `kill_at`-th filesystem operation; whether it died."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            count = itertools.count()
            for name in OPERATIONS:
                real = getattr(os, name)

                def counted(*args, _real=real, **kwargs):
                    if next(count) == kill_at:
                        os.kill(os.getpid(), signal.SIGKILL)
                    return _real(*args, **kwargs)

                setattr(os, name, counted)
            real_exchange = saving.exchange

            def exchange(a, b):
                if next(count) == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)
                return real_exchange(a, b)

            saving.exchange = exchange
            _save(model, target, shard, path)
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    return os.WIFSIGNALED(status)


@pytest.mark.parametrize("pair", list(PAIRS))
@pytest.mark.parametrize("path", list(PATHS))
def test_every_kill_point_leaves_the_old_or_the_new_checkpoint(variants, tmp_path, path, pair):
    """Killed before any filesystem operation of the save, the target holds the old checkpoint, the new one or (on
    the in-place paths) a directory whose load is refused naming a file: never a mix that loads. The next save
    removes what the killed one left and writes the new checkpoint whole."""
    old_dir, _, _, old_logits = variants[PAIRS[pair][0]]
    _, model, shard, new_logits = variants[PAIRS[pair][1]]
    if path == "new_target":
        old_logits = None
    target = (tmp_path / "ckpt").resolve()
    outcomes: dict[str, int] = {}
    for kill_at in itertools.count():
        shutil.rmtree(target, ignore_errors=True)
        if path != "new_target":
            shutil.copytree(old_dir, target)
        died = _killed_save(model, target, shard, kill_at, path)
        state = _state(target, old_logits, new_logits)
        if not died:
            assert state == "new", (path, pair, "the completed save")
            break
        outcomes[state] = outcomes.get(state, 0) + 1
        assert state in ("old", "new", "refused", "absent"), (path, pair, kill_at, state)
        if path in ("exchange", "working_directory", "new_target"):
            assert state != "refused", (path, pair, kill_at)  # atomic: never even a refused directory
        if path != "new_target" and state in ("old", "refused"):
            assert (target / "tokenizer.json").read_text() == "{}"
        _save(model, target, shard, path)
        assert _state(target, old_logits, new_logits) == "new", (path, pair, kill_at, "the next save")
        assert _hidden(target) == [] and not [p for p in target.iterdir() if ".dkm-" in p.name]
        if path != "new_target":
            assert (target / "tokenizer.json").read_text() == "{}"
    print(f"\n{path} {pair}: {kill_at} kill points {outcomes}")
    assert kill_at >= 5  # the save really passed through its operations


# -- concurrent saves ------------------------------------------------------------------------------------------------
def test_a_save_leaves_the_staging_directory_of_a_live_save_alone(variants, tmp_path):
    """A second save into the same directory runs while the first is writing: it must not take the first one's
    staging directory for a leftover of a killed save."""
    first_dir, _, _, first_logits = variants["single_3bit"]
    _, second, _, second_logits = variants["sharded_2bit"]
    target = tmp_path / "ckpt"
    shutil.copytree(variants["sharded_2bit_floats"][0], target)

    def write(tmp: str) -> None:
        shutil.copytree(first_dir, tmp, dirs_exist_ok=True)
        second.save_pretrained(target)  # completes while the first save is still writing
        assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(target)), second_logits)

    saving.atomic_save(target, write)
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(target)), first_logits)
    assert _hidden(target) == []


def test_two_processes_saving_into_one_directory(variants, tmp_path):
    """Two processes save 12 times each into one directory: every save succeeds and the directory ends with one of
    the two checkpoints, whole."""
    target = tmp_path / "ckpt"
    shutil.copytree(variants["sharded_2bit_floats"][0], target)
    children = []
    for name in ("single_3bit", "sharded_2bit"):
        _, model, shard, _ = variants[name]
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                os.close(read)
                for _ in range(12):
                    model.save_pretrained(target, **({"max_shard_size": shard} if shard else {}))
            except BaseException as err:  # noqa: BLE001 - reported to the parent
                os.write(write, f"{type(err).__name__}: {err}".encode())
                code = 1
            finally:
                os._exit(code)
        os.close(write)
        children.append((pid, read))
    errors = []
    for pid, read in children:
        with os.fdopen(read) as pipe:
            errors.append(pipe.read())
        os.waitpid(pid, 0)
    assert errors == ["", ""]
    logits = _logits(AutoModelForCausalLM.from_pretrained(target))
    assert torch.equal(logits, variants["single_3bit"][3]) or torch.equal(logits, variants["sharded_2bit"][3])
    assert _hidden(target) == []


# -- values the loader would refuse ----------------------------------------------------------------------------------
def test_a_lut_that_overflows_float16_is_not_saved(tmp_path):
    """A weight of 1e5 has a centroid of 1e5, which a float16 LUT stores as inf: refused by name when the model is
    prepared; centroids that grew beyond float16 in training make the save fail naming the tensor, before anything
    is written, instead of writing a checkpoint its own loader refuses."""
    torch.manual_seed(0)
    dense = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=4, n_positions=16))
    dense.save_pretrained(tmp_path / "dense")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "dense", dkm_config=dkm_hf.DKMConfig(weight_threshold=0))
    state = model.transformer.h[0].mlp.c_fc.dkm_weights["weight"]
    state.set_centroids(state.centroids.index_fill(1, torch.tensor([0]), 1e5))
    model = dkm_hf.palettize(model)
    with pytest.raises(dkm_hf.PalettizedCheckpointError, match=r"mlp\.c_fc\.weight_lut: 1 value\(s\) are NaN or inf"):
        model.save_pretrained(tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dense"]
    with torch.no_grad():
        dense.transformer.h[0].mlp.c_fc.weight[0, 0] = 1e5
    dense.save_pretrained(tmp_path / "dense")
    with pytest.raises(ValueError, match=r"^transformer\.h\.0\.mlp\.c_fc: values up to 1e\+05, beyond the LUT"):
        _palettized(tmp_path / "dense", 4)
    config = dkm_hf.DKMConfig(bits=4, weight_threshold=0, lut_dtype="float32")
    wide = dkm_hf.palettize(AutoModelForCausalLM.from_pretrained(tmp_path / "dense", dkm_config=config))
    wide.save_pretrained(tmp_path / "out")
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "out")), _logits(wide))


def _tiny_llama_dkm(tiny_dir, **config):
    from conftest import tiny_inputs

    model = AutoModelForCausalLM.from_pretrained(
        tiny_dir("llama"), dkm_config=dkm_hf.DKMConfig(bits=4, weight_threshold=0, **config)
    )
    return model, tiny_inputs("llama")


@torch.no_grad()
def test_a_sharded_save_over_a_single_file_checkpoint_removes_it(tiny_dir, tmp_path):
    """transformers' clean-up removes old shards, not an old model.safetensors, and loading reads that file first:
    a training-format save in shards over a single-file one, and a dequantized (dense) save in shards over a
    palettized single file, each load their own weights (before: a save-id error that saving again did not fix, and
    an error asking to restore the palettized config of the stale file)."""
    model, inputs = _tiny_llama_dkm(tiny_dir)
    out = tmp_path / "out"
    model.save_pretrained(out)
    model.model.layers[0].mlp.up_proj.weight.mul_(1.5)  # a different model: the stale file would not load as it
    model.eval()
    expected = model(**inputs).logits
    model.save_pretrained(out, max_shard_size="4KB")
    assert not (out / "model.safetensors").exists() and (out / "model.safetensors.index.json").exists()
    torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(out).eval()(**inputs).logits, expected)

    shutil.rmtree(out)
    dkm_hf.palettize(model).save_pretrained(out)
    dense = dkm_hf.dequantize(AutoModelForCausalLM.from_pretrained(out))
    dense.save_pretrained(out, max_shard_size="4KB")
    torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(out)(**inputs).logits, expected)
    assert not (out / "model.safetensors").exists()


@torch.no_grad()
def test_palettized_save_with_a_variant(tiny_dir, tmp_path):
    """`save_pretrained(variant=...)` writes model.<variant>.safetensors with its model card (before: the card's
    summary looked for model.safetensors and the save failed), and `from_pretrained(variant=...)` reads it back."""
    model, inputs = _tiny_llama_dkm(tiny_dir)
    dkm_hf.palettize(model)
    expected = model(**inputs).logits
    for max_shard_size in ("1GB", "4KB"):
        out = tmp_path / f"variant-{max_shard_size}"
        model.save_pretrained(out, variant="v1", max_shard_size=max_shard_size)
        names = set(os.listdir(out))
        assert "README.md" in names and not {"model.safetensors", "model.safetensors.index.json"} & names
        assert {"model.v1.safetensors", "model.safetensors.index.v1.json"} & names
        reloaded = AutoModelForCausalLM.from_pretrained(out, variant="v1")
        assert dkm_hf.palettized_modules(reloaded)
        torch.testing.assert_close(reloaded(**inputs).logits, expected)


def test_a_config_that_selects_nothing_saves_a_checkpoint_that_loads(tiny_dir, tmp_path, caplog):
    """A DKMConfig whose target_modules match no weight (warned) saves a training-format checkpoint that loads back
    (before: refused as 'damaged', since it holds no centroids)."""
    model = AutoModelForCausalLM.from_pretrained(
        tiny_dir("llama"), dkm_config=dkm_hf.DKMConfig(target_modules=["qeury"])
    )
    assert not dkm_hf.dkm_modules(model)
    model.save_pretrained(tmp_path / "out")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert not dkm_hf.dkm_modules(reloaded)
    torch.testing.assert_close(reloaded.lm_head.weight, model.lm_head.weight)
