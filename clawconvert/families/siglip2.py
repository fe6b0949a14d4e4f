"""SigLIP 2 NaFlex: canonical keys are transformers ``Siglip2Model``'s; tables in ``mappings/siglip2/``.

NaFlex differs from fixed-resolution SigLIP (:mod:`.siglip`) in the image embedding only:
a Dense over flattened patches instead of a convolution, and a learned 2-D position grid
that is resized to each image's patch grid.  big_vision <-> HF only: open_clip has no
NaFlex model.

====================================================  ========================================
big_vision tensor (``params/`` prefix stripped)       Siglip2Config
====================================================  ========================================
``img/embedding/kernel`` (P * P * 3, D)               ``vision_config.patch_size`` P, width D
``img/pos_embedding`` (g, g, D)                       ``vision_config.num_patches`` g * g
text tower, ``t``, ``b``                              as SigLIP (:func:`.siglip.read_text_tower`)
(always)                                              Gemma ids: pad 0, eos 1, bos 2
====================================================  ========================================
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ..errors import ClawError
from . import Extras, Family, FormatCodec
from .siglip import (GELU_TANH, SIGLIP_EPS, SiglipFamily, _check_joint, _check_towers, _encoder, _mark, _shape,
                     read_text_tower, siglip_preprocess, siglip_shapes, token_ids, write_tokenizer)
from .clip import write_json


def read_big_vision(store):
    """big_vision NaFlex tensor shapes -> a ``Siglip2Config``-like HFConfig."""
    from ..hfconfig import make

    _check_towers(store)
    enc = _encoder(store, "img/Transformer/", "image")
    k, d = _shape(store, "img/embedding/kernel", 2)
    p = math.isqrt(k // 3)
    if p * p * 3 != k:
        raise ClawError(f"{store.path}: not representable: img/embedding/kernel {(k, d)} is not a flattened "
                        f"square patch over 3 channels")
    g1, g2, d2 = _shape(store, "img/pos_embedding", 3)
    if g1 != g2:
        raise ClawError(f"{store.path}: not representable: img/pos_embedding {(g1, g2, d2)} is not a square grid "
                        f"(transformers' Siglip2 keeps a square one)")
    if d != enc["width"] or d2 != d:
        raise ClawError(f"{store.path}: shapes contradict each other: patch embedding width {d}, position embedding "
                        f"width {d2}, image attention width {enc['width']}")
    vision = dict(hidden_size=d, intermediate_size=enc["mlp"], num_hidden_layers=enc["depth"],
                  num_attention_heads=enc["heads"], num_patches=g1 * g1, patch_size=p, num_channels=3,
                  hidden_act=GELU_TANH, layer_norm_eps=SIGLIP_EPS)
    text, has_head = read_text_tower(store)
    _check_joint(store, d, text, has_head)
    text.update(token_ids(text["vocab_size"], siglip2=True))
    return _mark(make("siglip2", text_config=text, vision_config=vision), has_head, "b" in store)


def claims_big_vision(store) -> bool:
    return "img/embedding/kernel" in store and len(store.info("img/embedding/kernel").shape) == 2


def _no_openclip(*_: Any) -> dict:
    raise ClawError("no OpenCLIP form: open_clip has no NaFlex SigLIP 2 model; convert to hf or big_vision")


class Siglip2Family(Family):
    name = "siglip2"
    hf_model_types = ("siglip2",)
    towers = {"visual": ("vision_model.",), "text": ("text_model.",)}

    def __init__(self) -> None:
        super().__init__()
        self.codecs["big_vision"] = FormatCodec(read=read_big_vision, write=lambda config: {}, claims=claims_big_vision)
        self.codecs["openclip"] = FormatCodec(read=_no_openclip, write=_no_openclip)

    def hf_architecture(self, config) -> str:
        return "Siglip2Model"

    def canonical_shapes(self, config) -> dict[str, tuple[int, ...]]:
        """``Siglip2Model``'s state dict, from the config (tests compare it with the model on ``meta``)."""
        v = config.vision_config
        return siglip_shapes(config, patch_embedding=(v.hidden_size, v.num_channels * v.patch_size * v.patch_size),
                             positions=v.num_patches)

    def params(self, config) -> dict[str, Any]:
        from .siglip import FAMILY as SIGLIP
        v = config.vision_config
        g = math.isqrt(v.num_patches)
        return {**SIGLIP.params(config), "G": g, "PPC": v.patch_size * v.patch_size * v.num_channels}

    def refine(self, ckpt) -> None:
        from .siglip import FAMILY as SIGLIP
        SIGLIP.refine(ckpt)
        ckpt.extras.preprocess = {**ckpt.extras.preprocess, "interpolation": "bilinear"}

    def target_notes(self, ckpt, target: str) -> list[str]:
        from .siglip import FAMILY as SIGLIP
        return SIGLIP.target_notes(ckpt, target) if target == "big_vision" else []

    def expected_drift(self, ckpt, target: str) -> float:
        from .siglip import FAMILY as SIGLIP
        return SIGLIP.expected_drift(ckpt, target) if target == "big_vision" else 0.0

    def sample_inputs(self, config, batch: int = 2, seed: int = 0):
        """NaFlex inputs: flattened patches of two grids (one square, one not), padding, Gemma-style ids."""
        import torch

        v = config.vision_config
        n = v.num_patches
        g = math.isqrt(n)
        # grids of at least two columns: torch's antialiased resize is wrong on width-1 targets
        grids = [(g, g), (max(1, g // 2), min(2 * g, n // max(1, g // 2)))][:batch]
        gen = torch.Generator().manual_seed(seed)
        pixels = torch.zeros(len(grids), n, v.patch_size * v.patch_size * v.num_channels)
        mask = torch.zeros(len(grids), n, dtype=torch.long)
        for i, (h, w) in enumerate(grids):
            pixels[i, : h * w] = torch.rand(h * w, pixels.shape[-1], generator=gen) * 2 - 1
            mask[i, : h * w] = 1
        image = {"pixel_values": pixels, "pixel_attention_mask": mask,
                 "spatial_shapes": torch.tensor(grids, dtype=torch.long)}
        return image, _ids(config, len(grids), seed)

    # both towers' side files, and tower configs, exactly as SigLIP 1 does them
    write_hf_extras = SiglipFamily.write_hf_extras
    tower_config = SiglipFamily.tower_config

    def tower_architecture(self, tower: str, with_projection: bool) -> str:
        return {"visual": "Siglip2VisionModel", "text": "Siglip2TextModel"}[tower]

    def write_hf_tower_extras(self, out_dir: Path, config, extras: Extras, tower: str) -> list[str]:
        if tower == "text":
            return write_tokenizer(out_dir, config.text_config.vocab_size, extras)
        pre = {**siglip_preprocess(True), **extras.preprocess}
        v = config.vision_config
        # what Siglip2ImageProcessor(...).save_pretrained writes
        write_json(Path(out_dir) / "preprocessor_config.json", {
            "do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": list(pre["mean"]),
            "image_processor_type": "Siglip2ImageProcessor", "image_std": list(pre["std"]),
            "max_num_patches": v.num_patches, "patch_size": v.patch_size,
            "resample": {"bicubic": 3, "bilinear": 2}.get(pre["interpolation"], 2), "rescale_factor": 1 / 255})
        return []

def _ids(config, batch: int, seed: int):
    """Token rows the Gemma way: bos? tokens, eos, then pad 0 up to the full length."""
    import torch
    t = config.text_config
    g = torch.Generator().manual_seed(seed + 1)
    L, V = t.max_position_embeddings, t.vocab_size
    ids = torch.full((batch, L), t.pad_token_id if t.pad_token_id is not None else 0, dtype=torch.long)
    for i in range(batch):
        n = int(torch.randint(2, L - 1, (1,), generator=g))
        row = torch.randint(3, V, (n,), generator=g).tolist()
        seq = row + [t.eos_token_id]
        ids[i, : len(seq)] = torch.tensor(seq[:L])
    return ids


FAMILY = Siglip2Family()
