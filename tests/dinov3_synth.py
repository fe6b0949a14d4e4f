"""Tiny DINOv3 ViTs with seeded weights, in the layouts the frameworks themselves write.

* :func:`timm_dir`: a real timm DINOv3 model (``timm.create_model`` of a registered
  ``vit_*_patch16_dinov3*`` architecture, one block, a 32 px image) saved by timm's own
  ``save_for_hf``;
* :func:`original_file`: a facebookresearch/dinov3 torch-hub state dict (``torch.save``) with
  seeded tensors under the research code's names, for one of the hub's entry points.  The tests
  check it is one by loading it, strictly, through timm's own reader of those checkpoints
  (``timm.models.eva.checkpoint_filter_fn``), and, when facebookresearch's code is at hand
  (``CLAWCONVERT_DINOV3_SRC``), through its ``DinoVisionTransformer``.

Tiny means one block and two heads; each head keeps the width of the architecture it comes
from (64, the 7B's 128), so the RoPE periods are the real model's.  ``narrow=False`` keeps the
real widths (the slow tests).  Weights are drawn wide (std 0.2, LayerScale around 1) so a
mis-mapped tensor moves every output.
"""
from __future__ import annotations

from pathlib import Path

import torch

IMAGE = 32        # 2 x 2 patches of 16
# every timm DINOv3 architecture: its head width
TIMM = {
    "vit_tiny_patch16_dinov3_qkvb": 64, "vit_small_patch16_dinov3": 64, "vit_small_patch16_dinov3_qkvb": 64,
    "vit_small_plus_patch16_dinov3": 64, "vit_small_plus_patch16_dinov3_qkvb": 64, "vit_base_patch16_dinov3": 64,
    "vit_base_patch16_dinov3_qkvb": 64, "vit_large_patch16_dinov3": 64, "vit_large_patch16_dinov3_qkvb": 64,
    "vit_huge_plus_patch16_dinov3": 64, "vit_huge_plus_patch16_dinov3_qkvb": 64, "vit_7b_patch16_dinov3": 128,
}
# every torch-hub entry point: the timm architecture that reads its file (timm's reader), and the
# timm model_args that give it the hub model's MLP (timm has no ViT-L+: its H+ with L's numbers)
HUB = {
    "dinov3_vits16": ("vit_small_patch16_dinov3_qkvb", {}),
    "dinov3_vits16plus": ("vit_small_plus_patch16_dinov3_qkvb", {}),
    "dinov3_vitb16": ("vit_base_patch16_dinov3_qkvb", {}),
    "dinov3_vitl16": ("vit_large_patch16_dinov3_qkvb", {}),
    "dinov3_vitl16plus": ("vit_huge_plus_patch16_dinov3_qkvb", {"embed_dim": 1024, "num_heads": 16}),
    "dinov3_vith16plus": ("vit_huge_plus_patch16_dinov3_qkvb", {}),
    "dinov3_vit7b16": ("vit_7b_patch16_dinov3", {}),
}


