"""A reference forward pass of big_vision's SigLIP, written from its model code, in torch.

jax and big_vision are not dependencies of clawconvert, so ``--verify`` with a big_vision
side runs this instead: the two-towers model of ``big_vision/models/proj/image_text/
two_towers.py`` with the ``vit`` (or ``naflex_vit``) image tower and the ``text_transformer``
text tower, computed straight from the ``.npz`` tensors under their big_vision names (no
mapping table involved, so it checks the tables rather than repeating them).  It is tested
against the outputs big_vision itself produced (``fixtures/big_vision/*_io.npz``) to 1e-6.

What it follows, flax for flax: pre-LayerNorm blocks with eps 1e-6, tanh GELU, flax
``MultiHeadDotProductAttention`` kernels (D, H, hd) / (H, hd, D), the MAP head (a probe
attends over the tokens, then LayerNorm + MLP with a residual, first token), the text
tower pooled at position -1 with no mask, both embeddings L2-normalised and
``logits = zimg @ ztxt.T * exp(t) + b``.  NaFlex: a Dense over flattened patches, the
(g, g, D) position grid resized per image (bilinear, antialiased; big_vision uses
``jax.image.scale_and_translate``, equal to about 1e-7 except on one-patch-wide grids) and
padding patches masked out of attention and pooling.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from .io.dtypes import as_torch

EPS = 1e-6


class BigVisionSiglip:
    """big_vision SigLIP (fixed resolution or NaFlex) from a ``{key: tensor}`` of its parameters."""

    def __init__(self, params: dict[str, torch.Tensor]):
        self.p = {k: as_torch(v).float() for k, v in params.items()}  # numpy from the readers, or torch
        self.naflex = self.p["img/embedding/kernel"].dim() == 2

    # -- building blocks ---------------------------------------------------------------
    def _ln(self, x, prefix):
        return F.layer_norm(x, x.shape[-1:], self.p[prefix + "scale"], self.p[prefix + "bias"], EPS)

    def _dense(self, x, prefix):
        return x @ self.p[prefix + "kernel"] + self.p[prefix + "bias"]

    def _mlp(self, x, prefix):
        h = F.gelu(self._dense(x, prefix + "Dense_0/"), approximate="tanh")
        return self._dense(h, prefix + "Dense_1/")

    def _attention(self, q_in, kv_in, prefix, key_mask=None):
        p = self.p
        q = torch.einsum("bsd,dhe->bshe", q_in, p[prefix + "query/kernel"]) + p[prefix + "query/bias"]
        k = torch.einsum("bsd,dhe->bshe", kv_in, p[prefix + "key/kernel"]) + p[prefix + "key/bias"]
        v = torch.einsum("bsd,dhe->bshe", kv_in, p[prefix + "value/kernel"]) + p[prefix + "value/bias"]
        q = q / math.sqrt(q.shape[-1])
        logits = torch.einsum("bqhd,bkhd->bhqk", q, k)
        if key_mask is not None:
            logits = logits.masked_fill(~key_mask[:, None, None, :], torch.finfo(logits.dtype).min)
        w = logits.softmax(-1)
        out = torch.einsum("bhqk,bkhd->bqhd", w, v)
        return torch.einsum("bqhd,hdo->bqo", out, p[prefix + "out/kernel"]) + p[prefix + "out/bias"]

    def _encoder(self, x, prefix, key_mask=None):
        i = 0
        while f"{prefix}encoderblock_{i}/LayerNorm_0/scale" in self.p:
            b = f"{prefix}encoderblock_{i}/"
            y = self._ln(x, b + "LayerNorm_0/")
            x = x + self._attention(y, y, b + "MultiHeadDotProductAttention_0/", key_mask)
            x = x + self._mlp(self._ln(x, b + "LayerNorm_1/"), b + "MlpBlock_0/")
            i += 1
        return self._ln(x, prefix + "encoder_norm/")

    # -- towers ------------------------------------------------------------------------
    def encode_image(self, image: Any) -> torch.Tensor:
        """MAP-head output (no image head in SigLIP): NCHW pixels, or a NaFlex input dict."""
        p = self.p
        mask = None
        if self.naflex:
            x, mask = self._naflex_tokens(image)
        else:
            k = p["img/embedding/kernel"]                           # HWIO
            x = F.conv2d(image.float(), k.permute(3, 2, 0, 1), p["img/embedding/bias"], stride=k.shape[0])
            x = x.flatten(2).transpose(1, 2) + p["img/pos_embedding"]  # row-major patches, (1, N, D)
        x = self._encoder(x, "img/Transformer/", mask)
        probe = p["img/MAPHead_0/probe"].expand(x.shape[0], -1, -1)
        h = self._attention(probe, x, "img/MAPHead_0/MultiHeadDotProductAttention_0/", mask)
        h = h + self._mlp(self._ln(h, "img/MAPHead_0/LayerNorm_0/"), "img/MAPHead_0/MlpBlock_0/")
        return h[:, 0]

    def _naflex_tokens(self, image: dict) -> tuple[torch.Tensor, torch.Tensor]:
        p = self.p
        patches, ptype, shapes = image["pixel_values"].float(), image["pixel_attention_mask"].bool(), image["spatial_shapes"]
        x = self._dense(patches, "img/embedding/")
        grid = p["img/pos_embedding"].permute(2, 0, 1)[None]      # (1, D, g, g), indexed [y, x]
        pos = torch.zeros_like(x)
        for i, (h, w) in enumerate(shapes.tolist()):
            resized = F.interpolate(grid, size=(h, w), mode="bilinear", antialias=True, align_corners=False)
            resized = resized[0].flatten(1).T                       # (h*w, D), row-major over (y, x)
            pos[i] = resized[0]                                     # padding: the (0, 0) entry
            pos[i, : h * w] = resized
        return x + pos, ptype

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        p = self.p
        x = p["txt/Embed_0/embedding"][ids.long()] + p["txt/pos_embedding"]
        x = self._encoder(x, "txt/Encoder_0/")[:, -1]
        return self._dense(x, "txt/head/") if "txt/head/kernel" in p else x

    def logits(self, image: Any, ids: torch.Tensor) -> torch.Tensor:
        zimg = F.normalize(self.encode_image(image), dim=-1)
        ztxt = F.normalize(self.encode_text(ids), dim=-1)
        out = zimg @ ztxt.T * self.p["t"].exp()
        return out + self.p["b"] if "b" in self.p else out


def big_vision_runner(ckpt):
    """A :class:`~clawconvert.verify.Runner` for a big_vision checkpoint (reference forward)."""
    from .verify import Runner
    model = BigVisionSiglip({k: ckpt.store.read(k) for k in ckpt.store.keys()})
    return Runner("big_vision reference forward (torch; jax not used)", image=model.encode_image,
                  text=model.encode_text, logits=model.logits)
