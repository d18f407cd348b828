"""The native CPU kernels of palettized inference (`lut_kernels.c`): compiled once, loaded with ctypes.

    decode_rows(palette, ...)   rows of a palettized weight, bit for bit what the torch decode makes
    lut_gemv(palette, x, bias)  y = x W^T + bias for a few rows of x, without writing W out (float32 only)

The C file is compiled on first use with the system C compiler (`$CC`, else gcc, else cc; -O3 and the -m flags of
the CPU capability torch reports: AVX-512, AVX2 or none) into `$XDG_CACHE_HOME/dkm_hf/native` (default
~/.cache/dkm_hf/native), named by the hash of the source and the flags, so each source and CPU kind is built once.
$DKM_HF_NATIVE_ARCH=AVX2 or DEFAULT builds another variant (tests of the AVX2 and plain C code on an AVX-512 CPU).
Without a compiler, when compiling fails, off CPU or with DKM_HF_NATIVE=0 in the environment, `available()` is
False and callers keep their torch path: nothing here is required.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("lut_kernels.c")
ABI_VERSION = 1
MAX_LUT = 4096  # n_clusters * cluster_dim (the C side's MAX_LUT)
MAX_DIM = 16  # cluster_dim (the C side's MAX_DIM)
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_ARCH_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx2", "-mfma", "-mf16c"],
    "AVX2": ["-mavx2", "-mfma", "-mf16c"],
}
_LIB: ctypes.CDLL | None = None
_TRIED = False


class Palette(ctypes.Structure):
    """The C `Palette`: one palettized weight seen as (channels, features) rows. Holds its tensors alive."""

    _fields_ = [
        ("packed", ctypes.c_void_p),
        ("bits", ctypes.c_int64),
        ("cluster_dim", ctypes.c_int64),
        ("vectors_per_row", ctypes.c_int64),
        ("rows_per_group", ctypes.c_int64),
        ("n_clusters", ctypes.c_int64),
        ("lut", ctypes.c_void_p),
        ("lut_dtype", ctypes.c_int64),
        ("scale", ctypes.c_void_p),
        ("scale_dtype", ctypes.c_int64),
        ("value_dtype", ctypes.c_int64),
    ]


def enabled() -> bool:
    return os.environ.get("DKM_HF_NATIVE", "1").strip().lower() not in ("0", "false", "no", "off")


def arch_flags() -> list[str]:
    """The -m flags of the variant to build: torch's CPU capability, or $DKM_HF_NATIVE_ARCH (AVX512, AVX2 or DEFAULT:
    to test the other variants on one machine)."""
    try:
        capability = os.environ.get("DKM_HF_NATIVE_ARCH") or torch.backends.cpu.get_cpu_capability()
    except Exception:  # noqa: BLE001 - an old or unusual torch: build the portable variant
        capability = "DEFAULT"
    return list(_ARCH_FLAGS.get(capability, []))


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "dkm_hf" / "native"


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "gcc", "cc"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _build() -> Path | None:
    """The shared library for this source and CPU kind, compiled now if the cache lacks it; None if it cannot be."""
    compiler = _compiler()
    if compiler is None or not SOURCE.exists():
        return None
    source = SOURCE.read_bytes()
    for extra in (["-fopenmp"], []):  # OpenMP where the compiler has it
        flags = ["-O3", "-shared", "-fPIC", "-std=c11", *arch_flags(), *extra]
        key = hashlib.sha256(source + " ".join([compiler, *flags]).encode()).hexdigest()[:16]
        target = cache_dir() / f"lut_kernels-{key}.so"
        if target.exists():
            return target
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
                out = Path(tmp) / target.name
                done = subprocess.run(
                    [compiler, *flags, str(SOURCE), "-o", str(out), "-lm"], capture_output=True, timeout=120
                )
                if done.returncode == 0:
                    os.replace(out, target)  # atomic: concurrent builders agree on the file
                    return target
        except (OSError, subprocess.SubprocessError):
            return None
    return None


def library() -> ctypes.CDLL | None:
    """The loaded kernels, or None (disabled, no compiler, a failed build or a library of another ABI)."""
    global _LIB, _TRIED
    if not enabled():
        return None
    if not _TRIED:
        _TRIED = True
        try:
            path = _build()
            lib = ctypes.CDLL(str(path)) if path else None
            if lib is not None and lib.dkm_abi_version() == ABI_VERSION:
                pointer, i64 = ctypes.c_void_p, ctypes.c_int64
                lib.dkm_decode_rows.argtypes = [ctypes.POINTER(Palette), pointer, i64, i64, pointer, i64]
                lib.dkm_lut_gemv.argtypes = [ctypes.POINTER(Palette), pointer, i64, pointer, pointer, i64, i64]
                lib.dkm_decode_rows.restype = lib.dkm_lut_gemv.restype = ctypes.c_int
                _LIB = lib
        except OSError:
            _LIB = None
    return _LIB


def available() -> bool:
    return library() is not None


def lanes() -> int:
    """Float lanes of the loaded variant: 16 (AVX-512), 8 (AVX2), 0 (plain C); -1 without the library."""
    lib = library()
    return lib.dkm_lanes() if lib is not None else -1


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
    None where the kernels do not cover it (not CPU, a dtype or geometry they lack): the caller decodes in torch."""
    groups, n_clusters, dim = lut.shape
    tensors = [packed, lut] + ([scale] if scale is not None else [])
    if (
        any(t.device.type != "cpu" or not t.is_contiguous() for t in tensors)
        or packed.dtype != torch.uint8
        or lut.dtype not in DTYPE_CODES
        or (scale is not None and (scale.dtype not in DTYPE_CODES or scale.numel() != channels))
        or value_dtype not in DTYPE_CODES
        or not 1 <= bits <= 8
        or n_clusters != 2**bits
        or dim > MAX_DIM
        or n_clusters * dim > MAX_LUT
        or features % dim
        or channels % groups
        or packed.numel() * 8 < channels * features // dim * bits
    ):
        return None
    palette = Palette(
        packed.data_ptr(),
        bits,
        dim,
        features // dim,
        channels // groups,
        n_clusters,
        lut.data_ptr(),
        DTYPE_CODES[lut.dtype],
        scale.data_ptr() if scale is not None else None,
        DTYPE_CODES[scale.dtype] if scale is not None else 0,
        DTYPE_CODES[value_dtype],
    )
    palette.tensors = tensors  # kept alive as long as the palette
    palette.shape = (channels, features)
    palette.out_dtype = value_dtype
    return palette


