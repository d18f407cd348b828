"""What each patch in dkm_hf/integrations/transformers_patches.py relies on in transformers.

Every assertion names its patch, so an upgrade of transformers that moves one of these points fails here, loudly,
instead of somewhere deep in a load or a save.
"""

from __future__ import annotations

import copy
import importlib
import inspect

import pytest
import torch
from conftest import AUTO, TINY, tiny_inputs, tiny_model
from torch import nn
from transformers import PreTrainedModel
from transformers.quantizers import auto as quantizers_auto
from transformers.utils.hub import PushToHubMixin

import dkm_hf
from dkm_hf import DKMConfig
from dkm_hf.integrations import transformers_patches


def _relies(patch: str, condition: bool, what: str) -> None:
    assert condition, f"transformers changed what dkm_hf's patch '{patch}' relies on: {what}"


def test_patch_1_from_pretrained_takes_the_dkm_arguments_off():
    source = inspect.getsource(PreTrainedModel.from_pretrained.__func__.__wrapped__)
    _relies(
        "from_pretrained", 'kwargs.pop("quantization_config"' in source, "from_pretrained reads quantization_config"
    )
    _relies("from_pretrained", getattr(PreTrainedModel.from_pretrained, "_dkm_hf_patched", False), "wrapper installed")
    with pytest.raises(TypeError, match="dkm_config must be a dkm_hf.DKMConfig"):
        PreTrainedModel.from_pretrained("unused", dkm_config={"bits": 4})
    with pytest.raises(ValueError, match="dkm_inference_mode must be one of"):
        PreTrainedModel.from_pretrained("unused", dkm_inference_mode="fast")


def test_patch_2_save_pretrained_signature_and_hook_order():
    original = PreTrainedModel.save_pretrained.__wrapped__
    parameters = inspect.signature(original).parameters
    _relies("save_pretrained", "is_main_process" in parameters and "push_to_hub" in parameters, "its arguments")
    _relies("save_pretrained", hasattr(PreTrainedModel, "should_save_on_this_rank"), "should_save_on_this_rank()")
    source = inspect.getsource(original)
    metadata_hook = source.index("get_state_dict_and_metadata(self)")
    _relies(
        "save_pretrained",
        metadata_hook < source.index("config.save_pretrained(save_directory)"),
        "the quantizer's get_state_dict_and_metadata runs before config.json is written (the checkpoint record)",
    )


def test_patch_3_push_to_hub_writes_its_card_then_uploads():
    source = inspect.getsource(PushToHubMixin.push_to_hub)
    card, upload = (
        source.find('model_card.save(os.path.join(tmp_dir, "README.md"))'),
        source.find("self._upload_modified_files("),
    )
    _relies("push_to_hub card", 0 <= card < upload, "push_to_hub saves its README.md, then _upload_modified_files")
    parameters = list(inspect.signature(PreTrainedModel._upload_modified_files.__wrapped__).parameters)
    _relies("push_to_hub card", parameters[:3] == ["self", "working_dir", "repo_id"], "_upload_modified_files args")


def test_patch_4_ties_are_declared_in_all_tied_weights_keys():
    cls, make_config = TINY["llama"]
    model = cls(make_config())
    declared = getattr(model, "all_tied_weights_keys", None)
    _relies("untie", isinstance(declared, dict), "models declare their ties in all_tied_weights_keys")
    _relies("untie", declared.get("lm_head.weight") == "model.embed_tokens.weight", f"tie map format: {declared}")
    source = inspect.getsource(PreTrainedModel.mark_tied_weights_as_initialized)
    _relies("untie", "all_tied_weights_keys" in source and "get_parameter" in source, "loading looks ties up")


def test_patch_5_init_skips_tensors_marked_initialized():
    from transformers import initialization

    source = inspect.getsource(initialization)
    _relies("mark_initialized", 'getattr(tensor, "_is_hf_initialized", False)' in source, "init functions' flag")
    tensor = transformers_patches.mark_initialized(torch.zeros(3))
    initialization.normal_(tensor)
    assert tensor._is_hf_initialized is True and torch.equal(tensor, torch.zeros(3))


