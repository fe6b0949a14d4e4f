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
