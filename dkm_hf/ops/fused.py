"""The DKM loop as fused kernels: one pass over the weight per iteration, the N x k attention never in memory.

On CPU, a LUT group of up to 2,048 vectors (per-row LUTs: one row) is one work item whose attention stays in cache
between the sums of an iteration and what needs its new centroids, so an iteration and the soft weight (backward: the
gradient of C_T and dL/dw) share one pass: the LLM recipe's one iteration is one pass forward and one backward. Larger
groups take a second pass for the soft weight (backward: for the gradient of C_T).

    fused_dkm(w, c0, tau, epsilon, max_iters, importance) -> (W~, C_T, history, masses, T)   torch.ops.dkm_hf.fused_dkm
    fused_dkm_backward(w, grad, history, masses, T, tau, importance) -> dL/dw   torch.ops.dkm_hf.fused_dkm_backward

Same math, early stop and per-group tau / epsilon as the chunked path of `dkm.py` (vectors w (G, n, d) in float32,
bfloat16 or float16, float32 centroids (G, k, d), tau and epsilon (G,), and optionally the vectors' float32
importance (G, n) of an importance-weighted loop, `dkm_cluster(importance=)`); history is (max_iters + 1, G, k, d) and
masses (max_iters, G, k), the entries after T (a 0-d int64 tensor) unused, so every output has a fixed shape. The
loop runs in float32 whatever w's dtype; W~ and dL/dw come back in w's dtype, and what is saved for backward is w
itself (for a 16-bit weight no float32 copy stays alive between forward and backward). Both are `torch.library`
custom ops with fake implementations and the backward registered as their autograd formula: autograd, torch.compile
and FSDP2 see ordinary ops.

The uniquified path of `dkm.py` calls the CPU extension directly: its loop over a weight's distinct values is the
forward with the values' counts as importance, and `backward_buckets(u, sums, counts, history, masses, T, tau) -> (b,
a)` gives each distinct value's share of the gradient through the centroids and the derivative of its soft weight.

On CPU the kernel is `dkm_fused.cpp`, built on first use with `torch.utils.cpp_extension.load` (-O3, OpenMP, the -m
flags of `native.arch_flags`) into a folder of `<cache>/dkm_hf/torch_extensions/` (`extension.py`); on CUDA it is the
Triton kernel of `fused_triton.py` when triton is installed. When neither is there (a failed build warns once, naming
the reason; DKM_HF_NATIVE=0 disables the CPU build), `available` is False and `dkm_cluster` keeps the pure-torch path.
"""

from __future__ import annotations

import importlib.util
import threading
import warnings
from pathlib import Path
from types import ModuleType

import torch

from . import native
from .extension import build_and_load, build_failure_reason, build_root, one_device, source_tag

# The Triton kernels, where they can run (triton imports in about a second: not on machines without CUDA).
if torch.cuda.is_available() and importlib.util.find_spec("triton") is not None:
    from . import fused_triton
else:
    fused_triton = None

SOURCE = Path(__file__).with_name("dkm_fused.cpp")
BUCKETS_SOURCE = Path(__file__).with_name("dkm_buckets.cpp")  # the uniquified path's per-weight loops (buckets.py)
KMEANS_SOURCE = Path(__file__).with_name("dkm_kmeans.cpp")  # Lloyd iterations of 1-D k-means (kmeans.py)
GPTQ_SOURCE = Path(__file__).with_name("dkm_gptq.cpp")  # GPTQ's loop inside a block of features (surgery/gptq.py)
ABI_VERSION = 8
DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # weights the kernels take (the loop runs in float32)
_LOCK = threading.Lock()
_CPU: ModuleType | None = None
_CPU_TRIED = False


def sources() -> list[Path]:
    return [SOURCE, BUCKETS_SOURCE, KMEANS_SOURCE, GPTQ_SOURCE]


def build_dir() -> Path:
    """Where the CPU extension is built: one folder per torch version, instruction-set variant and content of the
    sources (extension.source_tag: a new version never meets the objects of an older one)."""
    arch = "-".join(flag.removeprefix("-m") for flag in native.arch_flags()) or "default"
    return build_root() / f"fused-{arch}-{source_tag(sources())}"