def test_patch_6_registration_survives_a_reload():
    _relies("register", isinstance(quantizers_auto.AUTO_QUANTIZATION_CONFIG_MAPPING, dict), "config mapping")
    _relies("register", isinstance(quantizers_auto.AUTO_QUANTIZER_MAPPING, dict), "quantizer mapping")
    with pytest.raises(ValueError):  # why the patch pops before registering again
        quantizers_auto.register_quantizer("dkm")(dkm_hf.DKMHfQuantizer)
    importlib.reload(dkm_hf)
    assert quantizers_auto.AUTO_QUANTIZATION_CONFIG_MAPPING["dkm"] is dkm_hf.DKMConfig
    assert quantizers_auto.AUTO_QUANTIZER_MAPPING["dkm"] is dkm_hf.DKMHfQuantizer


def test_patch_7_half_and_float_of_dkm_models(tiny_dir):
    from conftest import AUTO

    source = inspect.getsource(PreTrainedModel.half.__wrapped__)
    _relies("half/float", "is_quantized" in source and "raise ValueError" in source, "quantized models refuse .half()")
    model = AUTO["llama"].from_pretrained(tiny_dir("llama"), dkm_config=dkm_hf.DKMConfig(bits=2))
    assert model.half().model.layers[0].mlp.up_proj.weight.dtype == torch.float16
    assert model.float().model.layers[0].mlp.up_proj.centroids.dtype == torch.float32
    plain = AUTO["llama"].from_pretrained(tiny_dir("llama"))
    assert plain.half().model.layers[0].mlp.up_proj.weight.dtype == torch.float16  # unchanged for other models


def test_patch_8_step_zero_checkpoint_for_the_best_model():
    from transformers import Trainer

    for name, params in (
        ("_determine_best_metric", ["self", "metrics", "trial"]),
        ("_save_checkpoint", ["self", "model", "trial"]),
        ("_get_output_dir", ["self", "trial"]),
    ):
        method = getattr(Trainer, name, None)
        _relies("checkpoint_initial_model", method is not None, f"Trainer.{name} exists")
        _relies("checkpoint_initial_model", list(inspect.signature(method).parameters) == params, f"{name} args")
    source = inspect.getsource(Trainer._save_checkpoint)
    _relies("checkpoint_initial_model", "self.state.best_global_step" in source, "best checkpoint by best_global_step")
    _relies("checkpoint_initial_model", "eval_on_start" in inspect.getsource(Trainer), "Trainer has eval_on_start")


def test_patch_9_trainer_counts_items_and_leaves_the_loss_undivided():
    from transformers import Trainer

    counting = inspect.getsource(Trainer._get_num_items_in_batch)
    _relies("accumulated_batch_share", "self._loss_shifts_labels" in counting, "causal LMs count labels[..., 1:]")
    _relies("accumulated_batch_share", '"shift_labels" in batch' in counting, "shift_labels are counted as given")
    step = inspect.getsource(Trainer.training_step)
    _relies(
        "accumulated_batch_share",
        "self.model_accepts_loss_kwargs and num_items_in_batch is not None" in step,
        "the loss is not divided by the accumulation steps once items are counted",
    )
    loss = inspect.getsource(Trainer.compute_loss)
    _relies(
        "accumulated_batch_share",
        "self.accelerator.num_processes // self.get_tp_size()" in loss,
        "a loss normalised by the items of every process is scaled by their number",
    )


def test_patch_10_accounting_methods_keep_their_signatures():
    original = PreTrainedModel.num_parameters.__wrapped__
    _relies(
        "accounting",
        list(inspect.signature(original).parameters)[1:] == ["only_trainable", "exclude_embeddings"],
        "num_parameters(only_trainable, exclude_embeddings)",
    )
    footprint = PreTrainedModel.get_memory_footprint.__wrapped__
    _relies(
        "accounting",
        list(inspect.signature(footprint).parameters)[1:] == ["return_buffers"],
        "get_memory_footprint(return_buffers)",
    )


