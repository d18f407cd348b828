"""Atomic saves: a checkpoint directory holds the old checkpoint or the new one, whole, at every instant.

The new checkpoint is written into a hidden sibling directory, completed with the old directory's other files
(tokenizer, trainer checkpoints...: hard-linked, not copied), then exchanged with the target in one atomic
`renameat2(RENAME_EXCHANGE)` (Linux; `renamex_np(RENAME_SWAP)` on macOS). Where neither exists, or the target is the
process's working directory (or holds it), files are replaced one by one, weights first and config.json last. Hidden
leftovers of a save that was killed are removed by the next save into the same directory.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import re
import shutil
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Files of an older checkpoint that a new save replaces (never carried over into the new directory).
WEIGHT_FILE = re.compile(r"(model|pytorch_model)([.-].*)?\.(safetensors|bin)(\.index\.json)?")
_HIDDEN = re.compile(r"\.(?P<name>.+)\.dkm-(tmp|old)-[0-9a-f]{12}")


def atomic_save(
    save_directory: str | os.PathLike, write: Callable[[str], Any], finish: Callable[[str], None] | None = None
) -> Any:
    """Run `write(tmp)` in a fresh hidden sibling directory and put the result at `save_directory` once complete.

    If `write` raises, the temporary directory is removed and `save_directory` is untouched. `finish(tmp)` runs after
    the old directory's other files were carried over (e.g. to add a model card if none exists).
    """
    target = Path(os.path.realpath(save_directory))
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(target)
    tmp = target.parent / f".{target.name}.dkm-tmp-{uuid.uuid4().hex[:12]}"
    tmp.mkdir()
    try:
        result = write(str(tmp))
        if target.is_dir():
            _carry_over(target, tmp)
            shutil.copymode(target, tmp)
        if finish is not None:
            finish(str(tmp))
        if not target.exists():
            os.rename(tmp, target)
        elif _holds_cwd(target) or not exchange(tmp, target):
            _replace_files(tmp, target)
    finally:
        # The partial new checkpoint if anything failed, else what is left: the old checkpoint after the exchange.
        shutil.rmtree(tmp, ignore_errors=True)
    return result


def remove_leftovers(target: Path) -> None:
    """Remove hidden directories that earlier, interrupted saves into `target` left next to it."""
    if not target.parent.is_dir():
        return
    for entry in os.scandir(target.parent):
        match = _HIDDEN.fullmatch(entry.name)
        if match and match["name"] == target.name and entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path, ignore_errors=True)


def _holds_cwd(target: Path) -> bool:
    try:
        cwd = Path(os.getcwd()).resolve()
    except OSError:
        return False
    return cwd == target or cwd.is_relative_to(target)


def _carry_over(old: Path, new: Path) -> None:
    present = set(os.listdir(new))
    for entry in os.scandir(old):
        if entry.name in present or WEIGHT_FILE.fullmatch(entry.name) or _HIDDEN.fullmatch(entry.name):
            continue
        destination = new / entry.name
        if entry.is_symlink():
            os.symlink(os.readlink(entry.path), destination)
        elif entry.is_dir():
            shutil.copytree(entry.path, destination, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(entry.path, destination)


def _link_or_copy(source: str, destination: str) -> None:
    try:
        os.link(source, destination)
    except OSError:
        shutil.copy2(source, destination)


def _libc():
    name = ctypes.util.find_library("c")
    return ctypes.CDLL(name, use_errno=True) if name else None


_AT_FDCWD, _RENAME_EXCHANGE, _RENAME_SWAP = -100, 2, 2


def exchange(a: Path, b: Path) -> bool:
    """Atomically exchange two paths; False where the system cannot (then nothing happened)."""
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
    return rc == 0


def _replace_files(tmp: Path, target: Path) -> None:
    """File by file: new weights first, then the other files, config.json last; old weight files no longer named
    by the new checkpoint are removed before config.json names the new ones."""
    names = sorted(os.listdir(tmp), key=lambda n: (n == "config.json", not WEIGHT_FILE.fullmatch(n)))
    for name in names:
        if name == "config.json":
            for old in os.listdir(target):
                if WEIGHT_FILE.fullmatch(old) and old not in names:
                    os.remove(target / old)
        destination = target / name
        if destination.is_dir() and not destination.is_symlink():
            shutil.rmtree(destination)
        os.replace(tmp / name, destination)
