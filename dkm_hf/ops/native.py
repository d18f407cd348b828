"""The native CPU kernels of palettized inference (`lut_kernels.c`) as torch operators.

    decode_rows(palette, ...)   rows of a palettized weight, bit for bit what the torch decode makes
    lut_gemv(palette, x, bias)  y = x W^T + bias for a few rows of x, without writing W out (float32 only)

`lut_kernels.cpp` wraps the C kernels as `torch.ops.dkm_hf.decode_rows` / `lut_gemv` (fake implementations
registered here, so they trace under torch.compile and run on the meta device). It is built on first use by
`extension.load_extension` (torch.utils.cpp_extension: ninja and the C++ compiler torch uses, -O3, OpenMP, the -m
flags of the CPU capability torch reports: AVX-512, AVX2 or none), once per torch version and CPU kind, under
~/.cache/dkm_hf/torch_extensions. $DKM_HF_NATIVE_ARCH=AVX2 or DEFAULT builds another variant (tests of the AVX2 and
plain C code on an AVX-512 CPU). When the build fails, `available()` is False, callers keep their torch path (about
32x slower for batch-1 generation) and a warning says why, once; DKM_HF_NATIVE=0 in the environment turns the
kernels off without a warning. Nothing here is required.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .extension import load_extension, one_device, warn_once

SOURCE = Path(__file__).with_name("lut_kernels.cpp")
INCLUDED = SOURCE.with_name("lut_kernels.c")  # the kernels themselves, in C; SOURCE registers them with torch
MAX_LUT = 4096  # n_clusters * cluster_dim (the C side's MAX_LUT)
MAX_DIM = 16  # cluster_dim (the C side's MAX_DIM)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_ARCH_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx2", "-mfma", "-mf16c"],
    "AVX2": ["-mavx2", "-mfma", "-mf16c"],
}
_SLOWER = "; palettized weights decode in torch instead (about 32x slower for batch-1 generation)"
_LOADED: bool | None = None


class Palette:
    """One palettized weight seen as (channels, features) rows, as the kernels read it: its packed indices, LUT
    (groups, 2**bits, cluster_dim), optional per-row scale and the dtype its values decode to."""

    def __init__(
        self,
        packed: torch.Tensor | None = None,
        lut: torch.Tensor | None = None,
        scale: torch.Tensor | None = None,
        bits: int = 0,
        shape: tuple[int, int] = (0, 0),
        out_dtype: torch.dtype = torch.float32,
    ):
        self.packed, self.lut, self.scale, self.bits = packed, lut, scale, bits
        self.shape, self.out_dtype = shape, out_dtype

    def arguments(self) -> tuple:
        return (self.packed, self.lut, self.scale, self.bits, *self.shape, self.out_dtype)


def enabled() -> bool:
    return os.environ.get("DKM_HF_NATIVE", "1").strip().lower() not in ("0", "false", "no", "off")


def arch() -> str:
    """The variant to build: torch's CPU capability, or $DKM_HF_NATIVE_ARCH (AVX512, AVX2 or DEFAULT: to test the
    other variants on one machine)."""
    try:
        capability = os.environ.get("DKM_HF_NATIVE_ARCH") or torch.backends.cpu.get_cpu_capability()
    except Exception:  # noqa: BLE001 - an old or unusual torch: build the portable variant
        capability = "DEFAULT"
    return capability if capability in _ARCH_FLAGS else "DEFAULT"


def arch_flags() -> list[str]:
    return list(_ARCH_FLAGS.get(arch(), []))


def _register_fakes() -> None:
    """Shapes and dtypes of the operators' results without running them (meta tensors, torch.compile)."""

    @torch.library.register_fake("dkm_hf::decode_rows")
    def _(packed, lut, scale, bits, channels, features, dtype, rows, threads):
        one_device("dkm_hf::decode_rows", packed, lut, scale, rows)
        n = channels if rows is None else rows.numel()
        return packed.new_empty((n, features), dtype=dtype)

    @torch.library.register_fake("dkm_hf::lut_gemv")
    def _(packed, lut, scale, bits, channels, features, dtype, x, bias, threads):
        one_device("dkm_hf::lut_gemv", packed, lut, scale, x, bias)
        return x.new_empty((*x.shape[:-1], channels), dtype=torch.float32)


