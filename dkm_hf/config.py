"""`DKMConfig` (how to cluster: settings, validated) and `CheckpointRecord` (what a saved checkpoint holds: state).

Both are serialised together as config.json's `quantization_config`: the settings' fields plus `format`,
`format_version`, `modules` (one `Layout` record per palettized module) and `save_id` from the record.
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from transformers.utils import logging
from transformers.utils.quantization_config import QuantizationConfigMixin

from .config_checks import (
    check_absolute_tau,
    check_bool,
    check_choice,
    check_int,
    check_layer_fields,
    check_number,
    check_pattern,
    name_matches,
)
from .nn.layout import LUT_DTYPES, TAU_SCALES, ClusterSettings, Layout
from .ops.dkm import IMPLEMENTATIONS

logger = logging.get_logger(__name__)

# Version 2 adds the save id (config.json and every weight file) and makes the checksums mandatory, covering each
# tensor's dtype and shape as well as its bytes; version 1 files (optional, bytes-only checksums) still load.
FORMAT_VERSION = 2
READABLE_FORMAT_VERSIONS = (1, 2)
FORMATS = ("train", "palettized")
# Fields a per-module override may change.
OVERRIDABLE = ("bits", "cluster_dim", "tau", "granularity", "group_size", "per_channel_scale", "max_iters")
MAX_SEED = 2**63 - 1
# tau=None: the relative tau (tau_scale="variance") for a layer's bit width, from the accuracy measurements in
# README "Choosing tau": 0.01 is right at 4 bits (MobileNetV2 88.6% vs 86.9% at 0.05; MiniLM, SmolLM2 at 4 bits);
# at 3 and 2 bits, where 8 or 4 centroids share a weight distribution, a softer 0.05 (SmolLM2 3-bit perplexity 1.36x
# dense where 0.01 stalls; MobileNetV2 2-bit 84.3% vs 79.9%; MiniLM 2-bit +0.75 points).
DEFAULT_TAU_HIGH_BITS, DEFAULT_TAU_LOW_BITS, LOW_BITS = 1e-2, 5e-2, 3


def default_tau(bits: int) -> float:
    """The relative tau that `tau=None` means for a layer clustered to `bits` bits."""
    return DEFAULT_TAU_LOW_BITS if bits <= LOW_BITS else DEFAULT_TAU_HIGH_BITS


# The tau schedule's default end, as a fraction of each layer's starting tau (DKMTrainingArguments.tau_end_ratio=None).
# At 3 bits and fewer the soft model trained at a constant 0.05 can sit far from its hard snap (MobileNetV2 2-bit:
# 87.9% soft, 69.0% hard); annealing to a tenth over the phase ends training on a model that is nearly hard
# (README "Choosing tau"). At 4 bits the gap is small and the schedule stays flat.
DEFAULT_TAU_END_RATIO_HIGH_BITS, DEFAULT_TAU_END_RATIO_LOW_BITS = 1.0, 0.1


def default_tau_end_ratio(bits: int) -> float:
    """tau at the last step / tau at the milestone, for a layer of `bits` bits when the schedule's end is not given."""
    return DEFAULT_TAU_END_RATIO_LOW_BITS if bits <= LOW_BITS else DEFAULT_TAU_END_RATIO_HIGH_BITS


