"""Parent scopes: a module whose children hold DKM weights sees their clustered weights during its own forward.

A DKM module shadows its parameters with their clustered weights while its own forward runs. Some parents read a
child's weight directly instead of calling the child (a Mamba mixer passes `conv1d.weight` to its convolution, some
attention blocks fuse their projections' weights); `ParentScope` hooks extend the shadowing to the parent's forward.
"""

from __future__ import annotations

import contextlib
import threading

from torch import nn

from .dkm import DKMMixin


class ParentScope:
    """Forward hooks of a module whose children hold DKM weights: while the parent's forward runs, the children's
    clustered parameters read as their clustered weights, so a parent that reads a child's weight directly (a Mamba
    mixer's `conv1d.weight`, an attention block's fused projections) computes with the clustered weight too. The
    weights are the ones the children's own forwards compute (cached: no extra DKM pass)."""

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
        with contextlib.ExitStack() as stack:  # a child that fails closes those opened before it, in this thread
            for child in module.children():
                if isinstance(child, DKMMixin):
                    stack.enter_context(child.clustered_parameters())
            self._open().append(stack.pop_all())

    def exit(self, module: nn.Module, args, output) -> None:
        opened = self._open()
        if opened:
            opened.pop().close()


def add_parent_scopes(model: nn.Module) -> None:
    """Give every module with DKM children a `ParentScope` (once)."""
    for module in model.modules():
        if "_dkm_parent_scope" in module.__dict__:
            continue
        if any(isinstance(child, DKMMixin) for child in module.children()):
            scope = ParentScope()
            handles = (
                module.register_forward_pre_hook(scope.enter),
                module.register_forward_hook(scope.exit, always_call=True),
            )
            module.__dict__["_dkm_parent_scope"] = handles


def remove_parent_scopes(model: nn.Module) -> None:
    """Remove the `ParentScope` of every module that no longer has DKM children."""
    for module in model.modules():
        handles = module.__dict__.get("_dkm_parent_scope")
        if handles is not None and not any(isinstance(child, DKMMixin) for child in module.children()):
            for handle in handles:
                handle.remove()
            del module.__dict__["_dkm_parent_scope"]
