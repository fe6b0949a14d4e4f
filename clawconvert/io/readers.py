"""Lazy tensor stores: plan from headers, read one tensor at a time.

A :class:`TensorStore` knows every tensor's name, shape and dtype from file headers alone
(safetensors JSON header, ``.npy`` member headers, a torch zip's pickled metadata under
``mmap``) and reads a tensor's bytes only when :meth:`TensorStore.read` asks for it, so
resident memory is bounded by the largest tensor in flight, not by the checkpoint.

Which reader handles a path is decided by :data:`READERS` (suffix -> class) and by
:func:`open_tensors` for directories (sharded safetensors index, or a single weights file).
"""
from __future__ import annotations

import contextlib
import contextvars
import json
import math
import mmap
import os
import pickle
import re
import stat
import sys
import struct
import warnings
import zipfile
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

try:    # ISA-L's CRC-32 (same polynomial as zip's): ~10 GB/s, where zlib 1.2 manages ~3
    from isal.isal_zlib import crc32
except ImportError:  # pragma: no cover - isal is a dependency; zlib is the fallback
    from zlib import crc32

from ..deps import need
from ..errors import ClawError
from .dtypes import SAFETENSORS_DTYPES, DType, as_numpy, contiguous, dtype_of, itemsize

MAX_HEADER_BYTES = 100 * 1024 * 1024
MAX_JSON_BYTES = 256 * 1024 * 1024
MAX_DIM = 2**62          # a larger dimension cannot be a real tensor (and overflows int64 numel)
# dtypes the writers can store; a source tensor of another dtype is refused when opened
STORABLE_DTYPES = frozenset(SAFETENSORS_DTYPES.values())
STORABLE_NAMES = frozenset(d.name for d in STORABLE_DTYPES)


# ------------------------------------------------------------------------------------
# small helpers shared by every reader
# ------------------------------------------------------------------------------------
def _first_line(e: BaseException, limit: int = 200) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else e.__class__.__name__)[:limit]


