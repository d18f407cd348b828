"""`push_to_hub` of palettized models, checked at the network boundary (HfApi and ModelCard.load are faked)."""

from __future__ import annotations

import types
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi, ModelCard
from huggingface_hub.errors import EntryNotFoundError
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel
from transformers.utils import logging

import dkm_hf
from dkm_hf.integrations.model_card import DKM_MARKER, auto_class_name
from dkm_hf.integrations.summary import summarize

logging.set_verbosity_error()
logging.disable_progress_bar()

REPO = "someone/tiny-gpt2-dkm"
USER_CARD = "---\nlicense: mit\n---\n# My model\nHand-written."


class FakeHub:
    """Records what transformers would send to the Hub; `card` is the README.md the repo already has (or None)."""

    def __init__(self, monkeypatch, card: str | None = None):
        self.repos, self.commits = [], []
        hub = self

        def create_repo(api, repo_id, **kwargs):
            hub.repos.append(repo_id)
            return types.SimpleNamespace(repo_id=repo_id)

        def create_commit(api, repo_id, operations, **kwargs):
            files = {op.path_in_repo: Path(op.path_or_fileobj).read_bytes() for op in operations}
            hub.commits.append({"repo_id": repo_id, "files": files, **kwargs})
            return types.SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/0")

        def load(repo_id_or_path, **kwargs):
            if card is None:
                raise EntryNotFoundError(f"{repo_id_or_path} has no README.md")
            return ModelCard(card)

        monkeypatch.setattr(HfApi, "create_repo", create_repo)
        monkeypatch.setattr(HfApi, "create_commit", create_commit)
        monkeypatch.setattr(ModelCard, "load", staticmethod(load))


@pytest.fixture(scope="module")
def palettized(tmp_path_factory):
    torch.manual_seed(0)
    dense = tmp_path_factory.mktemp("dense")
    GPT2LMHeadModel(GPT2Config(vocab_size=100, n_embd=32, n_layer=1, n_head=4, n_positions=32)).save_pretrained(dense)
    model = AutoModelForCausalLM.from_pretrained(dense, dkm_config=dkm_hf.DKMConfig(bits=4, weight_threshold=0))
    return dkm_hf.palettize(model), dense


def _reload(files: dict[str, bytes], path: Path):
    path.mkdir()
    for name, blob in files.items():
        (path / name).write_bytes(blob)
    return AutoModelForCausalLM.from_pretrained(path)


def _logits(model, x):
    with torch.no_grad():
        return model(x).logits


def test_push_to_hub_uploads_the_palettized_checkpoint_and_card(palettized, tmp_path, monkeypatch):
    model, dense = palettized
    hub = FakeHub(monkeypatch)
    model.push_to_hub(REPO)
    assert hub.repos == [REPO]
    (commit,) = hub.commits
    assert commit["repo_id"] == REPO and commit["commit_message"] == "Upload model"
    files = commit["files"]
    assert sorted(files) == ["README.md", "config.json", "generation_config.json", "model.safetensors"]
    card = files["README.md"].decode()
    assert DKM_MARKER in card
    assert f'AutoModelForCausalLM.from_pretrained("{REPO}")' in card
    assert "pip install dkm_hf" in card and "import dkm_hf" in card
    assert f"This checkpoint is `{dense}` (GPT2LMHeadModel)" in card
    assert "| 4 | 1 | 4 | per tensor | no | 6 | 16,512 |" in card  # c_attn, c_proj, c_fc, mlp.c_proj, wpe, wte
    x = torch.randint(0, 100, (2, 7))
    reloaded = _reload(files, tmp_path / "download")
    assert torch.equal(_logits(reloaded, x), _logits(model, x))
    summary = summarize(tmp_path / "download")
    assert f"| palettized (this one) | {summary.total_bytes:,} |" in card
    assert f"| dense fp32 | {summary.dense_bytes(4):,} |" in card
    assert len(files["model.safetensors"]) < summary.dense_bytes(4) / 4


def test_push_to_hub_keeps_the_repo_card(palettized, monkeypatch):
    model, _ = palettized
    hub = FakeHub(monkeypatch, card=USER_CARD)
    model.push_to_hub(REPO)
    card = hub.commits[0]["files"]["README.md"].decode()
    assert "# My model\nHand-written." in card and "license: mit" in card  # the user's card, not dkm_hf's
    assert DKM_MARKER not in card
    assert "- dkm\n" in card  # transformers adds the model's tags (`add_model_tags`) to the repo's card


def test_push_to_hub_sharded(palettized, tmp_path, monkeypatch):
    model, _ = palettized
    hub = FakeHub(monkeypatch)
    model.push_to_hub(REPO, max_shard_size="4KB")
    files = hub.commits[0]["files"]
    shards = sorted(f for f in files if f.startswith("model-"))
    assert len(shards) >= 2 and "model.safetensors.index.json" in files and "model.safetensors" not in files
    assert sorted(set(files) - set(shards)) == [
        "README.md",
        "config.json",
        "generation_config.json",
        "model.safetensors.index.json",
    ]
    x = torch.randint(0, 100, (2, 7))
    assert torch.equal(_logits(_reload(files, tmp_path / "download"), x), _logits(model, x))


