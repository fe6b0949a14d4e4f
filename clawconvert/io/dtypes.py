"""Element types, without torch.

The conversion path runs on numpy (torch costs 3 s and ~650 MiB just to import), so
clawconvert names element types with its own small :class:`DType`: the safetensors code,
the numpy dtype (bfloat16 and float8 through ``ml_dtypes``), and the torch dtype on demand
for the places that hand arrays to a framework (``--verify``, pickle sources, tests).

``ml_dtypes`` is imported the first time a bfloat16 or float8 numpy dtype is asked for (a
tensor of that type is read, cast or written), not at start-up: version 0.7.0 takes about
1.1 s to import, which every command would otherwise pay (pyproject.toml bounds it as well).
Names and sizes are known without it, so planning from headers imports nothing.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .pipeline import in_two_halves


@dataclass(frozen=True)
class DType:
    name: str            # "float32", "bfloat16", ... (torch's spelling, without "torch.")
    code: str            # safetensors header code: "F32", "BF16", ...
    itemsize: int        # bytes per element
    is_floating_point: bool
    # the in-memory numpy dtype, or the name of an ml_dtypes type until it is first needed
    _np: Any = field(compare=False, repr=False)

    @property
    def np(self) -> np.dtype:
        """The numpy dtype (bfloat16 and float8: ``ml_dtypes``, imported on first use)."""
        if isinstance(self._np, str):
            import ml_dtypes
            object.__setattr__(self, "_np", np.dtype(getattr(ml_dtypes, self._np)))
        return self._np

    @property
    def torch(self) -> Any:
        import torch
        return getattr(torch, _TORCH_NAMES.get(self.name, self.name))

    def __str__(self) -> str:
        return self.name

    def __repr__(self) -> str:
        return f"dtype({self.name})"


def _d(name: str, code: str, npd: Any, flt: bool) -> DType:
    return DType(name, code, np.dtype(npd).itemsize, flt, np.dtype(npd))


def _ml(name: str, code: str, size: int) -> DType:
    """A float type numpy lacks: ``ml_dtypes.<name>``, looked up when first used."""
    return DType(name, code, size, True, name)


float64 = _d("float64", "F64", np.float64, True)
float32 = _d("float32", "F32", np.float32, True)
float16 = _d("float16", "F16", np.float16, True)
bfloat16 = _ml("bfloat16", "BF16", 2)
float8_e4m3fn = _ml("float8_e4m3fn", "F8_E4M3", 1)
float8_e5m2 = _ml("float8_e5m2", "F8_E5M2", 1)
int64 = _d("int64", "I64", np.int64, False)
int32 = _d("int32", "I32", np.int32, False)
int16 = _d("int16", "I16", np.int16, False)
int8 = _d("int8", "I8", np.int8, False)
uint8 = _d("uint8", "U8", np.uint8, False)
bool_ = _d("bool", "BOOL", np.bool_, False)

ALL: tuple[DType, ...] = (float64, float32, float16, bfloat16, float8_e4m3fn, float8_e5m2,
                          int64, int32, int16, int8, uint8, bool_)
_TORCH_NAMES = {"bool": "bool"}

# safetensors header code -> DType
SAFETENSORS_DTYPES: dict[str, DType] = {d.code: d for d in ALL}
_BY_NAME = {d.name: d for d in ALL}   # numpy and ml_dtypes name their dtypes the same way

# --dtype flag value -> DType (None keeps the source dtype)
CLI_DTYPES: dict[str, DType | None] = {"keep": None, "fp32": float32, "fp16": float16, "bf16": bfloat16}


def dtype_of(x: Any) -> DType:
    """The DType of a DType, a torch dtype, a numpy dtype, an array/tensor or a name."""
    if isinstance(x, DType):
        return x
    if isinstance(x, str):
        key = x.replace("torch.", "")
        if key in _BY_NAME:
            return _BY_NAME[key]
        if key in CLI_DTYPES and CLI_DTYPES[key] is not None:
            return CLI_DTYPES[key]  # type: ignore[return-value]
        raise TypeError(f"unknown dtype {x!r}")
    if hasattr(x, "dtype") and not isinstance(x, np.dtype):
        return dtype_of(x.dtype)
    if type(x).__module__ == "torch":  # a torch.dtype
        return dtype_of(str(x))
    try:
        npd = np.dtype(x)
    except TypeError as e:
        raise TypeError(f"unsupported dtype {x!r}") from e
    if npd.kind == "V" and npd.itemsize == 2 and npd.fields is None:
        return bfloat16  # JAX/big_vision store bfloat16 as 2-byte void
    if npd.byteorder == ">":
        npd = npd.newbyteorder("<")
    found = _BY_NAME.get(npd.name)
    if found is not None and found.np == npd:   # an ml_dtypes array means ml_dtypes is loaded already
        return found
    raise TypeError(f"unsupported array dtype {npd}")


def itemsize(dtype: Any) -> int:
    return dtype_of(dtype).itemsize


def output_dtype(source: DType, requested: DType | None) -> DType:
    """The dtype a tensor is written in: floating tensors follow ``--dtype``, others keep theirs."""
    if requested is None or not source.is_floating_point:
        return source
    return requested


# ------------------------------------------------------------------------------------
# arrays: numpy in the core, torch only at framework boundaries
# ------------------------------------------------------------------------------------
def as_numpy(x: Any) -> np.ndarray:
    """A numpy view (no copy where possible) of a numpy array or a CPU torch tensor."""
    if isinstance(x, np.ndarray):
        return x
    if type(x).__module__.startswith("torch"):
        import torch
        t = x.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        d = dtype_of(t.dtype)
        if d.np.kind == "V" or d.name in ("bfloat16", "float8_e4m3fn", "float8_e5m2"):
            raw = t.contiguous().view(torch.uint8 if d.itemsize == 1 else torch.int16).numpy()
            return raw.view(d.np)
        return t.numpy()
    return np.asarray(x)


def as_torch(x: Any) -> Any:
    """A torch tensor sharing memory with a numpy array (bfloat16/float8 included)."""
    import torch
    if isinstance(x, torch.Tensor):
        return x
    a = np.asarray(x)
    d = dtype_of(a.dtype)
    if not a.flags.writeable:
        a = a.copy()
    if d in (bfloat16, float8_e4m3fn, float8_e5m2):
        raw = contiguous(a).view(np.int16 if d.itemsize == 2 else np.uint8)
        return torch.from_numpy(raw).view(d.torch)
    return torch.from_numpy(contiguous(a))


def contiguous(x: np.ndarray) -> np.ndarray:
    """C-contiguous, keeping 0-d arrays 0-d (``np.ascontiguousarray`` makes them 1-d).

    Transposed views of 1 MB and up are copied in tiles (:func:`_tiled_copy`): numpy's own
    copy of a transposed matrix walks the source with a stride of a whole row and runs at a
    quarter of the speed."""
    if x.flags.c_contiguous:   # 0-d arrays always are
        return x
    out = np.empty(x.shape, x.dtype)
    copy_into(out, x)
    return out


_TILED_FROM = 1 << 20


def copy_into(out: np.ndarray, x: np.ndarray) -> None:
    """``out[...] = x`` for a C-contiguous ``out`` of x's shape, tiled when ``x`` is a large
    transposed view."""
    if x.flags.c_contiguous or x.ndim < 2 or x.nbytes < _TILED_FROM:
        np.copyto(out, x)
    else:
        _tiled_copy(out, x)


def _tiled_copy(out: np.ndarray, x: np.ndarray) -> None:
    """``out[...] = x`` in tiles a few hundred KB of ``x`` each, short along both the axis
    ``x`` is contiguous in and the axis ``out`` is: every tile stays in cache while it is
    read across and written along.  Measured on 4304x1152 float32: 0.9 GB/s plain, 3+ GB/s
    tiled."""
    axes = [i for i in range(x.ndim) if x.shape[i] > 1]
    if not axes:
        np.copyto(out, x)
        return
    write_ax = axes[-1]                                         # out's innermost axis
    read_ax = min(axes, key=lambda i: abs(x.strides[i]))       # x's innermost axis
    if read_ax == write_ax:
        np.copyto(out, x)
        return
    # rows of x read per tile: fewer when they are a multiple of 4 KiB apart, because such
    # rows map to the same cache sets and evict each other
    rows, cols = (16, 512) if abs(x.strides[write_ax]) % 4096 == 0 else (64, 1024)

    def band(first: int, last: int) -> None:
        index: list[slice] = [slice(None)] * x.ndim
        for i in range(first, last, rows):
            index[write_ax] = slice(i, min(i + rows, last))
            for j in range(0, x.shape[read_ax], cols):
                index[read_ax] = slice(j, j + cols)
                tile = tuple(index)
                out[tile] = x[tile]

    in_two_halves(band, x.shape[write_ax], rows, x.nbytes)   # large: two bands of whole tiles, one on the helper thread


def cast(x: np.ndarray, dtype: DType) -> np.ndarray:
    """``x`` in ``dtype`` (round to nearest even, like torch's ``.to``); no copy if already so."""
    if x.dtype == dtype.np:
        return x
    return x.astype(dtype.np)