def require_file(path: Path, what: str = "file") -> None:
    """A regular file: not missing, not a directory, not a FIFO or device (which could block)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ClawError(f"{path}: no such file") from None
    except OSError as e:
        raise ClawError(f"{path}: cannot read: {e.strerror or e}") from e
    if stat.S_ISDIR(st.st_mode):
        raise ClawError(f"{path}: is a directory, expected a {what}")
    if not stat.S_ISREG(st.st_mode):
        raise ClawError(f"{path}: not a regular file, expected a {what}")
    if st.st_size == 0:
        raise ClawError(f"{path}: empty file, expected a {what}")


def contained_path(root: Path, relative: Any, origin: Path, what: str = "path") -> Path:
    """``root / relative`` when ``relative`` is a plain relative path that stays inside ``root``.

    The check is lexical (absolute paths, ``..`` escapes, NUL bytes, backslashes are refused),
    so a file that is itself a symlink, as in the Hugging Face cache, still opens.
    """
    if not isinstance(relative, str) or not relative or "\0" in relative:
        raise ClawError(f"{origin}: {what} {relative!r} is not a file name")
    if os.path.isabs(relative) or relative.startswith("\\") or re.match(r"^[A-Za-z]:", relative):
        raise ClawError(f"{origin}: {what} '{relative}' escapes its directory (absolute path)")
    norm = os.path.normpath(relative)
    if norm == ".." or norm.startswith(".." + os.sep) or norm == "." or "\\" in relative:
        raise ClawError(f"{origin}: {what} '{relative}' escapes its directory")
    return Path(root) / norm


def read_json_file(path: Path, what: str = "JSON file", reject_duplicates: bool = False) -> Any:
    """Read a JSON file as data, every failure a one-line :class:`ClawError` naming the file."""
    path = Path(path)
    require_file(path, what)
    try:
        if path.stat().st_size > MAX_JSON_BYTES:
            raise ClawError(f"{path}: {path.stat().st_size} bytes is too large for a {what}")
        raw = path.read_bytes()
    except OSError as e:
        raise ClawError(f"{path}: cannot read: {e.strerror or e}") from e
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ClawError(f"{path}: not a {what}: not UTF-8 text (byte {e.start})") from e
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates if reject_duplicates else None)
    except RecursionError:
        raise ClawError(f"{path}: not a {what}: JSON nested too deeply") from None
    except ValueError as e:
        raise ClawError(f"{path}: not a {what}: invalid JSON ({_first_line(e)})") from e


# ------------------------------------------------------------------------------------
# NaN / Inf checks (--check-finite)
# ------------------------------------------------------------------------------------
_CHECK_FINITE: contextvars.ContextVar[bool] = contextvars.ContextVar("clawconvert_check_finite", default=False)


@contextlib.contextmanager
def finite_checks(enabled: bool = True) -> Iterator[None]:
    """While active, every :meth:`TensorStore.read` refuses a tensor holding NaN or Inf."""
    token = _CHECK_FINITE.set(bool(enabled))
    try:
        yield
    finally:
        _CHECK_FINITE.reset(token)


def finite_checks_active() -> bool:
    return _CHECK_FINITE.get()


def count_nonfinite(t: Any) -> tuple[int, int]:
    """(NaN count, +/-Inf count) of an array; (0, 0) for integer arrays."""
    t = as_numpy(t)
    if not dtype_of(t.dtype).is_floating_point or t.size == 0:
        return 0, 0
    nan = inf = 0
    flat = t.reshape(-1)
    for i in range(0, flat.size, 1 << 22):  # in blocks: a float32 copy of a bf16 block, not of the tensor
        block = flat[i:i + (1 << 22)]
        if block.dtype.kind != "f":
            block = block.astype(np.float32)
        nan += int(np.count_nonzero(np.isnan(block)))
        inf += int(np.count_nonzero(np.isinf(block)))
    return nan, inf


def describe_nonfinite(file: Path, name: str, nan: int, inf: int, numel: int) -> str:
    parts = [f"{n} {w}" for n, w in ((nan, "NaN"), (inf, "Inf")) if n]
    return f"{file}: tensor '{name}' holds {' and '.join(parts)} value{'s' if nan + inf > 1 else ''} (of {numel})"


def scan_nonfinite(store: "TensorStore", names: list[str] | None = None) -> list[str]:
    """Read every (or the named) floating tensor once; one line per tensor holding NaN/Inf."""
    problems = []
    for name in names if names is not None else store.keys():
        info = store.info(name)
        if not info.dtype.is_floating_point:
            continue
        with finite_checks(False):
            t = store.read(name)
        nan, inf = count_nonfinite(t)
        if nan or inf:
            problems.append(describe_nonfinite(info.file, name, nan, inf, t.size))
    return problems


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: DType
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

    def read(self, name: str) -> np.ndarray:
        info = self._infos[name]
        try:
            t = self._read(self._file_names.get(name, name), info)
        except ClawError:
            raise
        except Exception as e:  # corrupt data surfaces here, never as a traceback
            raise ClawError(f"{info.file}: cannot read tensor '{name}': {e}") from e
        if tuple(t.shape) != info.shape:
            raise ClawError(f"{info.file}: tensor '{name}' has shape {tuple(t.shape)}, header says {info.shape}")
        if _CHECK_FINITE.get():
            nan, inf = count_nonfinite(t)
            if nan or inf:
                raise ClawError(describe_nonfinite(info.file, name, nan, inf, t.size)
                                + " (--check-finite)")
        return t

    def _read(self, name: str, info: TensorInfo) -> np.ndarray:  # pragma: no cover
        raise NotImplementedError

    @contextlib.contextmanager
    def checks_deferred(self) -> Iterator[None]:
        """Inside, integrity checks of what is read (a member's CRC-32) may run on another
        thread and fail later, at the latest when the block ends; a caller that only writes
        into a temporary output uses this to overlap them with the rest of its work."""
        yield

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
    """Parse and validate a safetensors header: returns (data_start, entries, metadata).

    Checked before any tensor is read: the header length against the file, UTF-8 JSON with
    no duplicate names, every entry's dtype, shape and offsets, each dtype x shape against
    its data span, spans inside the file, not overlapping, and covering the data section
    exactly (as the safetensors library requires).
    """
    path = Path(path)
    require_file(path, "safetensors file")
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw_len = f.read(8)
            if len(raw_len) < 8:
                raise ClawError(f"{path}: not a safetensors file (only {size} bytes)")
            n = int.from_bytes(raw_len, "little")
            if n <= 1 or n > MAX_HEADER_BYTES or 8 + n > size:
                raise ClawError(f"{path}: not a safetensors file, or truncated (header length {n}, file {size} bytes)")
            raw = f.read(n)
    except OSError as e:
        raise ClawError(f"{path}: cannot read: {e.strerror or e}") from e
    if len(raw) != n:
        raise ClawError(f"{path}: truncated while reading its header")
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except RecursionError:
        raise ClawError(f"{path}: corrupt safetensors header (JSON nested too deeply)") from None
    except (UnicodeDecodeError, ValueError) as e:
        raise ClawError(f"{path}: corrupt safetensors header ({_first_line(e)})") from e
    if not isinstance(header, dict):
        raise ClawError(f"{path}: corrupt safetensors header (not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise ClawError(f"{path}: corrupt safetensors header (__metadata__ is not an object)")
    data_start = 8 + n
    data_len = size - data_start
    entries = {}
    spans = []
    for name, e in header.items():
        if not isinstance(e, dict) or not {"dtype", "shape", "data_offsets"} <= set(e):
            raise ClawError(f"{path}: corrupt safetensors header entry for '{name}'")
        dtype = SAFETENSORS_DTYPES.get(e["dtype"]) if isinstance(e["dtype"], str) else None
        if dtype is None:
            raise ClawError(f"{path}: tensor '{name}' has unsupported dtype {e['dtype']!r}"[:300])
        shape, offs = e["shape"], e["data_offsets"]
        if (not isinstance(shape, list) or not all(_is_count(s) and s < MAX_DIM for s in shape)
                or not isinstance(offs, list) or len(offs) != 2 or not all(_is_count(o) for o in offs)):
            raise ClawError(f"{path}: corrupt safetensors header entry for '{name}' (shape or data_offsets)")
        begin, end = offs
        expected = math.prod(shape) * itemsize(dtype)
        if end < begin or end - begin != expected:
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
    covered = max((e for _, e, _ in spans), default=0)
    if covered != data_len:
        raise ClawError(f"{path}: corrupt: {data_len - covered} bytes after the last tensor's data "
                        f"(the header does not describe the whole file)")
    return data_start, entries, metadata


def _is_count(v: Any) -> bool:
    """A non-negative JSON integer (``true`` is not 1 here)."""
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


class SpanStore(TensorStore):
    """Tensors stored as plain little-endian byte runs: ``_where[name] = (file, offset, nbytes)``
    (safetensors files, torch.save zips), read with plain file reads and copied as bytes."""

    def __init__(self, path: Path):
        super().__init__(path)
        self._where: dict[str, tuple[Path, int, int]] = {}

    def _read(self, name: str, info: TensorInfo) -> np.ndarray:
        file, offset, nbytes = self._where[name]
        with open(file, "rb", buffering=0) as f:
            buf = read_span(f.fileno(), offset, nbytes)
        if buf is None:
            raise ClawError(f"{file}: truncated while reading '{name}'")
        return buf.view(info.dtype.np).reshape(info.shape)

    def byte_range(self, name: str) -> tuple[Path, int, int] | None:
        """(file, offset, length) of a tensor's little-endian bytes: copied without decoding."""
        return self._where[self._file_names.get(name, name)]


class SafetensorsStore(SpanStore):
    """One ``.safetensors`` file, or several (sharded), read with plain file reads."""

    def __init__(self, path: Path, files: list[Path] | None = None):
        super().__init__(path)
        for file in files if files is not None else [Path(path)]:
            data_start, entries, metadata = read_safetensors_header(file)
            self.metadata.update({str(k): str(v) for k, v in metadata.items()})
            for name, (shape, dtype, begin, end) in entries.items():
                if name in self._infos:
                    raise ClawError(f"{path}: tensor '{name}' appears in both {self._infos[name].file.name} and {file.name}")
                self._infos[name] = TensorInfo(name, shape, dtype, file)
                self._where[name] = (file, data_start + begin, end - begin)


def read_weight_map(index_path: Path) -> dict[str, str]:
    """An HF ``*.index.json``: ``weight_map`` tensor name -> shard file, every name listed once."""
    index = read_json_file(index_path, "weights index (JSON)", reject_duplicates=True)
    if not isinstance(index, dict) or not isinstance(index.get("weight_map"), dict):
        raise ClawError(f"{index_path}: not a valid weights index (needs a 'weight_map' object)")
    weight_map = index["weight_map"]
    if not weight_map:
        raise ClawError(f"{index_path}: not a valid weights index (its weight_map is empty)")
    for name, shard in weight_map.items():
        if not isinstance(shard, str):
            raise ClawError(f"{index_path}: weight_map gives '{name}' the shard {shard!r}, not a file name"[:300])
    return weight_map


def _index_shards(index_path: Path, weight_map: dict[str, str]) -> list[Path]:
    """The shard files an index names, each inside the index's directory and present."""
    root = index_path.parent
    files = []
    for shard in dict.fromkeys(weight_map.values()):
        p = contained_path(root, shard, index_path, "shard path")
        _check_link_target(root, p, index_path, shard)
        if not p.exists():
            raise ClawError(f"{index_path}: shard '{shard}' is missing")
        require_file(p, "weights shard")
        files.append(p)
    return files


def _check_link_target(root: Path, p: Path, origin: Path, shown: str) -> None:
    """A symlinked shard must point inside its directory, or into the HF cache's blob store."""
    try:
        target = p.resolve()
        real_root = root.resolve()
    except (OSError, RuntimeError) as e:
        raise ClawError(f"{origin}: shard '{shown}' cannot be resolved ({_first_line(e)})") from e
    if target == real_root or real_root in target.parents:
        return
    for anc in [real_root, *real_root.parents]:
        if anc.name == "snapshots":
            if (anc.parent / "blobs") in target.parents:
                return
            break
    raise ClawError(f"{origin}: shard '{shown}' is a link that escapes its directory (to {target})")


def _check_index_placement(index_path: Path, weight_map: dict, store: TensorStore) -> None:
    """Every tensor an index lists is in the shard it names."""
    for name, shard in weight_map.items():
        info = store._infos.get(name)
        if info is None:
            raise ClawError(f"{index_path}: index lists '{name}' in {shard} but that shard does not hold it")
        if info.file.name != Path(shard).name:
            raise ClawError(f"{index_path}: index puts '{name}' in {shard} but it is stored in {info.file.name}")


def open_sharded_index(index_path: Path) -> SafetensorsStore:
    """``model.safetensors.index.json``: open only the shards it names, nothing outside its directory."""
    index_path = Path(index_path)
    weight_map = read_weight_map(index_path)
    files = _index_shards(index_path, weight_map)
    store = SafetensorsStore(index_path, files)
    _check_index_placement(index_path, weight_map, store)
    unlisted = [n for n in store.keys() if n not in weight_map]
    if unlisted:
        raise ClawError(f"{index_path}: shard {store.info(unlisted[0]).file.name} holds '{unlisted[0]}', which the "
                        f"index does not list ({len(unlisted)} such tensor{'s' if len(unlisted) > 1 else ''})")
    return store


# ------------------------------------------------------------------------------------
# torch pickles (.pt / .bin / .pth)
# ------------------------------------------------------------------------------------
# containers a training script wraps its weights in; checked in this order
STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "module", "ema_state_dict")


