"""Streaming writers: the layout is fixed from the plan, bytes arrive one tensor at a time.

:class:`SafetensorsWriter` is given every output tensor's name, shape and dtype before any
data (the engine knows them from the source headers), so it writes each file's header first,
splits into shards above ``max_shard_size`` with an HF-style ``*.index.json``, and then
copies each tensor's bytes straight to its place.  Nothing is ever held beyond one tensor.
"""
from __future__ import annotations

import json
import math
import os
import re
import zipfile
from pathlib import Path
from typing import Iterable

import errno
import hashlib
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from ..errors import ClawError
from ..provenance import remember_hash
from . import dtypes
from .dtypes import SAFETENSORS_DTYPES, DType, as_numpy, cast, contiguous, dtype_of

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)?\s*$", re.I)
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40,
          "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}


def parse_size(text: str | int) -> int:
    """``"5GB"`` -> 5_000_000_000 (HF convention: GB = 1e9, GiB = 2**30)."""
    if isinstance(text, int):
        return text
    m = _SIZE_RE.match(text)
    unit = (m.group(2) or "").upper() if m else None
    if not m or unit not in _UNITS:
        raise ClawError(f"cannot read size {text!r} (examples: 5GB, 500MB, 2GiB)")
    return int(float(m.group(1)) * _UNITS[unit])


def _with_file(e: OSError, path: Path) -> OSError:
    """The same OSError, naming the file being written (plain writes leave ``filename`` empty)."""
    if e.filename:
        return e
    return OSError(e.errno, e.strerror or str(e), str(path))


class _Hasher:
    """sha256 of each output file, computed on a second thread while the bytes are written.

    Writes that arrive in file order are hashed as they go (hashlib releases the GIL), so
    the manifest does not read the output back; a file written out of order is hashed at
    the end by the manifest instead.  At most ``max_pending`` bytes wait for the hasher.
    """

    def __init__(self, max_pending: int = 256 << 20):
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="clawconvert-sha256")
        self._pending: deque = deque()
        self._pending_bytes = 0
        self.max_pending = max_pending
        self._buf: np.ndarray | None = None   # the hashing thread's read buffer

    def update(self, h, data):
        """Queue ``h.update(data)``; ``data`` must not change until the returned future is done."""
        n = len(data)
        while self._pending and self._pending_bytes + n > self.max_pending:
            self._drain_one()
        fut = self._pool.submit(h.update, data)
        self._pending.append((fut, n))
        self._pending_bytes += n
        return fut

    def update_from_file(self, h, path: Path, offset: int, nbytes: int):
        """Queue hashing ``nbytes`` of ``path`` at ``offset`` (bytes the kernel copied for us)."""
        while self._pending and self._pending_bytes + nbytes > self.max_pending:
            self._drain_one()
        fut = self._pool.submit(self._hash_file_range, h, path, offset, nbytes)
        self._pending.append((fut, nbytes))
        self._pending_bytes += nbytes
        return fut

    def _hash_file_range(self, h, path: Path, offset: int, nbytes: int) -> None:
        if self._buf is None:
            self._buf = np.empty(COPY_CHUNK, dtype=np.uint8)
        with open(path, "rb", buffering=0) as f:
            done = 0
            while done < nbytes:
                n = min(COPY_CHUNK, nbytes - done)
                view = memoryview(self._buf)[:n]
                if os.preadv(f.fileno(), [view], offset + done) != n:
                    raise ClawError(f"{path}: truncated while hashing")
                h.update(view)
                done += n

    def _drain_one(self) -> None:
        fut, n = self._pending.popleft()
        fut.result()
        self._pending_bytes -= n

    def wait(self) -> None:
        while self._pending:
            self._drain_one()

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def tensor_bytes(t) -> memoryview:
    """An array's raw little-endian bytes, without copying when it is already contiguous."""
    a = contiguous(as_numpy(t))
    if a.size == 0:
        return memoryview(b"")
    return memoryview(a.reshape(-1).view(np.uint8))


def _pwrite_all(fd: int, data, offset: int, path: Path) -> None:
    view = memoryview(data).cast("B") if not isinstance(data, memoryview) or data.format != "B" else data
    done = 0
    try:
        while done < len(view):
            n = os.pwrite(fd, view[done:], offset + done)
            if n <= 0:
                raise OSError(28, os.strerror(28))
            done += n
    except OSError as e:
        raise _with_file(e, path) from e


COPY_CHUNK = 16 << 20


