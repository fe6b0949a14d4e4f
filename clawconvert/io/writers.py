"""Streaming writers: the layout is fixed from the plan, bytes arrive one tensor at a time.

:class:`SafetensorsWriter` is given every output tensor's name, shape and dtype before any
data (the engine knows them from the source headers), so it writes each file's header first,
splits into shards above ``max_shard_size`` with an HF-style ``*.index.json``, and then
copies each tensor's bytes straight to its place.  Nothing is ever held beyond one tensor.
"""
from __future__ import annotations

import json
import math
import re
import zipfile
from pathlib import Path
from typing import Iterable

from typing import Any

import numpy as np

from ..errors import ClawError
from ..provenance import remember_hash
from . import dtypes
from .staged import Staging, StagedFile, stage_size, with_file
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


def tensor_bytes(t) -> memoryview:
    """An array's raw little-endian bytes, without copying when it is already contiguous."""
    a = contiguous(as_numpy(t))
    if a.size == 0:
        return memoryview(b"")
    return memoryview(a.reshape(-1).view(np.uint8))


class SafetensorsWriter:
    """Write planned tensors into one safetensors file or HF-style shards.

    >>> w = SafetensorsWriter(out_dir, [("a", (2, 3), dtypes.float32)], max_shard_size=5 * 10**9)
    >>> w.write("a", array); w.close()

    Every file is written front to back through a few large aligned buffers
    (:mod:`clawconvert.io.staged`: ``O_DIRECT`` where the file system allows it, sha256
    computed on the way); ``copy_range`` reads a tensor whose bytes are already right (a
    rename) from the source straight into them.  ``hashes`` holds each file's sha256 after
    ``close``.
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
        self._out: list[StagedFile] = []
        self._staging = Staging(stage_bytes=stage_size(sum(math.prod(e[1]) * e[2].itemsize for e in plan)))
        self._sizes: list[int] = []   # each file's final size
        self._headers: list[bytes | None] = []   # each file's header, until it is written
        self._left: list[int] = []    # tensors each file still waits for
        self.hashes: dict[str, str] = {}
        self.total_size = 0
        try:
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
                out = StagedFile(path, self._staging)
                self._out.append(out)
                # the header goes out with the file's first tensor, and a file is flushed once its last
                # tensor is in: only the file being written holds a staging buffer, whatever the shard count
                self._headers.append(len(raw).to_bytes(8, "little") + raw)
                self._left.append(len(shard))
                self._sizes.append(data_start + offset)
                for name, shape, dtype in shard:
                    b, e = header[name]["data_offsets"]
                    self._where[name] = (len(self._out) - 1, data_start + b, e - b, dtype, tuple(shape))
                self.files.append(path)
                self.total_size += offset
        except BaseException:
            self.abort()
            raise
        self._pending = set(self._where)
        self.basename = basename

    @property
    def direct(self) -> bool:
        """Whether the files are written with O_DIRECT (the page cache is bypassed)."""
        return all(f.direct for f in self._out)

    def _slot(self, name: str) -> tuple[int, int, int, DType, tuple[int, ...]]:
        if name not in self._where:
            raise ClawError(f"internal: tensor '{name}' was not planned for writing")
        return self._where[name]

    def write(self, name: str, tensor) -> None:
        fi, offset, nbytes, dtype, shape = self._slot(name)
        arr = as_numpy(tensor)
        if tuple(arr.shape) != shape:
            raise ClawError(f"tensor '{name}' came out with shape {tuple(arr.shape)}, planned {shape}")
        arr = cast(arr, dtype)
        if arr.nbytes != nbytes:
            raise ClawError(f"internal: tensor '{name}' is {arr.nbytes} bytes, planned {nbytes}")
        self._begin(fi)
        if nbytes:
            if arr.flags.c_contiguous or arr.ndim < 2:
                self._out[fi].write_at(offset, tensor_bytes(arr))
            else:   # a transposed view: laid out straight into the write buffers
                self._out[fi].write_array_at(offset, arr)
        self._done(name, fi)

    def _begin(self, fi: int) -> None:
        header, self._headers[fi] = self._headers[fi], None
        if header is not None:
            self._out[fi].write_at(0, header)

    def _done(self, name: str, fi: int) -> None:
        if name in self._pending:
            self._pending.discard(name)
            self._left[fi] -= 1
            if self._left[fi] == 0:
                self._out[fi].flush()

    def fill(self, name: str, filler) -> None:
        """Tensor ``name`` computed by ``filler.fill(dest, first, last)`` a band of rows at a time,
        straight into the write buffers (``filler.shape`` must be the planned shape)."""
        fi, offset, nbytes, dtype, shape = self._slot(name)
        if tuple(filler.shape) != shape:
            raise ClawError(f"tensor '{name}' would come out with shape {tuple(filler.shape)}, planned {shape}")
        self._begin(fi)
        if nbytes:
            self._out[fi].fill_at(offset, shape, dtype.np, filler.fill)
        self._done(name, fi)

    def copy_range(self, name: str, src: Path, src_offset: int, nbytes: int) -> None:
        """Copy ``nbytes`` from ``src`` at ``src_offset`` as tensor ``name`` (read straight
        into the write buffers: no tensor is materialised)."""
        fi, offset, planned, _, _ = self._slot(name)
        if nbytes != planned:
            raise ClawError(f"internal: tensor '{name}' is {nbytes} bytes, planned {planned}")
        self._begin(fi)
        if nbytes:
            self._out[fi].copy_at(offset, src, src_offset, nbytes)
        self._done(name, fi)

    def close(self) -> list[Path]:
        """Flush everything; refuse to finish while a planned tensor was never written."""
        if self._pending:
            self.abort()
            missing = sorted(self._pending)
            raise ClawError(f"{len(missing)} planned tensors were never written: {', '.join(missing[:5])}")
        try:
            for fi, out in enumerate(self._out):
                self._begin(fi)
                out.flush()
            self._staging.wait()
            for out, size in zip(self._out, self._sizes):
                out.settle(size)
        except BaseException:
            self.abort()
            raise
        for out in self._out:
            digest = out.digest()
            if digest is not None:
                self.hashes[out.path.name] = digest
                remember_hash(out.path, digest)
        self.abort()   # threads and descriptors
        if len(self.files) > 1:
            index = {"metadata": {"total_size": self.total_size},
                     "weight_map": {name: self.files[w[0]].name for name, w in sorted(self._where.items())}}
            ipath = self.directory / f"{self.basename}.safetensors.index.json"
            try:
                ipath.write_text(json.dumps(index, indent=2) + "\n")
            except OSError as e:
                raise with_file(e, ipath) from e
            return self.files + [ipath]
        return list(self.files)

    def abort(self) -> None:
        self._staging.shutdown()
        for out in self._out:
            out.close()


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
        if arr.dtype.name == dtypes.bfloat16.name:  # numpy files have no bfloat16: JAX's 2-byte void, or float32
            arr = arr.view(np.dtype("V2")) if self.keep_bfloat16 else arr.astype(np.float32)
        if arr.dtype.hasobject:
            raise ClawError(f"tensor '{name}' holds Python objects; .npz outputs hold arrays only")
        try:
            with self._zip.open(name + ".npy", "w", force_zip64=True) as f:
                np.lib.format.write_array(f, arr, allow_pickle=False)
        except OSError as e:
            raise with_file(e, self.path) from e

    def close(self) -> list[Path]:
        try:
            self._zip.close()
        except OSError as e:
            raise with_file(e, self.path) from e
        return [self.path]

    def abort(self) -> None:
        try:
            self._zip.close()
        except (OSError, ValueError):
            pass