def library() -> bool:
    """Whether the operators are loaded: built now if needed. False when disabled or when the build failed (said
    once, with the reason, by a RuntimeWarning)."""
    global _LOADED
    if not enabled():
        return False
    if _LOADED is None:
        name = f"dkm_hf_lut_kernels_{arch().lower()}"
        flags = ["-O3", *arch_flags()]
        omp = ([*flags, "-fopenmp"], ["-fopenmp"])
        path = load_extension(f"{name}_omp", [SOURCE], *omp, warn=False, includes=[INCLUDED])
        if path is None:  # a compiler without OpenMP: one thread
            path = load_extension(name, [SOURCE], flags, what=_SLOWER, includes=[INCLUDED])
        _LOADED = path is not None
        if _LOADED:
            _register_fakes()
    return _LOADED


def available() -> bool:
    return library()


def lanes() -> int:
    """Float lanes of the loaded variant: 16 (AVX-512), 8 (AVX2), 0 (plain C); -1 without the library."""
    return torch.ops.dkm_hf.lut_lanes() if library() else -1


def make_palette(
    packed: torch.Tensor,
    lut: torch.Tensor,
    scale: torch.Tensor | None,
    bits: int,
    channels: int,
    features: int,
    value_dtype: torch.dtype,
) -> Palette | None:
    """The `Palette` of a weight of (channels, features) rows, LUT (groups, 2**bits, cluster_dim), per-row `scale`;
    None where the kernels do not cover it: off CPU silently (the torch decode is the device's path), else with a
    warning, once per reason, naming what they lack. The caller then decodes in torch."""
    tensors = [packed, lut] + ([scale] if scale is not None else [])
    if any(t.device.type != "cpu" for t in tensors):
        return None
    groups, n_clusters, dim = lut.shape
    reason = None
    if not all(t.is_contiguous() for t in tensors):
        reason = "non-contiguous LUT, indices or scale"
    elif packed.dtype != torch.uint8:
        reason = f"indices of dtype {packed.dtype}"
    elif lut.dtype not in DTYPES or (scale is not None and scale.dtype not in DTYPES) or value_dtype not in DTYPES:
        dtypes = {lut.dtype, value_dtype} | ({scale.dtype} if scale is not None else set())
        reason = f"dtypes {sorted(str(d) for d in dtypes - set(DTYPES))}"
    elif not 1 <= bits <= 8 or n_clusters != 2**bits:
        reason = f"a LUT of {n_clusters} entries for {bits} bits"
    elif dim > MAX_DIM or n_clusters * dim > MAX_LUT:
        reason = f"cluster_dim {dim} with {n_clusters} clusters (at most {MAX_DIM} and {MAX_LUT} values)"
    elif features % dim or channels % groups or (scale is not None and scale.numel() != channels):
        reason = f"a weight of {channels} x {features} with LUT {tuple(lut.shape)}"
    elif packed.numel() * 8 < channels * features // dim * bits:
        reason = f"{packed.numel()} bytes of indices for {channels * features // dim} indices of {bits} bits"
    if reason is not None:
        warn_once(f"palette:{reason}", f"dkm_hf: the native kernels do not cover {reason}{_SLOWER}")
        return None
    return Palette(packed, lut, scale, bits, (channels, features), value_dtype)


def decode_rows(palette: Palette, rows: torch.Tensor | None = None, threads: int | None = None) -> torch.Tensor:
    """Rows `rows` (int64, default all) of the weight, (len(rows), features) in the palette's value dtype, equal bit
    for bit to the torch decode (dkm_hf.nn.palettized). `threads` defaults to torch's intra-op threads."""
    if not library():
        raise RuntimeError("the native kernels are not available (see dkm_hf.ops.native)")
    if rows is not None:
        rows = rows.to(torch.int64)
        if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= palette.shape[0]):
            raise IndexError(f"rows out of range for a weight of {palette.shape[0]} rows")
    threads = torch.get_num_threads() if threads is None else threads
    return torch.ops.dkm_hf.decode_rows(*palette.arguments(), rows, threads)


def lut_gemv(
    palette: Palette, x: torch.Tensor, bias: torch.Tensor | None = None, threads: int | None = None
) -> torch.Tensor:
    """x (..., features) float32 -> x W^T + bias (..., channels) float32, W read from its LUT and indices only. The
    weight's values are those of `decode_rows`; the sums run in float32 in another order than a BLAS GEMM, so the
    result equals F.linear(x, decode_rows(palette), bias) within float32 summation-order tolerance."""
    if not library():
        raise RuntimeError("the native kernels are not available (see dkm_hf.ops.native)")
    features = palette.shape[1]
    if x.dtype != torch.float32 or x.device.type != "cpu" or x.shape[-1] != features:
        raise ValueError(f"lut_gemv needs float32 CPU input of {features} features, got {x.dtype} {tuple(x.shape)}")
    threads = torch.get_num_threads() if threads is None else threads
    return torch.ops.dkm_hf.lut_gemv(*palette.arguments(), x, bias, threads)
