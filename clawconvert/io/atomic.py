"""Outputs that appear all at once or not at all.

Everything is written into a hidden temporary directory beside the destination
(``.clawconvert-tmp-<name>-<pid>-<random>``), synced to disk, and renamed into place only
when complete.  With ``overwrite`` the new output and the old one are swapped in one atomic
``renameat2(RENAME_EXCHANGE)`` where the kernel and file system offer it; elsewhere the old
output is first moved *into* the temporary directory and the new one renamed into place.
Either way the old output is removed only after the new one carries the destination's name.

On any failure the temporary directory is removed, so a half-written output never carries
the destination's name.  A process killed outright (SIGKILL, power loss) cannot clean up;
the next run writing beside the same destination removes temporary directories whose owning
process is gone, and, if the kill fell between the two renames of an overwrite, puts the old
output back first.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import re
import secrets
import shutil
import socket
import sys
from pathlib import Path
from typing import Iterator

from ..errors import ClawError

TMP_PREFIX = ".clawconvert-tmp-"
OWNER_FILE = ".clawconvert-owner.json"
OLD = "old"          # where the fallback promotion parks the previous output, inside the temp dir
_STALE_RE = re.compile(r"^" + re.escape(TMP_PREFIX) + r"(?P<name>.+)-(?P<pid>\d+)-(?P<token>[0-9a-f]{8})$")


# ------------------------------------------------------------------------------------
# destination checks
# ------------------------------------------------------------------------------------
def check_destination(dst: Path, overwrite: bool, sources: tuple[Path, ...] = ()) -> None:
    """Refuse destinations that exist (without overwrite) or that would touch a source."""
    dst = Path(dst).absolute()
    d = dst.resolve()
    for src in sources:
        src = Path(src).resolve()
        if d == src or src in d.parents:
            raise ClawError(f"{dst}: destination is the source or inside it ({src}); choose another path")
        if d in src.parents:
            raise ClawError(f"{dst}: destination contains the source {src}; choose another path")
    if dst.name in ("", ".", "..") or dst.name.startswith(TMP_PREFIX):
        raise ClawError(f"{dst}: not a usable destination name")
    if dst.exists() or dst.is_symlink():
        if not overwrite:
            kind = "directory" if dst.is_dir() else "file"
            raise ClawError(f"{dst}: already exists ({kind}; pass --overwrite to replace it)")
        if dst.is_dir() and not dst.is_symlink():
            cwd = Path.cwd().resolve()
            home = Path.home().resolve()
            if d == cwd or d in cwd.parents or d == home or d == Path(d.anchor):
                raise ClawError(f"{dst}: refusing to replace it: it is the current directory, one of its "
                                f"parents, or your home directory")
    parent = dst.parent
    if not parent.exists():
        raise ClawError(f"{parent}: parent directory does not exist")
    if not parent.is_dir():
        raise ClawError(f"{parent}: not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ClawError(f"{parent}: not writable")


# ------------------------------------------------------------------------------------
# stale temporary directories (a run killed with SIGKILL cannot remove its own)
# ------------------------------------------------------------------------------------
def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return True
    return True


def _owner(tmp: Path) -> dict:
    try:
        data = json.loads((tmp / OWNER_FILE).read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def clean_stale_temporaries(parent: Path) -> list[str]:
    """Remove this host's temporary directories in ``parent`` whose process is gone.

    When a stale directory still holds the previous output of an interrupted overwrite and the
    destination is missing, the previous output is moved back first.  Returns notes.
    """
    notes: list[str] = []
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return notes
    host = socket.gethostname()
    for entry in entries:
        m = _STALE_RE.match(entry.name)
        if not m or not entry.is_dir(follow_symlinks=False):
            continue
        tmp = Path(entry.path)
        owner = _owner(tmp)
        if owner.get("host", host) != host:
            continue  # another machine's run on a shared file system: not ours to judge
        pid = owner.get("pid") if isinstance(owner.get("pid"), int) else int(m.group("pid"))
        if _pid_alive(pid):
            continue
        name = owner.get("dst") if isinstance(owner.get("dst"), str) else m.group("name")
        old = tmp / OLD
        dst = Path(parent) / name
        if old.exists() or old.is_symlink():
            if (dst.exists() or dst.is_symlink()) or "/" in name or name in (".", ".."):
                # something else carries the name now: never delete a previous output, say where it is
                notes.append(f"{tmp}: an interrupted run (pid {pid}) left the previous output of '{name}' "
                             f"here as '{OLD}'; nothing was deleted")
                continue
            try:
                os.rename(old, dst)
                notes.append(f"{dst}: restored the previous output, which an interrupted run (pid {pid}) had moved aside")
            except OSError:
                continue  # leave everything as it is rather than lose the old output
        shutil.rmtree(tmp, ignore_errors=True)
    return notes


# ------------------------------------------------------------------------------------
# promotion
# ------------------------------------------------------------------------------------
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2); False when the system cannot."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    if fn(_AT_FDCWD, os.fsencode(str(a)), _AT_FDCWD, os.fsencode(str(b)), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _fsync_path(path: Path, directory: bool) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as e:  # data that cannot reach the disk (EIO, ENOSPC on delayed allocation) is a failed write
        if e.errno not in (errno.EINVAL, errno.EROFS, errno.EBADF) or not directory:
            raise OSError(e.errno, e.strerror, str(path)) from e
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    """Push every file and directory of a finished output to disk before it gets its name."""
    if path.is_dir() and not path.is_symlink():
        for root, dirs, files in os.walk(path):
            for f in files:
                p = Path(root) / f
                if not p.is_symlink():
                    _fsync_path(p, False)
            _fsync_path(Path(root), True)
    elif path.is_file():
        _fsync_path(path, False)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


def _promote(new: Path, dst: Path) -> None:
    """Give ``new`` (inside its temp dir) the name ``dst``; the old ``dst`` goes only afterwards."""
    _fsync_tree(new)
    if dst.exists() or dst.is_symlink():
        if _exchange(new, dst):      # dst is now the new output, ``new`` holds the old one
            _fsync_path(dst.parent, True)
            _remove(new)
            return
        old = new.parent / OLD       # fallback: park the old output inside our temp dir
        os.rename(dst, old)
        try:
            os.rename(new, dst)
        except OSError:
            os.rename(old, dst)
            raise
        _fsync_path(dst.parent, True)
        _remove(old)
        return
    os.rename(new, dst)
    _fsync_path(dst.parent, True)


# ------------------------------------------------------------------------------------
# the context managers
# ------------------------------------------------------------------------------------
def _clean_beside(dst: Path) -> None:
    """Before the destination is judged: tidy what killed runs left beside it."""
    if dst.parent.is_dir():
        for note in clean_stale_temporaries(dst.parent):
            print(f"clawconvert: note: {note}", file=sys.stderr)


def _write_error(dst: Path, tmp: Path, e: OSError) -> ClawError:
    what = ""
    if e.filename:
        try:
            what = f" writing {Path(e.filename).relative_to(tmp).as_posix().split('/', 1)[-1]}"
        except ValueError:
            what = f" writing {e.filename}"
    hint = " (the disk is full)" if e.errno == errno.ENOSPC else ""
    return ClawError(f"{dst}: write failed{what}: {e.strerror or e}{hint}; nothing was written there")


@contextlib.contextmanager
def _temporary_beside(dst: Path, payload: str) -> Iterator[Path]:
    """A fresh hidden directory in ``dst``'s parent, always removed afterwards."""
    # the name is cut so a destination name near NAME_MAX (255) still leaves room; the owner
    # file records it in full
    tmp = dst.parent / f"{TMP_PREFIX}{dst.name[:80]}-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        tmp.mkdir()
        (tmp / OWNER_FILE).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                                  "dst": dst.name, "payload": payload}))
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ClawError(f"{dst.parent}: cannot create a temporary directory: {e.strerror or e}") from e
    try:
        yield tmp
    except OSError as e:
        raise _write_error(dst, tmp, e) from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def _missing_parents(dst: Path) -> Iterator[None]:
    """Create ``dst``'s missing parent directories (like ``mkdir -p``); remove them again,
    when still empty, if the command fails, so a failed run leaves nothing behind."""
    created: list[Path] = []
    p = dst.parent
    while not p.exists() and p != p.parent:
        created.append(p)
        p = p.parent
    if created and not p.is_dir():
        raise ClawError(f"{p}: not a directory")
    try:
        for d in reversed(created):
            d.mkdir()
    except OSError as e:
        raise ClawError(f"{dst.parent}: cannot create it: {e.strerror or e}") from e
    try:
        yield
    except BaseException:
        for d in created:  # deepest first
            try:
                d.rmdir()
            except OSError:
                break
        raise