class SafetensorsWriter:
    """Write planned tensors into one safetensors file or HF-style shards.

    >>> w = SafetensorsWriter(out_dir, [("a", (2, 3), dtypes.float32)], max_shard_size=5 * 10**9)
    >>> w.write("a", array); w.close()

    ``copy_range`` moves a tensor whose bytes are already right (a rename) from the source
    file in fixed-size chunks, so a tensor of any size costs ``COPY_CHUNK`` of memory.
    ``hashes`` holds each written file's sha256 after ``close``.
    """

    def __init__(self, directory: Path, plan: Iterable[tuple[str, tuple[int, ...], Any]],
                 max_shard_size: int = 5 * 10**9, basename: str = "model",
                 metadata: dict[str, str] | None = None):
        self.directory = Path(directory)
        plan = [(name, tuple(shape), dtype_of(dtype)) for name, shape, dtype in plan]
        names = [p[0] for p in plan]
        if len(set(names)) != len(names):
            dup = sorted({n for n in names if names.count(n) > 1})
            raise ClawError(f"output would hold duplicate tensor names: {', '.join(dup[:5])}")
        for name, shape, dtype in plan:
            if dtype.code not in SAFETENSORS_DTYPES:
                raise ClawError(f"tensor '{name}' has dtype {dtype}, which safetensors cannot store")
        self.metadata = {"format": "pt", **(metadata or {})}
        shards: list[list[tuple[str, tuple[int, ...], DType]]] = [[]]
        size = 0
        for entry in plan:
            nbytes = math.prod(entry[1]) * entry[2].itemsize
            if shards[-1] and size + nbytes > max_shard_size:
                shards.append([])
                size = 0
            shards[-1].append(entry)
            size += nbytes
        n = len(shards)
        self.files: list[Path] = []
        self._where: dict[str, tuple[int, int, int, DType, tuple[int, ...]]] = {}
        self._handles = []
        self._sha = []          # per file: [hashlib object, next offset to hash, in order so far]
        self._hasher = _Hasher()
        self._sizes: list[int] = []   # each file's final size
        self._ring: list = []
        self._kernel_copy = hasattr(os, "copy_file_range")
        self.hashes: dict[str, str] = {}
        self.total_size = 0
        for i, shard in enumerate(shards):
            fname = f"{basename}.safetensors" if n == 1 else f"{basename}-{i + 1:05d}-of-{n:05d}.safetensors"
            header, offset = {}, 0
            for name, shape, dtype in shard:
                nbytes = math.prod(shape) * dtype.itemsize
                header[name] = {"dtype": dtype.code, "shape": list(shape),
                                "data_offsets": [offset, offset + nbytes]}
                offset += nbytes
            header = {"__metadata__": self.metadata, **header}
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)
            path = self.directory / fname
            data_start = 8 + len(raw)
            try:
                f = open(path, "wb", buffering=0)
            except OSError as e:
                self.abort()
                raise _with_file(e, path) from e
            self._handles.append(f)
            head = len(raw).to_bytes(8, "little") + raw
            try:  # no truncate to the final size: on ext4, filling a sparse file is several times slower
                f.write(head)
            except OSError as e:
                self.abort()
                raise _with_file(e, path) from e
            self._sha.append([hashlib.sha256(head), data_start, True])
            self._sizes.append(data_start + offset)
            for name, shape, dtype in shard:
                b, e = header[name]["data_offsets"]
                self._where[name] = (len(self._handles) - 1, data_start + b, e - b, dtype, tuple(shape))
            self.files.append(path)
            self.total_size += offset
        self._pending = set(self._where)
        self.basename = basename

    def _put(self, fi: int, offset: int, data):
        _pwrite_all(self._handles[fi].fileno(), data, offset, self.files[fi])
        h = self._hash_in_order(fi, offset, len(data))
        return None if h is None else self._hasher.update(h, data)

    def _hash_in_order(self, fi: int, offset: int, nbytes: int):
        """File ``fi``'s running sha256 when these bytes come next in it, else None (the file
        was written out of order: the manifest hashes it itself)."""
        state = self._sha[fi]
        if state[2] and offset == state[1]:
            state[1] += nbytes
            return state[0]
        state[2] = False
        return None

    def _slot(self, name: str) -> tuple[int, int, int, DType, tuple[int, ...]]:
        if name not in self._where:
            raise ClawError(f"internal: tensor '{name}' was not planned for writing")
        return self._where[name]

    def write(self, name: str, tensor) -> None:
        fi, offset, nbytes, dtype, shape = self._slot(name)
        arr = as_numpy(tensor)
        if tuple(arr.shape) != shape:
            raise ClawError(f"tensor '{name}' came out with shape {tuple(arr.shape)}, planned {shape}")
        data = tensor_bytes(cast(arr, dtype))
        if len(data) != nbytes:
            raise ClawError(f"internal: tensor '{name}' is {len(data)} bytes, planned {nbytes}")
        if nbytes:
            self._put(fi, offset, data)
        self._pending.discard(name)

    def copy_range(self, name: str, src: Path, src_offset: int, nbytes: int) -> None:
        """Copy ``nbytes`` from ``src`` at ``src_offset`` as tensor ``name``.

        The kernel copies (``copy_file_range``: no user-space buffer at all) while the hashing
        thread reads the same source bytes; where the kernel cannot (another file system,
        an old kernel), the bytes go through a small ring of ``COPY_CHUNK`` buffers."""
        fi, offset, planned, _, _ = self._slot(name)
        if nbytes != planned:
            raise ClawError(f"internal: tensor '{name}' is {nbytes} bytes, planned {planned}")
        if not (self._kernel_copy and self._copy_in_kernel(fi, offset, src, src_offset, nbytes)):
            self._copy_through_buffers(fi, offset, src, src_offset, nbytes)
        self._pending.discard(name)

    def _copy_in_kernel(self, fi: int, offset: int, src: Path, src_offset: int, nbytes: int) -> bool:
        out = self._handles[fi].fileno()
        with open(src, "rb", buffering=0) as f:
            done = 0
            while done < nbytes:
                try:
                    n = os.copy_file_range(f.fileno(), out, nbytes - done, src_offset + done, offset + done)
                except OSError as e:
                    if done == 0 and e.errno in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP,
                                                 errno.EBADF, errno.ENOTSUP):
                        self._kernel_copy = False
                        return False
                    raise _with_file(e, self.files[fi]) from e
                if n <= 0:
                    raise ClawError(f"{src}: truncated while reading {nbytes} bytes at {src_offset}")
                done += n
        h = self._hash_in_order(fi, offset, nbytes)
        if h is not None:
            self._hasher.update_from_file(h, src, src_offset, nbytes)
        return True

    def _copy_through_buffers(self, fi: int, offset: int, src: Path, src_offset: int, nbytes: int) -> None:
        if not self._ring:
            self._ring = [[np.empty(COPY_CHUNK, dtype=np.uint8), None] for _ in range(3)]
        with open(src, "rb", buffering=0) as f:
            done = 0
            while done < nbytes:
                slot = self._ring[0]
                self._ring.append(self._ring.pop(0))
                if slot[1] is not None:
                    slot[1].result()  # the hasher may still be reading this buffer
                n = min(COPY_CHUNK, nbytes - done)
                view = memoryview(slot[0])[:n]
                got = os.preadv(f.fileno(), [view], src_offset + done)
                if got != n:
                    raise ClawError(f"{src}: truncated while reading {nbytes} bytes at {src_offset}")
                slot[1] = self._put(fi, offset + done, view)
                done += n

    def close(self) -> list[Path]:
        """Flush everything; refuse to finish while a planned tensor was never written."""
        handles, self._handles = self._handles, []
        try:
            for f, path, size in zip(handles, self.files, self._sizes):
                try:  # fsync while the hashing thread finishes: the two overlap
                    if os.fstat(f.fileno()).st_size < size:  # zero-byte tensors at the end
                        os.ftruncate(f.fileno(), size)
                    os.fsync(f.fileno())
                except OSError as e:
                    raise _with_file(e, path) from e
            self._hasher.wait()
        finally:
            self._hasher.shutdown()
            for f in handles:
                f.close()
        if self._pending:
            missing = sorted(self._pending)
            raise ClawError(f"{len(missing)} planned tensors were never written: {', '.join(missing[:5])}")
        for path, (h, hashed, in_order) in zip(self.files, self._sha):
            if in_order and hashed == path.stat().st_size:
                self.hashes[path.name] = h.hexdigest()
                remember_hash(path, self.hashes[path.name])
        if len(self.files) > 1:
            index = {"metadata": {"total_size": self.total_size},
                     "weight_map": {name: self.files[w[0]].name for name, w in sorted(self._where.items())}}
            ipath = self.directory / f"{self.basename}.safetensors.index.json"
            try:
                ipath.write_text(json.dumps(index, indent=2) + "\n")
            except OSError as e:
                raise _with_file(e, ipath) from e
            return self.files + [ipath]
        return list(self.files)

    def abort(self) -> None:
        self._hasher.shutdown()
        handles, self._handles = self._handles, []
        for f in handles:
            try:
                f.close()
            except OSError:
                pass


