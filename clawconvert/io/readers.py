"""Lazy tensor stores: plan from headers, read one tensor at a time.

A :class:`TensorStore` knows every tensor's name, shape and dtype from file headers alone
(safetensors JSON header, ``.npy`` member headers, a torch zip's pickled metadata under
``mmap``) and reads a tensor's bytes only when :meth:`TensorStore.read` asks for it, so
resident memory is bounded by the largest tensor in flight, not by the checkpoint.

Which reader handles a path is decided by :data:`READERS` (suffix -> class) and by
:func:`open_tensors` for directories (sharded safetensors index, or a single weights file).
"""
from __future__ import annotations

import json
import math
import os
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from ..errors import ClawError
from .dtypes import SAFETENSORS_DTYPES, itemsize, numpy_to_torch_dtype

MAX_HEADER_BYTES = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: Path

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * itemsize(self.dtype)


class TensorStore:
    """Name -> lazily read tensor.  Subclasses fill ``self._infos`` and implement ``_read``."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._infos: dict[str, TensorInfo] = {}
        self.metadata: dict[str, str] = {}
        # keys renamed on the way in (e.g. DDP ``module.`` prefix): store name -> file name
        self._file_names: dict[str, str] = {}

    # -- mapping protocol -------------------------------------------------------------
    def keys(self) -> list[str]:
        return list(self._infos)

    def __contains__(self, name: str) -> bool:
        return name in self._infos

    def __len__(self) -> int:
        return len(self._infos)

    def __iter__(self) -> Iterator[str]:
        return iter(self._infos)

    def info(self, name: str) -> TensorInfo:
        return self._infos[name]

    def infos(self) -> dict[str, TensorInfo]:
        return dict(self._infos)

    def read(self, name: str) -> torch.Tensor:
        info = self._infos[name]
        try:
            t = self._read(self._file_names.get(name, name), info)
        except ClawError:
            raise
        except Exception as e:  # corrupt data surfaces here, never as a traceback
            raise ClawError(f"{info.file}: cannot read tensor '{name}': {e}") from e
        if tuple(t.shape) != info.shape:
            raise ClawError(f"{info.file}: tensor '{name}' has shape {tuple(t.shape)}, header says {info.shape}")
        return t

    def _read(self, name: str, info: TensorInfo) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def rename(self, mapping: Callable[[str], str | None]) -> None:
        """Rename (or, returning None, hide) stored keys, e.g. to strip ``module.``."""
        infos, files = {}, {}
        for name, info in self._infos.items():
            new = mapping(name)
            if new is None:
                continue
            if new in infos:
                raise ClawError(f"{self.path}: tensors '{files[new]}' and '{name}' both map to '{new}'")
            infos[new] = TensorInfo(new, info.shape, info.dtype, info.file)
            files[new] = self._file_names.get(name, name)
        self._infos, self._file_names = infos, files

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ------------------------------------------------------------------------------------
# safetensors
# ------------------------------------------------------------------------------------
def _no_duplicates(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key '{k}' in header")
        out[k] = v
    return out


def read_safetensors_header(path: Path) -> tuple[int, dict, dict]:
    """Parse and validate a safetensors header: returns (data_start, entries, metadata)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw_len = f.read(8)
            if len(raw_len) < 8:
                raise ClawError(f"{path}: not a safetensors file (only {size} bytes)")
            n = int.from_bytes(raw_len, "little")
            if n <= 0 or n > MAX_HEADER_BYTES or 8 + n > size:
                raise ClawError(f"{path}: not a safetensors file or truncated (header length {n}, file {size} bytes)")
            raw = f.read(n)
    except OSError as e:
        raise ClawError(f"{path}: cannot read: {e.strerror or e}") from e
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError) as e:
        raise ClawError(f"{path}: corrupt safetensors header ({e})") from e
    if not isinstance(header, dict):
        raise ClawError(f"{path}: corrupt safetensors header (not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + n
    data_len = size - data_start
    entries = {}
    spans = []
    for name, e in header.items():
        if not isinstance(e, dict) or not {"dtype", "shape", "data_offsets"} <= set(e):
            raise ClawError(f"{path}: corrupt safetensors header entry for '{name}'")
        dtype = SAFETENSORS_DTYPES.get(e["dtype"])
        if dtype is None:
            raise ClawError(f"{path}: tensor '{name}' has unsupported dtype {e['dtype']!r}")
        shape, offs = e["shape"], e["data_offsets"]
        if (not isinstance(shape, list) or not all(isinstance(s, int) and s >= 0 for s in shape)
                or not isinstance(offs, list) or len(offs) != 2
                or not all(isinstance(o, int) and o >= 0 for o in offs)):
            raise ClawError(f"{path}: corrupt safetensors header entry for '{name}'")
        begin, end = offs
        expected = math.prod(shape) * itemsize(dtype)
        if end - begin != expected:
            raise ClawError(f"{path}: tensor '{name}' is {e['dtype']} {tuple(shape)} = {expected} bytes "
                            f"but its data span is {end - begin} bytes")
        if end > data_len:
            raise ClawError(f"{path}: truncated: tensor '{name}' ends at byte {end} of a {data_len}-byte data section")
        entries[name] = (tuple(shape), dtype, begin, end)
        spans.append((begin, end, name))
    spans.sort()
    for (b0, e0, n0), (b1, e1, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise ClawError(f"{path}: corrupt: tensors '{n0}' and '{n1}' overlap")
    return data_start, entries, metadata if isinstance(metadata, dict) else {}


class SafetensorsStore(TensorStore):
    """One ``.safetensors`` file, or several (sharded), read with plain file reads."""

    def __init__(self, path: Path, files: list[Path] | None = None):
        super().__init__(path)
        self._where: dict[str, tuple[Path, int, int]] = {}
        for file in files or [Path(path)]:
            data_start, entries, metadata = read_safetensors_header(file)
            self.metadata.update({str(k): str(v) for k, v in metadata.items()})
            for name, (shape, dtype, begin, end) in entries.items():
                if name in self._infos:
                    raise ClawError(f"{path}: tensor '{name}' appears in both {self._infos[name].file.name} and {file.name}")
                self._infos[name] = TensorInfo(name, shape, dtype, file)
                self._where[name] = (file, data_start + begin, end - begin)

    def _read(self, name: str, info: TensorInfo) -> torch.Tensor:
        file, offset, nbytes = self._where[name]
        buf = bytearray(nbytes)
        with open(file, "rb") as f:
            f.seek(offset)
            got = f.readinto(buf)
        if got != nbytes:
            raise ClawError(f"{file}: truncated while reading '{name}'")
        if nbytes == 0:
            return torch.empty(info.shape, dtype=info.dtype)
        return torch.frombuffer(buf, dtype=info.dtype).reshape(info.shape)


def open_sharded_index(index_path: Path) -> SafetensorsStore:
    """``model.safetensors.index.json``: open only the shards it names, nothing outside its directory."""
    try:
        index = json.loads(index_path.read_text())
        weight_map = index["weight_map"]
        assert isinstance(weight_map, dict)
    except Exception as e:
        raise ClawError(f"{index_path}: not a valid safetensors index ({e.__class__.__name__})") from e
    root = index_path.parent.resolve()
    files = []
    for shard in dict.fromkeys(weight_map.values()):
        p = (root / str(shard)).resolve()
        if root not in p.parents:
            raise ClawError(f"{index_path}: shard path '{shard}' escapes its directory")
        if not p.is_file():
            raise ClawError(f"{index_path}: shard '{shard}' is missing")
        files.append(p)
    store = SafetensorsStore(index_path, files)
    for name, shard in weight_map.items():
        info = store._infos.get(name)
        if info is None:
            raise ClawError(f"{index_path}: index lists '{name}' in {shard} but that shard does not hold it")
        if info.file.name != Path(shard).name:
            raise ClawError(f"{index_path}: index puts '{name}' in {shard} but it is stored in {info.file.name}")
    return store


# ------------------------------------------------------------------------------------
# torch pickles (.pt / .bin / .pth)
# ------------------------------------------------------------------------------------
# containers a training script wraps its weights in; checked in this order
STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "module", "ema_state_dict")


def _unwrap_checkpoint(obj, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        for key in STATE_DICT_KEYS:
            if isinstance(obj.get(key), dict):
                return _unwrap_checkpoint(obj[key], path)
    if not isinstance(obj, dict):
        raise ClawError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise ClawError(f"{path}: holds no tensors (keys: {', '.join(list(map(str, obj))[:8])})")
    return tensors


def strip_common_prefix(names: list[str], prefixes=("module.", "_orig_mod.")) -> Callable[[str], str]:
    """DDP ``module.`` / torch.compile ``_orig_mod.`` prefixes carried by every key."""
    strip = ""
    changed = True
    while changed and names:
        changed = False
        for p in prefixes:
            if all(n.startswith(strip + p) for n in names):
                strip += p
                changed = True
    return lambda n: n[len(strip):]


class TorchPickleStore(TensorStore):
    """A torch checkpoint, loaded with ``weights_only=True`` and ``mmap=True`` (zip format)."""

    def __init__(self, path: Path, unsafe_pickle: bool = False):
        super().__init__(path)
        self._tensors = _unwrap_checkpoint(load_torch_file(Path(path), unsafe_pickle), Path(path))
        for name, t in self._tensors.items():
            self._infos[name] = TensorInfo(name, tuple(t.shape), t.dtype, Path(path))
        self.rename(strip_common_prefix(list(self._infos)))

    def _read(self, name: str, info: TensorInfo) -> torch.Tensor:
        return self._tensors[name].clone()


def load_torch_file(path: Path, unsafe_pickle: bool = False):
    """torch.load with weights_only unless the user opted out; mmap when the file allows it."""
    if path.is_dir() or not path.exists():
        raise ClawError(f"{path}: not a file")
    kw = dict(map_location="cpu", weights_only=not unsafe_pickle)
    try:
        try:
            return torch.load(path, mmap=True, **kw)
        except RuntimeError as e:  # legacy (non-zip) format cannot be memory-mapped
            if "mmap" not in str(e) and "zip" not in str(e):
                raise
            return torch.load(path, **kw)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else "unpickling error"
        if "weights_only" in str(e) or "Unsupported global" in str(e) or "Weights only load failed" in str(e):
            raise ClawError(f"{path}: refused: this pickle wants to run code or build objects that safe loading "
                            f"does not allow; re-run with --unsafe-pickle only if you trust its author") from e
        raise ClawError(f"{path}: not a readable torch checkpoint ({first})") from e
    except (RuntimeError, EOFError, ValueError, zipfile.BadZipFile, OSError, KeyError, AttributeError, TypeError) as e:
        first = (str(e).strip().splitlines() or [e.__class__.__name__])[0][:200]
        raise ClawError(f"{path}: not a readable torch checkpoint ({first})") from e


# ------------------------------------------------------------------------------------
# .npz (numpy / JAX big_vision)
# ------------------------------------------------------------------------------------
def read_npy_header(f) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran_order, dtype) of the ``.npy`` stream ``f``, leaving it at the data.

    numpy 2.x keeps only the versioned readers public (``_read_array_header`` moved)."""
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(f)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(f)
    from numpy.lib import _format_impl  # version 3.0 (utf-8 field names) has no public reader
    return _format_impl._read_array_header(f, version)


class NpzStore(TensorStore):
    """A numpy ``.npz`` archive; each ``.npy`` member's header is read up front, data on demand."""

    def __init__(self, path: Path):
        super().__init__(path)
        try:
            self._zip = zipfile.ZipFile(path)
            members = self._zip.infolist()
        except (zipfile.BadZipFile, OSError, ValueError) as e:
            raise ClawError(f"{path}: not a valid .npz archive ({e})") from e
        self._members: dict[str, tuple[zipfile.ZipInfo, tuple, np.dtype, bool]] = {}
        for m in members:
            if not m.filename.endswith(".npy"):
                continue
            name = m.filename[:-4]
            try:
                with self._zip.open(m) as f:
                    shape, fortran, dtype = read_npy_header(f)
            except Exception as e:
                raise ClawError(f"{path}: member '{m.filename}' is corrupt ({e.__class__.__name__}: {e})") from e
            if dtype.hasobject:
                raise ClawError(f"{path}: member '{name}' holds Python objects; refusing to unpickle it")
            if dtype.kind in "US":  # strings (e.g. a stored pipeline description) are not weights
                continue
            try:
                tdtype = numpy_to_torch_dtype(dtype)
            except TypeError as e:
                raise ClawError(f"{path}: member '{name}': {e}") from e
            self._members[name] = (m, tuple(shape), dtype, fortran)
            self._infos[name] = TensorInfo(name, tuple(shape), tdtype, Path(path))

    def read_numpy(self, name: str) -> np.ndarray:
        m, shape, dtype, fortran = self._members[self._file_names.get(name, name)]
        with self._zip.open(m) as f:
            read_npy_header(f)
            nbytes = math.prod(shape) * dtype.itemsize
            data = f.read(nbytes)
        if len(data) != nbytes:
            raise ClawError(f"{self.path}: member '{name}' is truncated")
        arr = np.frombuffer(bytearray(data), dtype=dtype)
        if fortran:
            return arr.reshape(shape[::-1]).transpose()
        return arr.reshape(shape)

    def _read(self, name: str, info: TensorInfo) -> torch.Tensor:
        arr = self.read_numpy(name)
        if info.dtype == torch.bfloat16:
            return torch.from_numpy(np.ascontiguousarray(arr).view(np.uint16)).view(torch.bfloat16)
        return torch.from_numpy(np.ascontiguousarray(arr))

    def close(self) -> None:
        self._zip.close()


# ------------------------------------------------------------------------------------
# dispatch
# ------------------------------------------------------------------------------------
READERS: dict[str, Callable[..., TensorStore]] = {
    ".safetensors": lambda p, **kw: SafetensorsStore(p),
    ".pt": lambda p, **kw: TorchPickleStore(p, **kw),
    ".pth": lambda p, **kw: TorchPickleStore(p, **kw),
    ".bin": lambda p, **kw: TorchPickleStore(p, **kw),
    ".ckpt": lambda p, **kw: TorchPickleStore(p, **kw),
    ".npz": lambda p, **kw: NpzStore(p),
}

# weight files a model directory may hold, most preferred first
DIRECTORY_WEIGHTS = (
    "model.safetensors.index.json", "model.safetensors",
    "open_clip_model.safetensors", "open_clip_pytorch_model.bin",
    "pytorch_model.bin.index.json", "pytorch_model.bin",
)


def open_tensors(path: str | os.PathLike, unsafe_pickle: bool = False, prefer: tuple[str, ...] = DIRECTORY_WEIGHTS) -> TensorStore:
    """Open a weights file, a sharded index, or the weights inside a model directory."""
    path = Path(path)
    if not path.exists():
        raise ClawError(f"{path}: no such file or directory")
    if path.is_dir():
        for name in prefer:
            if (path / name).is_file():
                return open_tensors(path / name, unsafe_pickle, prefer)
        raise ClawError(f"{path}: no weights file found (looked for {', '.join(prefer)})")
    if path.name.endswith(".safetensors.index.json"):
        return open_sharded_index(path)
    if path.name.endswith(".bin.index.json"):
        return _open_pickle_index(path, unsafe_pickle)
    reader = READERS.get(path.suffix.lower())
    if reader is None:
        raise ClawError(f"{path}: unknown weights file type '{path.suffix}' (known: {', '.join(READERS)})")
    if path.stat().st_size == 0:
        raise ClawError(f"{path}: empty file")
    return reader(path, unsafe_pickle=unsafe_pickle)


class _MultiStore(TensorStore):
    def __init__(self, path: Path, stores: list[TensorStore]):
        super().__init__(path)
        self._owner: dict[str, TensorStore] = {}
        for s in stores:
            for name, info in s.infos().items():
                if name in self._infos:
                    raise ClawError(f"{path}: tensor '{name}' appears in two shards")
                self._infos[name] = info
                self._owner[name] = s

    def _read(self, name: str, info: TensorInfo) -> torch.Tensor:
        return self._owner[name].read(name)


def _open_pickle_index(index_path: Path, unsafe_pickle: bool) -> TensorStore:
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except Exception as e:
        raise ClawError(f"{index_path}: not a valid weights index") from e
    root = index_path.parent.resolve()
    stores = []
    for shard in dict.fromkeys(weight_map.values()):
        p = (root / str(shard)).resolve()
        if root not in p.parents:
            raise ClawError(f"{index_path}: shard path '{shard}' escapes its directory")
        if not p.is_file():
            raise ClawError(f"{index_path}: shard '{shard}' is missing")
        stores.append(TorchPickleStore(p, unsafe_pickle=unsafe_pickle))
    return _MultiStore(index_path, stores)
