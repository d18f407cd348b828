"""Parent scopes: a module whose descendants hold DKM weights sees their clustered weights during its own forward.

A DKM module shadows its parameters with their clustered weights while its own forward runs. Some parents read a
child's weight directly instead of calling the child (a Mamba mixer passes `conv1d.weight` to its convolution, some
attention blocks fuse their projections' weights, a hand-written LM multiplies by its embedding's weight in its top
forward); `ParentScope` hooks extend the shadowing to the forward of every ancestor, so that whatever a forward
reads of the model's clustered weights is what the palettized model will hold. (A method other than a forward that
reads a weight sees the plain parameter.)
"""

from __future__ import annotations

import contextlib
import threading

from torch import nn

from .dkm import DKMMixin


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
        with contextlib.ExitStack() as stack:  # a child that fails closes those opened before it, in this thread
            added = []
            for child in module.modules():
                if child is not module and isinstance(child, DKMMixin) and id(child) not in covered:
                    stack.enter_context(child.clustered_parameters())
                    added.append(id(child))
            covered.update(added)
            stack.callback(covered.difference_update, added)
            self._open().append(stack.pop_all())

    def exit(self, module: nn.Module, args, output) -> None:
        opened = self._open()
        if opened:
            opened.pop().close()


_THREAD = threading.local()


def _covered() -> set[int]:
    if not hasattr(_THREAD, "covered"):
        _THREAD.covered = set()
    return _THREAD.covered


def add_parent_scopes(model: nn.Module) -> None:
    """Give every module with DKM descendants a `ParentScope` (once)."""
    for module in model.modules():
        if "_dkm_parent_scope" in module.__dict__:
            continue
        if _has_dkm_descendants(module):
            scope = ParentScope()
            handles = (
                module.register_forward_pre_hook(scope.enter),
                module.register_forward_hook(scope.exit, always_call=True),
            )
            module.__dict__["_dkm_parent_scope"] = handles


def remove_parent_scopes(model: nn.Module) -> None:
    """Remove the `ParentScope` of every module that no longer has DKM descendants."""
    for module in model.modules():
        handles = module.__dict__.get("_dkm_parent_scope")
        if handles is not None and not _has_dkm_descendants(module):
            for handle in handles:
                handle.remove()
            del module.__dict__["_dkm_parent_scope"]


def _has_dkm_descendants(module: nn.Module) -> bool:
    return any(m is not module and isinstance(m, DKMMixin) for m in module.modules())
