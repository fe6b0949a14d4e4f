"""Write a ``torch.save``-format state dict (``.pth``) without torch, one tensor at a time.

torch's zip format: an uncompressed zip holding ``archive/data.pkl`` (a protocol-2 pickle of an
``OrderedDict`` whose tensors are ``torch._utils._rebuild_tensor_v2`` calls on persistent
storage ids ``('storage', torch.FloatStorage, key, 'cpu', numel)``), one ``archive/data/KEY``
member per storage (aligned to 64 bytes, as ``torch.save`` aligns them, so ``torch.load(...,
mmap=True)`` maps them), and the ``byteorder`` / ``version`` records.  ``torch.load`` with
``weights_only=True`` reads it: the pickle names only ``collections.OrderedDict``,
``torch._utils._rebuild_tensor_v2`` and the storage classes, all on its allow list.

Each tensor is streamed into its member as it arrives; the pickle (a few bytes per tensor,
known from the plan) goes last, so memory stays at one tensor whatever the model's size.  The
pickle is emitted opcode by opcode: Python's pickler would import torch to check the globals.
"""
from __future__ import annotations

import struct
import zipfile
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from ..errors import ClawError
from .dtypes import DType, as_numpy, cast, contiguous, dtype_of

ARCHIVE = "archive"
ALIGN = 64
ZIP64_FROM = (1 << 31) - 1          # members this large get zip64 sizes in their local header
PAD_ID = 0x4246                      # extra field id of torch.save's alignment padding ("FB")
# dtype name -> the legacy typed storage class torch.save names for it
STORAGES = {"float32": "FloatStorage", "float16": "HalfStorage", "bfloat16": "BFloat16Storage",
            "float64": "DoubleStorage", "int64": "LongStorage", "int32": "IntStorage", "int16": "ShortStorage",
            "int8": "CharStorage", "uint8": "ByteStorage", "bool": "BoolStorage"}


def _int(v: int) -> bytes:
    if 0 <= v < 1 << 8:
        return b"K" + bytes([v])
    if 0 <= v < 1 << 16:
        return b"M" + v.to_bytes(2, "little")
    if -(1 << 31) <= v < 1 << 31:
        return b"J" + v.to_bytes(4, "little", signed=True)
    raw = v.to_bytes((v.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(raw)]) + raw


def _str(s: str) -> bytes:
    raw = s.encode("utf-8")
    return b"X" + len(raw).to_bytes(4, "little") + raw


def _ints(values: Iterable[int]) -> bytes:
    values = list(values)
    return b")" if not values else b"(" + b"".join(_int(v) for v in values) + b"t"


ORDERED_DICT = b"ccollections\nOrderedDict\n)R"      # GLOBAL, EMPTY_TUPLE, REDUCE: OrderedDict()


def state_dict_pickle(entries: list[tuple[str, DType, tuple[int, ...]]]) -> bytes:
    """``data.pkl`` of an OrderedDict of contiguous tensors, storage i holding tensor i."""
    out = bytearray(b"\x80\x02" + ORDERED_DICT + b"(")
    for key, (name, dtype, shape) in enumerate(entries):
        numel = int(np.prod(shape, dtype=np.int64)) if shape else 1
        stride = [int(np.prod(shape[i + 1:], dtype=np.int64)) for i in range(len(shape))]
        out += _str(name) + b"ctorch._utils\n_rebuild_tensor_v2\n("
        out += b"(" + _str("storage") + f"ctorch\n{STORAGES[dtype.name]}\n".encode() + _str(str(key)) + _str("cpu")
        out += _int(numel) + b"tQ"                       # persistent id tuple, BINPERSID
        out += _int(0) + _ints(shape) + _ints(stride) + b"\x89" + ORDERED_DICT + b"tR"   # offset, size, stride,
    out += b"u."                                          # requires_grad False, hooks; SETITEMS, STOP
    return bytes(out)


