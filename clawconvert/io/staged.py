"""Output files written front to back through a few large aligned buffers.

Every byte of a safetensors output (header, converted tensors, tensors copied unchanged from
the source) is put into one of ``STAGES`` buffers of ``STAGE_BYTES``; a full buffer is written
with one ``pwrite`` on a writing thread and hashed (sha256, for the manifest) on a hashing
thread, while the next buffer fills.  Where the file system allows it the output is opened
with ``O_DIRECT``: the bytes go from these buffers to the disk without a second copy in the
page cache, nothing is left for ``fsync`` to flush at the end, and a large conversion does not
evict the rest of the machine's page cache.  Elsewhere (tmpfs, some network and FUSE file
systems, or ``CLAWCONVERT_DIRECT_IO=0``) the same buffers are written through the page cache.

A write that does not come next in its file (no caller does this today) leaves the ordered
path for good: what is staged is written, the file goes back to the page cache, and later
writes go straight to their offsets; its sha256 is then computed by the manifest instead.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from typing import Callable

import numpy as np

from ..errors import ClawError
from .dtypes import contiguous, copy_into

ALIGN = 4096                # O_DIRECT offsets, lengths and buffer addresses are multiples of this
STAGE_BYTES = 16 << 20      # one pwrite, one hashing step (at most: see stage_size)
STAGES = 3                  # one filling, one being written and hashed, one spare: memory is STAGES x STAGE_BYTES
_NO_DIRECT = {errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EPERM, errno.EACCES}


def stage_size(total_bytes: int) -> int:
    """Buffers for an output of ``total_bytes``: a 32nd of it, 1 to 16 MiB, whole 4 KiB
    blocks, so that small outputs do not pay for large buffers."""
    return max(1 << 20, min(STAGE_BYTES, total_bytes // 32)) // ALIGN * ALIGN


def direct_io_wanted() -> bool:
    return bool(getattr(os, "O_DIRECT", 0)) and os.environ.get("CLAWCONVERT_DIRECT_IO", "1") != "0"


def with_file(e: OSError, path: Path) -> OSError:
    """The same OSError, naming the file being written (plain writes leave ``filename`` empty)."""
    if e.filename:
        return e
    return OSError(e.errno, e.strerror or str(e), str(path))


def as_bytes(data) -> memoryview:
    """A flat byte view of a bytes-like object, without copying."""
    view = memoryview(data)
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


def pwrite_all(fd: int, data, offset: int, path: Path) -> None:
    """Write all of ``data`` at ``offset``: every output byte reaches its file here (tests
    replace this function to fill the disk)."""
    view = as_bytes(data)
    done = 0
    try:
        while done < len(view):
            n = os.pwrite(fd, view[done:], offset + done)
            if n <= 0:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            done += n
    except OSError as e:
        raise with_file(e, path) from e


def _aligned(nbytes: int) -> np.ndarray:
    raw = np.empty(nbytes + ALIGN, dtype=np.uint8)
    start = -raw.ctypes.data % ALIGN
    return raw[start:start + nbytes]


class _Stage:
    __slots__ = ("buf", "busy")

    def __init__(self, nbytes: int):
        self.buf = _aligned(nbytes)
        self.busy: list[Future] = []   # the write and the hash still reading ``buf``


class Staging:
    """The ring of buffers and the two threads behind them, shared by a writer's files."""

    def __init__(self, stages: int = STAGES, stage_bytes: int = STAGE_BYTES):
        self.stage_bytes = stage_bytes
        self._count = stages
        self._made = 0
        self._ring: deque[_Stage] = deque()   # submitted, oldest first
        self._idle: list[_Stage] = []
        self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="clawconvert-write")
        self._sha = ThreadPoolExecutor(max_workers=1, thread_name_prefix="clawconvert-sha256")

    def take(self) -> _Stage:
        """A free buffer: an idle one, a new one while fewer than ``stages`` exist, else the
        oldest submitted one once its write and hash are done (their errors are raised here)."""
        if self._idle:
            return self._idle.pop()
        if self._made < self._count or not self._ring:   # (every buffer held by an unfinished file: one more)
            self._made += 1
            return _Stage(self.stage_bytes)
        stage = self._ring.popleft()
        self._settle(stage)
        return stage

    def give_back(self, stage: _Stage) -> None:
        """A buffer taken but not submitted."""
        self._idle.append(stage)

    @staticmethod
    def _settle(stage: _Stage) -> None:
        busy, stage.busy = stage.busy, []
        for fut in busy:
            fut.result()

    def submit(self, stage: _Stage, fd: int, nbytes: int, padded: int, offset: int, path: Path, sha) -> None:
        """Write ``padded`` bytes of ``stage`` at ``offset`` and hash its first ``nbytes``."""
        view = memoryview(stage.buf)[:padded]
        stage.busy.append(self._io.submit(pwrite_all, fd, view, offset, path))
        if sha is not None:
            stage.busy.append(self._sha.submit(sha.update, view[:nbytes]))
        self._ring.append(stage)

    def wait(self) -> None:
        """Every submitted write and hash done; the first error is raised."""
        while self._ring:
            stage = self._ring.popleft()
            self._settle(stage)
            self._idle.append(stage)

    def shutdown(self) -> None:
        for pool in (self._io, self._sha):
            pool.shutdown(wait=True, cancel_futures=True)


