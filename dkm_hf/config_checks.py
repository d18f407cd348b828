"""The checks of `DKMConfig`'s fields (each error names the field and the value passed), and how a pattern of
`target_modules`, `modules_to_not_convert` or `overrides` matches a module name."""

from __future__ import annotations

import math
import re
from typing import Any

GRANULARITIES = ("per_tensor", "per_grouped_channel")


def name_matches(pattern: str, name: str) -> bool:
    """A module name matches a pattern if it equals it, ends with `.pattern`, or fully matches it as a regex."""
    if name == pattern or name.endswith("." + pattern):
        return True
    try:
        return re.fullmatch(pattern, name) is not None
    except re.error:
        return False


def check_pattern(field_name: str, pattern: Any) -> None:
    if not isinstance(pattern, str):
        raise ValueError(f"DKMConfig.{field_name} must hold strings, but the value passed is {pattern!r}")
    try:
        re.compile(pattern)
    except re.error as err:
        raise ValueError(f"DKMConfig.{field_name}: {pattern!r} is not a valid regex ({err})") from None


def check_int(name: str, value: Any, low: int, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bound = f"an integer in [{low}, {high}]" if high is not None else f"an integer >= {low}"
        raise ValueError(f"DKMConfig.{name} must be {bound}, but the value passed is {value!r}")


def check_number(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (value > 0 and math.isfinite(value)):
        raise ValueError(f"DKMConfig.{name} must be a finite number > 0, but the value passed is {value!r}")


def check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"DKMConfig.{name} must be a bool (True or False), but the value passed is {value!r}")


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"DKMConfig.{name} must be one of {list(choices)}, but the value passed is {value!r}")


def check_absolute_tau(where: str, tau: float | None, tau_scale: str) -> None:
    if tau is None and tau_scale == "absolute":
        raise ValueError(
            f"DKMConfig.{where}: tau_scale='absolute' needs an explicit tau (a scale against squared weight "
            "distances, e.g. 1e-4 for weights of std ~0.04); tau=None only has a default for tau_scale='variance'"
        )


def check_layer_fields(prefix: str, v: dict[str, Any], own: dict[str, Any] | None = None) -> None:
    """Check the per-layer fields; `prefix` is "" for the defaults or "overrides['pattern']." for an override, `v`
    the defaults with the override's `own` values (its granularity and group_size are resolved per weight, after
    every override that matches it: `layout_for`)."""
    check_int(f"{prefix}bits", v["bits"], 1, 8)
    check_int(f"{prefix}cluster_dim", v["cluster_dim"], 1)
    check_int(f"{prefix}max_iters", v["max_iters"], 1, 2**24)  # the fused kernels' bound
    if v["tau"] is not None:
        check_number(f"{prefix}tau", v["tau"])
    check_choice(f"{prefix}granularity", v["granularity"], GRANULARITIES)
    granularity, group_size = v["granularity"], v["group_size"]
    if own is not None:  # an override: its own group_size, and one it contradicts itself (the rest: per weight)
        granularity = own.get("granularity", "per_grouped_channel" if own.get("group_size") is not None else None)
        group_size = own.get("group_size", None if granularity != "per_grouped_channel" else 1)
    if granularity == "per_grouped_channel":
        check_int(f"{prefix}group_size", group_size, 1)
    elif group_size is not None:
        raise ValueError(
            f"DKMConfig.{prefix}group_size is only used with granularity='per_grouped_channel', but it is "
            f"{group_size!r} with granularity {granularity!r}"
        )
    check_bool(f"{prefix}per_channel_scale", v["per_channel_scale"])