@pytest.mark.parametrize("reloaded", [False, True])
def test_tie_weights_on_a_palettized_tied_model_keeps_its_outputs(tiny_dir, tmp_path, reloaded):
    """(11) `tie_weights()` rebuilt the tie map and looked up `model.embed_tokens.weight`, which a palettized
    embedding does not have as a parameter: AttributeError after `palettize()` and after reloading."""
    model = AUTO["llama"].from_pretrained(tiny_dir("llama"), dkm_config=DKMConfig(bits=3, weight_threshold=0)).eval()
    dkm_hf.palettize(model)
    if reloaded:
        model.save_pretrained(tmp_path / "p")
        model = AUTO["llama"].from_pretrained(tmp_path / "p").eval()
    inputs = tiny_inputs("llama")
    with torch.no_grad():
        expected = model(**inputs).logits
    model.tie_weights()
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    assert head.palettized_weights["weight"].tied_source is embedding.palettized_weights["weight"]
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, expected, rtol=0, atol=0)


@pytest.mark.parametrize("palettized", [False, True])
@pytest.mark.parametrize("tied", [True, False])
def test_resize_token_embeddings_of_a_clustered_model_is_refused_naming_the_modules(tiny_dir, palettized, tied):
    """(12) A DKM model accepted the resize and failed at its next forward on a reshape; a palettized one kept its
    128 rows (transformers copied into a decoded temporary) while its head became a dense Linear."""
    path = tiny_dir("llama")
    model = AUTO["llama"].from_pretrained(path, tie_word_embeddings=tied, dkm_config=DKMConfig(weight_threshold=0))
    if palettized:
        dkm_hf.palettize(model)
    inputs = tiny_inputs("llama")
    with torch.no_grad():
        expected = model.eval()(**inputs).logits
    with pytest.raises(ValueError, match=r"resize_token_embeddings: model\.embed_tokens, lm_head hold"):
        model.resize_token_embeddings(136)
    assert model.config.vocab_size == 99
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, expected, rtol=0, atol=0)
    dense = AUTO["llama"].from_pretrained(path, tie_word_embeddings=tied)
    dense.resize_token_embeddings(136)  # a dense model still resizes
    assert dense.get_input_embeddings().weight.shape[0] == 136


def test_tie_weights_of_a_palettized_model_whose_tie_map_has_patterns():
    """(11) BERT's MLM head ties a bias too, which makes transformers match patterns against the model's names;
    the palettized embedding's buffers made it raise a ValueError."""
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=99, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=37
    )
    model = dkm_hf.palettize(dkm_hf.prepare(BertForMaskedLM(config), DKMConfig(bits=3, weight_threshold=0))).eval()
    inputs = tiny_inputs("bert")
    with torch.no_grad():
        expected = model(**inputs).logits
    model.tie_weights()
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, expected, rtol=0, atol=0)


def test_resize_token_embeddings_to_the_same_size_goes_through(tiny_dir):
    """(12) Scripts call `resize_token_embeddings(len(tokenizer))` whatever the size; at the current size (or None)
    nothing is resized and the call must not be refused."""
    model = AUTO["llama"].from_pretrained(tiny_dir("llama"), dkm_config=DKMConfig(weight_threshold=0))
    model.resize_token_embeddings(99)
    model.resize_token_embeddings()
    with pytest.raises(ValueError, match="resize_token_embeddings"):
        model.resize_token_embeddings(99, pad_to_multiple_of=64)  # 128 rows


# Behaviours of dkm_hf/integrations/transformers_patches.py no other test pinned (a mutation review)


def test_register_replaces_another_dkm_config_and_quantizer_class():
    """Registering another DKMConfig / quantizer class (a reload of dkm_hf.config makes a new DKMConfig) replaces the
    mapping's entries rather than raising transformers' "already registered" (test_patch_6 reloads dkm_hf only,
    whose DKMConfig stays the same class)."""
    from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

    from dkm_hf import DKMHfQuantizer
    from dkm_hf.integrations.transformers_patches import register

    class OtherConfig(DKMConfig):
        pass

    class OtherQuantizer(DKMHfQuantizer):
        pass

    try:
        register(OtherConfig, OtherQuantizer)
        assert AUTO_QUANTIZATION_CONFIG_MAPPING["dkm"] is OtherConfig
        assert AUTO_QUANTIZER_MAPPING["dkm"] is OtherQuantizer
    finally:
        AUTO_QUANTIZATION_CONFIG_MAPPING["dkm"], AUTO_QUANTIZER_MAPPING["dkm"] = DKMConfig, DKMHfQuantizer


