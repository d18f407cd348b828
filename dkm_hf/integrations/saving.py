"""Atomic saves: a checkpoint directory holds the old checkpoint or the new one, whole, at every instant.

The new checkpoint is written into a hidden sibling directory, completed with the old directory's other files
(tokenizer, trainer checkpoints...: hard-linked, not copied), then exchanged with the target in one atomic
`renameat2(RENAME_EXCHANGE)` (Linux; `renamex_np(RENAME_SWAP)` on macOS). When the target is the process's working
directory (or holds it), the process moves into the new directory right after the exchange.

In place: where the system cannot exchange, or the target is a mount point (`EXDEV`) or its parent is read-only
(`EROFS`, `EACCES`, `EPERM`: no sibling can be made or renamed), or the target holds a mount point (a mounted
dataset: an exchange would move it into the old copy, which is then removed) or belongs to another user or group than
the new directory would (an exchange would change the directory's owner), the new checkpoint is staged inside the
target and its files replace the old ones one by one, weights first and config.json last. Every save writes one save
id into every weight file's metadata and into config.json, and a load refuses files of different saves (naming one),
so a save killed between two replacements leaves the old checkpoint, the new one, or a directory whose load fails by
name, never a mix that loads.

Each save holds an exclusive `flock` on its staging directory for its whole life; hidden leftovers of a killed save
(unlocked) are removed by the next save into the same directory, and a live save's directory is left alone.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import re
import shutil
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .safetensors_files import INDEX_NAME, SINGLE_NAME, variant_name

try:
    import fcntl
except ImportError:  # no flock (Windows): leftovers are never removed, so no live save's directory is either
    fcntl = None


def weight_files(variant: str | None = None) -> re.Pattern:
    """The names of the weight files transformers writes for `variant` (single file, shards, shard index; safetensors
    or pickle): those of an older checkpoint that a new save of that variant replaces (never carried over). Other
    variants' files and a user's own (`model-ema.safetensors`) are not weights of this checkpoint and stay."""
    tag = rf"\.{re.escape(variant)}" if variant else ""
    shard = r"(-\d{5,}-of-\d{5,})?"
    return re.compile(
        rf"(model{tag}{shard}\.safetensors|pytorch_model{tag}{shard}\.bin"
        rf"|model\.safetensors\.index{tag}\.json|pytorch_model\.bin\.index{tag}\.json)"
    )


WEIGHT_FILE = weight_files()
_HIDDEN = re.compile(r"\.(?P<name>.+)\.dkm-(tmp|old)-[0-9a-f]{12}")
_TRAINER_CHECKPOINT, TRAINER_STATE = re.compile(r"checkpoint-\d+"), "trainer_state.json"
# Where these stop a sibling directory from being made, renamed or exchanged, the save goes in place.
IN_PLACE_ERRNOS = frozenset({errno.EXDEV, errno.EROFS, errno.EACCES, errno.EPERM, errno.EBUSY})
_STAGING_TRIES = 8


def atomic_save(
    save_directory: str | os.PathLike,
    write: Callable[[str], Any],
    finish: Callable[[str], None] | None = None,
    variant: str | None = None,
) -> Any:
    """Run `write(tmp)` in a fresh hidden staging directory and put the result at `save_directory` once complete.

    If `write` raises, the staging directory is removed and `save_directory` is untouched. `finish(tmp)` runs after
    the old directory's other files were carried over (e.g. to add a model card if none exists). `variant`: the
    weights variant being saved (`save_pretrained(variant=...)`), whose older weight files the new ones replace.
    """
    target = Path(os.path.realpath(save_directory))
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(target)
    weights = weight_files(variant)
    if _TRAINER_CHECKPOINT.fullmatch(target.name):
        # other processes write into a Trainer checkpoint meanwhile (each rank's RNG state): no exchange, in place
        target.mkdir(exist_ok=True)
    in_place = target.is_dir() and _must_stay(target)
    with _staging(target, inside=in_place) as tmp:
        result = write(str(tmp))
        # staged inside the target, only the files a save might rewrite are carried (for `finish` to see them)
        carried = _carry_over(target, tmp, weights, directories=tmp.parent != target) if target.is_dir() else set()
        if target.is_dir() and tmp.parent != target:
            shutil.copymode(target, tmp)
            _copy_owner(target, tmp)
        if finish is not None:
            finish(str(tmp))
        _put_in_place(tmp, target, carried, weights)
    return result


def _must_stay(target: Path) -> bool:
    """Whether an exchange must not replace the directory `target`: a Trainer checkpoint (other ranks write into it),
    or it holds a mount point (the exchange would move the mounted file system into the old copy, which is removed),
    or its owner or group is one this process cannot give the new directory (its users could no longer write)."""
    if _TRAINER_CHECKPOINT.fullmatch(target.name):
        return True
    info = target.stat()
    if not hasattr(os, "geteuid"):  # Windows: no owners to keep
        return _holds_mount(target)
    if os.geteuid() != 0 and (info.st_uid != os.geteuid() or info.st_gid not in (os.getegid(), *os.getgroups())):
        return True
    return _holds_mount(target)


def _holds_mount(target: Path, table: str = "/proc/self/mountinfo") -> bool:
    inside = str(target).rstrip("/") + "/"
    try:
        with open(table, encoding="utf-8") as lines:
            points = [_unescape(line.split()[4]) for line in lines if len(line.split()) > 4]
        return any(point.startswith(inside) for point in points)
    except OSError:  # no mount table: a directory on another device is a mount point (bind mounts are not seen)
        device = target.stat().st_dev
        for root, directories, _ in os.walk(target):
            for name in directories:
                path = os.path.join(root, name)
                if not os.path.islink(path) and os.lstat(path).st_dev != device:
                    return True
        return False


def _unescape(field: str) -> str:
    """A mountinfo path: space, tab, newline and backslash are written as octal escapes (\\040 ...)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), field)