class TorchZipWriter:
    """Stream planned tensors into one ``torch.load``-able ``.pth`` (the engine's sink protocol)."""

    def __init__(self, path: Path, plan: list[tuple[str, tuple[int, ...], Any]]):
        self.path = Path(path)
        self._plan = [(name, dtype_of(dtype), tuple(int(d) for d in shape)) for name, shape, dtype in plan]
        for name, dtype, _ in self._plan:
            if dtype.name not in STORAGES:
                raise ClawError(f"tensor '{name}' has dtype {dtype}, which a torch state dict file cannot hold here")
        self._index = {name: i for i, (name, _, _) in enumerate(self._plan)}
        if len(self._index) != len(self._plan):
            raise ClawError("output would hold duplicate tensor names")
        self._pending = set(self._index)
        self._zip = zipfile.ZipFile(self.path, "w", compression=zipfile.ZIP_STORED, allowZip64=True)

    def _member(self, name: str, nbytes: int) -> zipfile.ZipInfo:
        """A stored member whose data starts on a 64-byte boundary (padding in an extra field)."""
        info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
        info.compress_type = zipfile.ZIP_STORED
        info.file_size = nbytes
        zip64 = nbytes >= ZIP64_FROM
        start = self._zip.fp.tell() + 30 + len(name.encode()) + 4 + (20 if zip64 else 0)
        pad = -start % ALIGN
        info.extra = struct.pack("<HH", PAD_ID, pad) + b"\0" * pad
        return info

    def _put(self, name: str, data: bytes | memoryview) -> None:
        nbytes = len(data)
        info = self._member(f"{ARCHIVE}/{name}", nbytes)
        with self._zip.open(info, "w", force_zip64=nbytes >= ZIP64_FROM) as f:
            if nbytes and self._zip.fp.tell() % ALIGN:   # the local header is written: this is the data start
                raise ClawError(f"internal: {name} is not aligned in {self.path.name}")
            view = memoryview(data)
            for at in range(0, nbytes, 1 << 24):
                f.write(view[at:at + (1 << 24)])

    def write(self, name: str, tensor: Any) -> None:
        if name not in self._pending:
            raise ClawError(f"internal: tensor '{name}' was not planned for writing (or written twice)")
        i = self._index[name]
        _, dtype, shape = self._plan[i]
        arr = contiguous(cast(as_numpy(tensor), dtype))
        if tuple(arr.shape) != shape:
            raise ClawError(f"tensor '{name}' came out with shape {tuple(arr.shape)}, planned {shape}")
        self._put(f"data/{i}", arr.reshape(-1).view(np.uint8).data if arr.size else b"")
        self._pending.discard(name)

    def close(self) -> list[Path]:
        if self._pending:
            self.abort()
            missing = sorted(self._pending)
            raise ClawError(f"{len(missing)} planned tensors were never written: {', '.join(missing[:5])}")
        self._put("data.pkl", state_dict_pickle([(n, d, s) for n, d, s in self._plan]))
        for record, text in ((".format_version", "1"), (".storage_alignment", str(ALIGN)), ("byteorder", "little"),
                             ("version", "3\n")):
            self._put(record, text.encode())
        self._zip.close()
        return [self.path]

    def abort(self) -> None:
        try:
            self._zip.close()
        except (OSError, ValueError):
            pass


# ------------------------------------------------------------------------------------
# reading: the same format, without torch and without unpickling anything but data
# ------------------------------------------------------------------------------------
class NotPlain(Exception):
    """The file is not a plain zip-format state dict this reader takes (the caller falls back to
    ``torch.load(weights_only=True)``, which has the last word on anything else)."""


_STORAGE_DTYPES = {cls: name for name, cls in STORAGES.items()}


class _Storage:
    def __init__(self, dtype: str, key: str, numel: int):
        self.dtype, self.key, self.numel = dtype, key, numel


class _Tensor:
    def __init__(self, storage: _Storage, offset: int, shape: tuple, stride: tuple):
        self.storage, self.offset, self.shape, self.stride = storage, int(offset), tuple(shape), tuple(stride)


class _StateDict(dict):
    """collections.OrderedDict stand-in (takes the ``_metadata`` attribute torch.save stores)."""


def _rebuild_tensor(storage, offset, shape, stride, *_):
    if not isinstance(storage, _Storage):
        raise NotPlain("a tensor whose storage is not a plain storage")
    return _Tensor(storage, offset, shape, stride)


def _rebuild_parameter(data, *_):
    return data