def decode_rows(palette: Palette, rows: torch.Tensor | None = None, threads: int | None = None) -> torch.Tensor:
    """Rows `rows` (int64, default all) of the weight, (len(rows), features) in the palette's value dtype, equal bit
    for bit to the torch decode (dkm_hf.nn.palettized). `threads` defaults to torch's intra-op threads."""
    lib = library()
    if lib is None:
        raise RuntimeError("the native kernels are not available (see dkm_hf.ops.native)")
    channels, features = palette.shape
    if rows is not None:
        rows = rows.to(torch.int64).contiguous()
        if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= channels):
            raise IndexError(f"rows out of range for a weight of {channels} rows")
    n = channels if rows is None else rows.numel()
    out = torch.empty(n, features, dtype=palette.out_dtype)
    threads = torch.get_num_threads() if threads is None else threads
    lib.dkm_decode_rows(
        ctypes.byref(palette), rows.data_ptr() if rows is not None else None, 0, n, out.data_ptr(), threads
    )
    return out


def lut_gemv(
    palette: Palette, x: torch.Tensor, bias: torch.Tensor | None = None, threads: int | None = None
) -> torch.Tensor:
    """x (..., features) float32 -> x W^T + bias (..., channels) float32, W read from its LUT and indices only. The
    weight's values are those of `decode_rows`; the sums run in float32 in another order than a BLAS GEMM, so the
    result equals F.linear(x, decode_rows(palette), bias) within float32 summation-order tolerance."""
    lib = library()
    if lib is None:
        raise RuntimeError("the native kernels are not available (see dkm_hf.ops.native)")
    channels, features = palette.shape
    if x.dtype != torch.float32 or x.device.type != "cpu" or x.shape[-1] != features:
        raise ValueError(f"lut_gemv needs float32 CPU input of {features} features, got {x.dtype} {tuple(x.shape)}")
    if bias is not None:
        bias = bias.to(torch.float32).contiguous()
    flat = x.reshape(-1, features).contiguous()
    out = torch.empty(flat.shape[0], channels, dtype=torch.float32)
    threads = torch.get_num_threads() if threads is None else threads
    lib.dkm_lut_gemv(
        ctypes.byref(palette),
        flat.data_ptr(),
        flat.shape[0],
        bias.data_ptr() if bias is not None else None,
        out.data_ptr(),
        channels,
        threads,
    )
    return out.view(*x.shape[:-1], channels)