@dataclass
class CheckpointRecord:
    """The form of a saved model: `train` (float weights + centroids) or `palettized` (LUTs + packed indices, with
    each palettized module's `Layout` record in `modules`). Derived from the model's modules when it is saved.

    `save_id` names the save that wrote config.json; the same id is in every weight file of that save, so a
    directory holding files of two saves (an interrupted in-place save) is refused instead of loading a mix."""

    format: str = "train"
    format_version: int = FORMAT_VERSION
    modules: dict[str, dict[str, Any]] = field(default_factory=dict)
    save_id: str | None = None

    KEYS = ("format", "format_version", "modules", "save_id")

    def __post_init__(self) -> None:
        check_choice("format", self.format, FORMATS)
        if isinstance(self.format_version, bool) or self.format_version not in READABLE_FORMAT_VERSIONS:
            readable = " or ".join(map(str, READABLE_FORMAT_VERSIONS))
            raise ValueError(
                f"DKMConfig.format_version must be {readable} (the checkpoint formats this dkm_hf reads), "
                f"but the value passed is {self.format_version!r}; upgrade dkm_hf to read this checkpoint"
            )
        if not isinstance(self.modules, dict):
            raise ValueError(f"DKMConfig.modules must be a dict of module records, but is {self.modules!r}")
        if self.save_id is not None and not isinstance(self.save_id, str):
            raise ValueError(f"DKMConfig.save_id must be a string or None, but is {self.save_id!r}")

    @classmethod
    def of(cls, layouts: dict[str, Layout]) -> CheckpointRecord:
        """The record of a palettized model with these module layouts (an empty dict: a training checkpoint)."""
        if not layouts:
            return cls()
        return cls("palettized", FORMAT_VERSION, {name: layouts[name].to_record() for name in sorted(layouts)})