def cpu_kernels() -> ModuleType | None:
    """The compiled CPU extension, built now if needed; None (after one warning naming the reason) if it cannot be."""
    global _CPU, _CPU_TRIED
    with _LOCK:
        if _CPU_TRIED:
            return _CPU
        _CPU_TRIED = True
        if not native.enabled():
            return None
        base = build_dir()
        for omp in (["-fopenmp"], []):  # then without OpenMP (Apple's clang): at::parallel_for runs serially
            directory = base if omp else base.with_name(f"{base.name}-serial")
            name = "dkm_hf_fused" if omp else "dkm_hf_fused_serial"  # (one name per library: torch's `_v1` otherwise)
            try:
                module = build_and_load(
                    directory, name, sources(), ["-O3", *omp, *native.arch_flags()], omp, module=True
                )
                if module.abi_version() != ABI_VERSION:
                    raise RuntimeError(f"{directory} holds ABI {module.abi_version()}, expected {ABI_VERSION}")
                _CPU = module
                break
            except Exception as error:  # noqa: BLE001 - any build or load failure: keep the torch path
                reason = build_failure_reason(error)
        if _CPU is None or not omp:
            what = "could not be built, using the torch path" if _CPU is None else "was built without OpenMP (slower)"
            warnings.warn(
                f"dkm_hf: the fused CPU DKM kernel ({SOURCE.name}) {what}: {reason}", RuntimeWarning, stacklevel=3
            )
        return _CPU


def available(w: torch.Tensor) -> bool:
    """Whether a fused kernel serves weights like `w` (its device and dtype)."""
    if w.dtype not in DTYPES or w.numel() == 0:
        return False
    if w.device.type == "cpu":
        return cpu_kernels() is not None
    return w.device.type == "cuda" and fused_triton is not None