def _unwrap_checkpoint(obj, path: Path) -> dict[str, Any]:
    import torch

    if isinstance(obj, dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        for key in STATE_DICT_KEYS:
            if isinstance(obj.get(key), dict):
                return _unwrap_checkpoint(obj[key], path)
    if not isinstance(obj, dict):
        raise ClawError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    tensors: dict[str, Any] = {}
    for k, v in obj.items():
        if not isinstance(v, torch.Tensor):
            continue
        name = str(k)
        if name in tensors:
            raise ClawError(f"{path}: two entries are both named '{name}'")
        if v.layout != torch.strided or v.device.type not in ("cpu",) or type(v) is not torch.Tensor \
                and not isinstance(v, torch.nn.Parameter):
            raise ClawError(f"{path}: tensor '{name}' is not a plain dense CPU tensor "
                            f"({v.layout}, {v.device.type}, {type(v).__name__}); cannot convert it")
        if str(v.dtype).replace('torch.', '') not in STORABLE_NAMES:
            raise ClawError(f"{path}: tensor '{name}' has dtype {str(v.dtype).replace('torch.', '')}, "
                            f"which no output format stores")
        tensors[name] = v
    if not tensors:
        raise ClawError(f"{path}: holds no tensors (keys: {', '.join(list(map(str, obj))[:8])})"[:300])
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
            self._infos[name] = TensorInfo(name, tuple(t.shape), dtype_of(t.dtype), Path(path))
        self.rename(strip_common_prefix(list(self._infos)))

    def _read(self, name: str, info: TensorInfo) -> np.ndarray:
        return as_numpy(self._tensors[name]).copy()  # a copy: never a view into the (mmapped) file


REFUSED_PICKLE = ("refused: this pickle wants to run code or build objects that safe loading (weights_only) "
                  "does not allow ({detail}); re-run with --unsafe-pickle only if you trust its author")


def load_torch_file(path: Path, unsafe_pickle: bool = False):
    """torch.load with weights_only unless the user opted out; mmap when the file allows it.

    With ``weights_only`` (the default) torch's restricted unpickler refuses any global it
    does not know to be data, so a checkpoint cannot run code.  ``unsafe_pickle`` lifts that,
    with a warning on stderr naming the file.
    """
    path = Path(path)
    require_file(path, "torch checkpoint")
    if unsafe_pickle:
        print(f"clawconvert: warning: {path}: --unsafe-pickle: loading with full pickle, which runs any code "
              f"the file carries; use only on files from authors you trust", file=sys.stderr)
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise ClawError(f"{path}: cannot read: {e.strerror or e}") from e
    if not magic.startswith(b"PK") and magic[:1] != b"\x80":  # torch.save: a zip, or (legacy) pickle protocol 2
        raise ClawError(f"{path}: not a torch checkpoint (neither a zip archive nor a pickle; it starts with "
                        f"{magic!r})")
    kw = dict(map_location="cpu", weights_only=not unsafe_pickle)
    try:
        with warnings.catch_warnings():  # torch's chatter (pickle protocol, storage deprecations) is not ours
            warnings.simplefilter("ignore")
            return _torch_load(path, kw)
    except ClawError:
        raise
    except pickle.UnpicklingError as e:
        text = str(e)
        if "weights_only" in text or "Unsupported global" in text or "Weights only load failed" in text:
            detail = _refusal_detail(text)
            raise ClawError(f"{path}: " + REFUSED_PICKLE.format(detail=detail)) from e
        raise ClawError(f"{path}: not a readable torch checkpoint ({_first_line(e)})") from e
    except MemoryError as e:
        raise ClawError(f"{path}: not a readable torch checkpoint (it asks for more memory than there is)") from e
    except RecursionError as e:
        raise ClawError(f"{path}: not a readable torch checkpoint (nested too deeply)") from e
    except Exception as e:  # torch raises many kinds on corrupt zips and pickles; none is a bug of ours
        raise ClawError(f"{path}: not a readable torch checkpoint ({e.__class__.__name__}: {_first_line(e)})") from e


def _torch_load(path: Path, kw: dict):
    need("torch", to=f"reading the torch pickle {path.name}")
    import torch
    try:
        return torch.load(path, mmap=True, **kw)
    except RuntimeError as e:  # legacy (non-zip) format cannot be memory-mapped
        if "mmap" not in str(e) and "zip" not in str(e):
            raise
        if zipfile.is_zipfile(path):
            raise
        return torch.load(path, **kw)


def _refusal_detail(text: str) -> str:
    """The global torch's restricted unpickler refused, e.g. ``posix.system``."""
    m = re.search(r"Unsupported global:\s*(?:GLOBAL\s+)?([A-Za-z_][\w.]*)", text) or \
        re.search(r"\bGLOBAL\s+([A-Za-z_][\w.]*)", text)
    if m:
        return f"it imports {m.group(1)}"
    for line in text.splitlines():
        if "Unsupported" in line or "not allowed" in line or "unsupported" in line:
            return line.strip()[:160]
    return "unsupported pickle content"


# ------------------------------------------------------------------------------------
# .npz (numpy / JAX big_vision)
# ------------------------------------------------------------------------------------
def read_npy_header(f) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran_order, dtype) of the ``.npy`` stream ``f``, leaving it at the data.

    numpy 2.x keeps only the versioned readers public (``_read_array_header`` moved)."""
    with warnings.catch_warnings():  # e.g. "created on Python 2": numpy's chatter, not a problem
        warnings.simplefilter("ignore")
        return _read_npy_header(f)


def _read_npy_header(f) -> tuple[tuple[int, ...], bool, np.dtype]:
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(f)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(f)
    from numpy.lib import _format_impl  # version 3.0 (utf-8 field names) has no public reader
    return _format_impl._read_array_header(f, version)


MAP_FROM = 1 << 20   # spans this large are mapped, smaller ones read


def read_span(fd: int, offset: int, nbytes: int) -> np.ndarray | None:
    """``nbytes`` at ``offset`` of an open file as read-only uint8, or None when the file is
    shorter.  Large spans are mapped from the page cache (no copy, no fresh memory to fault
    in; the mapping goes when the array does), small ones read."""
    if nbytes >= MAP_FROM and hasattr(mmap, "MAP_POPULATE"):
        if offset + nbytes > os.fstat(fd).st_size:
            return None
        start = offset - offset % mmap.ALLOCATIONGRANULARITY
        m = mmap.mmap(fd, offset + nbytes - start, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE, prot=mmap.PROT_READ,
                      offset=start)
        return np.frombuffer(m, dtype=np.uint8, count=nbytes, offset=offset - start)
    buf = np.empty(nbytes, dtype=np.uint8)   # not zero-filled: every byte is read into
    got, view = 0, memoryview(buf)
    while got < nbytes:
        n = os.preadv(fd, [view[got:]], offset + got)
        if not n:
            return None
        got += n
    buf.flags.writeable = False
    return buf


class MappedRows:
    """Rows of one stored tensor, mapped read-only from the file and let go as they are used.

    ``rows(i, j)`` is a view of rows ``[i, j)`` (the page cache's bytes, not a copy);
    ``done(i, j)`` drops the pages wholly inside those rows from this process (``MADV_DONTNEED``:
    the page cache keeps them), so reading a large tensor a band at a time never makes it
    resident here all at once.  ``close()`` unmaps."""

    def __init__(self, file: Path, offset: int, shape: tuple[int, ...], dtype: np.dtype):
        self.shape, self.dtype = tuple(shape), np.dtype(dtype)
        self.row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        nbytes = self.row_bytes * self.shape[0]
        with open(file, "rb", buffering=0) as f:
            if offset + nbytes > os.fstat(f.fileno()).st_size:
                raise ClawError(f"{file}: truncated: a tensor's rows end past the end of the file")
            self._start = offset - offset % mmap.ALLOCATIONGRANULARITY
            self._map = mmap.mmap(f.fileno(), offset + nbytes - self._start, flags=mmap.MAP_SHARED,
                                  prot=mmap.PROT_READ, offset=self._start)
        self._base = offset - self._start
        self._array = np.frombuffer(self._map, dtype=np.uint8, count=nbytes, offset=self._base)

    def rows(self, i: int, j: int) -> np.ndarray:
        view = self._array[i * self.row_bytes:j * self.row_bytes]
        return view.view(self.dtype).reshape((j - i, *self.shape[1:]))

    def done(self, i: int, j: int) -> None:
        page = mmap.PAGESIZE
        lo = -(-(self._base + i * self.row_bytes) // page) * page
        hi = (self._base + j * self.row_bytes) // page * page
        if hi > lo and hasattr(mmap, "MADV_DONTNEED"):
            self._map.madvise(mmap.MADV_DONTNEED, lo, hi - lo)

    def close(self) -> None:
        self._array = None
        try:
            self._map.close()
        except BufferError:      # a caller still holds a view: the mapping goes with it
            pass


class NpzStore(TensorStore):
    """A numpy ``.npz`` archive; each ``.npy`` member's header is read up front, data on demand.

    Checked when opened: the zip directory, no member named twice, every ``.npy`` header,
    no object (pickled) arrays, and each member's size against its header's dtype x shape,
    so a truncated or contradictory member is refused before anything is read.
    """

    MAX_CHECKS_WAITING = 2   # members read but not yet CRC-checked (checks_deferred): a few tensors

    def __init__(self, path: Path):
        super().__init__(path)
        require_file(Path(path), ".npz archive")
        try:
            self._zip = zipfile.ZipFile(path)
            members = self._zip.infolist()
        except Exception as e:  # BadZipFile, OSError, ValueError, struct/EOF errors on mangled archives
            raise ClawError(f"{path}: not a valid .npz archive ({_first_line(e)})") from e
        try:
            self._scan(members)
        except BaseException:
            self._zip.close()
            raise

    def _scan(self, members: list[zipfile.ZipInfo]) -> None:
        path = self.path
        self._checker = None              # the CRC-32 thread inside checks_deferred()
        self._checks: deque = deque()     # (member, future crc) not yet compared
        self._starts: dict[str, int] = {}
        self._data_starts: dict[str, int] = {}
        self._members: dict[str, tuple[zipfile.ZipInfo, tuple, np.dtype, bool]] = {}
        seen: set[str] = set()
        for m in members:
            if m.filename in seen:
                raise ClawError(f"{path}: member '{m.filename}' is stored twice")
            seen.add(m.filename)
            if not m.filename.endswith(".npy"):
                continue
            name = m.filename[:-4]
            if m.flag_bits & 0x1:
                raise ClawError(f"{path}: member '{m.filename}' is encrypted")
            try:
                with self._zip.open(m) as f:
                    shape, fortran, dtype = read_npy_header(f)
                    header_len = f.tell()
            except Exception as e:
                raise ClawError(f"{path}: member '{m.filename}' is corrupt ({e.__class__.__name__}: {_first_line(e)})") from e
            if dtype.hasobject:
                raise ClawError(f"{path}: member '{name}' holds Python objects; refusing to unpickle it")
            if dtype.kind in "US":  # strings (e.g. a stored pipeline description) are not weights
                continue
            if any(d >= MAX_DIM for d in shape):
                raise ClawError(f"{path}: member '{m.filename}' is corrupt (shape {shape})")
            nbytes = math.prod(shape) * dtype.itemsize
            if m.file_size != header_len + nbytes:
                what = "truncated" if m.file_size < header_len + nbytes else "longer than its header says"
                raise ClawError(f"{path}: member '{m.filename}' is {what}: {dtype} {tuple(shape)} needs "
                                f"{nbytes} bytes of data, the member holds {m.file_size - header_len}")
            if m.compress_type == zipfile.ZIP_STORED:   # known before any thread reads: no lookups later
                self._data_starts[m.filename] = self._member_start(m) + header_len
            try:
                tdtype = dtype_of(dtype)
            except Exception as e:
                raise ClawError(f"{path}: member '{name}': {_first_line(e)}") from e
            if tdtype not in STORABLE_DTYPES:
                raise ClawError(f"{path}: member '{name}' has dtype {dtype}, which no output format stores")
            self._members[name] = (m, tuple(shape), dtype, fortran)
            self._infos[name] = TensorInfo(name, tuple(shape), tdtype, Path(path))

    def read_numpy(self, name: str) -> np.ndarray:
        m, shape, dtype, fortran = self._members[self._file_names.get(name, name)]
        nbytes = math.prod(shape) * dtype.itemsize
        if m.compress_type == zipfile.ZIP_STORED and not fortran:
            arr = self._read_stored(m, nbytes)
        else:
            with self._zip.open(m) as f:
                read_npy_header(f)
                data = f.read(nbytes)
            if len(data) != nbytes:
                raise ClawError(f"{self.path}: member '{name}' is truncated")
            arr = np.frombuffer(bytearray(data), dtype=np.uint8)
        arr = arr.view(dtype)
        if fortran:
            return arr.reshape(shape[::-1]).transpose()
        return arr.reshape(shape)

    def _read_stored(self, m: zipfile.ZipInfo, nbytes: int) -> np.ndarray:
        """An uncompressed member's data with one read into its final buffer, CRC-checked
        (the member's CRC-32 covers its .npy header and data) as zipfile would: here, or
        on the checking thread inside :meth:`checks_deferred`."""
        start = self.data_offset(m)
        fd = self._zip.fp.fileno()
        head = os.pread(fd, start - self._member_start(m), self._member_start(m))
        buf = read_span(fd, start, nbytes)
        if buf is None:
            raise ClawError(f"{self.path}: member '{m.filename}' is truncated")
        if self._checker is None:
            self._check_crc(m, crc32(buf, crc32(head)))
        else:
            while len(self._checks) >= self.MAX_CHECKS_WAITING:
                self._settle_check()
            self._checks.append((m, self._checker.submit(lambda: crc32(buf, crc32(head)))))
        return buf

    def _check_crc(self, m: zipfile.ZipInfo, crc: int) -> None:
        if crc != m.CRC:
            raise ClawError(f"{self.path}: member '{m.filename}' is corrupt (Bad CRC-32)")

    def _settle_check(self) -> None:
        m, fut = self._checks.popleft()
        self._check_crc(m, fut.result())

    @contextlib.contextmanager
    def checks_deferred(self) -> Iterator[None]:
        if self._checker is not None:   # nested: the outer block settles
            yield
            return
        from concurrent.futures import ThreadPoolExecutor
        self._checker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="clawconvert-crc32")
        try:
            yield
            while self._checks:
                self._settle_check()
        finally:
            self._checker.shutdown(wait=True, cancel_futures=True)
            self._checker = None
            self._checks.clear()

    def _member_start(self, m: zipfile.ZipInfo) -> int:
        """Offset of a member's bytes (after its local zip header)."""
        if m.filename not in self._starts:
            local = os.pread(self._zip.fp.fileno(), 30, m.header_offset)
            if len(local) != 30 or local[:4] != b"PK\x03\x04":
                raise ClawError(f"{self.path}: corrupt zip header for '{m.filename}'")
            name_len, extra_len = struct.unpack("<HH", local[26:30])
            self._starts[m.filename] = m.header_offset + 30 + name_len + extra_len
        return self._starts[m.filename]

    def data_offset(self, m: zipfile.ZipInfo) -> int:
        """Absolute offset of a stored (uncompressed) member's array data, found by the scan."""
        return self._data_starts[m.filename]

    def _read(self, name: str, info: TensorInfo) -> np.ndarray:
        arr = self.read_numpy(name)
        if arr.dtype != info.dtype.np:  # 2-byte void (JAX bfloat16) or big-endian
            arr = contiguous(arr)
            arr = arr.view(info.dtype.np) if arr.dtype.kind == "V" else arr.astype(info.dtype.np)
        return contiguous(arr)

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
            candidate = path / name
            if candidate.is_file():
                return open_tensors(candidate, unsafe_pickle, prefer)
            if candidate.exists() or candidate.is_symlink():
                require_file(candidate, "weights file")  # a directory, a dangling link, a FIFO: say so
        raise ClawError(f"{path}: no weights file found (looked for {', '.join(prefer)})")
    if path.name.endswith(".safetensors.index.json"):
        return open_sharded_index(path)
    if path.name.endswith(".bin.index.json"):
        return _open_pickle_index(path, unsafe_pickle)
    reader = READERS.get(path.suffix.lower())
    if reader is None:
        raise ClawError(f"{path}: unknown weights file type '{path.suffix}' (known: {', '.join(READERS)})")
    require_file(path, "weights file")
    return reader(path, unsafe_pickle=unsafe_pickle)


class _MultiStore(TensorStore):
    def __init__(self, path: Path, stores: list[TensorStore]):
        super().__init__(path)
        self._owner: dict[str, TensorStore] = {}
        for s in stores:
            for name, info in s.infos().items():
                if name in self._infos:
                    raise ClawError(f"{path}: tensor '{name}' appears in two shards "
                                    f"({self._infos[name].file.name} and {info.file.name})")
                self._infos[name] = info
                self._owner[name] = s

    def _read(self, name: str, info: TensorInfo) -> np.ndarray:
        return self._owner[name].read(name)


class GatheredStore(TensorStore):
    """Tensors picked from several stores under new names: ``{name: (store, key)}``, in order.

    Surgery that joins models (a language model, a vision tower and a connector into one VLM)
    reads them through one of these, so the engine sees a single source."""

    def __init__(self, path: Path, entries: dict[str, tuple[TensorStore, str]]):
        super().__init__(path)
        self._entries = entries
        for name, (store, key) in entries.items():
            info = store.info(key)
            self._infos[name] = TensorInfo(name, info.shape, info.dtype, info.file)

    def _read(self, name: str, info: TensorInfo) -> np.ndarray:
        store, key = self._entries[name]
        return store.read(key)

    def byte_range(self, name: str) -> tuple[Path, int, int] | None:
        store, key = self._entries[name]
        return store.byte_range(key) if hasattr(store, "byte_range") else None

    def filler(self, name: str, out):
        store, key = self._entries[name]
        return store.filler(key, out) if hasattr(store, "filler") else None

    @contextlib.contextmanager
    def checks_deferred(self) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            for store in {id(s): s for s, _ in self._entries.values()}.values():
                stack.enter_context(store.checks_deferred())
            yield


def _open_pickle_index(index_path: Path, unsafe_pickle: bool) -> TensorStore:
    """``pytorch_model.bin.index.json``: the same checks as a safetensors index."""
    weight_map = read_weight_map(index_path)
    stores = [TorchPickleStore(p, unsafe_pickle=unsafe_pickle) for p in _index_shards(index_path, weight_map)]
    store = _MultiStore(index_path, stores)
    _check_index_placement(index_path, weight_map, store)
    return store
