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

import numpy as np
import torch

from ..errors import ClawError
from .dtypes import TORCH_TO_SAFETENSORS, itemsize

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


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """A tensor's raw little-endian bytes without copying when it is already contiguous."""
    t = t.detach().contiguous().reshape(-1)
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.view(torch.uint8).numpy())


class SafetensorsWriter:
    """Write planned tensors into one safetensors file or HF-style shards.

    >>> w = SafetensorsWriter(out_dir, [("a", (2, 3), torch.float32)], max_shard_size=5 * 10**9)
    >>> w.write("a", tensor); w.close()
    """

    def __init__(self, directory: Path, plan: Iterable[tuple[str, tuple[int, ...], torch.dtype]],
                 max_shard_size: int = 5 * 10**9, basename: str = "model",
                 metadata: dict[str, str] | None = None):
        self.directory = Path(directory)
        plan = list(plan)
        names = [p[0] for p in plan]
        if len(set(names)) != len(names):
            dup = sorted({n for n in names if names.count(n) > 1})
            raise ClawError(f"output would hold duplicate tensor names: {', '.join(dup[:5])}")
        for name, shape, dtype in plan:
            if dtype not in TORCH_TO_SAFETENSORS:
                raise ClawError(f"tensor '{name}' has dtype {str(dtype).replace('torch.', '')}, "
                                f"which safetensors cannot store")
        self.metadata = {"format": "pt", **(metadata or {})}
        shards: list[list[tuple[str, tuple[int, ...], torch.dtype]]] = [[]]
        size = 0
        for entry in plan:
            nbytes = math.prod(entry[1]) * itemsize(entry[2])
            if shards[-1] and size + nbytes > max_shard_size:
                shards.append([])
                size = 0
            shards[-1].append(entry)
            size += nbytes
        n = len(shards)
        self.files: list[Path] = []
        self._where: dict[str, tuple[int, int, int, torch.dtype, tuple[int, ...]]] = {}
        self._handles = []
        self.total_size = 0
        for i, shard in enumerate(shards):
            fname = f"{basename}.safetensors" if n == 1 else f"{basename}-{i + 1:05d}-of-{n:05d}.safetensors"
            header, offset = {}, 0
            for name, shape, dtype in shard:
                nbytes = math.prod(shape) * itemsize(dtype)
                header[name] = {"dtype": TORCH_TO_SAFETENSORS[dtype], "shape": list(shape),
                                "data_offsets": [offset, offset + nbytes]}
                offset += nbytes
            header = {"__metadata__": self.metadata, **header}
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)
            path = self.directory / fname
            data_start = 8 + len(raw)
            try:
                f = open(path, "wb")
            except OSError as e:
                self.abort()
                raise _with_file(e, path) from e
            self._handles.append(f)
            try:
                f.write(len(raw).to_bytes(8, "little"))
                f.write(raw)
                f.truncate(data_start + offset)
            except OSError as e:
                self.abort()
                raise _with_file(e, path) from e
            for name, shape, dtype in shard:
                b, e = header[name]["data_offsets"]
                self._where[name] = (len(self._handles) - 1, data_start + b, e - b, dtype, tuple(shape))
            self.files.append(path)
            self.total_size += offset
        self._pending = set(self._where)
        self.basename = basename

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if name not in self._where:
            raise ClawError(f"internal: tensor '{name}' was not planned for writing")
        fi, offset, nbytes, dtype, shape = self._where[name]
        if tuple(tensor.shape) != shape:
            raise ClawError(f"tensor '{name}' came out with shape {tuple(tensor.shape)}, planned {shape}")
        if tensor.dtype != dtype:
            tensor = tensor.to(dtype)
        data = tensor_bytes(tensor)
        if len(data) != nbytes:
            raise ClawError(f"internal: tensor '{name}' is {len(data)} bytes, planned {nbytes}")
        f = self._handles[fi]
        try:
            f.seek(offset)
            written = f.write(data)
        except OSError as e:
            raise _with_file(e, self.files[fi]) from e
        if written is not None and written != len(data):
            raise OSError(28, os.strerror(28), str(self.files[fi]))
        self._pending.discard(name)

    def close(self) -> list[Path]:
        """Flush everything; refuse to finish while a planned tensor was never written."""
        handles, self._handles = self._handles, []
        for f, path in zip(handles, self.files):
            try:
                f.flush()
                os.fsync(f.fileno())
            except OSError as e:
                for g in handles:
                    g.close()
                raise _with_file(e, path) from e
            f.close()
        if self._pending:
            missing = sorted(self._pending)
            raise ClawError(f"{len(missing)} planned tensors were never written: {', '.join(missing[:5])}")
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

    def write(self, name: str, tensor: torch.Tensor | np.ndarray) -> None:
        if isinstance(tensor, torch.Tensor):
            t = tensor.detach().contiguous()
            if t.dtype == torch.bfloat16:
                arr = t.view(torch.int16).numpy().view(np.dtype("V2")) if self.keep_bfloat16 else t.float().numpy()
            else:
                arr = t.numpy()
        else:
            arr = np.ascontiguousarray(tensor)
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