class NpzWriter:
    """Stream arrays into an uncompressed ``.npz`` (zip64), one member at a time.

    bfloat16 tensors are stored as float32 unless ``keep_bfloat16`` is set, in which case they
    are written as 2-byte void, the way JAX/big_vision checkpoints carry them.
    """

    def __init__(self, path: Path, keep_bfloat16: bool = False):
        self.path = Path(path)
        self.keep_bfloat16 = keep_bfloat16
        self._zip = zipfile.ZipFile(self.path, "w", compression=zipfile.ZIP_STORED, allowZip64=True)

    def write(self, name: str, tensor) -> None:
        arr = contiguous(as_numpy(tensor))
        if arr.dtype == dtypes.bfloat16.np:  # numpy files have no bfloat16: JAX's 2-byte void, or float32
            arr = arr.view(np.dtype("V2")) if self.keep_bfloat16 else arr.astype(np.float32)
        if arr.dtype.hasobject:
            raise ClawError(f"tensor '{name}' holds Python objects; .npz outputs hold arrays only")
        try:
            with self._zip.open(name + ".npy", "w", force_zip64=True) as f:
                np.lib.format.write_array(f, arr, allow_pickle=False)
        except OSError as e:
            raise _with_file(e, self.path) from e

    def close(self) -> list[Path]:
        try:
            self._zip.close()
        except OSError as e:
            raise _with_file(e, self.path) from e
        return [self.path]

    def abort(self) -> None:
        try:
            self._zip.close()
        except (OSError, ValueError):
            pass