class StagedFile:
    """One output file, written in order through ``staging``; see the module docstring."""

    def __init__(self, path: Path, staging: Staging):
        self.path = Path(path)
        self._staging = staging
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0)
        self.direct = direct_io_wanted()
        self.fd = -1
        if self.direct:
            try:
                self.fd = os.open(self.path, flags | os.O_DIRECT, 0o644)
            except OSError as e:
                if e.errno not in _NO_DIRECT:
                    raise with_file(e, self.path) from e
                self.direct = False
        if self.fd < 0:
            try:
                self.fd = os.open(self.path, flags, 0o644)
            except OSError as e:
                raise with_file(e, self.path) from e
        self.pos = 0                 # the next byte in file order
        self.in_order = True         # every write so far came next: ``sha`` covers the file
        self.sha = hashlib.sha256()
        self._stage: _Stage | None = None
        self._start = 0              # file offset of the current stage's first byte
        self._fill = 0

    # -- writing ---------------------------------------------------------------------
    def _room(self) -> memoryview:
        if self._stage is None:
            self._stage = self._staging.take()
            self._start, self._fill = self.pos, 0
        return memoryview(self._stage.buf)[self._fill:]

    def _advance(self, n: int) -> None:
        self._fill += n
        self.pos += n
        if self._fill == self._staging.stage_bytes:
            self.flush()

    def flush(self) -> None:
        """Hand what is staged to the writing and hashing threads."""
        stage, n = self._stage, self._fill
        self._stage = None
        if stage is None:
            return
        if n == 0:
            self._staging.give_back(stage)
            return
        padded = -(-n // ALIGN) * ALIGN if self.direct else n   # O_DIRECT: whole blocks; EOF is set at close
        self._staging.submit(stage, self.fd, n, padded, self._start, self.path, self.sha)

    def write_at(self, offset: int, data) -> None:
        """``data`` (bytes-like) at ``offset``."""
        view = as_bytes(data)
        if offset != self.pos:
            self._leave_order()
        if not self.in_order:
            pwrite_all(self.fd, view, offset, self.path)
            return
        done = 0
        while done < len(view):
            room = self._room()
            n = min(len(room), len(view) - done)
            np.copyto(np.frombuffer(room[:n], dtype=np.uint8), np.frombuffer(view[done:done + n], dtype=np.uint8))  # releases the GIL
            done += n
            self._advance(n)

    def write_array_at(self, offset: int, arr: np.ndarray) -> None:
        """A numpy array's C-order bytes at ``offset``, laid out directly in the buffers (a
        transposed view is copied once, in tiles, instead of made contiguous and then copied)."""
        if offset != self.pos or not self.in_order or arr.ndim == 0 or arr.shape[0] == 0:
            self.write_at(offset, contiguous(arr).reshape(-1).view(np.uint8))
            return
        step = arr.nbytes // arr.shape[0]          # bytes of one slice along the first axis
        i = 0
        while i < arr.shape[0]:
            room = self._room()
            k = min(len(room) // step, arr.shape[0] - i)
            if k == 0:   # the buffer ends inside a slice: that slice alone goes through a copy
                self.write_at(self.pos, contiguous(arr[i]).reshape(-1).view(np.uint8))
                i += 1
                continue
            dest = np.frombuffer(room[:k * step], dtype=arr.dtype).reshape((k,) + arr.shape[1:])
            copy_into(dest, arr[i:i + k])
            i += k
            self._advance(k * step)

    def fill_at(self, offset: int, shape: tuple[int, ...], dtype: np.dtype,
                fill: Callable[[np.ndarray, int, int], None]) -> None:
        """A tensor whose rows ``fill(dest, first, last)`` computes, laid out straight into the
        buffers: ``dest`` is rows ``[first, last)`` of it, a view of the buffer being filled."""
        rows = shape[0] if shape else 0
        if offset != self.pos or not self.in_order or rows == 0:
            whole = np.empty(shape, dtype)
            if rows:
                fill(whole, 0, rows)
            self.write_at(offset, whole.reshape(-1).view(np.uint8))
            return
        step = int(np.prod(shape[1:], dtype=np.int64)) * np.dtype(dtype).itemsize
        i = 0
        while i < rows:
            room = self._room()
            k = min(len(room) // step, rows - i)
            if k == 0:   # the buffer ends inside a row: that row goes through a copy
                row = np.empty((1, *shape[1:]), dtype)
                fill(row, i, i + 1)
                self.write_at(self.pos, row.reshape(-1).view(np.uint8))
                i += 1
                continue
            fill(np.frombuffer(room[:k * step], dtype=dtype).reshape((k, *shape[1:])), i, i + k)
            i += k
            self._advance(k * step)

    def copy_at(self, offset: int, src: Path, src_offset: int, nbytes: int) -> None:
        """``nbytes`` of file ``src`` at ``src_offset``, read straight into the buffers."""
        if offset != self.pos:
            self._leave_order()
        with open(src, "rb", buffering=0) as f:
            done = 0
            while done < nbytes:
                if self.in_order:
                    room = self._room()
                    n = min(len(room), nbytes - done)
                    dest = room[:n]
                else:
                    n = min(self._staging.stage_bytes, nbytes - done)
                    dest = memoryview(np.empty(n, dtype=np.uint8))
                if os.preadv(f.fileno(), [dest], src_offset + done) != n:
                    raise ClawError(f"{src}: truncated while reading {nbytes} bytes at {src_offset}")
                if self.in_order:
                    self._advance(n)
                else:
                    pwrite_all(self.fd, dest, offset + done, self.path)
                done += n

    def _leave_order(self) -> None:
        """A write out of file order: write what is staged through the page cache and go on there."""
        if not self.in_order:
            return
        self.in_order = False
        self._staging.wait()
        if self.direct:
            fcntl.fcntl(self.fd, fcntl.F_SETFL, fcntl.fcntl(self.fd, fcntl.F_GETFL) & ~os.O_DIRECT)
            self.direct = False
        stage, n = self._stage, self._fill
        self._stage = None
        if stage is not None:
            if n:
                pwrite_all(self.fd, memoryview(stage.buf)[:n], self._start, self.path)
            self._staging.give_back(stage)

    # -- finishing -------------------------------------------------------------------
    def settle(self, size: int) -> None:
        """After ``flush`` and the staging's ``wait``: the file is ``size`` bytes, on disk."""
        try:
            if os.fstat(self.fd).st_size != size:   # O_DIRECT padding, or zero-byte tensors at the end
                os.ftruncate(self.fd, size)
            os.fsync(self.fd)
        except OSError as e:
            raise with_file(e, self.path) from e

    def digest(self) -> str | None:
        """sha256 of the file, when every write came in order (after the staging's ``wait``)."""
        return self.sha.hexdigest() if self.in_order else None

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            try:
                os.close(fd)
            except OSError:
                pass
