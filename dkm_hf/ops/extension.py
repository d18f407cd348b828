"""Building dkm_hf's native code with torch's extension machinery, and saying so when it cannot be used.

`load_extension(name, sources, ...)` compiles C++ sources with `torch.utils.cpp_extension.load` (ninja, torch's
headers and flags; a file lock in the build directory so concurrent processes build once) into
`$XDG_CACHE_HOME/dkm_hf/torch_extensions/<torch version>-<python>/<name>-<sources hash>` (default ~/.cache/...;
one folder per content of the sources: ninja rebuilds by timestamps, and an upgrade can install sources older than
the objects of the previous version's build, which would then be loaded as they are; the sources are compiled from
copies in that folder, so that two checkouts of one version share its build), loads the
library, whose `TORCH_LIBRARY` blocks register its operators under `torch.ops`, and returns its path. When it cannot
(no compiler or ninja, a failed build), it warns once, naming the reason, and returns None: the caller takes its
torch path. `warn_once` is that warning for any other fallback. `guarded_build` is what every build runs inside:
torch's own lock file outlives a build killed with SIGKILL (every later process would wait on it forever), and a
library damaged after its build (a copy cut short, a full disk) would be loaded as it is and kill the process.
A build folder this process cannot write (a read-only shared cache) is used as it is when its library matches its
recorded checksum (`prebuilt`).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import sys
import warnings
from pathlib import Path

import torch

_LOADED: dict[str, str | None] = {}
_WARNED: set[str] = set()


def warn_once(key: str, message: str) -> None:
    """A RuntimeWarning with `message`, the first time `key` comes up in this process."""
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def one_device(op: str, *tensors) -> None:
    """The operators' fake implementations run for any meta input: one meta tensor among CPU ones must fail as
    torch's own operators do, not return uninitialised CPU results."""
    devices = {t.device for t in tensors if t is not None}
    if len(devices) > 1:
        raise RuntimeError(f"{op}: expected all tensors to be on the same device, got {sorted(map(str, devices))}")


# What a failed build's output says about its cause, in order of preference: a compiler's error, then what the
# linker could not find, a missing or refused program or file, a killed process or an exceeded limit (ninja's own
# last line says only that it stopped, and the compiler driver's "collect2: error: ld returned 1 exit status" only
# that the linker failed).
_CAUSES = (
    ("error:",),
    (
        "undefined reference",
        "cannot find",
        "not found",
        "no such file",
        "permission denied",
        "killed",
        "limit exceeded",
    ),
    ("no space",),
)
_NOT_CAUSES = ("collect2:", "ld returned")


def build_failure_reason(error: Exception) -> str:
    """The line of a build or load failure that says why (e.g. "/bin/sh: 1: c++: not found"), else its last line."""
    lines = [" ".join(line.split()) for line in str(error).splitlines() if line.strip()]
    causes = [line for line in lines if not any(marker in line for marker in _NOT_CAUSES)]
    for markers in _CAUSES:
        found = [line for line in causes if any(marker in line.lower() for marker in markers)]
        if found:
            return found[0][:600]
    return lines[-1][-600:] if lines else type(error).__name__


