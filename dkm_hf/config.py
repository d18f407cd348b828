"""`DKMConfig`: every knob of DKM clustering, validated, and serialisable into a model's config.json."""

from __future__ import annotations

import copy
import json
import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from transformers.utils.quantization_config import QuantizationConfigMixin

FORMAT_VERSION = 1
GRANULARITIES = ("per_tensor", "per_grouped_channel")
FORMATS = ("train", "palettized")
IMPLEMENTATIONS = ("auto", "chunked", "uniquified")
LUT_DTYPES = ("float16", "bfloat16", "float32")
# Fields a per-module override may change.
OVERRIDABLE = ("bits", "cluster_dim", "tau", "granularity", "group_size", "per_channel_scale", "max_iters")


@dataclass
class LayerSpec:
    """The resolved clustering settings for one module (the config's defaults with any override applied)."""

    bits: int
    cluster_dim: int
    tau: float
    granularity: str
    group_size: int | None
    per_channel_scale: bool
    max_iters: int
    epsilon: float
    implementation: str
    lut_dtype: str = "float16"

    @property
    def n_clusters(self) -> int:
        return 2**self.bits


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
    tau: float = field(
        default=1e-4,
        metadata={
            "help": "Softmax temperature of the attention softmax(-||w - c||^2 / tau). An absolute scale against "
            "squared weight distances (relative to the per-channel scale when `per_channel_scale` is on)."
        },
    )
    max_iters: int = field(default=3, metadata={"help": "DKM iterations per forward pass (paper: 5, coremltools: 3)."})
    epsilon: float = field(default=1e-4, metadata={"help": "Stop iterating when no centroid moves more than this."})
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
        default=None, metadata={"help": "Names or regexes of modules to leave untouched."}
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
            "help": "`auto`, `chunked` (exact, O(N) memory, any cluster_dim) or `uniquified` (eDKM, "
            "cluster_dim 1: attention per distinct 16-bit value)."
        },
    )
    lut_dtype: str = field(default="float16", metadata={"help": "dtype of the stored lookup tables."})
    seed: int = field(default=0, metadata={"help": "Seed of the k-means initialisation."})
    format: str = field(default="train", metadata={"help": "`train` (float weights + centroids) or `palettized`."})
    format_version: int = field(default=FORMAT_VERSION, metadata={"help": "Version of the palettized format."})
    modules: dict[str, dict[str, Any]] = field(
        default_factory=dict, metadata={"help": "Filled on finalisation: per-module bits, shape, groups."}
    )
    quant_method: str = "dkm"

    def __post_init__(self) -> None:
        self.post_init()

    def post_init(self) -> None:
        if isinstance(self.target_modules, str):
            self.target_modules = [self.target_modules]
        if isinstance(self.modules_to_not_convert, str):
            self.modules_to_not_convert = [self.modules_to_not_convert]
        if self.quant_method != "dkm":
            raise ValueError(f"DKMConfig.quant_method must be 'dkm', but the value passed is {self.quant_method!r}")
        _check_layer_fields("", {f: getattr(self, f) for f in OVERRIDABLE} | {"epsilon": self.epsilon})
        _check_int("weight_threshold", self.weight_threshold, 0)
        _check_int("milestone", self.milestone, 0)
        _check_int("seed", self.seed, 0)
        _check_choice("implementation", self.implementation, IMPLEMENTATIONS)
        _check_choice("lut_dtype", self.lut_dtype, LUT_DTYPES)
        _check_choice("format", self.format, FORMATS)
        if not isinstance(self.format_version, int) or self.format_version != FORMAT_VERSION:
            raise ValueError(
                f"DKMConfig.format_version must be {FORMAT_VERSION} (the only palettized format this dkm_hf reads), "
                f"but the value passed is {self.format_version!r}; upgrade dkm_hf to read this checkpoint"
            )
        if self.implementation == "uniquified" and self.cluster_dim != 1:
            raise ValueError(
                f"DKMConfig.implementation='uniquified' needs cluster_dim=1, but cluster_dim is {self.cluster_dim}"
            )
        if not isinstance(self.overrides, dict):
            raise ValueError(f"DKMConfig.overrides must be a dict of regex -> settings, but is {self.overrides!r}")
        for pattern, values in self.overrides.items():
            _compile(f"overrides[{pattern!r}]", pattern)
            if not isinstance(values, dict):
                raise ValueError(f"DKMConfig.overrides[{pattern!r}] must be a dict, but is {values!r}")
            unknown = sorted(set(values) - set(OVERRIDABLE))
            if unknown:
                raise ValueError(
                    f"DKMConfig.overrides[{pattern!r}] has unknown field(s) {unknown}; allowed: {list(OVERRIDABLE)}"
                )
            merged = {f: getattr(self, f) for f in OVERRIDABLE} | values
            _check_layer_fields(f"overrides[{pattern!r}].", merged | {"epsilon": self.epsilon})
        for name in ("target_modules", "modules_to_not_convert"):
            for pattern in getattr(self, name) or []:
                _compile(name, pattern)

    # -- per-module resolution -------------------------------------------------------------------------------------
    def spec_for(self, module_name: str) -> LayerSpec:
        """The settings for `module_name`: defaults, then every matching override in order."""
        values = {f: getattr(self, f) for f in OVERRIDABLE}
        for pattern, override in self.overrides.items():
            if name_matches(pattern, module_name):
                values.update(override)
        return LayerSpec(**values, epsilon=self.epsilon, implementation=self.implementation, lut_dtype=self.lut_dtype)

    # -- serialisation -----------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return copy.deepcopy(asdict(self))

    def to_diff_dict(self) -> dict[str, Any]:
        return self.to_dict()

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], return_unused_kwargs: bool = False, **kwargs):
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(config_dict) - known)
        if unknown:
            raise ValueError(f"DKMConfig got unknown field(s) {unknown}; known fields: {sorted(known)}")
        return super().from_dict(dict(config_dict), return_unused_kwargs=return_unused_kwargs, **kwargs)

    def to_json_string(self, use_diff: bool = True) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"