@dataclass
class DKMConfig(QuantizationConfigMixin):
    """Configuration of Differentiable K-Means clustering (DKM, Cho et al., ICLR 2022).

    Every clustered weight is cut into vectors of `cluster_dim` values and softly assigned to `2**bits` centroids;
    after training each vector snaps to its nearest centroid and is stored as a `bits`-bit index into a lookup table.
    Bits per weight = `bits / cluster_dim`.

    Pass it to `from_pretrained(path, dkm_config=DKMConfig(...))` (or `quantization_config=`) after `import dkm_hf`,
    or to `dkm_hf.prepare(model, config)` for any `torch.nn.Module`.
    """

    bits: int = field(default=4, metadata={"help": "Centroids per LUT = 2**bits; 1 to 8."})
    cluster_dim: int = field(
        default=1, metadata={"help": "Length of the vectors that are clustered (d). Must divide each weight's rows."}
    )
    tau: float | None = field(
        default=None,
        metadata={
            "help": "Softmax temperature of the attention softmax(-||w - c||^2 / tau). With tau_scale='variance' "
            "(the default) relative to each LUT group's weight variance, so one value suits every layer and model; "
            "None (the default) takes the measured one for each layer's bit width: 0.01 at 4 bits and more, 0.05 at "
            "3 bits and fewer. With tau_scale='absolute' a scale against squared weight distances (required then). "
            "It is the starting value of DKMTrainingArguments' tau schedule, which by default anneals it to a tenth "
            "at 3 bits and fewer."
        },
    )
    tau_scale: str = field(
        default="variance",
        metadata={
            "help": "`variance`: tau and epsilon are relative to each LUT group's weight variance and standard "
            "deviation (of the clustered, per-channel-scaled values); `absolute`: used as given."
        },
    )
    max_iters: int = field(default=3, metadata={"help": "DKM iterations per forward pass (paper: 5, coremltools: 3)."})
    epsilon: float = field(
        default=1e-3,
        metadata={"help": "Stop iterating when no centroid moves more than this (x the group's std when relative)."},
    )
    granularity: str = field(
        default="per_tensor", metadata={"help": "`per_tensor` (one LUT per weight) or `per_grouped_channel`."}
    )
    group_size: int | None = field(
        default=None, metadata={"help": "Output channels sharing one LUT when granularity is per_grouped_channel."}
    )
    per_channel_scale: bool = field(
        default=False, metadata={"help": "Divide each output channel by its max |w| before clustering."}
    )
    weight_threshold: int = field(default=2048, metadata={"help": "Weights with fewer elements stay uncompressed."})
    target_modules: list[str] | None = field(
        default=None, metadata={"help": "Names or regexes of modules to cluster; None clusters every supported one."}
    )
    modules_to_not_convert: list[str] | None = field(
        default=None,
        metadata={"help": "Modules left untouched, with everything under them (transformers' matching rules)."},
    )
    overrides: dict[str, dict[str, Any]] = field(
        default_factory=dict,
        metadata={
            "help": "Regex -> {field: value} for the matching modules (mixed precision), e.g. {'.*embed.*': "
            "{'bits': 3}}. Fields: " + ", ".join(OVERRIDABLE)
        },
    )
    cluster_embeddings: bool = field(default=True, metadata={"help": "Whether nn.Embedding weights are clustered."})
    milestone: int = field(default=0, metadata={"help": "Training step at which clustering switches on."})
    implementation: str = field(
        default="auto",
        metadata={
            "help": "`auto`, `fused`, `chunked` or `uniquified`. `chunked`: exact, O(N) memory, any cluster_dim, "
            "pure torch. `fused`: the chunked path's math in one fused kernel per iteration that never writes the "
            "attention out (C++ on CPU, built on first use; Triton on CUDA), float32 arithmetic; chunked where no "
            "kernel serves the device. `uniquified` (eDKM, cluster_dim 1): attention per distinct 16-bit value; exact "
            "for bf16/fp16 weights, float32 weights are bucketed by their float16 rounding: on all-MiniLM-L6-v2 at 4 "
            "bits that moves the soft weights by 6e-4 and the weight gradients by 2% (0.5-4.4%), relative, against "
            "the exact path; benchmarks/uniquified_error.py. `auto`: uniquified for cluster_dim 1 with >= 131,072 "
            "weights per LUT (>= 8,192 where no fused kernel serves the device), else fused where a kernel serves the "
            "device, else chunked."
        },
    )
    lut_dtype: str = field(default="float16", metadata={"help": "dtype of the stored lookup tables."})
    seed: int = field(default=0, metadata={"help": "Seed of the k-means initialisation."})
    kmeans_restarts: int = field(
        default=1,
        metadata={
            "help": "k-means runs per LUT at initialisation; the one of lowest inertia is kept (scikit-learn's "
            "n_init). It avoids poor local optima (4 runs cut SmolLM2-135M's 3-bit per-row post-training perplexity "
            "from 727 to 453 and rescued a MiniLM k-means seed that had lost 5 points) but has not measurably "
            "improved a DKM-trained model (MobileNetV2 after DKM moved by 2-4 points between k-means seeds either "
            "way), so the default is one run. Costs that many times the initialisation (per-row LUTs of a "
            "1536 x 576 layer: 1.4 s instead of 0.36 s at one CPU thread)."
        },
    )
    quant_method: str = "dkm"

    def __post_init__(self) -> None:
        self.record = CheckpointRecord()
        self.post_init()

    def post_init(self) -> None:
        for name in ("target_modules", "modules_to_not_convert"):
            value = getattr(self, name)
            if isinstance(value, str):
                setattr(self, name, [value])
            elif isinstance(value, (tuple, set)):  # a set's order is the hash seed's: sorted, config.json stays one
                setattr(self, name, sorted(value, key=str) if isinstance(value, set) else list(value))
        if self.quant_method != "dkm":
            raise ValueError(f"DKMConfig.quant_method must be 'dkm', but the value passed is {self.quant_method!r}")
        defaults = {f: getattr(self, f) for f in OVERRIDABLE}
        check_layer_fields("", defaults)
        check_number("epsilon", self.epsilon)
        check_int("weight_threshold", self.weight_threshold, 0)
        check_int("milestone", self.milestone, 0)
        check_int("seed", self.seed, 0, MAX_SEED)
        check_int("kmeans_restarts", self.kmeans_restarts, 1)
        check_bool("cluster_embeddings", self.cluster_embeddings)
        check_choice("implementation", self.implementation, ("auto", *IMPLEMENTATIONS))
        check_choice("lut_dtype", self.lut_dtype, tuple(LUT_DTYPES))
        check_choice("tau_scale", self.tau_scale, TAU_SCALES)
        check_absolute_tau("tau", self.tau, self.tau_scale)
        if (uniquified := self.implementation == "uniquified") and self.cluster_dim != 1:
            raise ValueError(f"DKMConfig.implementation='uniquified' needs cluster_dim=1, not {self.cluster_dim}")
        pairs = isinstance(self.overrides, list) and all(isinstance(p, (list, tuple)) for p in self.overrides)
        if pairs and all(len(p) == 2 for p in self.overrides) and len(dict(self.overrides)) == len(self.overrides):
            self.overrides = dict(self.overrides)  # to_dict's [pattern, settings] pairs, in order
        if not isinstance(self.overrides, dict):
            raise ValueError(f"DKMConfig.overrides must be a dict of regex -> settings, but is {self.overrides!r}")
        for pattern, values in self.overrides.items():
            check_pattern(f"overrides[{pattern!r}]", pattern)
            if not isinstance(values, dict):
                raise ValueError(f"DKMConfig.overrides[{pattern!r}] must be a dict, but is {values!r}")
            if unknown := sorted(set(values) - set(OVERRIDABLE)):
                raise ValueError(
                    f"DKMConfig.overrides[{pattern!r}] has unknown field(s) {unknown}; allowed: {list(OVERRIDABLE)}"
                )
            check_layer_fields(f"overrides[{pattern!r}].", defaults | values, values)
            check_absolute_tau(f"overrides[{pattern!r}]", values.get("tau", self.tau), self.tau_scale)
            if uniquified and values.get("cluster_dim", 1) != 1:
                what = f"overrides[{pattern!r}] sets cluster_dim={values['cluster_dim']}"
                raise ValueError(f"DKMConfig.implementation='uniquified' needs cluster_dim=1, but {what}")
        for name in ("target_modules", "modules_to_not_convert"):
            patterns = getattr(self, name)
            if patterns is not None and not isinstance(patterns, list):
                raise ValueError(f"DKMConfig.{name} must be a list of strings, but the value passed is {patterns!r}")
            for pattern in patterns or []:
                check_pattern(name, pattern)

    def update(self, **kwargs) -> dict[str, Any]:
        """Set the fields named in `kwargs` (as transformers' configs do; the others are returned), then check the
        result as the constructor does: on an error, every field is as it was before."""
        before, unused = {f.name: getattr(self, f.name) for f in fields(self)}, super().update(**kwargs)
        try:
            self.post_init()
        except (ValueError, TypeError):
            self.__dict__.update(before)
            raise
        return unused

    # -- per-module resolution -------------------------------------------------------------------------------------
    def _values_for(self, module_name: str) -> dict[str, Any]:
        return self._resolve(module_name)[0]

    def _resolve(self, module_name: str) -> tuple[dict[str, Any], dict[str, tuple[int, str]]]:
        """The weight's settings (the defaults, then every matching override in order) and, for each field an
        override sets, (the position, the pattern) of the last one that does."""
        values, sources = {f: getattr(self, f) for f in OVERRIDABLE}, {}
        for index, (pattern, override) in enumerate(self.overrides.items()):
            if name_matches(pattern, module_name):
                values.update(override)
                sources.update(dict.fromkeys(override, (index, pattern)))
        return values, sources

    def layout_for(
        self, module_name: str, shape: tuple[int, ...], transposed: bool = False, channel_dims: int = 1
    ) -> Layout:
        """The layout of weight `module_name`: defaults, then every matching override in order. A group_size is
        needed where the result is per_grouped_channel; where it is per_tensor, a group_size set before the
        granularity (by the defaults or an earlier override: "all grouped but X") is ignored, one set after it
        refused."""
        v, sources = self._resolve(module_name)
        where = {f: f"overrides[{sources[f][1]!r}]" if f in sources else "the defaults" for f in sources | v}
        if v["granularity"] == "per_grouped_channel" and v["group_size"] is None:
            what = f"{where['granularity']} make(s) {module_name} per_grouped_channel"
            raise ValueError(f"DKMConfig: {what} and {where['group_size']} give it no group_size")
        late = sources.get("group_size", (-1,))[0] > sources.get("granularity", (-1,))[0]
        if v["granularity"] == "per_tensor" and v["group_size"] is not None and late:
            what = f"{where['group_size']} sets group_size {v['group_size']} for {module_name}"
            raise ValueError(f"DKMConfig: {what}, which {where['granularity']} make(s) per_tensor")
        group_size = v["group_size"] if v["granularity"] == "per_grouped_channel" else None
        values = (v["bits"], v["cluster_dim"], group_size, v["per_channel_scale"])
        return Layout.for_weight(shape, *values, transposed, module_name, channel_dims)

    def settings_for(self, module_name: str) -> ClusterSettings:
        v = self._values_for(module_name)
        tau = v["tau"] if v["tau"] is not None else default_tau(v["bits"])
        s = {f: getattr(self, f) for f in ("epsilon", "implementation", "lut_dtype", "tau_scale", "kmeans_restarts")}
        return ClusterSettings(tau=tau, max_iters=v["max_iters"], **s)

    # -- serialisation -----------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        settings = {f.name: getattr(self, f.name) for f in fields(self)}
        # overrides as [pattern, settings] pairs: JSON writers sort dict keys, and their order decides which one wins
        settings["overrides"] = [[pattern, values] for pattern, values in self.overrides.items()]
        return copy.deepcopy(settings | asdict(self.record))

    def differing_settings(self, other: DKMConfig) -> list[str]:
        """The settings (not the checkpoint record) in which `other` differs from this config; module lists match in
        any order."""
        mine, theirs = self.to_dict(), other.to_dict()
        for settings in (mine, theirs):
            for key in ("target_modules", "modules_to_not_convert"):
                settings[key] = None if settings[key] is None else set(settings[key])
        return [key for key in mine if key not in CheckpointRecord.KEYS and mine[key] != theirs.get(key)]

    def to_diff_dict(self) -> dict[str, Any]:
        return self.to_dict()

    def __eq__(self, other: object) -> bool:  # the order of overrides decides which one wins: it counts here too
        return self.to_dict() == other.to_dict() if isinstance(other, DKMConfig) else NotImplemented

    def __iter__(self):
        yield from self.to_dict().items()

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], return_unused_kwargs: bool = False, **kwargs):
        """A config from its dict form: a user's settings, or config.json's `quantization_config`.

        A dict that carries a `format_version` was written by dkm_hf when it saved a checkpoint. Everything a
        checkpoint needs to load is its format (refused here unless this release reads that version) and the module
        layouts; the other fields are the settings it was trained with. A newer release may have added settings of
        its own, so in a checkpoint's dict unknown fields are dropped with a warning that names them; in a user's
        dict they are an error (a misspelt field would otherwise be ignored).
        """
        if not isinstance(config_dict, dict):
            raise TypeError(
                f"DKMConfig.from_dict needs a dict of fields (e.g. config.json's quantization_config), but got a "
                f"{type(config_dict).__name__}: {config_dict!r}"
            )
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(config_dict) - known - set(CheckpointRecord.KEYS))
        if unknown and "format_version" not in config_dict:
            raise ValueError(f"DKMConfig got unknown field(s) {unknown}; known fields: {sorted(known)}")
        record = CheckpointRecord(**{k: config_dict[k] for k in CheckpointRecord.KEYS if k in config_dict})
        if unknown:
            logger.warning(
                f"dkm_hf: the checkpoint's DKMConfig has field(s) {unknown} that this dkm_hf does not know (written "
                f"by a newer release, format version {record.format_version}, which this one reads); they are "
                "training settings, ignored here"
            )
        settings = {k: v for k, v in config_dict.items() if k in known}
        result = super().from_dict(settings, return_unused_kwargs=return_unused_kwargs, **kwargs)
        config = result[0] if return_unused_kwargs else result
        config.record = record
        if kwargs:  # transformers' from_dict sets them after the constructor's checks
            config.post_init()
        return result

    def to_json_string(self, use_diff: bool = True) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"
