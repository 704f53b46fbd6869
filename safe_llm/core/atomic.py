"""Writing files and directories so that a crash leaves the old version or the new, never a mix.

Everything is written under a temporary sibling name (in the same directory, hence the same
file system) and renamed into place only once complete:

* :func:`atomic_write` for one file (fsynced before the rename);
* :func:`atomic_directory` for a directory: it is filled in a temporary sibling; an existing
  one is parked aside, the new one renamed into place, the old one removed (or put back if the
  rename fails), so the output is at every moment either the old directory or the new one.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def umask() -> int:
    """The process's file mode creation mask (read without changing it)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync(path: Path, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """``write(tmp)`` then fsync and ``os.replace(tmp, path)``: ``path`` is old or new, never
    partial. The temporary file keeps ``path``'s suffix (writers that pick the format by it
    still work) and is removed if anything fails. Returns ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}{path.suffix}")
    try:
        write(tmp)
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    with contextlib.suppress(OSError):  # some file systems cannot fsync a directory
        _fsync(path.parent, directory=True)
    return path


def _missing_ancestors(path: Path) -> list[Path]:
    """``path``'s ancestors that do not exist yet, outermost first."""
    missing = []
    for parent in path.parents:
        if parent.exists():
            break
        missing.append(parent)
    return missing[::-1]


def _remove_dirs(created: list[Path]) -> None:
    """Remove the (empty) directories ``created``, innermost first."""
    for directory in reversed(created):
        with contextlib.suppress(OSError):
            directory.rmdir()


def atomic_directory(output: str | os.PathLike, fill: Callable[[Path], None]) -> Path:
    """``fill(tmp)`` a temporary sibling directory of ``output``, then put it in ``output``'s
    place; an existing ``output`` (directory or file) is replaced only once the new one is
    complete and is put back if the final rename fails. On any error nothing is left behind:
    no temporary directory, no parent directories created for it. Returns ``output``."""
    output = Path(output)
    created = _missing_ancestors(output)
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    except BaseException:
        _remove_dirs(created)
        raise
    try:
        tmp.chmod(0o777 & ~umask())  # mkdtemp makes it private (0700)
        fill(tmp)
        _swap_into_place(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_dirs(created)
        raise
    return output


def _swap_into_place(tmp: Path, output: Path) -> None:
    """Rename ``tmp`` to ``output``, parking an existing ``output`` until that succeeded."""
    if not output.exists():
        tmp.rename(output)
        return
    # rename(2) replaces an empty directory atomically: park the old output there
    old = Path(tempfile.mkdtemp(prefix=f".{output.name}.old-", dir=output.parent))
    parked = old if output.is_dir() else old / output.name
    output.rename(parked)
    try:
        tmp.rename(output)
    except BaseException:
        parked.rename(output)
        raise
    shutil.rmtree(old, ignore_errors=True)