@contextlib.contextmanager
def atomic_output_dir(dst: str | os.PathLike, overwrite: bool = False,
                      sources: tuple[Path, ...] = ()) -> Iterator[Path]:
    """Yield a temporary directory; on success it becomes ``dst``."""
    dst = Path(dst).absolute()
    with _missing_parents(dst), _atomic_dir(dst, overwrite, sources) as out:
        yield out


@contextlib.contextmanager
def _atomic_dir(dst: Path, overwrite: bool, sources: tuple[Path, ...]) -> Iterator[Path]:
    _clean_beside(dst)
    check_destination(dst, overwrite, sources)
    with _temporary_beside(dst, "out") as tmp:
        out = tmp / "out"
        out.mkdir()
        yield out
        _promote(out, dst)


@contextlib.contextmanager
def atomic_output_file(dst: str | os.PathLike, overwrite: bool = False,
                       sources: tuple[Path, ...] = ()) -> Iterator[Path]:
    """Yield a temporary file path beside ``dst``; on success it is renamed to ``dst``."""
    dst = Path(dst).absolute()
    with _missing_parents(dst), _atomic_file(dst, overwrite, sources) as target:
        yield target


@contextlib.contextmanager
def _atomic_file(dst: Path, overwrite: bool, sources: tuple[Path, ...]) -> Iterator[Path]:
    _clean_beside(dst)
    check_destination(dst, overwrite, sources)
    with _temporary_beside(dst, f"file/{dst.name}") as tmp:
        (tmp / "file").mkdir()
        target = tmp / "file" / dst.name
        yield target
        if not target.exists():
            raise ClawError(f"internal: {dst.name} was not written")
        _promote(target, dst)
