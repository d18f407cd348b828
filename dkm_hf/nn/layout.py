"""`Layout`: how one clustered weight is cut into LUT groups and vectors, and how it is recorded in config.json.

A weight is seen as (channels, features) rows: channels are output channels (rows of a Linear, filters of a Conv,
columns of transformers' Conv1D, which stores (in, out), tokens of an Embedding). A stacked 3-D parameter (the
experts of a mixture-of-experts layer, (experts, out, in)) has `channel_dims=2`: its channels are the rows of every
expert, and its LUT groups never straddle two experts (at least one LUT per expert). Experts stored (experts, in,
out) (GPT-OSS, Llama4) are `transposed` like Conv1D: their channels are each expert's columns, and their record
says so (`"transposed": true`; Conv1D's transposition is read from the model's module class). Vectors of
`cluster_dim` values run along the features of one channel; LUT group g holds channels [g * C/G, (g + 1) * C/G).
A palettized weight is

    lut      (groups, 2**bits, cluster_dim)       the centroids
    indices  groups * vectors_per_group indices   b-bit, packed
    scale    (channels, 1)                        only with per_channel_scale

The same `Layout` describes a DKM module in training, its palettized module, a record in
`quantization_config.modules` and a row of `dkm-hf inspect`. `ClusterSettings` holds the rest of a module's
settings: those of the DKM loop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import torch

from ..errors import PalettizedCheckpointError
from ..ops import fused
from ..ops.packing import packed_size

SCALE_FLOOR = 1e-12  # a per-channel scale below it is an all-zero row's
RECORD_KEYS = ("bits", "cluster_dim", "groups", "shape", "per_channel_scale")
OPTIONAL_RECORD_KEYS = ("channel_dims", "transposed")  # written only when not 1 / only for stacked experts
LUT_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass(frozen=True)
class Layout:
    shape: tuple[int, ...]
    bits: int
    cluster_dim: int = 1
    groups: int = 1
    per_channel_scale: bool = False
    transposed: bool = False  # stored (features, channels): transformers' Conv1D, experts (experts, in, out)
    tied_to: str | None = None  # the weight whose LUT and indices this one shares
    channel_dims: int = 1  # leading dimensions that index channels (2 for stacked experts)

    @classmethod
    def for_weight(
        cls,
        shape: tuple[int, ...],
        bits: int,
        cluster_dim: int = 1,
        group_size: int | None = None,
        per_channel_scale: bool = False,
        transposed: bool = False,
        name: str = "",
        channel_dims: int = 1,
    ) -> Layout:
        """The layout of a weight of `shape`; a ValueError names the weight when the geometry does not fit.

        With `channel_dims=2` (stacked experts) there is at least one LUT group per expert."""
        layout = cls(tuple(shape), bits, cluster_dim, 1, per_channel_scale, transposed, None, channel_dims)
        where = name or "the weight"
        if layout.features % cluster_dim:
            raise ValueError(
                f"cluster_dim={cluster_dim} does not divide the {layout.features} features per channel of {where} "
                f"(weight shape {tuple(shape)})"
            )
        if group_size is not None:
            if layout.channels % group_size:
                raise ValueError(
                    f"group_size={group_size} does not divide the {layout.channels} output channels of {where} "
                    f"(weight shape {tuple(shape)})"
                )
            layout = replace(layout, groups=layout.channels // group_size)
        stacks = layout.stacks
        if group_size is not None and layout.groups % stacks:
            raise ValueError(
                f"group_size={group_size} makes LUT groups that straddle the {stacks} experts of {where} (weight "
                f"shape {tuple(shape)}): choose a group size that divides {layout.channels // stacks}"
            )
        return replace(layout, groups=max(layout.groups, stacks))

    # -- sizes --------------------------------------------------------------------------------------------------------
    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def channels(self) -> int:
        if self.transposed:  # (in, out) or (experts, in, out)
            return math.prod(self.shape[: self.channel_dims - 1]) * self.shape[-1]
        return math.prod(self.shape[: self.channel_dims])

    @property
    def stacks(self) -> int:
        """How many stacked weights (experts) the parameter holds: LUT groups never straddle two."""
        return math.prod(self.shape[: self.channel_dims - 1])

    @property
    def features(self) -> int:
        return self.numel // self.channels

    @property
    def n_clusters(self) -> int:
        return 2**self.bits

    @property
    def vectors(self) -> int:
        return self.numel // self.cluster_dim

    @property
    def vectors_per_group(self) -> int:
        return self.vectors // self.groups

    @property
    def lut_shape(self) -> tuple[int, int, int]:
        return (self.groups, self.n_clusters, self.cluster_dim)

    @property
    def scale_shape(self) -> tuple[int, int]:
        return (self.channels, 1)

    @property
    def packed_bytes(self) -> int:
        return packed_size(self.vectors, self.bits)

    @property
    def bits_per_weight(self) -> float:
        return self.bits / self.cluster_dim

    # -- views of the weight ------------------------------------------------------------------------------------------
    def to_rows(self, weight: torch.Tensor) -> torch.Tensor:
        """(channels, features) view of the weight."""
        if not self.transposed:
            return weight.reshape(self.channels, self.features)
        if weight.dim() == 2:
            return weight.t()
        return weight.transpose(-1, -2).reshape(self.channels, self.features)

    def from_rows(self, rows: torch.Tensor) -> torch.Tensor:
        if not self.transposed:
            return rows.reshape(self.shape)
        if len(self.shape) == 2:
            return rows.t()
        return rows.reshape(*self.shape[:-2], self.shape[-1], self.shape[-2]).transpose(-1, -2)

    def to_vectors(self, rows: torch.Tensor) -> torch.Tensor:
        """(groups, vectors_per_group, cluster_dim) view of the rows."""
        return rows.reshape(self.groups, -1, self.cluster_dim)

    def from_vectors(self, vectors: torch.Tensor) -> torch.Tensor:
        return vectors.reshape(self.channels, self.features)

    def initial_scale(self, weight: torch.Tensor) -> torch.Tensor:
        """The per-channel scales (channels, 1) of `weight` that initialisation sets: each row's largest |w|. An
        all-zero row (a padding token's embedding) takes the other rows' mean, not the floor: once training moves it,
        w / 1e-12 would be ~1e7 and the attention of its values overflow."""
        amax = self.to_rows(weight.detach().float()).abs().amax(1, keepdim=True)
        live = amax > SCALE_FLOOR
        typical = ((amax * live).sum() / live.sum().clamp_min(1)).clamp_min(SCALE_FLOOR)
        return torch.where(live, amax, typical)

    def weight_from_vectors(self, vectors: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        """The weight, in its own shape, from its (groups, n, d) vectors and the per-channel scale if any."""
        rows = self.from_vectors(vectors)
        if scale is not None:
            rows = rows * scale
        return self.from_rows(rows)

    # -- config.json records ------------------------------------------------------------------------------------------
    def to_record(self) -> dict[str, Any]:
        if self.tied_to is not None:
            return {"tied_to": self.tied_to}
        record = {
            "bits": self.bits,
            "cluster_dim": self.cluster_dim,
            "groups": self.groups,
            "shape": list(self.shape),
            "per_channel_scale": self.per_channel_scale,
        }
        if self.channel_dims != 1:
            record["channel_dims"] = self.channel_dims
            if self.transposed:
                record["transposed"] = True
        return record

    @classmethod
    def from_record(cls, name: str, record: Any, transposed: bool = False) -> Layout:
        """Check one untied `quantization_config.modules` record; errors name the module and the field."""
        where = f"config.json: palettized module {name!r}"
        if not isinstance(record, dict) or not set(RECORD_KEYS) <= set(record) <= {
            *RECORD_KEYS,
            *OPTIONAL_RECORD_KEYS,
        }:
            raise PalettizedCheckpointError(f"{where} has a malformed record {record!r} (expected keys {RECORD_KEYS})")
        for key in ("bits", "cluster_dim", "groups"):
            if not _is_count(record[key]) or record[key] < 1:
                raise PalettizedCheckpointError(f"{where} needs a positive integer {key!r}, got {record[key]!r}")
        if record["bits"] > 8:
            raise PalettizedCheckpointError(f"{where} has bits={record['bits']}, above 8")
        shape = record["shape"]
        if not isinstance(shape, list) or not shape or not all(_is_count(s) and s > 0 for s in shape):
            raise PalettizedCheckpointError(f"{where} has invalid shape {shape!r}")
        if len(shape) < 2 and transposed:
            raise PalettizedCheckpointError(f"{where} has shape {shape}, which cannot be a transposed Conv1D weight")
        channel_dims = record.get("channel_dims", 1)
        if not _is_count(channel_dims) or not 1 <= channel_dims < max(2, len(shape)):
            raise PalettizedCheckpointError(f"{where} has invalid channel_dims {channel_dims!r} for shape {shape}")
        if "transposed" in record:  # stacked experts say how they are stored; Conv1D's comes from the model
            if channel_dims == 1 or record["transposed"] is not True:
                raise PalettizedCheckpointError(
                    f"{where} has 'transposed': {record['transposed']!r}, which only stacked experts (channel_dims "
                    "2) record, as true"
                )
        if channel_dims > 1:
            transposed = record.get("transposed", False)
        if not isinstance(record["per_channel_scale"], bool):
            raise PalettizedCheckpointError(
                f"{where} needs a bool 'per_channel_scale', got {record['per_channel_scale']!r}"
            )
        layout = cls(
            tuple(shape),
            record["bits"],
            record["cluster_dim"],
            record["groups"],
            record["per_channel_scale"],
            transposed,
            None,
            channel_dims,
        )
        if layout.features % layout.cluster_dim or layout.channels % layout.groups or layout.groups % layout.stacks:
            raise PalettizedCheckpointError(
                f"{where} has cluster_dim={layout.cluster_dim} and groups={layout.groups}, which do not divide its "
                f"{layout.features} features and {layout.channels} channels"
            )
        return layout


def layouts_from_records(records: Any, transposed=lambda name: False) -> dict[str, Layout]:
    """Every layout of `quantization_config.modules`, ties resolved (a tied layout copies its source's geometry).

    `transposed(name)` says whether a module stores its weight transposed (transformers' Conv1D); without the model,
    pass the best guess. Errors name the module.
    """
    if not isinstance(records, dict):
        raise PalettizedCheckpointError(f"config.json: quantization_config.modules must be a dict, got {records!r}")
    layouts = {}
    for name, record in records.items():
        if not (isinstance(record, dict) and "tied_to" in record):
            layouts[name] = Layout.from_record(name, record, transposed(name))
    for name, record in records.items():
        if isinstance(record, dict) and "tied_to" in record:
            source = record["tied_to"]
            if set(record) != {"tied_to"} or not isinstance(source, str):
                raise PalettizedCheckpointError(
                    f"config.json: palettized module {name!r} has a malformed tie record {record!r}"
                )
            if source not in layouts:
                raise PalettizedCheckpointError(
                    f"config.json: palettized module {name!r} is tied to {source!r}, which is not a palettized module "
                    "with its own LUT"
                )
            layouts[name] = replace(layouts[source], transposed=transposed(name), tied_to=source)
    return layouts


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


TAU_SCALES = ("variance", "absolute")


def group_variance(v: torch.Tensor) -> torch.Tensor:
    """var(w_g) of `ClusterSettings` for vectors v (G, n, d): the mean squared distance to each group's mean vector,
    (G,). Float32 vectors on CPU take the compiled kernel (two passes over each group in cache); otherwise a centred
    norm on CPU, 10-50x faster there than torch.var's Welford pass (benchmarks/step_loops.py), and torch.var on a GPU
    (one launch instead of five: a step of per-row DKM there is bound by launches)."""
    if v.device.type == "cpu":
        if v.dtype == torch.float32 and not v.requires_grad and fused.available(v):
            return fused.group_variance(v)
        return torch.linalg.vector_norm(v - v.mean(1, keepdim=True), dim=(1, 2)).square() / v.shape[1]
    variance = torch.var(v, dim=1, correction=0)  # (G, d)
    return variance.squeeze(-1) if v.shape[-1] == 1 else variance.sum(-1)


@dataclass
class ClusterSettings:
    """The DKM loop's settings for one module (the config's values with any override applied).

    With `tau_scale="variance"` tau and epsilon are relative: the softmax temperature of LUT group g is
    tau * var(w_g) and its early-stop threshold epsilon * std(w_g), measured on the group's clustered vectors at
    every forward (var = mean squared distance to the group's mean vector). With "absolute" they are used as given.
    A tau schedule (`DKMCallback`) moves `tau` during training; `configured_tau` keeps the value it starts from.
    """

    tau: float  # every field from `DKMConfig.settings_for`: no defaults here to differ from DKMConfig's
    max_iters: int
    epsilon: float
    implementation: str
    lut_dtype: str
    tau_scale: str
    kmeans_restarts: int
    configured_tau: float | None = None  # None: tau

    def __post_init__(self):
        if self.configured_tau is None:
            self.configured_tau = self.tau

    @property
    def lut_torch_dtype(self) -> torch.dtype:
        return LUT_DTYPES[self.lut_dtype]


def vector_groups(start: int, stop: int, per_group: int, device: torch.device) -> torch.Tensor:
    """The LUT group of vectors start..stop (int32: groups * 2**bits fits), counted in int64 (stacked experts pass
    2**31 vectors: DeepSeek-V3's 256 x 4096 x 7168)."""
    return torch.arange(start, stop, device=device, dtype=torch.int64).floor_divide_(per_group).to(torch.int32)