class _Unpickler:
    """A pickle reader that builds only dicts, lists, tuples, numbers, strings and tensor stand-ins:
    every global it meets must be one of four names, or it stops (NotPlain) without calling anything."""

    ALLOWED = {("collections", "OrderedDict"): _StateDict, ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
               ("torch._utils", "_rebuild_parameter"): _rebuild_parameter}

    def __init__(self, data: bytes):
        import io
        import pickle

        outer = self

        class Restricted(pickle.Unpickler):
            def find_class(self, module, name):
                if module == "torch" and name in _STORAGE_DTYPES:
                    return ("storage-class", _STORAGE_DTYPES[name])
                if (module, name) in outer.ALLOWED:
                    return outer.ALLOWED[(module, name)]
                raise NotPlain(f"{module}.{name}")

            def persistent_load(self, pid):
                if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                        and isinstance(pid[1], tuple) and pid[1][0] == "storage-class"):
                    raise NotPlain("an unknown persistent id")
                return _Storage(pid[1][1], str(pid[2]), int(pid[4]))

        self._u = Restricted(io.BytesIO(data))

    def load(self):
        import pickle
        try:
            return self._u.load()
        except NotPlain:
            raise
        except (pickle.UnpicklingError, TypeError, ValueError, AttributeError, EOFError, IndexError, KeyError) as e:
            raise NotPlain(str(e)) from e


def _data_offset(f, info: zipfile.ZipInfo) -> int:
    f.seek(info.header_offset)
    head = f.read(30)
    if len(head) != 30 or head[:4] != b"PK\x03\x04":
        raise NotPlain(f"member {info.filename} has no local header")
    name_len, extra_len = struct.unpack("<HH", head[26:30])
    return info.header_offset + 30 + name_len + extra_len


def read_state_dict_index(path: Path) -> dict[str, tuple[str, tuple[int, ...], int, int]]:
    """``{name: (dtype name, shape, file offset, nbytes)}`` of a contiguous zip-format state dict,
    read from its pickle and zip directory only; NotPlain for anything else."""
    path = Path(path)
    try:
        z = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise NotPlain(str(e)) from e
    with z, open(path, "rb") as f:
        names = z.namelist()
        pkl = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pkl) != 1:
            raise NotPlain("no single data.pkl")
        prefix = pkl[0][: -len("data.pkl")]
        info = z.getinfo(pkl[0])
        if info.file_size > 64 << 20:
            raise NotPlain("a pickle of more than 64 MB")
        order = z.read(f"{prefix}byteorder").decode().strip() if f"{prefix}byteorder" in names else "little"
        if order != "little":
            raise NotPlain("big-endian storages")
        obj = _Unpickler(z.read(pkl[0])).load()
        if not isinstance(obj, dict) or not obj or not all(isinstance(v, _Tensor) for v in obj.values()):
            raise NotPlain("not a flat dict of tensors")
        out = {}
        for name, t in obj.items():
            member = f"{prefix}data/{t.storage.key}"
            if member not in names:
                raise NotPlain(f"no storage record {member}")
            zinfo = z.getinfo(member)
            if zinfo.compress_type != zipfile.ZIP_STORED:
                raise NotPlain("a compressed storage")
            dtype = dtype_of(t.storage.dtype)
            numel = int(np.prod(t.shape, dtype=np.int64)) if t.shape else 1
            contiguous_strides = tuple(int(np.prod(t.shape[i + 1:], dtype=np.int64)) for i in range(len(t.shape)))
            if numel and t.stride != contiguous_strides:
                raise NotPlain(f"tensor '{name}' is not contiguous")
            if (t.offset + numel) * dtype.itemsize > zinfo.file_size or t.storage.numel * dtype.itemsize != zinfo.file_size:
                raise NotPlain(f"tensor '{name}' does not fit its storage")
            out[str(name)] = (dtype.name, t.shape, _data_offset(f, zinfo) + t.offset * dtype.itemsize,
                              numel * dtype.itemsize)
        return out


def open_state_dict(path: Path, unsafe_pickle: bool = False):
    """A plain ``torch.save`` state dict read without torch (headers only, data on demand), or,
    for anything else (legacy pickles, wrapped training checkpoints, foreign objects), the
    ``torch.load(weights_only=True)`` store every other pickle source uses."""
    from .readers import SpanStore, TensorInfo, TorchPickleStore, require_file, strip_common_prefix

    require_file(Path(path), "torch checkpoint")
    try:
        index = read_state_dict_index(path)
    except NotPlain:
        return TorchPickleStore(path, unsafe_pickle=unsafe_pickle)

    store = SpanStore(path)      # the zip's members are stored, so each tensor is a run of the file
    for name, (dtype, shape, offset, nbytes) in index.items():
        store._infos[name] = TensorInfo(name, shape, dtype_of(dtype), Path(path))
        store._where[name] = (Path(path), offset, nbytes)
    store.rename(strip_common_prefix(list(store._infos)))
    return store
