"""Compute floors: the arithmetic a job cannot avoid, timed without any I/O.

    python bench/floors.py lora-products ADAPTER_DIR

``lora-products``: ``B @ A`` in float32 for every LoRA pair of ``adapter_model.safetensors``
(the delta PEFT's ``get_delta_weight`` and clawconvert's merge both compute), into one reused
buffer, with numpy's BLAS on every core.  Nothing is read back or written, so its wall time is
a lower bound for any merge of that adapter on this machine, whatever its I/O does.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file


def lora_products(adapter: Path) -> dict:
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    pairs = [(tensors[k.replace("lora_A", "lora_B")], a) for k, a in tensors.items() if ".lora_A." in k]
    biggest = max(b.shape[0] * a.shape[1] for b, a in pairs)
    buf = np.empty(biggest, np.float32)
    t0 = time.perf_counter()
    flops = 0
    for b, a in pairs:
        out = buf[:b.shape[0] * a.shape[1]].reshape(b.shape[0], a.shape[1])
        np.matmul(b.astype(np.float32, copy=False), a.astype(np.float32, copy=False), out=out)
        flops += 2 * b.shape[0] * b.shape[1] * a.shape[1]
    wall = time.perf_counter() - t0
    return {"pairs": len(pairs), "flop": flops, "gflop": round(flops / 1e9, 2), "compute_s": round(wall, 3),
            "gflop_per_s": round(flops / 1e9 / wall, 1)}


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "lora-products":
        raise SystemExit("usage: floors.py lora-products ADAPTER_DIR")
    print(json.dumps(lora_products(Path(sys.argv[2]))))
