"""`push_to_hub` of palettized models, checked at the network boundary (HfApi and ModelCard.load are faked)."""

from __future__ import annotations

import types
from pathlib import Path

import pytest
import torch
from conftest import tiny_model
from huggingface_hub import HfApi, ModelCard
from huggingface_hub.errors import EntryNotFoundError
from torch import nn
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel
from transformers.utils import logging

import dkm_hf
from dkm_hf import DKMConfig
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


# Behaviours of dkm_hf/integrations/summary.py no other test pinned (a mutation review)


def test_bound_bytes_of_owners_and_tied_weights(tmp_path):
    """`bound_bytes` (the information bound benchmarks/size_inference.py reports): N*b/(8d) index bytes plus the LUT
    and scale bytes, 0 for a tied weight."""
    from dkm_hf.integrations.summary import summarize

    model = dkm_hf.palettize(dkm_hf.prepare(tiny_model("llama"), DKMConfig(bits=3, weight_threshold=0)))
    model.save_pretrained(tmp_path / "p")
    summary = summarize(tmp_path / "p")
    tied = [n for n, lay in summary.layouts.items() if lay.tied_to is not None]
    assert tied == ["lm_head"] and summary.bound_bytes("lm_head") == 0.0
    for name, layout in summary.owners.items():
        stored = summary.stored(name)
        others = sum(e.nbytes for kind, e in stored.items() if kind != "weight_indices")
        assert summary.bound_bytes(name) == layout.numel * 3 / 8 + others
        assert summary.bound_bytes(name) < summary.bytes_on_disk(name) + 1


def test_dense_bytes_count_integer_tensors_at_their_own_size(tmp_path):
    """An integer tensor of the checkpoint (a step counter, token ids) counts at its own size in the dense sizes, not
    at the float width."""
    from transformers import PretrainedConfig, PreTrainedModel

    from dkm_hf.integrations.summary import summarize

    class TinyConfig(PretrainedConfig):
        model_type = "dkm_hf_test_counter"

    class Counter(PreTrainedModel):
        config_class = TinyConfig

        def __init__(self, config):
            super().__init__(config)
            self.proj = nn.Linear(16, 16, bias=False)
            self.register_buffer("ids", torch.arange(8))  # int64, persistent
            self.post_init()

        def forward(self, x):
            return self.proj(x)

    model = dkm_hf.palettize(dkm_hf.prepare(Counter(TinyConfig()), DKMConfig(bits=2, weight_threshold=0)))
    model.save_pretrained(tmp_path / "p")
    summary = summarize(tmp_path / "p")
    assert summary.tensors["ids"].dtype == "I64"
    assert summary.dense_bytes(4) == 16 * 16 * 4 + 8 * 8
    assert summary.dense_bytes(2) == 16 * 16 * 2 + 8 * 8


def test_summarize_refuses_a_training_checkpoint(tmp_path):
    """A DKM training checkpoint (float weights and centroids) is not summarised as if it were palettized."""
    from dkm_hf.integrations.summary import summarize

    model = dkm_hf.prepare(tiny_model("llama"), DKMConfig(bits=3, weight_threshold=0))
    model.save_pretrained(tmp_path / "train")
    with pytest.raises(dkm_hf.PalettizedCheckpointError, match="does not describe a dkm_hf palettized checkpoint"):
        summarize(tmp_path / "train")


# Behaviours of dkm_hf/integrations/model_card.py no other test pinned (a mutation review)


@pytest.fixture(scope="module")
def palettized_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("card") / "p"
    dkm_hf.palettize(dkm_hf.prepare(tiny_model("llama"), DKMConfig(bits=3, weight_threshold=0))).save_pretrained(path)
    return path


def test_human_bytes():
    """Sizes in the card are decimal units, whole bytes below 1 KB."""
    from dkm_hf.integrations.model_card import human_bytes

    assert human_bytes(999) == "999 B"
    assert human_bytes(1500) == "1.50 KB"
    assert human_bytes(2_500_000) == "2.50 MB"
    assert human_bytes(3_000_000_000_000) == "3000.00 GB"


def test_card_of_remote_code_names_the_auto_class_its_auto_map_gives(palettized_dir):
    """A model of its own code (an architecture transformers does not map) loads through the Auto class its auto_map
    names, not AutoModel."""
    from dkm_hf.integrations.model_card import model_card
    from dkm_hf.integrations.summary import summarize

    summary = summarize(palettized_dir)
    summary.config = {
        **summary.config,
        "architectures": ["MyModelForCausalLM"],
        "auto_map": {"AutoConfig": "my.MyConfig", "AutoModelForCausalLM": "my.MyModelForCausalLM"},
    }
    card = model_card(summary, None, "me/tiny")
    assert 'AutoModelForCausalLM.from_pretrained("me/tiny", trust_remote_code=True)' in card


def test_card_names_no_local_path_as_its_hub_base_model(palettized_dir, tmp_path, monkeypatch):
    """A model loaded from a relative local folder ("checkpoints/base", which also reads as a repo id) is not declared
    the card's Hub `base_model`; a repo id is."""
    from dkm_hf.integrations.model_card import model_card
    from dkm_hf.integrations.summary import summarize

    (tmp_path / "checkpoints" / "base").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    summary = summarize(palettized_dir)
    local = model_card(summary, "checkpoints/base", "me/tiny")
    assert "base_model" not in local.split("\n---", 1)[0]
    hub = model_card(summary, "org/base", "me/tiny")
    assert "base_model: org/base" in hub


def test_card_keeps_the_extra_tags(palettized_dir):
    """The tags of the card a push replaces (transformers' generated one) are kept after dkm_hf's own, none twice."""
    from dkm_hf.integrations.model_card import TAGS, model_card
    from dkm_hf.integrations.summary import summarize

    card = model_card(summarize(palettized_dir), None, "me/tiny", ["text-generation", "dkm"])
    header = card.split("\n---", 1)[0]
    for tag in TAGS + ["text-generation"]:
        assert f"- {tag}" in header
    assert header.count("- dkm\n") == 1


def test_auto_class_of_an_architecture_listed_in_a_tuple():
    """transformers maps some model types to several classes (deit: DeiTForImageClassification and ...WithTeacher);
    each of them names its Auto class."""
    from dkm_hf.integrations.model_card import auto_class_name

    assert auto_class_name("DeiTForImageClassificationWithTeacher") == "AutoModelForImageClassification"
    assert auto_class_name("FunnelBaseModel") == "AutoModel"
    assert auto_class_name("LlamaForCausalLM") == "AutoModelForCausalLM"


def test_replacing_a_generated_card_keeps_its_tags(palettized_dir, tmp_path):
    """A push replaces transformers' generated README.md with dkm_hf's card and keeps the tags it had (e.g. the
    Trainer's)."""
    import shutil

    from dkm_hf.integrations.model_card import GENERATED_MARKER, write_model_card

    folder = tmp_path / "upload"
    shutil.copytree(palettized_dir, folder)
    generated = (
        f"---\nlibrary_name: transformers\ntags:\n- generated_from_trainer\n- my-tag\n---\n\n{GENERATED_MARKER}.\n"
    )
    (folder / "README.md").write_text(generated)
    assert write_model_card(nn.Module(), str(folder), repo="me/tiny", replace_generated=True)
    header = (folder / "README.md").read_text().split("\n---", 1)[0]
    assert "- generated_from_trainer" in header and "- my-tag" in header and "- dkm" in header
