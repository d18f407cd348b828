"""Several processes: what DKM needs from FSDP2 (`torch.distributed.fsdp.fully_shard`).

DKM runs on a layer's whole weight. FSDP2 gathers a sharded unit's parameters before its forward and backward, so a
DKM module inside a unit (wrap per decoder block) clusters the gathered weight; the centroid buffers are not sharded,
and every rank updates them identically from the same gathered weights. Outside forward and backward the weights
are shards: `full_weights` gathers them for what needs the whole model at once (palettizing it, saving it), and
`gathered_by_unit` one unit at a time for what works layer by layer between steps (DKMCallback: initialising
centroids at the milestone, cluster health, re-seeding), so that no more than one unit is ever whole.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from ..nn.weights import FSDPModule


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole state dict of an FSDP2-sharded model, on the CPU (collective: every rank calls it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def saves_no_full_model(trainer) -> bool:
    """Whether Trainer's save_model writes no model file: FSDP with a state dict type other than FULL_STATE_DICT
    (SHARDED_STATE_DICT checkpoints are torch.distributed.checkpoint folders)."""
    return trainer.is_fsdp_enabled and "FULL" not in str(trainer.accelerator.state.fsdp_plugin.state_dict_type)


@contextlib.contextmanager
def full_weights(model: nn.Module) -> Iterator[nn.Module]:
    """Inside, every parameter of an FSDP2-sharded model is whole on every rank; outside, sharded again. A no-op
    for a model that is not sharded. Every rank must enter it (the gathering is collective)."""
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for unit in units:
        unit.unshard()
    try:
        yield model
    finally:
        for unit in reversed(units):
            unit.reshard()


def gathered_by_unit(model: nn.Module, modules: Iterable[tuple[str, nn.Module]]) -> Iterator[tuple[str, nn.Module]]:
    """`modules` ((name, module or clustered weight) pairs of `model`) again, grouped by the FSDP2 unit that holds
    their parameters (the
    nearest sharded module at or above them), each group while only its unit is whole. Collective: every rank must
    run it to the end with the same modules. For a model that is not sharded: the modules, nothing gathered."""
    owner: dict[int, nn.Module | None] = {}

    def walk(module: nn.Module, unit: nn.Module | None) -> None:
        unit = module if isinstance(module, FSDPModule) else unit
        owner[id(module)] = unit
        for child in module.children():
            walk(child, unit)

    walk(model, None)
    groups: dict[int, tuple[nn.Module | None, list[tuple[str, nn.Module]]]] = {}
    for name, module in modules:
        holder = module if isinstance(module, nn.Module) else module.module  # a clustered weight: its module
        unit = owner.get(id(holder))
        groups.setdefault(id(unit), (unit, []))[1].append((name, module))
    for unit, group in groups.values():
        if unit is not None:
            unit.unshard()
        try:
            yield from group
        finally:
            if unit is not None:
                unit.reshard()