def _copy_owner(source: Path, destination: Path) -> None:
    if not hasattr(os, "geteuid"):  # Windows
        return
    info = source.stat()
    mine = destination.stat()
    if (info.st_uid, info.st_gid) != (mine.st_uid, mine.st_gid):
        os.chown(destination, info.st_uid if os.geteuid() == 0 else -1, info.st_gid)


def _put_in_place(tmp: Path, target: Path, carried: set[str], weights: re.Pattern = WEIGHT_FILE) -> None:
    if tmp.parent != target:
        try:
            if not target.exists():
                os.rename(tmp, target)
                return
            cwd = _cwd_inside(target)
            if exchange(tmp, target):
                if cwd is not None:
                    os.chdir(target / cwd if (target / cwd).is_dir() else target)
                return
        except OSError as err:
            if err.errno not in IN_PLACE_ERRNOS or not target.is_dir():
                raise
    if _TRAINER_CHECKPOINT.fullmatch(target.name):  # stale beside new weights (see `_carry_over`)
        (target / TRAINER_STATE).unlink(missing_ok=True)
    with _staging(target, inside=True) as inner:
        # on the target's own filesystem, so that every replacement below is a rename
        for name in os.listdir(tmp):
            if name not in carried or not _unchanged(tmp / name, target / name):
                shutil.move(tmp / name, inner / name)
        _replace_files(inner, target, weights)


@contextlib.contextmanager
def _staging(target: Path, inside: bool = False) -> Iterator[Path]:
    """A fresh hidden directory next to `target` (inside it with `inside=True`, or where no sibling can be made),
    locked for as long as the save uses it and removed afterwards."""
    try:
        tmp, fd = _locked_directory(target if inside else target.parent, target.name)
    except OSError as err:
        if inside or err.errno not in IN_PLACE_ERRNOS or not target.is_dir():
            raise
        tmp, fd = _locked_directory(target, target.name)
    try:
        yield tmp
    finally:
        # The partial new checkpoint if anything failed, else what is left: the old checkpoint after the exchange.
        shutil.rmtree(tmp, ignore_errors=True)
        if fd is not None:
            os.close(fd)


def _locked_directory(parent: Path, name: str) -> tuple[Path, int | None]:
    """Make `parent/.name.dkm-tmp-<random>` and lock it. A sweep of leftovers may remove it between the mkdir and
    the lock; then the lock fails or finds the directory gone, and another name is tried."""
    for _ in range(_STAGING_TRIES):
        path = parent / f".{name}.dkm-tmp-{uuid.uuid4().hex[:12]}"
        os.mkdir(path)
        if fcntl is None:
            return path, None
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if os.fstat(fd).st_nlink > 0 and os.path.samestat(os.fstat(fd), os.stat(path)):
                return path, fd
        except OSError:
            pass
        os.close(fd)
    raise FileExistsError(f"{parent}: could not make a staging directory for {name!r} ({_STAGING_TRIES} tries)")


def remove_leftovers(target: Path) -> None:
    """Remove hidden directories that earlier, killed saves into `target` left next to it (or inside it): those whose
    lock no live save holds."""
    if fcntl is None:
        return
    for parent in (target.parent, target):
        try:
            entries = list(os.scandir(parent))
        except OSError:
            continue
        for entry in entries:
            match = _HIDDEN.fullmatch(entry.name)
            if match and match["name"] == target.name and entry.is_dir(follow_symlinks=False):
                _remove_unless_locked(entry.path)


