"""Tiny DINOv2 models with seeded weights, in the layouts the frameworks themselves write.

* :func:`timm_dir`: a real timm DINOv2 model (``timm.create_model`` of a registered
  ``vit_*_dinov2`` architecture, shallow and small-image) saved by timm's own ``save_for_hf``;
* :func:`original_file`: a facebookresearch torch-hub state dict (``torch.save``) with seeded
  tensors under the research code's names.  The tests check it is one by loading it, strictly,
  through timm's own reader of those checkpoints (``checkpoint_filter_fn``).

Weights are drawn wide (std 0.2, LayerScale around 1) so a mis-mapped tensor moves every output.
"""
from __future__ import annotations

import collections
from pathlib import Path

import torch

# (timm architecture, width, heads, swiglu, registers): the S / B / L / g shapes
VARIANTS = {
    "S": ("vit_small_patch14_dinov2", 384, 6, False, 0),
    "S-reg4": ("vit_small_patch14_reg4_dinov2", 384, 6, False, 4),
    "B": ("vit_base_patch14_dinov2", 768, 12, False, 0),
    "B-reg4": ("vit_base_patch14_reg4_dinov2", 768, 12, False, 4),
    "L": ("vit_large_patch14_dinov2", 1024, 16, False, 0),
    "L-reg4": ("vit_large_patch14_reg4_dinov2", 1024, 16, False, 4),
    "g": ("vit_giant_patch14_dinov2", 1536, 24, True, 0),
    "g-reg4": ("vit_giant_patch14_reg4_dinov2", 1536, 24, True, 4),
}
IMAGE = 28        # 2 x 2 patches of 14


def _fill(params, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in params:
            if name.endswith("gamma"):
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def timm_model(variant: str, depth: int = 1, seed: int = 0, **kw):
    import timm
    arch = VARIANTS[variant][0]
    model = timm.create_model(arch, pretrained=False, depth=depth, img_size=IMAGE, num_classes=0, weight_init="skip",
                              **kw)
    _fill(model.named_parameters(), seed)
    return model.eval()


def timm_dir(variant: str, out: Path, depth: int = 1, seed: int = 0, **kw) -> Path:
    import timm
    timm.models.save_for_hf(timm_model(variant, depth, seed, **kw), str(out), safe_serialization=True)
    return out


def original_state_dict(variant: str, depth: int = 1, seed: int = 0) -> dict[str, torch.Tensor]:
    """DinoVisionTransformer's state dict (block_chunks=0, LayerScale), seeded."""
    _, d, _, swiglu, regs = VARIANTS[variant]
    n = (IMAGE // 14) ** 2
    shapes = {"cls_token": (1, 1, d), "pos_embed": (1, 1 + n, d)}
    if regs:
        shapes["register_tokens"] = (1, regs, d)
    shapes.update({"mask_token": (1, d), "patch_embed.proj.weight": (d, 3, 14, 14), "patch_embed.proj.bias": (d,)})
    h = (int(4 * d * 2 / 3) + 7) // 8 * 8      # SwiGLUFFNFused
    for i in range(depth):
        b = f"blocks.{i}."
        shapes.update({b + "norm1.weight": (d,), b + "norm1.bias": (d,), b + "attn.qkv.weight": (3 * d, d),
                       b + "attn.qkv.bias": (3 * d,), b + "attn.proj.weight": (d, d), b + "attn.proj.bias": (d,),
                       b + "ls1.gamma": (d,), b + "norm2.weight": (d,), b + "norm2.bias": (d,)})
        if swiglu:
            shapes.update({b + "mlp.w12.weight": (2 * h, d), b + "mlp.w12.bias": (2 * h,),
                           b + "mlp.w3.weight": (d, h), b + "mlp.w3.bias": (d,)})
        else:
            shapes.update({b + "mlp.fc1.weight": (4 * d, d), b + "mlp.fc1.bias": (4 * d,),
                           b + "mlp.fc2.weight": (d, 4 * d), b + "mlp.fc2.bias": (d,)})
        shapes[b + "ls2.gamma"] = (d,)
    shapes.update({"norm.weight": (d,), "norm.bias": (d,)})
    sd = collections.OrderedDict((k, torch.empty(s)) for k, s in shapes.items())
    _fill(sd.items(), seed)
    return sd


def original_file(variant: str, out: Path, depth: int = 1, seed: int = 0) -> Path:
    torch.save(original_state_dict(variant, depth, seed), out)
    return out


def timm_from_original(variant: str, state: dict, depth: int = 1):
    """timm's own path for a torch-hub checkpoint: its model, its checkpoint_filter_fn, a strict load."""
    from timm.models.vision_transformer import checkpoint_filter_fn
    model = timm_model(variant, depth)
    model.load_state_dict(checkpoint_filter_fn(dict(state), model), strict=True)
    return model.eval()