@torch.library.custom_op("dkm_hf::fused_dkm", mutates_args=(), device_types="cpu")
def fused_dkm(
    w: torch.Tensor,
    c0: torch.Tensor,
    tau: torch.Tensor,
    epsilon: torch.Tensor,
    max_iters: int,
    importance: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    kernels = cpu_kernels()
    if kernels is None:
        raise RuntimeError("dkm_hf::fused_dkm: the CPU kernel is not available (see the warning of its build)")
    out, *rest = kernels.forward(w.float().contiguous(), c0, tau, epsilon, max_iters, _importance(importance, w))
    return out.to(w.dtype), *rest


def _importance(importance: torch.Tensor | None, w: torch.Tensor) -> torch.Tensor:
    """The kernels' importance argument: an empty tensor for none."""
    return w.new_empty(0, dtype=torch.float32) if importance is None else importance


@fused_dkm.register_fake
def _fused_dkm_fake(w, c0, tau, epsilon, max_iters, importance=None):
    one_device("dkm_hf::fused_dkm", w, c0, tau, epsilon, importance)
    G, _, d = w.shape
    k = c0.shape[1]
    return (
        torch.empty_like(w),
        c0.new_empty(G, k, d),
        c0.new_empty(max_iters + 1, G, k, d),
        c0.new_empty(max_iters, G, k),
        w.new_empty((), dtype=torch.int64),
    )


@torch.library.custom_op("dkm_hf::fused_dkm_backward", mutates_args=(), device_types="cpu")
def fused_dkm_backward(
    w: torch.Tensor,
    grad: torch.Tensor,
    history: torch.Tensor,
    masses: torch.Tensor,
    T: torch.Tensor,
    tau: torch.Tensor,
    importance: torch.Tensor | None = None,
) -> torch.Tensor:
    kernels = cpu_kernels()
    if kernels is None:
        raise RuntimeError("dkm_hf::fused_dkm_backward: the CPU kernel is not available")
    w32, grad32 = w.float().contiguous(), grad.float().contiguous()
    return kernels.backward(w32, grad32, history, masses, T, tau, _importance(importance, w)).to(w.dtype)


@fused_dkm_backward.register_fake
def _fused_dkm_backward_fake(w, grad, history, masses, T, tau, importance=None):
    one_device("dkm_hf::fused_dkm_backward", w, grad, history, masses, T, tau, importance)
    return torch.empty_like(w)


def _setup_context(ctx, inputs, output):
    w, _, tau, _, _, importance = inputs
    _, _, history, masses, T = output
    ctx.save_for_backward(w, history, masses, T, tau, importance)


def _backward(ctx, grad_out, *_):
    w, history, masses, T, tau, importance = ctx.saved_tensors
    grad = fused_dkm_backward(w, grad_out.contiguous(), history, masses, T, tau, importance)
    return grad, None, None, None, None, None


fused_dkm.register_autograd(_backward, setup_context=_setup_context)
if fused_triton is not None:
    # Triton launches on the current device: the weight's is made current (a layer on cuda:1 under device_map).
    # The inputs get the CPU kernel's checks, and the layouts the Triton kernels read.

    @fused_dkm.register_kernel("cuda")
    def _fused_dkm_cuda(w, c0, tau, epsilon, max_iters, importance=None):
        _check_cuda_inputs(w, c0, tau, epsilon)
        with torch.cuda.device(w.device):
            return fused_triton.forward(
                w.contiguous(), c0.float().contiguous(), tau.float().contiguous(), epsilon.float().contiguous(),
                max_iters, None if importance is None else importance.float().contiguous(),
            )  # fmt: skip

    @fused_dkm_backward.register_kernel("cuda")
    def _fused_dkm_backward_cuda(w, grad, history, masses, T, tau, importance=None):
        with torch.cuda.device(w.device):
            return fused_triton.backward(
                w.contiguous(), grad.contiguous(), history, masses, T, tau.float().contiguous(),
                None if importance is None else importance.float().contiguous(),
            )  # fmt: skip


def _check_cuda_inputs(w, c0, tau, epsilon) -> None:
    """What the CPU kernel refuses (dkm_fused.cpp), refused on CUDA too: the Triton kernels would read past the end."""
    if w.dim() != 3 or c0.dim() != 3 or c0.shape[0] != w.shape[0] or c0.shape[2] != w.shape[2]:
        raise ValueError(f"fused_dkm: w {tuple(w.shape)} and c0 {tuple(c0.shape)} are not (G, n, d) and (G, k, d)")
    for name, value in (("tau", tau), ("epsilon", epsilon)):
        if value.numel() != w.shape[0]:
            raise ValueError(f"fused_dkm: {name} has {value.numel()} values for {w.shape[0]} groups")


@torch.library.custom_op("dkm_hf::group_variance", mutates_args=(), device_types="cpu")
def group_variance(v: torch.Tensor) -> torch.Tensor:
    """layout.group_variance of float32 vectors (G, n, d) on CPU in one pass over each group while it is in cache."""
    kernels = cpu_kernels()
    if kernels is None:
        raise RuntimeError("dkm_hf::group_variance: the CPU kernel is not available")
    return kernels.group_variance(v.contiguous())


@group_variance.register_fake
def _group_variance_fake(v):
    return v.new_empty(v.shape[0])


def per_group(value: float | torch.Tensor, groups: int, device: torch.device) -> torch.Tensor:
    """A setting (a number, or one value per group in any shape of G elements) as a contiguous float32 (G,) tensor."""
    if isinstance(value, torch.Tensor):
        value = value.detach().to(device, torch.float32).reshape(-1)
        if value.numel() not in (1, groups):
            raise ValueError(f"expected one value per group ({groups}) or one in all, got {value.numel()}")
        return value.expand(groups).contiguous()
    return torch.full((groups,), float(value), dtype=torch.float32, device=device)


def dkm(
    w: torch.Tensor,
    centroids: torch.Tensor,
    tau: float | torch.Tensor,
    max_iters: int,
    epsilon: float | torch.Tensor,
    importance: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`dkm_cluster` through the fused kernels: (W~ in w's dtype, differentiable; C_T detached, float32: a 16-bit
    model's centroids keep the loop's precision between steps, as the float32 buffer that holds them).
    `importance` (G, n): the vectors' sample weights of an importance-weighted loop."""
    G = w.shape[0]
    if importance is not None:
        importance = importance.detach().to(w.device, torch.float32).contiguous()
    out, c_final, _, _, _ = fused_dkm(
        w.contiguous(),  # a view of the parameter: saved for backward at no cost
        centroids.detach().to(w.device, torch.float32).contiguous(),
        per_group(tau, G, w.device),
        per_group(epsilon, G, w.device),
        max_iters,
        importance,
    )
    return out, c_final
