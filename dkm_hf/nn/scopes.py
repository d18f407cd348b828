"""Parent scopes: a module whose descendants hold DKM weights sees their clustered weights during its own forward.

A DKM module shadows its parameters with their clustered weights while its own forward runs. Some parents read a
child's weight directly instead of calling the child (a Mamba mixer passes `conv1d.weight` to its convolution, some
attention blocks fuse their projections' weights, a hand-written LM multiplies by its embedding's weight in its top
forward); `ParentScope` hooks extend the shadowing to the parent's forward, and to every ancestor's where the
clustered weights are kept through the forward anyway (training with gradients, evaluation with hard weights), so
that what a forward reads of the model's clustered weights is what the palettized model will hold. (A method other
than a forward that reads a weight sees the plain parameter; so does an ancestor beyond the parent in a train-mode
forward without gradients or in soft evaluation, where computing every weight up front would hold a dense copy of
the model.)
"""

from __future__ import annotations

import contextlib
import threading
import weakref

import torch
from torch import nn

from .dkm import DKMMixin
from .weights import is_whole


class ParentScope:
    """Forward hooks of a module whose descendants hold DKM weights: while its forward runs, their clustered parameters
    read as their clustered weights, so a forward that reads a descendant's weight directly (a Mamba mixer's
    `conv1d.weight`, an attention block's fused projections) computes with the clustered weight too. The weights are
    the ones the descendants' own forwards compute (cached: no extra DKM pass). Locks are taken in model order."""

    def __init__(self):
        self.local = threading.local()  # each thread's open scopes (a stack: a parent may run inside itself)

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self.local = threading.local()

    def _open(self) -> list[contextlib.ExitStack]:
        if not hasattr(self.local, "open"):
            self.local.open = []
        return self.local.open

    def enter(self, module: nn.Module, args) -> None:
        covered = _covered()  # shadowed already by an enclosing scope of this thread: nothing to add
        children = {id(child) for child in module.children()}
        with contextlib.ExitStack() as stack:  # a child that fails closes those opened before it, in this thread
            added, found = [], False
            for child in module.modules():
                if child is module or not isinstance(child, DKMMixin):
                    continue
                found = True
                if id(child) in covered:
                    continue
                if id(child) not in children and not _kept(child):
                    continue  # made here, a deeper weight would live through the whole forward: its parent's scope
                if not all(is_whole(w.weight) for w in child.dkm_weights.values()):
                    continue  # sharded by FSDP2 until its unit runs: the scopes inside that unit shadow it
                stack.enter_context(child.clustered_parameters())
                added.append(id(child))
            if not found:  # no DKM descendant left: the hooks go (with the exit hook)
                _drop_scope(module)
                return
            covered.update(added)
            stack.callback(covered.difference_update, added)
            self._open().append(stack.pop_all())

    def exit(self, module: nn.Module, args, output) -> None:
        opened = self._open()
        if opened:
            opened.pop().close()


_THREAD = threading.local()
VIEWED: weakref.WeakSet = weakref.WeakSet()  # the models inside an open `palettized_view`


def _kept(module: DKMMixin) -> bool:
    """Whether the module's clustered weights live through the forward anyway (so an ancestor's scope costs no memory):
    soft weights awaiting their gradient in training, the cached hard weights in evaluation. Not in a train-mode
    forward without gradients, nor in soft evaluation: each is computed and dropped in turn there."""
    weights = module.dkm_weights.values()
    if module.training:
        return torch.is_grad_enabled() and all(w.weight.requires_grad for w in weights)
    return not any(w.soft_eval for w in weights)


def _covered() -> set[int]:
    if not hasattr(_THREAD, "covered"):
        _THREAD.covered = set()
    return _THREAD.covered


def add_parent_scopes(model: nn.Module) -> None:
    """Give every module with DKM descendants a `ParentScope` (once)."""
    holders = _dkm_ancestors(model)
    for module in model.modules():
        if "_dkm_parent_scope" in module.__dict__:
            continue
        if id(module) in holders:
            scope = ParentScope()
            handles = (
                module.register_forward_pre_hook(scope.enter),
                module.register_forward_hook(scope.exit, always_call=True),
            )
            module.__dict__["_dkm_parent_scope"] = handles


def remove_parent_scopes(model: nn.Module) -> None:
    """Remove the `ParentScope` of every module that no longer has DKM descendants."""
    holders = _dkm_ancestors(model)
    for module in model.modules():
        if "_dkm_parent_scope" in module.__dict__ and id(module) not in holders:
            _drop_scope(module)


def _drop_scope(module: nn.Module) -> None:
    """Remove the `ParentScope` hooks of a module without DKM descendants, unless a palettized view below will put
    DKM modules back (a copy of a model taken inside the view is another object, and sheds them)."""
    if not (VIEWED and any(child in VIEWED for child in module.modules())):
        for handle in module.__dict__.pop("_dkm_parent_scope", ()):
            handle.remove()


def _dkm_ancestors(model: nn.Module) -> set[int]:
    """The ids of the modules of `model` that have a DKM module below them, along every path (one pass)."""
    modules = dict(model.named_modules(remove_duplicate=False))
    ancestors: set[int] = set()
    for name, module in modules.items():
        if name and isinstance(module, DKMMixin):
            parts = name.split(".")
            ancestors.update(id(modules[".".join(parts[:i])]) for i in range(len(parts)))
    return ancestors