def build_root() -> Path:
    """The build directories' parent: one per torch version, Python and torch installation (virtual environment),
    so an upgrade never loads a stale build, and two environments never rebuild each other's (ninja's build files
    name the environment's include paths: a build from another one looks out of date and is redone)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    where = hashlib.sha1(os.path.realpath(os.path.dirname(torch.__file__)).encode()).hexdigest()[:8]
    tag = f"torch-{torch.__version__.replace('+', '-')}-py{sys.version_info.major}{sys.version_info.minor}-{where}"
    return Path(base) / "dkm_hf" / "torch_extensions" / tag


def source_tag(sources: list[Path]) -> str:
    """12 hex digits of the sources' names and contents (the files they include too): the part of a build folder's
    name that follows the code."""
    digest = hashlib.sha1(b"staged\0")  # built from copies in the folder (`staged`): not the folders of before
    for path in sources:
        digest.update(Path(path).name.encode() + b"\0" + Path(path).read_bytes() + b"\0")
    return digest.hexdigest()[:12]


def staged(directory: Path, files: list[Path]) -> list[Path]:
    """Copies of `files` in `directory`/src, written only where missing or different. ninja's build file names each
    source by its absolute path: compiled from the copies, two checkouts (or installs) of the same code share one
    build instead of rebuilding it each time the other one loaded it; an unchanged copy keeps its timestamp, which is
    all ninja compares. The files a source includes by a relative path go in `files` too."""
    folder = directory / "src"
    folder.mkdir(parents=True, exist_ok=True)
    copies = []
    for path in map(Path, files):
        copy, data = folder / path.name, path.read_bytes()
        if not copy.is_file() or copy.read_bytes() != data:
            partial = folder / f".{path.name}.{os.getpid()}.partial"
            partial.write_bytes(data)
            os.replace(partial, copy)
        copies.append(copy)
    return copies


@contextlib.contextmanager
def guarded_build(directory: Path, name: str):
    """Around torch's build and load of library `name` in `directory`:

    - an OS lock on `dkm_hf.lock` (released by the kernel when its holder dies, unlike torch's `lock` file, which a
      killed build leaves behind). Holding it, no dkm_hf build of this folder runs, so a torch `lock` there is a
      dead build's and is removed instead of waited on forever;
    - the library's SHA-256, recorded after its first load: a library whose bytes differ, or without a record (its
      process died between build and record), is removed and built again rather than loaded (a damaged shared object
      kills the process with SIGBUS; no exception is raised).
    """
    library, record = directory / f"{name}.so", directory / f"{name}.sha256"
    try:
        import fcntl
    except ImportError:  # no POSIX locks (Windows): torch's lock alone
        yield
        return
    with open(directory / "dkm_hf.lock", "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError:  # a file system without flock (some NFS, Lustre, FUSE mounts): torch's lock alone
            yield
            return
        try:
            (directory / "lock").unlink(missing_ok=True)
            if library.exists() and (not record.exists() or record.read_text().strip() != _sha256(library)):
                library.unlink()
                record.unlink(missing_ok=True)
            built = library.stat().st_mtime_ns if library.exists() else None
            yield
            if library.exists() and (not record.exists() or library.stat().st_mtime_ns != built):  # (re)built now
                record.write_text(_sha256(library))
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def prebuilt(directory: Path, name: str) -> Path | None:
    """Library `name` built before in a folder this process cannot write (a cache shared read-only, baked into an
    image, or another user's): its path where its SHA-256 record matches it, else None. Neither torch's build nor
    `guarded_build`'s lock can run there, and what the folder holds is this code's build (its name follows the
    sources, torch and Python), so it is loaded as it is."""
    library, record = directory / f"{name}.so", directory / f"{name}.sha256"
    if os.access(directory, os.W_OK) or not library.is_file() or not record.is_file():
        return None
    return library if record.read_text().strip() == _sha256(library) else None


def build_and_load(
    directory: Path,
    name: str,
    sources: list[Path],
    cflags: list[str],
    ldflags: list[str],
    module: bool,
    includes: list[Path] = (),
):
    """Library `name` of `sources` built in `directory` (`guarded_build`, from their `staged` copies there, with the
    `includes` they name by a relative path) and loaded, or a read-only folder's build loaded as it is (`prebuilt`):
    the Python module with `module`, else the library's path (its operators registered). Raises what the build or
    the load raises."""
    ready = prebuilt(directory, name)
    if ready is not None and module:
        spec = importlib.util.spec_from_file_location(name, ready)
        loaded = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(loaded)
        return loaded
    if ready is not None:
        torch.ops.load_library(str(ready))
        return str(ready)
    from torch.utils import cpp_extension

    directory.mkdir(parents=True, exist_ok=True)
    with guarded_build(directory, name):
        copies = staged(directory, [*sources, *includes])[: len(sources)]
        return cpp_extension.load(
            name=name,
            sources=[str(s) for s in copies],
            extra_cflags=cflags,
            extra_ldflags=ldflags,
            build_directory=str(directory),
            is_python_module=module,
            verbose=False,
        )


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_extension(
    name: str,
    sources: list[Path],
    extra_cflags: list[str] | None = None,
    extra_ldflags: list[str] | None = None,
    what: str = "",
    warn: bool = True,
    includes: list[Path] = (),
) -> str | None:
    """The path of the built and loaded library `name` (its operators registered), or None after a warning that
    names the reason. Built once per process (and cached on disk across processes); `what` says in the warning what
    the fallback costs; `warn=False` for an attempt that has another behind it; `includes`: the files the sources
    include by a relative path."""
    if name in _LOADED:
        return _LOADED[name]
    path = None
    try:
        directory = build_root() / f"{name}-{source_tag([*sources, *includes])}"
        path = build_and_load(
            directory, name, sources, extra_cflags or [], extra_ldflags or [], module=False, includes=includes
        )
    except Exception as error:  # noqa: BLE001 - any failure to build or load means the fallback, said once
        reason = build_failure_reason(error)
        if warn:
            warn_once(name, f"dkm_hf: the native extension {name} could not be built or loaded ({reason}){what}")
        path = None
    _LOADED[name] = path
    return path