def _fill(params, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in params:
            if name.endswith(("gamma", "gamma_1", "gamma_2")):
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def _narrow(head: int) -> dict:
    return {"embed_dim": 2 * head, "num_heads": 2}


def timm_model(arch: str, depth: int = 1, seed: int = 0, narrow: bool = True, **kw):
    import timm
    shape = _narrow(TIMM[arch]) if narrow else {}
    model = timm.create_model(arch, pretrained=False, depth=depth, img_size=IMAGE, num_classes=0,
                              **{**shape, **kw})
    _fill(model.named_parameters(), seed)
    return model.eval()


def timm_dir(arch: str, out: Path, depth: int = 1, seed: int = 0, narrow: bool = True, **kw) -> Path:
    import timm
    timm.models.save_for_hf(timm_model(arch, depth, seed, narrow, **kw), str(out), safe_serialization=True)
    return out


def hub_kwargs(name: str, narrow: bool = True) -> dict:
    """The entry point's DinoVisionTransformer kwargs (facebookresearch/dinov3 hub/backbones.py)."""
    from clawconvert.families.dinov3 import hub_models
    kw = dict(hub_models()[name])
    if narrow:
        kw.update(_narrow(kw["embed_dim"] // kw["num_heads"]))
    return kw


def periods(base: float, head: int) -> torch.Tensor:
    """RopePositionEmbedding._init_weights, as facebookresearch computes it (float32)."""
    return base ** (2 * torch.arange(head // 4, dtype=torch.float32) / (head // 2))


def original_state_dict(name: str, depth: int = 1, seed: int = 0, narrow: bool = True,
                        key_bias: float = 0.0) -> dict[str, torch.Tensor]:
    """DinoVisionTransformer's state dict for entry point ``name``, seeded.  The k third of a masked
    qkv bias stays at its initial zeros in training (its gradient is masked); ``key_bias`` fills it."""
    kw = hub_kwargs(name, narrow)
    d, heads = kw["embed_dim"], kw["num_heads"]
    sd: dict[str, tuple] = {"cls_token": (1, 1, d)}
    if kw["n_storage_tokens"]:
        sd["storage_tokens"] = (1, kw["n_storage_tokens"], d)
    sd["mask_token"] = (1, d)
    sd.update({"patch_embed.proj.weight": (d, 3, 16, 16), "patch_embed.proj.bias": (d,)})
    hidden = int(d * kw["ffn_ratio"])
    if kw["ffn_layer"].startswith("swiglu"):
        align = {"swiglu": 8, "swiglu64": 64}[kw["ffn_layer"]]
        h = int(hidden * 2 / 3)
        h += -h % align
    for i in range(depth):
        b = f"blocks.{i}."
        sd.update({b + "norm1.weight": (d,), b + "norm1.bias": (d,), b + "attn.qkv.weight": (3 * d, d)})
        if kw["qkv_bias"]:
            sd[b + "attn.qkv.bias"] = (3 * d,)
        sd.update({b + "attn.proj.weight": (d, d), b + "attn.proj.bias": (d,), b + "ls1.gamma": (d,),
                   b + "norm2.weight": (d,), b + "norm2.bias": (d,)})
        if kw["ffn_layer"].startswith("swiglu"):
            sd.update({b + "mlp.w1.weight": (h, d), b + "mlp.w1.bias": (h,), b + "mlp.w2.weight": (h, d),
                       b + "mlp.w2.bias": (h,), b + "mlp.w3.weight": (d, h), b + "mlp.w3.bias": (d,)})
        else:
            sd.update({b + "mlp.fc1.weight": (hidden, d), b + "mlp.fc1.bias": (hidden,),
                       b + "mlp.fc2.weight": (d, hidden), b + "mlp.fc2.bias": (d,)})
        sd[b + "ls2.gamma"] = (d,)
    sd.update({"norm.weight": (d,), "norm.bias": (d,)})
    if kw["untie_global_and_local_cls_norm"]:
        sd.update({"local_cls_norm.weight": (d,), "local_cls_norm.bias": (d,)})
    out = {k: torch.empty(s) for k, s in sd.items()}
    _fill(out.items(), seed)
    out["rope_embed.periods"] = periods(kw["pos_embed_rope_base"], d // heads)
    for i in range(depth):
        if kw["qkv_bias"] and kw["mask_k_bias"]:
            out[f"blocks.{i}.attn.qkv.bias"][d:2 * d] = key_bias
            out[f"blocks.{i}.attn.qkv.bias_mask"] = torch.cat([torch.ones(d), torch.zeros(d), torch.ones(d)])
    return out


def original_file(name: str, out: Path, depth: int = 1, seed: int = 0, narrow: bool = True, **kw) -> Path:
    torch.save(original_state_dict(name, depth, seed, narrow, **kw), out)
    return out


def timm_from_original(name: str, state: dict, depth: int = 1, narrow: bool = True):
    """timm's own path for a torch-hub checkpoint: its model, its checkpoint_filter_fn, a strict load."""
    from timm.models.eva import checkpoint_filter_fn
    arch, args = HUB[name]
    kw = hub_kwargs(name, narrow)
    shape = {"embed_dim": kw["embed_dim"], "num_heads": kw["num_heads"]} if narrow else args
    model = timm_model(arch, depth, narrow=False, **shape)
    model.load_state_dict(checkpoint_filter_fn(dict(state), model), strict=True)
    return model.eval()
