"""dtype names shared by safetensors headers, numpy files and the ``--dtype`` flag."""
from __future__ import annotations

import numpy as np
import torch

# safetensors header name -> torch dtype
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
TORCH_TO_SAFETENSORS = {v: k for k, v in SAFETENSORS_DTYPES.items()}

# --dtype flag value -> torch dtype (None keeps the source dtype)
CLI_DTYPES: dict[str, torch.dtype | None] = {
    "keep": None, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
}


def itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def numpy_to_torch_dtype(dt: np.dtype) -> torch.dtype:
    """numpy dtype of an array on disk -> torch dtype; 2-byte void is bfloat16 (big_vision)."""
    if dt.kind == "V" and dt.itemsize == 2:
        return torch.bfloat16
    if dt.name == "bfloat16":  # ml_dtypes registered with numpy
        return torch.bfloat16
    try:
        return torch.from_numpy(np.empty(0, dtype=dt)).dtype
    except TypeError as e:
        raise TypeError(f"unsupported array dtype {dt}") from e


def output_dtype(source: torch.dtype, requested: torch.dtype | None) -> torch.dtype:
    """The dtype a tensor is written in: floating tensors follow ``--dtype``, others keep theirs."""
    if requested is None or not source.is_floating_point:
        return source
    return requested