def test_save_pretrained_with_push_to_hub(palettized, tmp_path, monkeypatch):
    model, _ = palettized
    hub = FakeHub(monkeypatch)
    model.save_pretrained(tmp_path / "local", push_to_hub=True)
    assert hub.repos == ["local"]  # transformers' default: the directory name, not the temporary one
    files = hub.commits[0]["files"]
    assert sorted(files) == ["README.md", "config.json", "generation_config.json", "model.safetensors"]
    assert DKM_MARKER in files["README.md"].decode()
    local = sorted(p.name for p in (tmp_path / "local").iterdir())
    assert local == sorted(files)
    assert (tmp_path / "local" / "README.md").read_bytes() == files["README.md"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["local"]


def test_auto_class_names():
    assert auto_class_name("GPT2LMHeadModel") == "AutoModelForCausalLM"
    assert auto_class_name("BertForSequenceClassification") == "AutoModelForSequenceClassification"
    assert auto_class_name("ResNetForImageClassification") == "AutoModelForImageClassification"
    assert auto_class_name("BertModel") == "AutoModel"


def _hub_cache(cache: Path, repo: str, files: Path, subfolder: str = "") -> Path:
    """`files` laid out as huggingface_hub's cache holds a download: snapshots/<rev>/... link into blobs/."""
    import hashlib
    import os

    repo_dir = cache / f"models--{repo.replace('/', '--')}"
    revision = "0" * 40
    snapshot = repo_dir / "snapshots" / revision / subfolder
    (repo_dir / "blobs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs").mkdir(exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    for file in files.iterdir():
        blob = repo_dir / "blobs" / hashlib.sha256(file.read_bytes()).hexdigest()
        blob.write_bytes(file.read_bytes())
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    (repo_dir / "refs" / "main").write_text(revision)
    return repo_dir / "snapshots" / revision


def test_palettized_checkpoint_loads_from_the_hub_cache(palettized, tmp_path):
    """A downloaded checkpoint's files are links into the cache's blobs/: allowed at the snapshot's root, in a
    subfolder of it (`subfolder=`), and through a link to the snapshot (before: refused as files outside the
    checkpoint but at the root)."""
    model, _ = palettized
    model.save_pretrained(tmp_path / "saved")
    x = torch.randint(0, 100, (1, 8))
    cache = tmp_path / "cache"
    root = _hub_cache(cache, "org/root", tmp_path / "saved")
    _hub_cache(cache, "org/nested", tmp_path / "saved", subfolder="inner")
    (tmp_path / "link").symlink_to(root)
    loads = [
        AutoModelForCausalLM.from_pretrained("org/root", cache_dir=cache, local_files_only=True),
        AutoModelForCausalLM.from_pretrained("org/nested", subfolder="inner", cache_dir=cache, local_files_only=True),
        AutoModelForCausalLM.from_pretrained(tmp_path / "link"),
    ]
    for loaded in loads:
        assert len(list(dkm_hf.palettized_modules(loaded))) == len(list(dkm_hf.palettized_modules(model))) > 0
        torch.testing.assert_close(_logits(loaded, x), _logits(model, x), rtol=0, atol=0)
    # palettized files under a config that does not declare them are refused for a cached repo too (before: for a
    # local directory only; the repo loaded with every clustered weight random)
    _, dense = palettized
    plain = GPT2LMHeadModel.config_class.from_pretrained(dense)
    with pytest.raises(dkm_hf.PalettizedCheckpointError, match="does not declare it"):
        AutoModelForCausalLM.from_pretrained("org/nested", subfolder="inner", cache_dir=cache, config=plain)


def test_card_load_lines_name_the_default_mode_and_remote_code(palettized, tmp_path):
    """The card's alternative load line offered packed mode, which is the default, as the low-memory option; a model
    with its own code (auto_map) got a line without trust_remote_code that fails."""
    import json

    from dkm_hf.integrations.model_card import model_card

    model, _ = palettized
    model.save_pretrained(tmp_path / "saved")
    card = model_card(summarize(tmp_path / "saved"), None, "me/tiny")
    assert 'AutoModelForCausalLM.from_pretrained("me/tiny")' in card
    assert 'dkm_inference_mode="dense"' in card and 'dkm_inference_mode="packed"' not in card
    config = json.loads((tmp_path / "saved" / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_mine.MyConfig", "AutoModelForCausalLM": "modeling_mine.Mine"}
    (tmp_path / "saved" / "config.json").write_text(json.dumps(config))
    card = model_card(summarize(tmp_path / "saved"), None, "me/tiny")
    assert 'AutoModelForCausalLM.from_pretrained("me/tiny", trust_remote_code=True)' in card


def test_a_partly_downloaded_repo_is_left_to_transformers(palettized, tmp_path):
    """An interrupted download (the index and some shards in the Hub cache): the check before loading no longer
    reads the cached snapshot as a damaged checkpoint, so transformers downloads the rest (before: refused, naming
    the shard not downloaded yet); a complete one is checked."""
    from dkm_hf.integrations.preflight import cached_snapshot

    model, _ = palettized
    model.save_pretrained(tmp_path / "sharded", max_shard_size="2KB")
    shards = sorted((tmp_path / "sharded").glob("model-*.safetensors"))
    assert len(shards) > 1
    cache = tmp_path / "cache"
    snapshot = _hub_cache(cache, "org/sharded", tmp_path / "sharded")
    assert cached_snapshot("org/sharded", "", cache, None, None) == str(snapshot)
    (snapshot / shards[-1].name).unlink()
    assert cached_snapshot("org/sharded", "", cache, None, None) is None