def name_matches(pattern: str, name: str) -> bool:
    """A module name matches a pattern if it equals it, ends with `.pattern`, or fully matches it as a regex."""
    if name == pattern or name.endswith("." + pattern):
        return True
    try:
        return re.fullmatch(pattern, name) is not None
    except re.error:
        return False


def _compile(field_name: str, pattern: str) -> None:
    if not isinstance(pattern, str):
        raise ValueError(f"DKMConfig.{field_name} must hold strings, but the value passed is {pattern!r}")
    try:
        re.compile(pattern)
    except re.error as err:
        raise ValueError(f"DKMConfig.{field_name}: {pattern!r} is not a valid regex ({err})") from None


def _check_int(name: str, value: Any, low: int, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bound = f"an integer in [{low}, {high}]" if high is not None else f"an integer >= {low}"
        raise ValueError(f"DKMConfig.{name} must be {bound}, but the value passed is {value!r}")


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"DKMConfig.{name} must be one of {list(choices)}, but the value passed is {value!r}")


def _check_layer_fields(prefix: str, v: dict[str, Any]) -> None:
    """Check the per-layer fields; `prefix` is "" for the defaults or "overrides['pattern']." for an override."""
    _check_int(f"{prefix}bits", v["bits"], 1, 8)
    _check_int(f"{prefix}cluster_dim", v["cluster_dim"], 1)
    _check_int(f"{prefix}max_iters", v["max_iters"], 1)
    for name in ("tau", "epsilon"):
        value = v[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ValueError(f"DKMConfig.{prefix}{name} must be a number > 0, but the value passed is {value!r}")
    _check_choice(f"{prefix}granularity", v["granularity"], GRANULARITIES)
    if v["granularity"] == "per_grouped_channel":
        _check_int(f"{prefix}group_size", v["group_size"], 1)
    elif v["group_size"] is not None:
        raise ValueError(
            f"DKMConfig.{prefix}group_size is only used with granularity='per_grouped_channel', but it is "
            f"{v['group_size']!r} with granularity {v['granularity']!r}"
        )
    if not isinstance(v["per_channel_scale"], bool):
        raise ValueError(
            f"DKMConfig.{prefix}per_channel_scale must be a bool, but the value passed is {v['per_channel_scale']!r}"
        )
