"""Random big_vision SigLIP checkpoints with the released key layout and real shapes.

The layout follows big_vision's own modules (models/vit.py, models/proj/image_text/
text_transformer.py, two_towers.py) and the released files: ``params/`` prefix, ``/``
separators, ``encoderblock_{i}`` per layer or ``encoderblock`` stacked with a leading depth
axis, flax kernels (D, H, hd) / (H, hd, D), HWIO convolution, ``t`` and ``b`` of shape (1,).
Arrays are written one at a time (memory stays at one array); float16 halves size and time
and is what open_clip's loader accepts (it cannot read 2-byte void).
"""
from __future__ import annotations

import math
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np


@dataclass(frozen=True)
class Shape:
    name: str
    width: int = 768
    depth: int = 12
    heads: int = 12
    mlp: int = 3072
    patch: int = 16
    image: int = 224
    twidth: int = 768
    tdepth: int = 12
    theads: int = 12
    tmlp: int = 3072
    vocab: int = 32000
    length: int = 64
    head: int | None = 768           # text head output size; None: no text head
    bias: bool = True                 # logit bias b
    naflex_grid: int | None = None    # NaFlex: (g, g, D) position grid, Dense patch embedding
    openclip: str | None = None       # the built-in open_clip config with these shapes

    @property
    def params(self) -> int:
        return sum(math.prod(s) for _, s in keys(self))


# the released shapes named in issue 7 (widths, depths, heads, MLP sizes as in the open_clip/timm configs)
B16 = Shape("B/16-224", openclip="ViT-B-16-SigLIP")
L16 = Shape("L/16-256", width=1024, depth=24, heads=16, mlp=4096, image=256, twidth=1024, tdepth=24, theads=16,
            tmlp=4096, head=1024, openclip="ViT-L-16-SigLIP-256")
SO400M14 = Shape("So400m/14-224", width=1152, depth=27, heads=16, mlp=4304, patch=14, image=224, twidth=1152,
                 tdepth=27, theads=16, tmlp=4304, length=16, head=1152, openclip="ViT-SO400M-14-SigLIP")
SO400M16_I18N = Shape("So400m/16-256-i18n", width=1152, depth=27, heads=16, mlp=4304, patch=16, image=256,
                      twidth=1152, tdepth=27, theads=16, tmlp=4304, vocab=250000, head=None,
                      openclip="ViT-SO400M-16-SigLIP-i18n-256")
SIGLIP2_B16 = Shape("SigLIP 2 B/16-224", vocab=256000, openclip="ViT-B-16-SigLIP2")


def _encoder(prefix: str, depth: int, d: int, h: int, m: int) -> Iterator[tuple[str, tuple[int, ...]]]:
    hd = d // h
    for i in range(depth):
        b = f"{prefix}encoderblock_{i}/"
        for ln in ("LayerNorm_0", "LayerNorm_1"):
            yield f"{b}{ln}/scale", (d,)
            yield f"{b}{ln}/bias", (d,)
        yield f"{b}MlpBlock_0/Dense_0/kernel", (d, m)
        yield f"{b}MlpBlock_0/Dense_0/bias", (m,)
        yield f"{b}MlpBlock_0/Dense_1/kernel", (m, d)
        yield f"{b}MlpBlock_0/Dense_1/bias", (d,)
        for qkv in ("query", "key", "value"):
            yield f"{b}MultiHeadDotProductAttention_0/{qkv}/kernel", (d, h, hd)
            yield f"{b}MultiHeadDotProductAttention_0/{qkv}/bias", (h, hd)
        yield f"{b}MultiHeadDotProductAttention_0/out/kernel", (h, hd, d)
        yield f"{b}MultiHeadDotProductAttention_0/out/bias", (d,)
    yield f"{prefix}encoder_norm/scale", (d,)
    yield f"{prefix}encoder_norm/bias", (d,)


