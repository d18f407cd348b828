"""The native palettized-inference kernels (dkm_hf/ops/lut_kernels.c) against a decode written in torch.

`decode_rows` must equal the torch decode bit for bit (same values in the same dtype); `lut_gemv` must equal
x @ W^T + bias within float32 summation-order tolerance (its sums run in another order than a BLAS GEMM). Skipped
where the library cannot be built; the DKM_HF_NATIVE=0 fallback is tested everywhere.
"""

from __future__ import annotations

import itertools
import os
import shutil
import warnings

import pytest
import torch
from conftest import U
from torch.utils import cpp_extension

from dkm_hf.ops import native
from dkm_hf.ops.packing import pack_indices, unpack_indices

needs_native = pytest.mark.skipif(not native.available(), reason="native kernels unavailable (no C compiler?)")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _weight(bits, dim, channels, features, groups, scale, lut_dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    lut = torch.randn(groups, 2**bits, dim, generator=g).to(lut_dtype)
    idx = torch.randint(0, 2**bits, (channels * features // dim,), generator=g)
    s = (torch.rand(channels, generator=g) + 0.5).to(lut_dtype) if scale else None
    return pack_indices(idx, bits), lut, s


def _reference(packed, lut, scale, bits, channels, features, value_dtype):
    """The torch decode of dkm_hf.nn.palettized: float32 LUT values times the scale, rounded once to value_dtype."""
    groups, _, dim = lut.shape
    idx = unpack_indices(packed, bits, channels * features // dim).view(channels, -1)
    group = (torch.arange(channels) // (channels // groups)).unsqueeze(1)
    rows = lut.float()[group, idx].reshape(channels, features)
    if scale is not None:
        rows = rows * scale.float().unsqueeze(1)
    return rows.to(value_dtype)


GEOMETRY = [  # (cluster_dim, channels, features): odd and vector-path-sized rows
    (1, 12, 37),
    (1, 6, 96),
    (1, 9, 100),
    (1, 3, 1040),
    (2, 12, 38),
    (2, 6, 100),
]
LUTS = ["per_tensor", "grouped", "per_row"]


@needs_native
@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("lut_kind", LUTS)
@pytest.mark.parametrize("scale", [False, True])
def test_decode_rows_is_the_torch_decode_bit_for_bit(bits, lut_kind, scale):
    for (dim, channels, features), lut_dtype, value_dtype in itertools.product(GEOMETRY, DTYPES, DTYPES):
        groups = {"per_tensor": 1, "grouped": 3, "per_row": channels}[lut_kind]
        packed, lut, s = _weight(bits, dim, channels, features, groups, scale, lut_dtype)
        palette = native.make_palette(packed, lut, s, bits, channels, features, value_dtype)
        assert palette is not None
        expected = _reference(packed, lut, s, bits, channels, features, value_dtype)
        got = native.decode_rows(palette)
        assert got.dtype == value_dtype and torch.equal(got, expected), (dim, channels, features, lut_dtype)
        rows = torch.tensor([channels - 1, 0, channels // 2, channels - 1])
        assert torch.equal(native.decode_rows(palette, rows), expected[rows])


@needs_native
@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("lut_kind", LUTS)
@pytest.mark.parametrize("scale", [False, True])
def test_lut_gemv_matches_the_decoded_weight(bits, lut_kind, scale):
    for (dim, channels, features), lut_dtype in itertools.product(GEOMETRY, DTYPES):
        groups = {"per_tensor": 1, "grouped": 3, "per_row": channels}[lut_kind]
        packed, lut, s = _weight(bits, dim, channels, features, groups, scale, lut_dtype, seed=bits)
        palette = native.make_palette(packed, lut, s, bits, channels, features, torch.float32)
        weight = _reference(packed, lut, s, bits, channels, features, torch.float32)
        bias = torch.randn(channels)
        # The kernel sums the features' products in float32 in its own order (its vector width, the host's): each
        # output moves from the exact sum by at most (features + 1) U times the sum of its terms' magnitudes
        # (Higham's bound for any order: products, additions and the bias; conftest.U).
        for n in (1, 3, 5, 8):
            x = torch.randn(n, features)
            expected = x.double() @ weight.double().T
            magnitude = x.double().abs() @ weight.double().abs().T
            bound = (features + 1) * U * (magnitude + bias.double().abs())
            assert ((native.lut_gemv(palette, x).double() - expected).abs() <= bound).all()
            got = native.lut_gemv(palette, x.view(1, n, features), bias)
            assert got.shape == (1, n, channels)
            assert ((got[0].double() - expected - bias.double()).abs() <= bound).all()


@needs_native
@pytest.mark.parametrize("bits", [3, 4, 8])
def test_threads_give_the_same_results(bits):
    """Large enough for the OpenMP split (when the library has OpenMP): the same values as one thread."""
    packed, lut, s = _weight(bits, 1, 512, 1024, 512, True, torch.float16)
    palette = native.make_palette(packed, lut, s, bits, 512, 1024, torch.float32)
    one = native.decode_rows(palette, threads=1)
    assert torch.equal(native.decode_rows(palette, threads=2), one)
    assert torch.equal(one, _reference(packed, lut, s, bits, 512, 1024, torch.float32))
    x = torch.randn(2, 1024)
    assert torch.equal(native.lut_gemv(palette, x, threads=2), native.lut_gemv(palette, x, threads=1))


@needs_native
def test_make_palette_refuses_what_the_kernels_do_not_cover(monkeypatch):
    """Each refusal says what the kernels lack, once per reason; off CPU is no fallback and says nothing."""
    from dkm_hf.ops import extension

    monkeypatch.setattr(extension, "_WARNED", set())
    packed, lut, s = _weight(4, 1, 8, 16, 1, False, torch.float16)
    with pytest.warns(RuntimeWarning, match=r"do not cover dtypes \['torch.float64'\].*decode in torch"):
        assert native.make_palette(packed, lut, s, 4, 8, 16, torch.float64) is None  # value dtype
    with pytest.warns(RuntimeWarning, match="63 bytes of indices for 128 indices of 4 bits"):
        assert native.make_palette(packed[:-1], lut, s, 4, 8, 16, torch.float32) is None  # too few bytes
    with pytest.warns(RuntimeWarning, match="a LUT of 16 entries for 3 bits"):
        assert native.make_palette(packed, lut, s, 3, 8, 16, torch.float32) is None  # LUT size != 2**bits
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert native.make_palette(packed[:-1], lut, s, 4, 8, 16, torch.float32) is None  # said already
        assert native.make_palette(packed, lut.double(), s, 4, 8, 16, torch.float32) is None  # LUT dtype, said
        assert native.make_palette(packed.to("meta"), lut, s, 4, 8, 16, torch.float32) is None
    with pytest.raises(ValueError, match="float32"):
        native.lut_gemv(native.make_palette(packed, lut, s, 4, 8, 16, torch.float32), torch.randn(1, 16).double())


@needs_native
@pytest.mark.parametrize("channels, features", [(2**61, 16), (2**59, 16), (-8, 16), (8, -16)])
def test_the_registered_operators_refuse_sizes_that_do_not_fit_the_packed_bytes(channels, features):
    """The operators are public (torch.ops.dkm_hf): their own size check computed channels x vectors x bits in int64,
    which wrapped to 0 for 2**61 x 16 x 8, and a row below 2**61 then read far past the 16 packed bytes (a crash)."""
    packed, lut = torch.zeros(16, dtype=torch.uint8), torch.arange(256.0).reshape(1, 256, 1)
    with pytest.raises(RuntimeError, match="dkm_hf native kernels: (packed has 16 bytes, too few|a weight of)"):
        torch.ops.dkm_hf.decode_rows(packed, lut, None, 8, channels, features, torch.float32, torch.tensor([2**40]), 1)
    with pytest.raises(RuntimeError, match="dkm_hf native kernels: (packed has 16 bytes, too few|a weight of)"):
        torch.ops.dkm_hf.lut_gemv(packed, lut, None, 8, channels, features, torch.float32, torch.ones(1, 16), None, 1)


@needs_native
def test_the_registered_operators_clamp_threads_and_check_rows():
    """A thread count of 10**6 went to OpenMP as it was (a crash; 2**31 aborted in libgomp), float and bool rows were
    truncated to indices, and 0 features over 10**10 rows looped over every row."""
    packed, lut, s = _weight(4, 1, 1024, 256, 1, False, torch.float32)
    palette = native.make_palette(packed, lut, s, 4, 1024, 256, torch.float32)
    x = torch.randn(3, 256)
    assert torch.equal(native.decode_rows(palette, threads=10**6), native.decode_rows(palette, threads=1))
    assert torch.equal(native.lut_gemv(palette, x, threads=2**31), native.lut_gemv(palette, x, threads=1))
    for rows in (torch.tensor([7.9]), torch.tensor([True])):
        with pytest.raises(RuntimeError, match="rows must be an integer CPU tensor"):
            torch.ops.dkm_hf.decode_rows(*palette.arguments(), rows, 1)
    empty_lut = torch.zeros(1, 16, 1)
    out = torch.ops.dkm_hf.decode_rows(torch.zeros(0, dtype=torch.uint8), empty_lut, None, 4, 10**10, 0,
                                       torch.float32, torch.tensor([5]), 1)  # fmt: skip
    assert out.shape == (1, 0)
    with pytest.raises(RuntimeError, match="same device"):
        torch.ops.dkm_hf.lut_gemv(*palette.arguments(), x.to("meta"), None, 1)


def test_disabled_by_the_environment(monkeypatch):
    monkeypatch.setenv("DKM_HF_NATIVE", "0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # switched off on purpose: no warning
        assert not native.enabled() and not native.library() and not native.available()
    with pytest.raises(RuntimeError, match="not available"):
        native.decode_rows(native.Palette())


def test_a_failed_build_warns_once_with_its_reason(monkeypatch):
    """No compiler (or any failed build): the torch path is taken and a RuntimeWarning says why, once."""
    from torch.utils import cpp_extension

    from dkm_hf.ops import extension

    def fail(**kwargs):
        raise RuntimeError(f"Ninja is required to load C++ extensions ({kwargs['name']})")

    monkeypatch.setattr(cpp_extension, "load", fail)
    monkeypatch.setattr(extension, "_LOADED", {})
    monkeypatch.setattr(extension, "_WARNED", set())
    monkeypatch.setattr(native, "_LOADED", None)
    with pytest.warns(RuntimeWarning, match=r"dkm_hf_lut_kernels_\w+ could not be built.*Ninja is required.*torch"):
        assert not native.available()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        monkeypatch.setattr(native, "_LOADED", None)
        assert not native.available() and native.lanes() == -1
    with pytest.raises(RuntimeError, match="not available"):
        native.decode_rows(native.Palette())


@pytest.mark.skipif(
    shutil.which(os.environ.get("CXX", "c++")) is None or not cpp_extension.is_ninja_available(),
    reason="no C++ compiler or ninja: the torch fallbacks are what runs here",
)
def test_the_kernels_build_where_the_toolchain_is_installed():
    """With a compiler and ninja a failed build is a defect, not a reason to skip the kernel tests."""
    from dkm_hf.ops import fused

    assert native.available(), "the LUT kernels did not build"
    assert fused.cpu_kernels() is not None, "the fused DKM kernel did not build"


def test_build_directory_is_per_torch_version(monkeypatch, tmp_path):
    from dkm_hf.ops import extension

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    root = extension.build_root()
    assert root.parent == tmp_path / "dkm_hf" / "torch_extensions"
    assert root.name.startswith(f"torch-{torch.__version__.split('+')[0]}")
    # one per torch installation: two virtual environments with one torch version never rebuild each other's
    monkeypatch.setattr(extension.torch, "__file__", str(tmp_path / "other-venv" / "torch" / "__init__.py"))
    other = extension.build_root()
    assert other != root and other.name.rsplit("-", 1)[0] == root.name.rsplit("-", 1)[0]


def test_build_directory_changes_with_the_sources(tmp_path):
    """A build folder per content of the sources: a changed source never meets the objects of the previous build,
    whatever the files' timestamps (ninja's only test; installed files keep their archive's)."""
    from dkm_hf.ops import extension, fused

    a, b = tmp_path / "a.cpp", tmp_path / "b.cpp"
    a.write_text("int f() { return 1; }\n")
    b.write_text("int g() { return 2; }\n")
    tag = extension.source_tag([a, b])
    assert len(tag) == 12 and tag == extension.source_tag([a, b])
    stat = a.stat()
    a.write_text("int f() { return 3; }\n")
    os.utime(a, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # the same timestamp, other contents
    assert extension.source_tag([a, b]) != tag
    assert fused.build_dir().name.endswith(extension.source_tag(fused.sources()))
    assert fused.KMEANS_SOURCE in fused.sources() and fused.GPTQ_SOURCE in fused.sources()


def test_a_file_the_sources_include_is_part_of_the_build_folders_name(tmp_path, monkeypatch):
    """lut_kernels.cpp includes lut_kernels.c, which holds the kernels: a change there alone must not meet the
    objects of the build before (the folder's name followed lut_kernels.cpp only)."""
    from dkm_hf.ops import extension

    folders = []
    monkeypatch.setattr(extension, "build_and_load", lambda directory, *args, **kwargs: folders.append(directory))
    monkeypatch.setattr(extension, "_LOADED", {})
    source, included = tmp_path / "k.cpp", tmp_path / "k.c"
    source.write_text('#include "k.c"\n')
    for body in ("int k() { return 1; }\n", "int k() { return 2; }\n"):
        included.write_text(body)
        extension._LOADED.clear()
        extension.load_extension("k", [source], includes=[included])
    assert len(folders) == 2 and folders[0] != folders[1]
    assert native.INCLUDED.name == "lut_kernels.c" and '#include "lut_kernels.c"' in native.SOURCE.read_text()


@needs_native
def test_two_checkouts_of_the_same_sources_share_one_build(tmp_path):
    """ninja's build file names each source by its absolute path: compiled where they lay, two checkouts of one
    version sharing a virtual environment rebuilt the shared build each time the other one had loaded it (60-140 s
    each for the fused kernels). Compiled from copies in the build folder, loading from the second checkout, and from
    the first again, rebuilds nothing."""
    import ctypes

    from dkm_hf.ops import extension

    build, built = tmp_path / "build", None
    for checkout in ("a", "b", "a"):
        source, header = tmp_path / checkout / "tiny.cpp", tmp_path / checkout / "tiny.h"
        source.parent.mkdir(exist_ok=True)
        source.write_text('#include "tiny.h"\nextern "C" int tiny() { return TINY; }\n')
        header.write_text("#define TINY 7\n")
        extension.build_and_load(build, "tiny", [source], [], [], module=False, includes=[header])
        built = built or (build / "tiny.so").stat().st_mtime_ns
        assert (build / "tiny.so").stat().st_mtime_ns == built, checkout
    ninja = (build / "build.ninja").read_text()
    assert str(build / "src" / "tiny.cpp") in ninja and str(tmp_path / "a") not in ninja
    assert sorted(p.name for p in (build / "src").iterdir()) == ["tiny.cpp", "tiny.h"]
    assert ctypes.CDLL(str(build / "tiny.so")).tiny() == 7


@needs_native
def test_operators_have_fake_implementations():
    """The registered operators give their result's shape and dtype on the meta device (torch.compile's view)."""
    packed, lut, s = _weight(4, 2, 12, 38, 3, True, torch.float16)
    meta = [t.to("meta") for t in (packed, lut, s)]
    out = torch.ops.dkm_hf.decode_rows(*meta, 4, 12, 38, torch.bfloat16, None, 1)
    assert out.device.type == "meta" and out.shape == (12, 38) and out.dtype == torch.bfloat16
    rows = torch.tensor([0, 5], device="meta")
    assert torch.ops.dkm_hf.decode_rows(*meta, 4, 12, 38, torch.float32, rows, 1).shape == (2, 38)
    x = torch.empty(2, 3, 38, device="meta")
    y = torch.ops.dkm_hf.lut_gemv(*meta, 4, 12, 38, torch.float32, x, None, 1)
    assert y.shape == (2, 3, 12) and y.dtype == torch.float32
    with pytest.raises(RuntimeError, match="lut has dtype Double"):
        torch.ops.dkm_hf.decode_rows(packed, lut.double(), s, 4, 12, 38, torch.float32, None, 1)


@needs_native
@pytest.mark.slow
@pytest.mark.parametrize("arch", ["AVX2", "DEFAULT"])
def test_other_cpu_variants(arch):
    """The AVX2 and plain C variants (built on this CPU by $DKM_HF_NATIVE_ARCH) pass the tests above."""
    import os
    import subprocess
    import sys

    if arch == "AVX2" and native.lanes() < 8:
        pytest.skip("no AVX2 on this CPU")
    env = {**os.environ, "DKM_HF_NATIVE_ARCH": arch}
    lanes = {"AVX2": 8, "DEFAULT": 0}[arch]
    code = f"from dkm_hf.ops import native; assert native.lanes() == {lanes}"
    subprocess.run([sys.executable, "-c", code], env=env, check=True)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-x",
            __file__,
            "-k",
            "not other_cpu_variants",
            "-p",
            "no:cacheprovider",
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout[-3000:]


def test_a_build_lock_left_by_a_killed_build_is_removed_not_waited_on(tmp_path):
    """torch's `lock` file outlives a build killed with SIGKILL, and torch waits on it with no timeout: every later
    process hung at its first DKM forward. Under dkm_hf's OS lock (which dies with its holder) no build of the folder
    runs, so the file is a dead build's and goes."""
    from dkm_hf.ops.extension import guarded_build

    (tmp_path / "lock").touch()
    with guarded_build(tmp_path, "lib"):
        assert not (tmp_path / "lock").exists()


@pytest.mark.parametrize("record", ["matching", "other bytes", "none"])
def test_a_library_whose_bytes_differ_from_its_record_is_built_again(tmp_path, record):
    """A damaged shared object (a copy cut short, a full disk) killed the process with SIGBUS when loaded, every run.
    The library's SHA-256 is recorded after its first load; one that differs, or has no record, is removed before
    torch's build (which then builds it again) and the new one recorded."""
    import hashlib

    from dkm_hf.ops.extension import guarded_build

    library = tmp_path / "lib.so"
    library.write_bytes(b"\x7fELF built")
    digest = hashlib.sha256(library.read_bytes()).hexdigest()
    if record != "none":
        (tmp_path / "lib.sha256").write_text(digest if record == "matching" else "0" * 64)
    with guarded_build(tmp_path, "lib"):
        assert library.exists() == (record == "matching")
        if not library.exists():
            library.write_bytes(b"\x7fELF rebuilt")  # what torch's build writes
    assert (tmp_path / "lib.sha256").read_text() == hashlib.sha256(library.read_bytes()).hexdigest()
    # a build that replaces a recorded library (ninja saw a changed command or source) records the new one: a stale
    # record made the next process remove the library and link it again, and a read-only cache fall back to torch
    with guarded_build(tmp_path, "lib"):
        library.write_bytes(b"\x7fELF relinked")
    assert (tmp_path / "lib.sha256").read_text() == hashlib.sha256(b"\x7fELF relinked").hexdigest()


def test_the_built_extension_carries_its_record():
    from dkm_hf.ops import fused

    if fused.cpu_kernels() is None:
        pytest.skip("no C++ toolchain")
    import hashlib

    library = fused.build_dir() / "dkm_hf_fused.so"
    record = (fused.build_dir() / "dkm_hf_fused.sha256").read_text()
    assert record == hashlib.sha256(library.read_bytes()).hexdigest()


def test_a_file_system_without_flock_builds_under_torchs_lock_alone(tmp_path, monkeypatch):
    """Some NFS, Lustre and FUSE mounts refuse flock(); the OSError escaped and every native extension fell back to
    the torch path."""
    import fcntl

    from dkm_hf.ops.extension import guarded_build

    def refuse(*args):
        raise OSError(38, "Function not implemented")

    monkeypatch.setattr(fcntl, "flock", refuse)
    ran = []
    with guarded_build(tmp_path, "lib"):
        ran.append(True)
    assert ran == [True]


def test_a_build_failure_is_reported_by_the_line_that_says_why():
    """ninja's last line says only that the build stopped: the reason is a compiler error, else a missing program or
    file, a refusal or a limit (no compiler on PATH gave "ninja: build stopped: subcommand failed" alone)."""
    from dkm_hf.ops.extension import build_failure_reason

    head = "Error building extension 'dkm_hf_fused':\n[1/2] c++ -MMD -MF dkm_fused.o.d -O3 -c dkm_fused.cpp\n"
    head += "FAILED: dkm_fused.o\nc++ -MMD -MF dkm_fused.o.d -O3 -c dkm_fused.cpp\n"
    tail = "ninja: build stopped: subcommand failed.\n"
    assert build_failure_reason(RuntimeError(head + "/bin/sh: 1: c++: not found\n" + tail)) == (
        "/bin/sh: 1: c++: not found"
    )
    compiler = "dkm_fused.cpp:3:2: error: #error this kernel does not compile\n"
    assert build_failure_reason(RuntimeError(head + "In file included from x.h,\n" + compiler + tail)) == (
        compiler.strip()
    )
    assert build_failure_reason(RuntimeError(head + "File size limit exceeded (core dumped)\n" + tail)) == (
        "File size limit exceeded (core dumped)"
    )
    link = "[2/3] c++ dkm_fused.o -shared -lc10 -o dkm_hf_fused.so\nFAILED: dkm_hf_fused.so\n"
    for cause in ("/usr/bin/ld: cannot find -lc10: No such file or directory", "undefined reference to `g'"):
        linked = link + cause + "\ncollect2: error: ld returned 1 exit status\n" + tail
        assert build_failure_reason(RuntimeError(linked)) == cause  # not the compiler driver's summary
    assert build_failure_reason(RuntimeError("Ninja is required to load C++ extensions")) == (
        "Ninja is required to load C++ extensions"
    )
    assert build_failure_reason(OSError()) == "OSError"


def test_a_read_only_cache_with_a_verified_build_is_used_as_it_is(monkeypatch, tmp_path):
    """A build folder this process cannot write (a cache shared read-only, another user's): torch's build and the
    build lock both need to write there (every kernel fell back to torch, ~32x slower, with a complete build in
    place). Its library is loaded as it is when it matches its recorded checksum; otherwise it is not."""
    from torch.utils import cpp_extension

    from dkm_hf.ops import extension, fused

    if fused.cpu_kernels() is None or not native.available():
        pytest.skip("the kernels did not build here")
    real_access = os.access

    def read_only(path, mode, *args, **kwargs):
        return False if mode == os.W_OK else real_access(path, mode, *args, **kwargs)

    def refused(*args, **kwargs):
        raise PermissionError("[Errno 13] Permission denied: 'dkm_hf.lock'")

    monkeypatch.setattr(os, "access", read_only)
    monkeypatch.setattr(cpp_extension, "load", refused)
    monkeypatch.setattr(extension, "guarded_build", refused)
    monkeypatch.setattr(fused, "_CPU", None)
    monkeypatch.setattr(fused, "_CPU_TRIED", False)
    monkeypatch.setattr(extension, "_LOADED", {})
    monkeypatch.setattr(extension, "_WARNED", set())
    monkeypatch.setattr(native, "_LOADED", None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning
        kernels = fused.cpu_kernels()
        assert kernels is not None and kernels.abi_version() == fused.ABI_VERSION
        assert native.available()
    library = tmp_path / "x.so"
    library.write_bytes(b"\x7fELF built before")
    assert extension.prebuilt(tmp_path, "x") is None  # no checksum record: its process died before writing it
    (tmp_path / "x.sha256").write_text(extension._sha256(library))
    assert extension.prebuilt(tmp_path, "x") == library
    library.write_bytes(b"\x7fELF damaged since")
    assert extension.prebuilt(tmp_path, "x") is None
    monkeypatch.setattr(os, "access", real_access)
    (tmp_path / "x.sha256").write_text(extension._sha256(library))
    assert extension.prebuilt(tmp_path, "x") is None  # a folder it can write: built and locked as usual


# Behaviours of dkm_hf/ops/native.py no other test pinned (a mutation review)


def _native_weight(bits=4, channels=8, features=16, lut_dtype=torch.float16, scale=True):
    from dkm_hf.ops.packing import pack_indices

    g = torch.Generator().manual_seed(0)
    lut = torch.randn(1, 2**bits, 1, generator=g).to(lut_dtype)
    idx = torch.randint(0, 2**bits, (channels * features,), generator=g)
    s = (torch.rand(channels, generator=g) + 0.5).to(lut_dtype) if scale else None
    return pack_indices(idx, bits), lut, s


def _needs_native():
    from dkm_hf.ops import native

    if not native.available():
        pytest.skip("native kernels unavailable")
    return native


def test_make_palette_refuses_non_contiguous_tensors_other_index_dtypes_and_misfit_scales(monkeypatch):
    """A non-contiguous LUT, indices of another dtype than uint8 and a scale of another length than the channels are
    cases the kernels do not cover: make_palette gives None with its warning (the torch decode follows), and never
    reaches the operator."""
    import warnings

    from dkm_hf.ops import extension

    native = _needs_native()
    monkeypatch.setattr(extension, "_WARNED", set())
    packed, lut, s = _native_weight()
    assert native.make_palette(packed, lut, s, 4, 8, 16, torch.float32) is not None
    lut_view = torch.randn(1, 32, 1, dtype=torch.float16)[:, ::2]  # every other entry: a strided view
    assert lut_view.shape == lut.shape and not lut_view.is_contiguous()
    with pytest.warns(RuntimeWarning, match="non-contiguous LUT, indices or scale"):
        assert native.make_palette(packed, lut_view, s, 4, 8, 16, torch.float32) is None
    with pytest.warns(RuntimeWarning, match="indices of dtype torch.int32"):
        assert native.make_palette(packed.to(torch.int32), lut, s, 4, 8, 16, torch.float32) is None
    with pytest.warns(RuntimeWarning, match=r"a weight of 8 x 16 with LUT \(1, 16, 1\)"):
        assert native.make_palette(packed, lut, s[:4], 4, 8, 16, torch.float32) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert native.make_palette(packed, lut, s, 4, 8, 16, torch.float32) is not None


def test_decode_rows_refuses_rows_out_of_range_by_index_error():
    """Rows outside the weight (one past the last, negative) are an IndexError naming the row count, before the
    operator runs."""
    native = _needs_native()
    packed, lut, s = _native_weight()
    palette = native.make_palette(packed, lut, s, 4, 8, 16, torch.float32)
    assert native.decode_rows(palette, torch.tensor([0, 7])).shape == (2, 16)
    for rows in ([8], [0, 8], [-1], [3, -8]):
        with pytest.raises(IndexError, match="rows out of range for a weight of 8 rows"):
            native.decode_rows(palette, torch.tensor(rows))


def test_lut_gemv_refuses_input_of_another_width():
    """An input of another width than the weight's features is a ValueError naming both."""
    native = _needs_native()
    packed, lut, s = _native_weight()
    palette = native.make_palette(packed, lut, s, 4, 8, 16, torch.float32)
    assert native.lut_gemv(palette, torch.randn(2, 16)).shape == (2, 8)
    for width in (8, 15, 32):
        with pytest.raises(ValueError, match=r"lut_gemv needs float32 CPU input of 16 features"):
            native.lut_gemv(palette, torch.randn(2, width))


def test_decode_rows_fake_refuses_rows_on_another_device():
    """decode_rows' fake (meta) implementation refuses rows on another device, as the operator does."""
    _needs_native()
    packed, lut, s = _native_weight()
    meta = [t.to("meta") for t in (packed, lut, s)]
    out = torch.ops.dkm_hf.decode_rows(*meta, 4, 8, 16, torch.float32, torch.tensor([0, 1], device="meta"), 1)
    assert out.shape == (2, 16) and out.device.type == "meta"
    with pytest.raises(RuntimeError, match="same device"):
        torch.ops.dkm_hf.decode_rows(*meta, 4, 8, 16, torch.float32, torch.tensor([0, 1]), 1)


# Behaviours of dkm_hf/ops/extension.py no other test pinned (a mutation review)


def test_staged_copies_are_rewritten_only_when_their_sources_change(tmp_path):
    """The staged copies of the sources are rewritten only when their bytes change: ninja compares timestamps, and a
    copy rewritten at every load would rebuild the extension in every process."""
    from dkm_hf.ops.extension import staged

    source = tmp_path / "kernel.cpp"
    source.write_text("int f() { return 1; }\n")
    (copy_,) = staged(tmp_path / "build", [source])
    assert copy_.read_text() == source.read_text()
    old = copy_.stat().st_mtime_ns - 10**9
    os.utime(copy_, ns=(old, old))
    (again,) = staged(tmp_path / "build", [source])
    assert again == copy_ and again.stat().st_mtime_ns == old  # unchanged: not written
    source.write_text("int f() { return 2; }\n")
    (changed,) = staged(tmp_path / "build", [source])
    assert changed.read_text() == source.read_text() and changed.stat().st_mtime_ns != old


def test_load_extension_builds_once_per_process_and_warns_only_when_asked(tmp_path, monkeypatch):
    """An extension is built (or its failure recorded) once per process, and a failure warns only when asked (the
    OpenMP attempt, which has a fallback behind it, does not)."""
    import warnings

    from dkm_hf.ops import extension

    source = tmp_path / "k.cpp"
    source.write_text("// kernel\n")
    monkeypatch.setattr(extension, "_LOADED", {})
    monkeypatch.setattr(extension, "_WARNED", set())
    monkeypatch.setattr(extension, "build_root", lambda: tmp_path / "root")
    calls = []

    def build(directory, name, *args, **kwargs):
        calls.append(name)
        if name.startswith("bad"):
            raise RuntimeError("c++: error: no compiler here")
        return f"/lib/{name}.so"

    monkeypatch.setattr(extension, "build_and_load", build)
    assert extension.load_extension("good", [source]) == "/lib/good.so"
    assert extension.load_extension("good", [source]) == "/lib/good.so"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert extension.load_extension("bad_omp", [source], warn=False) is None
        assert extension.load_extension("bad_omp", [source], warn=False) is None
    with pytest.warns(RuntimeWarning, match=r"bad_plain could not be built or loaded \(c\+\+: error: no compiler"):
        assert extension.load_extension("bad_plain", [source]) is None
    assert calls == ["good", "bad_omp", "bad_plain"]


def test_a_build_failure_without_a_known_cause_is_reported_by_its_last_line():
    """With no line naming a known cause, a build failure's reason is the output's last line (where ninja and torch
    say how it ended), not its first (the command line)."""
    from dkm_hf.ops.extension import build_failure_reason

    output = "[1/2] c++ -O3 -c kernel.cpp\n\nsomething odd happened\nbuild stopped: subcommand failed.\n"
    assert build_failure_reason(RuntimeError(output)) == "build stopped: subcommand failed."
    assert build_failure_reason(RuntimeError("")) == "RuntimeError"
