"""A linear map by a frozen weight that is computed on demand (decoded from a LUT + indices), recomputed in backward.

`F.linear(x, W)` with an `x` that needs a gradient keeps W until the backward pass (grad_x = grad_y W). For a
palettized weight W is a temporary decoded for the forward, so autograd would keep every layer's decoded weight
between the forward and the backward pass: LoRA training on a packed model would hold the dense model's weights
after all. `recomputed_linear` keeps nothing of W and decodes it again in backward, as a packed forward does; the
weight gets no gradient (it is frozen: not a parameter).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


class _RecomputedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, bias: torch.Tensor | None, weight_fn: Callable[[], torch.Tensor]):
        ctx.weight_fn, ctx.has_bias = weight_fn, bias is not None
        return F.linear(x, weight_fn(), bias)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out @ ctx.weight_fn().to(grad_out.dtype)
        if ctx.has_bias and ctx.needs_input_grad[1]:
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
        return grad_x, grad_bias, None


def recomputed_linear(
    x: torch.Tensor,
    weight_fn: Callable[[], torch.Tensor],
    bias: torch.Tensor | None = None,
    transposed: bool = False,
) -> torch.Tensor:
    """y = x W^T + bias with W = weight_fn() (out_features, in_features; (in, out) if `transposed`, as transformers'
    Conv1D stores it; no gradient), called once in the forward and once more in the backward pass; nothing of W is
    kept in between."""
    if transposed:
        return _RecomputedLinear.apply(x, bias, lambda: weight_fn().t())
    return _RecomputedLinear.apply(x, bias, weight_fn)