def keys(s: Shape) -> Iterator[tuple[str, tuple[int, ...]]]:
    """Every key (without ``params/``) and its shape, per-layer layout."""
    d, h = s.width, s.heads
    if s.naflex_grid:
        yield "img/embedding/kernel", (s.patch * s.patch * 3, d)
        yield "img/pos_embedding", (s.naflex_grid, s.naflex_grid, d)
    else:
        yield "img/embedding/kernel", (s.patch, s.patch, 3, d)
        yield "img/pos_embedding", (1, (s.image // s.patch) ** 2, d)
    yield "img/embedding/bias", (d,)
    yield from _encoder("img/Transformer/", s.depth, d, h, s.mlp)
    yield "img/MAPHead_0/probe", (1, 1, d)
    yield "img/MAPHead_0/LayerNorm_0/scale", (d,)
    yield "img/MAPHead_0/LayerNorm_0/bias", (d,)
    yield "img/MAPHead_0/MlpBlock_0/Dense_0/kernel", (d, s.mlp)
    yield "img/MAPHead_0/MlpBlock_0/Dense_0/bias", (s.mlp,)
    yield "img/MAPHead_0/MlpBlock_0/Dense_1/kernel", (s.mlp, d)
    yield "img/MAPHead_0/MlpBlock_0/Dense_1/bias", (d,)
    for qkv in ("query", "key", "value"):
        yield f"img/MAPHead_0/MultiHeadDotProductAttention_0/{qkv}/kernel", (d, h, d // h)
        yield f"img/MAPHead_0/MultiHeadDotProductAttention_0/{qkv}/bias", (h, d // h)
    yield "img/MAPHead_0/MultiHeadDotProductAttention_0/out/kernel", (h, d // h, d)
    yield "img/MAPHead_0/MultiHeadDotProductAttention_0/out/bias", (d,)
    t = s.twidth
    yield "txt/Embed_0/embedding", (s.vocab, t)
    yield "txt/pos_embedding", (1, s.length, t)
    yield from _encoder("txt/Encoder_0/", s.tdepth, t, s.theads, s.tmlp)
    if s.head is not None:
        yield "txt/head/kernel", (t, s.head)
        yield "txt/head/bias", (s.head,)
    yield "t", (1,)
    if s.bias:
        yield "b", (1,)


def _value(rng: np.random.Generator, key: str, shape: tuple[int, ...], dtype) -> np.ndarray:
    if key == "t":
        return np.full(shape, math.log(10.0) + 0.2, np.float32).astype(dtype)
    if key == "b":
        return np.full(shape, -10.0, np.float32).astype(dtype)
    x = rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)
    if key.endswith("/scale"):
        x += np.float32(1.0)
    return x.astype(dtype)


def write(path: Path, s: Shape, *, dtype=np.float16, seed: int = 0, stacked: tuple[str, ...] = (),
          prefix: str = "params/") -> Path:
    """Write ``s`` as a big_vision ``.npz``; ``stacked`` names the encoders ("img", "txt") in scan layout.

    bfloat16 (``dtype="bfloat16"``) is stored the JAX way, as 2-byte void.
    """
    rng = np.random.default_rng(seed)
    bf16 = dtype == "bfloat16"
    np_dtype = np.float32 if bf16 else dtype
    enc = {"img": "img/Transformer/", "txt": "txt/Encoder_0/"}
    stacks: dict[str, list[np.ndarray]] = {}
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as z:
        def put(key: str, arr: np.ndarray) -> None:
            if bf16:
                arr = (arr.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16).view(np.dtype("V2"))
            with z.open(prefix + key + ".npy", "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.ascontiguousarray(arr), allow_pickle=False)

        for key, shape in keys(s):
            arr = _value(rng, key, shape, np_dtype)
            tower = next((t for t in stacked if key.startswith(enc[t] + "encoderblock_")), None)
            if tower is None:
                put(key, arr)
                continue
            rest = key[len(enc[tower] + "encoderblock_"):]
            layer, leaf = rest.split("/", 1)
            member = f"{enc[tower]}encoderblock/{leaf}"
            stacks.setdefault(member, []).append(arr)
            depth = s.depth if tower == "img" else s.tdepth
            if len(stacks[member]) == depth:
                put(member, np.stack(stacks.pop(member)))
    return path


