"""Outputs that appear all at once or not at all.

Everything is written into a hidden temporary directory beside the destination and renamed
into place only when complete.  With ``overwrite`` the old output is moved aside first and
removed only after the new one is in place, so an interrupted run never loses it.  On any
failure the temporary directory is removed: a half-written output never carries the
destination's name.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from ..errors import ClawError

TMP_PREFIX = ".clawconvert-tmp-"


def check_destination(dst: Path, overwrite: bool, sources: tuple[Path, ...] = ()) -> None:
    """Refuse destinations that exist (without overwrite) or that would touch a source."""
    dst = Path(dst).absolute()
    for src in sources:
        src = Path(src).resolve()
        d = dst.resolve()
        if d == src or src in d.parents:
            raise ClawError(f"{dst}: destination is the source or inside it ({src}); choose another path")
        if src.is_file() and d in src.parents:
            raise ClawError(f"{dst}: destination contains the source file {src}; choose another path")
        if src.is_dir() and d in src.parents:
            raise ClawError(f"{dst}: destination contains the source {src}; choose another path")
    if dst.exists() and not overwrite:
        raise ClawError(f"{dst}: already exists (pass --overwrite to replace it)")
    parent = dst.parent
    if not parent.is_dir():
        raise ClawError(f"{parent}: parent directory does not exist")
    if not os.access(parent, os.W_OK):
        raise ClawError(f"{parent}: not writable")


def _promote(tmp: Path, dst: Path) -> None:
    backup = None
    if dst.exists() or dst.is_symlink():
        backup = dst.parent / f"{TMP_PREFIX}old-{dst.name}-{os.getpid()}"
        os.rename(dst, backup)
    try:
        os.rename(tmp, dst)
    except OSError:
        if backup is not None:
            os.rename(backup, dst)
        raise
    if backup is not None:
        if backup.is_dir() and not backup.is_symlink():
            shutil.rmtree(backup, ignore_errors=True)
        else:
            backup.unlink(missing_ok=True)


@contextlib.contextmanager
def _temporary_beside(dst: Path) -> Iterator[Path]:
    """A fresh hidden directory in ``dst``'s parent, always removed afterwards."""
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{dst.name}-", dir=dst.parent))
    except OSError as e:
        raise ClawError(f"{dst.parent}: cannot create a temporary directory: {e.strerror or e}") from e
    try:
        yield tmp
    except OSError as e:
        raise ClawError(f"{dst}: write failed: {e.strerror or e}") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_output_dir(dst: str | os.PathLike, overwrite: bool = False,
                      sources: tuple[Path, ...] = ()) -> Iterator[Path]:
    """Yield a temporary directory; on success it becomes ``dst``."""
    dst = Path(dst).absolute()
    check_destination(dst, overwrite, sources)
    with _temporary_beside(dst) as tmp:
        out = tmp / "out"
        out.mkdir()
        yield out
        _promote(out, dst)


@contextlib.contextmanager
def atomic_output_file(dst: str | os.PathLike, overwrite: bool = False,
                       sources: tuple[Path, ...] = ()) -> Iterator[Path]:
    """Yield a temporary file path beside ``dst``; on success it is renamed to ``dst``."""
    dst = Path(dst).absolute()
    check_destination(dst, overwrite, sources)
    with _temporary_beside(dst) as tmp:
        target = tmp / dst.name
        yield target
        if not target.exists():
            raise ClawError(f"internal: {dst.name} was not written")
        _promote(target, dst)