def test_dkm_config_and_quantization_config_together_are_refused():
    """dkm_config= together with quantization_config= is refused: the one would silently replace the other."""
    from transformers import LlamaForCausalLM

    with pytest.raises(ValueError, match="pass the DKM configuration once"):
        LlamaForCausalLM.from_pretrained("unused", dkm_config=DKMConfig(), quantization_config=DKMConfig(bits=2))


def test_the_batch_share_is_scaled_by_the_processes_the_count_was_summed_over():
    """With average_tokens_across_devices (Trainer's default) the item count is summed over the processes and DDP
    averages their gradients, so each process's share is multiplied back by their number (over the tensor-parallel
    size). The two-process tests train with AdamW, which would hide a gradient scale."""
    from types import SimpleNamespace

    from dkm_hf.integrations.transformers_patches import accumulated_batch_share

    def trainer(average, processes, tp=1):
        return SimpleNamespace(
            args=SimpleNamespace(average_tokens_across_devices=average),
            accelerator=SimpleNamespace(num_processes=processes),
            get_tp_size=lambda: tp,
        )

    items = torch.tensor(3)
    assert accumulated_batch_share(trainer(True, 1), items, 12).item() == 0.25
    assert accumulated_batch_share(trainer(True, 4), items, torch.tensor(12)).item() == 1.0
    assert accumulated_batch_share(trainer(True, 4, tp=2), items, 12).item() == 0.5
    assert accumulated_batch_share(trainer(False, 4), items, 12).item() == 0.25


def test_num_parameters_without_embeddings_counts_no_palettized_embedding():
    """num_parameters(exclude_embeddings=True) of a palettized model leaves its palettized embedding out, as for the
    dense model."""
    dense = tiny_model("llama")
    model = dkm_hf.palettize(dkm_hf.prepare(copy.deepcopy(dense), DKMConfig(bits=4, weight_threshold=0)))
    assert dkm_hf.palettized_modules(model)
    assert model.num_parameters(exclude_embeddings=True) == dense.num_parameters(exclude_embeddings=True)
    assert model.num_parameters() == dense.num_parameters()


def test_dtype_and_device_of_a_model_without_float_parameters():
    """A PreTrainedModel whose every float parameter is palettized has no parameter to read its dtype and device from;
    they come from its palettized weights and buffers."""
    from transformers import PretrainedConfig, PreTrainedModel

    class TinyConfig(PretrainedConfig):
        model_type = "dkm_hf_test_all_palettized"

    class Tiny(PreTrainedModel):
        config_class = TinyConfig

        def __init__(self, config):
            super().__init__(config)
            self.proj = nn.Linear(16, 16, bias=False)
            self.post_init()

        def forward(self, x):
            return self.proj(x)

    model = dkm_hf.palettize(dkm_hf.prepare(Tiny(TinyConfig()), DKMConfig(bits=2, weight_threshold=0)))
    assert not list(model.parameters()) and dkm_hf.palettized_modules(model)
    assert model.dtype == torch.float32
    assert model.device == torch.device("cpu")


def test_dkm_inference_mode_applies_with_output_loading_info(tmp_path):
    """dkm_inference_mode= applies when from_pretrained returns (model, info) (output_loading_info=True)."""
    from transformers import LlamaForCausalLM

    from dkm_hf.nn.palettized import PalettizedMixin

    model = dkm_hf.palettize(dkm_hf.prepare(tiny_model("llama"), DKMConfig(bits=4, weight_threshold=0)))
    model.save_pretrained(tmp_path / "p")
    loaded, info = LlamaForCausalLM.from_pretrained(
        tmp_path / "p", dkm_inference_mode="dense", output_loading_info=True
    )
    modes = {m.inference_mode for m in loaded.modules() if isinstance(m, PalettizedMixin)}
    assert modes == {"dense"} and not info["missing_keys"]