def _remove_unless_locked(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return  # a live save's staging directory
    try:
        shutil.rmtree(path, ignore_errors=True)
    finally:
        os.close(fd)


def _cwd_inside(target: Path) -> Path | None:
    """The working directory relative to `target`, if it lies inside it."""
    try:
        cwd = Path(os.getcwd()).resolve()
    except OSError:
        return None
    return cwd.relative_to(target) if cwd == target or cwd.is_relative_to(target) else None


def _carry_over(old: Path, new: Path, weights: re.Pattern = WEIGHT_FILE, directories: bool = True) -> set[str]:
    """Link the old directory's files that the new checkpoint does not replace into it; the names carried
    (`directories=False`: files and links only)."""
    present, carried = set(os.listdir(new)), set()
    # a Trainer checkpoint's state describes the weights beside it: new weights make it stale, and its absence marks
    # the checkpoint incomplete until Trainer writes the new one (last), so a save killed between is not resumed
    stale = {TRAINER_STATE} if _TRAINER_CHECKPOINT.fullmatch(old.name) else set()
    for entry in os.scandir(old):
        if entry.name in present | stale or weights.fullmatch(entry.name) or _HIDDEN.fullmatch(entry.name):
            continue
        destination = new / entry.name
        if entry.is_symlink():
            os.symlink(os.readlink(entry.path), destination)
        elif entry.is_dir():
            if not directories:
                continue
            shutil.copytree(entry.path, destination, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(entry.path, destination)
        carried.add(entry.name)
    return carried


def _unchanged(new: Path, old: Path) -> bool:
    """Whether a carried-over entry still is the old one (a carried directory is never rewritten)."""
    try:
        return new.is_dir() and not new.is_symlink() or os.path.samefile(new, old)
    except OSError:
        return False


def _link_or_copy(source: str, destination: str) -> None:
    try:
        os.link(source, destination)
    except OSError:
        shutil.copy2(source, destination)


def _libc():
    name = ctypes.util.find_library("c")
    return ctypes.CDLL(name, use_errno=True) if name else None


_AT_FDCWD, _RENAME_EXCHANGE, _RENAME_SWAP = -100, 2, 2
_UNSUPPORTED = frozenset({errno.EINVAL, errno.ENOSYS, errno.ENOTSUP})


def exchange(a: Path, b: Path) -> bool:
    """Atomically exchange two paths; False where the system or filesystem cannot (then nothing happened). Any other
    failure raises `OSError` (e.g. `EXDEV` when `b` is a mount point)."""
    libc = _libc()
    try:
        if sys.platform.startswith("linux") and libc is not None and hasattr(libc, "renameat2"):
            rc = libc.renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
        elif sys.platform == "darwin" and libc is not None and hasattr(libc, "renamex_np"):
            rc = libc.renamex_np(os.fsencode(a), os.fsencode(b), _RENAME_SWAP)
        else:
            return False
    except (AttributeError, OSError):
        return False
    if rc == 0:
        return True
    code = ctypes.get_errno()
    if code in _UNSUPPORTED:
        return False
    raise OSError(code, f"cannot exchange {a} and {b}: {os.strerror(code)}")


def _replace_files(staged: Path, target: Path, weights: re.Pattern = WEIGHT_FILE) -> None:
    """File by file: new weights first, then the other files, config.json last; old weight files no longer named
    by the new checkpoint are removed before config.json names the new ones."""
    names = sorted(os.listdir(staged), key=lambda n: (n == "config.json", not weights.fullmatch(n), n))
    for name in names:
        if name == "config.json":
            # the shard index first: no index ever names a shard that is gone
            for old in sorted(os.listdir(target), key=lambda n: not n.endswith(".json")):
                if weights.fullmatch(old) and old not in names:
                    os.remove(target / old)
        destination = target / name
        if destination.is_dir() and not destination.is_symlink():
            shutil.rmtree(destination)
        os.replace(staged / name, destination)


def stale_single_file_guard(save_directory: str | os.PathLike, variant: str | None) -> Callable[[], None]:
    """Call before a save into `save_directory`; the function it returns, called after it, removes a single-file
    checkpoint (`model.safetensors`, of `variant`) that the save did not write when the save wrote a new shard index:
    loading reads the single file first, so it would shadow the new shards."""
    single, index = (variant_name(name, variant) for name in (SINGLE_NAME, INDEX_NAME))
    directory = Path(save_directory)

    def stamp(path: Path) -> tuple[int, int] | None:
        try:
            info = path.stat()
        except OSError:
            return None
        return info.st_mtime_ns, info.st_ino

    before = stamp(directory / index), stamp(directory / single)

    def remove_stale() -> None:
        wrote_index = stamp(directory / index) not in (None, before[0])
        old_single = before[1] is not None and stamp(directory / single) == before[1]  # there, and not rewritten
        if wrote_index and old_single:
            (directory / single).unlink()

    return remove_stale
