"""DINOv3 ViT: canonical keys are transformers 5's ``DINOv3ViTModel`` state dict; tables in
``mappings/dinov3/``.

Three layouts, side by side in ``docs/dinov3.md``: facebookresearch/dinov3's torch-hub state
dicts (``original``), timm's ``vit_*_patch16_dinov3[_qkvb]`` (``timm``, the Eva model) and
transformers (``hf``, both key spellings).  The model is one image tower: ``extract-visual`` is a
conversion.  What DINOv3 shares with DINOv2 (hub names, one tower, the runners) is
:class:`~clawconvert.families.dinov2.TorchHubViT`.

Config translation
==================

The original ``.pth`` carries no config, but its shapes say nearly everything, the head count
included (the RoPE periods buffer has one entry per 4 channels of a head):

==============================================  ==============================================
original tensor / DinoVisionTransformer kwarg    DINOv3ViTConfig
==============================================  ==============================================
``patch_embed.proj.weight`` (D, C, P, P)         ``hidden_size`` D, ``num_channels`` C, ``patch_size`` P
``blocks.{i}`` count                             ``num_hidden_layers``
``rope_embed.periods`` (D / H / 4,)              ``num_attention_heads`` H; its values
                                                 ``rope_theta`` ** (4 i / head width)
``storage_tokens`` (1, R, D)                     ``num_register_tokens`` R
``mlp.fc1`` (M, D) / ``mlp.w1``, ``w2`` (M, D)   ``intermediate_size`` M, ``use_gated_mlp``
                                                 (``hidden_act`` gelu / silu)
``attn.qkv.bias`` + ``bias_mask``                ``query_bias``, ``value_bias``; ``key_bias`` false
                                                 (the mask zeroes it); without the mask true
``attn.proj.bias``, ``mlp.*.bias``               ``proj_bias``, ``mlp_bias``
``norm_layer`` (not in the shapes)               ``layer_norm_eps``: layernormbf16 1e-5 (every
                                                 published DINOv3), layernorm 1e-6
``img_size`` (not in the shapes: RoPE)           ``image_size`` (224 unless given)
``pos_embed_rope_{shift,jitter,rescale}_coords`` ``pos_embed_{shift,jitter,rescale}`` (training only)
==============================================  ==============================================

``--model-name`` (a torch-hub entry point, ``mappings/dinov3/hub_models.json``) or
``--model-config`` (DinoVisionTransformer keyword arguments as JSON) are checked against the
shapes; values that neither the weights nor the user give take the published models' values
(``defaults`` in ``hub_models.json``), not DinoVisionTransformer's own defaults.

timm's ``config.json`` names an architecture (``mappings/dinov3/timm_archs.json``, made by
``tools/make_timm_archs.py`` from the installed timm) and ``model_args`` that override it;
writing timm picks the architecture of the same MLP kind and qkv-bias kind with the nearest
width and records what differs, so ``timm.create_model("local-dir:DIR", pretrained=True)``
builds exactly this model.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ClawError
from . import Extras, FormatCodec, Shapes
from .clip import _mlp_ratio, write_json
from .dinov2 import (IMAGENET_MEAN, IMAGENET_STD, TorchHubViT, _pair, _shape, _square, mask_token_note,
                     screen_timm_args, timm_config_json)

WHAT = "DINOv3"
HF_CLASS = "DINOv3ViTModel"
NORM_EPS = {"layernormbf16": 1e-5, "layernorm": 1e-6}      # DinoVisionTransformer norm_layer -> LayerNorm eps
SWIGLU_ALIGN = {"swiglu": 8, "swiglu32": 32, "swiglu64": 64, "swiglu128": 128}   # SwiGLUFFN align_to
ORIGINAL_KWARGS = ("img_size", "patch_size", "in_chans", "pos_embed_rope_base", "pos_embed_rope_min_period",
                   "pos_embed_rope_max_period", "pos_embed_rope_normalize_coords", "pos_embed_rope_shift_coords",
                   "pos_embed_rope_jitter_coords", "pos_embed_rope_rescale_coords", "pos_embed_rope_dtype",
                   "embed_dim", "depth", "num_heads", "ffn_ratio", "qkv_bias", "drop_path_rate", "layerscale_init",
                   "norm_layer", "ffn_layer", "ffn_bias", "proj_bias", "n_storage_tokens", "mask_k_bias",
                   "untie_cls_and_patch_norms", "untie_global_and_local_cls_norm")
# training-time RoPE augmentations: original kwarg, timm model_args key, DINOv3ViTConfig field
ROPE_TRAINING = (("pos_embed_rope_shift_coords", "rope_shift_coords", "pos_embed_shift"),
                 ("pos_embed_rope_jitter_coords", "rope_jitter_coords", "pos_embed_jitter"),
                 ("pos_embed_rope_rescale_coords", "rope_rescale_coords", "pos_embed_rescale"))


def _data(name: str) -> dict:
    return json.loads(resources.files("clawconvert.mappings").joinpath(f"dinov3/{name}").read_text())


@lru_cache(maxsize=1)
def hub_models() -> dict[str, dict]:
    """torch-hub entry point -> its DinoVisionTransformer kwargs (``mappings/dinov3/hub_models.json``)."""
    data = _data("hub_models.json")
    return {name: {**data["defaults"], **kw} for name, kw in data["models"].items()}


def published() -> dict[str, Any]:
    """The kwargs every published DINOv3 ViT shares: the values taken for what nobody says."""
    return dict(_data("hub_models.json")["defaults"])


def _refuse(why: str) -> ClawError:
    return ClawError(f"not representable as transformers {HF_CLASS} because {why}")


def _float(value: Any) -> float | None:
    return None if value is None else float(value)


# ------------------------------------------------------------------------------------
# the canonical config
# ------------------------------------------------------------------------------------
def swiglu_hidden(width: int, ratio: float, align: int) -> int:
    """The SwiGLU width facebookresearch's SwiGLUFFN builds from ``ffn_ratio`` and ``align_to``."""
    d = int(int(width * ratio) * 2 / 3)
    return d + (-d % align)


def make_config(width: int, depth: int, heads: int, intermediate: int, gated: bool, regs: int, *,
                qkv_bias: bool = True, key_bias: bool = False, proj_bias: bool = True, mlp_bias: bool = True,
                theta: float = 100.0, eps: float = 1e-5, image: int = 224, patch: int = 16, channels: int = 3,
                shift: float | None = None, jitter: float | None = None, rescale: float | None = 2.0,
                drop_path: float = 0.0):
    """A DINOv3ViTConfig-like HFConfig from the architecture's numbers."""
    from ..hfconfig import make

    if heads <= 0 or width % heads or (width // heads) % 4:
        raise _refuse(f"{heads} heads on a width of {width} do not give a head width that is a multiple of 4 "
                      f"(2D RoPE needs one)")
    return make("dinov3_vit", hidden_size=width, num_hidden_layers=depth, num_attention_heads=heads,
                intermediate_size=intermediate, hidden_act="silu" if gated else "gelu", layer_norm_eps=float(eps),
                rope_theta=float(theta), image_size=image, patch_size=patch, num_channels=channels,
                query_bias=qkv_bias, key_bias=bool(qkv_bias and key_bias), value_bias=qkv_bias, proj_bias=proj_bias,
                mlp_bias=mlp_bias, use_gated_mlp=gated, num_register_tokens=regs, pos_embed_shift=_float(shift),
                pos_embed_jitter=_float(jitter), pos_embed_rescale=_float(rescale), drop_path_rate=drop_path)


def head_dim(config) -> int:
    return config.hidden_size // config.num_attention_heads


def check_hf(config, where: str) -> None:
    """What the tables cannot see: activations and bias flags DINOv3 has one value for."""
    act = "silu" if config.use_gated_mlp else "gelu"
    if config.hidden_act != act:
        raise ClawError(f"not representable {where} because hidden_act={config.hidden_act!r}: DINOv3's "
                        f"{'SwiGLU' if config.use_gated_mlp else 'MLP'} uses {act}")
    if config.query_bias != config.value_bias or (config.key_bias and not config.query_bias):
        raise ClawError(f"not representable {where} because query_bias={config.query_bias}, key_bias="
                        f"{config.key_bias}, value_bias={config.value_bias}: DINOv3 has one qkv bias (its k part "
                        f"masked or not)")
    if head_dim(config) % 4:
        raise ClawError(f"not representable {where} because the head width {head_dim(config)} is not a multiple of 4")


# ------------------------------------------------------------------------------------
# original (facebookresearch torch hub): the architecture from shapes, checked against a config
# ------------------------------------------------------------------------------------
def infer_original(store) -> dict[str, Any]:
    """DinoVisionTransformer kwargs a torch-hub state dict's shapes say (plus ``hidden``, ``local_cls_norm``)."""
    def shape(key, rank):
        return _shape(store, key, rank, WHAT)

    d, c, p1, p2 = shape("patch_embed.proj.weight", 4)
    if p1 != p2:
        raise ClawError(f"{store.path}: not representable: patch_embed.proj.weight {(d, c, p1, p2)} is not a square patch")
    if shape("cls_token", 3) != (1, 1, d):
        raise ClawError(f"{store.path}: shapes contradict each other: patch embedding width {d}, cls_token "
                        f"{store.info('cls_token').shape}")
    (n,) = shape("rope_embed.periods", 1)
    if n == 0 or d % (4 * n):
        raise ClawError(f"{store.path}: rope_embed.periods has {n} entries: a head {4 * n} wide does not divide the "
                        f"width {d}")
    if "cls_norm.weight" in store:
        raise ClawError(f"{store.path}: " + str(_refuse("it has cls_norm (untie_cls_and_patch_norms): transformers "
                                                        "normalises the class, register and patch tokens with one norm")))
    blocks = sorted({int(k.split(".")[1]) for k in store.keys() if k.startswith("blocks.") and k.split(".")[1].isdigit()})
    if not blocks or blocks != list(range(len(blocks))):
        raise ClawError(f"{store.path}: the blocks are not numbered 0..N-1 (found {blocks[:8]}); "
                        f"a DINOv3 torch-hub state dict has blocks.0 ... blocks.N-1")
    b = "blocks.0."
    if b + "ls1.gamma" not in store:
        raise ClawError(f"{store.path}: " + str(_refuse("the blocks have no LayerScale (blocks.0.ls1.gamma; "
                                                        "layerscale_init None)")))
    if b + "norm1.bias" not in store or "norm.bias" not in store:
        raise ClawError(f"{store.path}: " + str(_refuse("the norms have no bias (norm_layer rmsnorm): "
                                                        "transformers' DINOv3 uses LayerNorm")))
    if shape(b + "attn.qkv.weight", 2) != (3 * d, d):
        raise ClawError(f"{store.path}: blocks.0.attn.qkv.weight {store.info(b + 'attn.qkv.weight').shape} is not "
                        f"(3 x {d}, {d})")
    if b + "mlp.w1.weight" in store:
        hidden, d3 = shape(b + "mlp.w1.weight", 2)
        ffn, ffn_bias = "swiglu", b + "mlp.w1.bias" in store
    elif b + "mlp.fc1.weight" in store:
        hidden, d3 = shape(b + "mlp.fc1.weight", 2)
        ffn, ffn_bias = "mlp", b + "mlp.fc1.bias" in store
    else:
        raise ClawError(f"{store.path}: blocks.0.mlp has neither fc1 (Mlp) nor w1 / w2 / w3 (SwiGLUFFN)")
    if d3 != d:
        raise ClawError(f"{store.path}: shapes contradict each other: the MLP takes {d3}, the model is {d} wide")
    regs = 0
    if "storage_tokens" in store:
        one, regs, d4 = shape("storage_tokens", 3)
        if (one, d4) != (1, d):
            raise ClawError(f"{store.path}: storage_tokens {(one, regs, d4)} is not (1, R, {d})")
    qkv_bias = b + "attn.qkv.bias" in store
    return dict(embed_dim=d, depth=len(blocks), num_heads=d // (4 * n), patch_size=p1, in_chans=c,
                n_storage_tokens=regs, ffn_layer=ffn, hidden=hidden, ffn_bias=ffn_bias, qkv_bias=qkv_bias,
                mask_k_bias=qkv_bias and b + "attn.qkv.bias_mask" in store, proj_bias=b + "attn.proj.bias" in store,
                local_cls_norm="local_cls_norm.weight" in store)


def _declared_hidden(width: int, kw: dict, kind: str) -> int:
    ratio = float(kw.get("ffn_ratio", 4.0))
    if kind == "swiglu":
        return swiglu_hidden(width, ratio, SWIGLU_ALIGN.get(str(kw.get("ffn_layer", "swiglu")), 8))
    return int(width * ratio)


def _contradictions(inferred: dict, declared: dict) -> list[str]:
    wrong = []
    for key in ("embed_dim", "depth", "num_heads", "patch_size", "in_chans", "n_storage_tokens"):
        if key in declared and int(declared[key]) != inferred[key]:
            wrong.append(f"{key} {declared[key]} there, {inferred[key]} in the weights")
    for key in ("qkv_bias", "proj_bias", "ffn_bias"):
        if key in declared and bool(declared[key]) != inferred[key]:
            wrong.append(f"{key} {bool(declared[key])} there, {inferred[key]} in the weights")
    if "mask_k_bias" in declared and inferred["qkv_bias"] and bool(declared["mask_k_bias"]) != inferred["mask_k_bias"]:
        wrong.append(f"mask_k_bias {bool(declared['mask_k_bias'])} there, {inferred['mask_k_bias']} in the weights "
                     f"(blocks.N.attn.qkv.bias_mask)")
    kind = str(declared.get("ffn_layer", inferred["ffn_layer"]))
    kind = "swiglu" if kind.startswith("swiglu") else kind
    if kind != inferred["ffn_layer"]:
        wrong.append(f"ffn_layer {declared['ffn_layer']} there, {inferred['ffn_layer']} in the weights")
    elif "ffn_ratio" in declared or "ffn_layer" in declared:
        want = _declared_hidden(inferred["embed_dim"], declared, kind)
        if want != inferred["hidden"]:
            wrong.append(f"an MLP {want} wide there, {inferred['hidden']} in the weights")
    if "layerscale_init" in declared and not declared["layerscale_init"]:
        wrong.append("no LayerScale there (layerscale_init), LayerScale in the weights")
    if declared.get("norm_layer") == "rmsnorm":
        wrong.append("norm_layer rmsnorm there, LayerNorm (with a bias) in the weights")
    if declared.get("untie_cls_and_patch_norms"):
        wrong.append("untie_cls_and_patch_norms there, no cls_norm in the weights")
    return wrong


def rope_theta_of(store, width: int, heads: int, declared: float | None) -> float:
    """``rope_theta`` from the periods buffer: the declared base, else 100, else the one its values say."""
    from ..ops import rope_periods

    hd = width // heads
    info = store.info("rope_embed.periods")
    got = np.asarray(store.read("rope_embed.periods"), dtype=np.float64)
    rtol = 1e-6 if info.dtype.itemsize >= 4 else 1e-2

    def fits(theta: float) -> bool:
        return bool(np.allclose(got, rope_periods(theta, hd), rtol=rtol, atol=0))

    if declared is not None:
        if fits(float(declared)):
            return float(declared)
        raise ClawError(f"{store.path}: rope_embed.periods {got[:4].tolist()}... are not pos_embed_rope_base "
                        f"{declared} ** (4 i / {hd})")
    if fits(100.0):
        return 100.0
    n = got.size
    if n > 1 and np.all(np.isfinite(got)) and got[-1] > 0:
        estimate = float(f"{got[-1] ** (n / (n - 1)):.7g}")     # the last period is theta ** ((n - 1) / n)
        if fits(estimate):
            return estimate
    raise ClawError(f"{store.path}: " + str(_refuse(
        f"rope_embed.periods {got[:4].tolist()}... are not theta ** (4 i / {hd}) for any theta "
        f"(pos_embed_rope_min_period / max_period): transformers' DINOv3ViTConfig has only rope_theta")))


def read_original(store, declared: dict | None = None, origin: str = "") -> Any:
    """The canonical config of a torch-hub state dict; ``declared`` (``--model-name`` / ``--model-config``)
    must agree with the shapes."""
    inferred = infer_original(store)
    declared = dict(declared or {})
    unknown = sorted(set(declared) - set(ORIGINAL_KWARGS) - {"_about"})
    if unknown:
        raise ClawError(f"{origin}: not a DINOv3 model config: unknown key '{unknown[0]}' "
                        f"(DinoVisionTransformer takes {', '.join(ORIGINAL_KWARGS)})")
    wrong = _contradictions(inferred, declared)
    if wrong:
        raise ClawError(f"{store.path}: shapes contradict {origin}: {'; '.join(wrong)}")
    given = {**published(), **declared}   # what neither the weights nor the user say: the published models' value
    norm = str(given["norm_layer"])
    if norm not in NORM_EPS:
        raise ClawError(f"{origin}: norm_layer {norm!r}: DinoVisionTransformer knows {', '.join(NORM_EPS)}, rmsnorm")
    for key, want, why in (("pos_embed_rope_normalize_coords", "separate", "transformers normalises the patch "
                            "coordinates of each side by that side ('separate')"),
                           ("pos_embed_rope_dtype", "fp32", "transformers computes RoPE in float32"),
                           ("pos_embed_rope_min_period", None, "transformers' RoPE has only rope_theta"),
                           ("pos_embed_rope_max_period", None, "transformers' RoPE has only rope_theta")):
        if given.get(key) != want:
            raise ClawError(f"{origin}: " + str(_refuse(f"{key}={given[key]!r}: {why}")))
    theta = rope_theta_of(store, inferred["embed_dim"], inferred["num_heads"], declared.get("pos_embed_rope_base"))
    return make_config(inferred["embed_dim"], inferred["depth"], inferred["num_heads"], inferred["hidden"],
                       inferred["ffn_layer"] == "swiglu", inferred["n_storage_tokens"], qkv_bias=inferred["qkv_bias"],
                       key_bias=inferred["qkv_bias"] and not inferred["mask_k_bias"], proj_bias=inferred["proj_bias"],
                       mlp_bias=inferred["ffn_bias"], theta=theta, eps=NORM_EPS[norm],
                       image=_square(given["img_size"], "img_size"), patch=inferred["patch_size"],
                       channels=inferred["in_chans"], shift=given["pos_embed_rope_shift_coords"],
                       jitter=given["pos_embed_rope_jitter_coords"], rescale=given["pos_embed_rope_rescale_coords"],
                       drop_path=given["drop_path_rate"])


def _original_ffn(config) -> tuple[str, float]:
    """(ffn_layer, ffn_ratio) that build this MLP width; the published models' own spelling first."""
    width, hidden = config.hidden_size, config.intermediate_size
    if not config.use_gated_mlp:
        return "mlp", _mlp_ratio(width, hidden)
    tries = [(kw["ffn_layer"], kw["ffn_ratio"]) for kw in hub_models().values()
             if kw["embed_dim"] == width and kw["ffn_layer"].startswith("swiglu")]
    ratio = hidden * 1.5 / width
    tries += [(name, r) for name in SWIGLU_ALIGN for r in (ratio, math.nextafter(ratio, math.inf))]
    for name, r in tries:
        if swiglu_hidden(width, r, SWIGLU_ALIGN[name]) == hidden:
            return name, float(r)
    raise ClawError(f"not representable in the original DINOv3 layout because the SwiGLU MLP is {hidden} wide on a "
                    f"width of {width}: SwiGLUFFN builds a multiple of 8 from int(ffn_ratio * {width}) * 2 / 3")


def config_to_original(config) -> dict[str, Any]:
    """DinoVisionTransformer kwargs that build this model (what ``--model-config`` reads back)."""
    check_hf(config, "in the original DINOv3 layout")
    norm = next((n for n, eps in NORM_EPS.items() if math.isclose(config.layer_norm_eps, eps, rel_tol=1e-9)), None)
    if norm is None:
        raise ClawError(f"not representable in the original DINOv3 layout because layer_norm_eps="
                        f"{config.layer_norm_eps}: DinoVisionTransformer's LayerNorms use 1e-5 or 1e-6")
    ffn, ratio = _original_ffn(config)
    return dict(img_size=_square(config.image_size, "image_size"), patch_size=_square(config.patch_size, "patch_size"),
                in_chans=config.num_channels, pos_embed_rope_base=float(config.rope_theta),
                pos_embed_rope_min_period=None, pos_embed_rope_max_period=None,
                pos_embed_rope_normalize_coords="separate", pos_embed_rope_shift_coords=config.pos_embed_shift,
                pos_embed_rope_jitter_coords=config.pos_embed_jitter,
                pos_embed_rope_rescale_coords=config.pos_embed_rescale, pos_embed_rope_dtype="fp32",
                embed_dim=config.hidden_size, depth=config.num_hidden_layers, num_heads=config.num_attention_heads,
                ffn_ratio=ratio, qkv_bias=config.query_bias, drop_path_rate=config.drop_path_rate,
                layerscale_init=1e-05, norm_layer=norm, ffn_layer=ffn, ffn_bias=config.mlp_bias,
                proj_bias=config.proj_bias, n_storage_tokens=config.num_register_tokens,
                mask_k_bias=bool(config.query_bias and not config.key_bias), untie_cls_and_patch_norms=False,
                untie_global_and_local_cls_norm=False)


# kwargs a torch-hub entry point may differ in and still load the file into the same model
HUB_FREE = ("img_size", "drop_path_rate", "layerscale_init", "pos_embed_rope_shift_coords",
            "pos_embed_rope_jitter_coords", "pos_embed_rope_rescale_coords", "untie_global_and_local_cls_norm")


def hub_name_for(kw: dict[str, Any]) -> str | None:
    """The torch-hub entry point that builds exactly this model from the file, if any."""
    def same(hub: dict) -> bool:
        keys = [k for k in kw if k not in HUB_FREE and (k != "mask_k_bias" or kw["qkv_bias"])]
        return all(hub.get(k) == kw[k] for k in keys) and not hub["untie_global_and_local_cls_norm"]
    return next((name for name, hub in hub_models().items() if same(hub)), None)


# ------------------------------------------------------------------------------------
# timm: architectures (data) and config.json <-> canonical config
# ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TimmArch:
    """What a registered timm DINOv3 architecture fixes (``mappings/dinov3/timm_archs.json``)."""

    name: str
    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float        # hidden_features = int(embed_dim * mlp_ratio), SwiGLU: then aligned to swiglu_align_to
    swiglu_mlp: bool
    swiglu_align_to: int
    qkv_bias: bool          # q_bias and v_bias (the _qkvb models); k_bias is a zero buffer
    num_reg_tokens: int
    patch_size: int
    img_size: int
    in_chans: int
    rope_temperature: float
    norm_eps: float         # partial(LayerNorm, eps=...): a config.json cannot name another
    init_values: float | None


@lru_cache(maxsize=1)
def timm_archs() -> dict[str, TimmArch]:
    return {r["name"]: TimmArch(**r) for r in _data("timm_archs.json")["architectures"]}


TIMM_ARGS = ("embed_dim", "depth", "num_heads", "mlp_ratio", "swiglu_mlp", "swiglu_align_to", "qkv_bias",
             "num_reg_tokens", "patch_size", "img_size", "in_chans", "rope_temperature", "init_values")
# model_args keys that change nothing in the weights or forward_features (training, init, pooling head)
TIMM_IGNORED = ("drop_rate", "pos_drop_rate", "patch_drop_rate", "proj_drop_rate", "attn_drop_rate", "drop_path_rate",
                "dynamic_img_size", "dynamic_img_pad", "head_init_scale", "ref_feat_shape", "num_classes",
                "global_pool", "weight_init")
# model_args keys whose only value DINOv3 has (what every registered vit_*_dinov3 builds); None: any
TIMM_FIXED = {"class_token": True, "qkv_fused": True, "qk_norm": False, "scale_mlp": False, "scale_attn_inner": False,
              "attn_type": "eva", "use_abs_pos_emb": False, "use_rot_pos_emb": True, "rope_type": "dinov3",
              "rope_rotate_half": True, "rope_grid_offset": 0.0, "rope_grid_indexing": "ij", "use_post_norm": False,
              "use_pre_transformer_norm": False, "use_fc_norm": False, "num_kv_heads": None,
              "attn_only_layer_scale": False, "no_embed_class": None, "use_post_transformer_norm": None}
TIMM_POOLS = ("token", "avg", "", "avgmax", "max")     # "map" adds an attention-pool head


def _timm_refuse(key: str, value: Any, why: str) -> ClawError:
    return _refuse(f"timm {key}={value!r}: {why}")


def timm_effective(cfg: dict) -> tuple[TimmArch, dict[str, Any]]:
    """The architecture a timm ``config.json`` names and the arguments it is built with."""
    training = tuple(timm_key for _, timm_key, _ in ROPE_TRAINING)
    arch, args = screen_timm_args(cfg, timm_archs(), "DINOv3", "DINOv3ViTModel", TIMM_ARGS + training, TIMM_IGNORED,
                                  TIMM_FIXED, _timm_refuse)
    eff = {k: getattr(arch, k) for k in TIMM_ARGS}
    eff.update({k: v for k, v in args.items() if k in TIMM_ARGS})
    eff.update({k: args.get(k) for k in training})
    eff["drop_path_rate"] = args.get("drop_path_rate", 0.0)
    if not eff["init_values"]:
        raise _timm_refuse("model_args.init_values", eff["init_values"], "no LayerScale; DINOv3ViTModel always has one")
    if eff["swiglu_mlp"] and not eff["swiglu_align_to"]:
        raise _timm_refuse("model_args.swiglu_align_to", 0, "timm then packs gate and up into one fc1 (GluMlp), "
                                                             "which no DINOv3 layout has")
    pool = args.get("global_pool", cfg.get("global_pool", "avg"))
    if pool not in TIMM_POOLS:
        raise _timm_refuse("global_pool", pool, "an attention-pooling head; DINOv3ViTModel has none")
    return arch, eff


def _timm_hidden(width: int, ratio: float, swiglu: bool, align: int) -> int:
    hidden = int(width * ratio)
    return hidden + (-hidden % align) if swiglu and align else hidden


def timm_to_config(cfg: dict):
    arch, eff = timm_effective(cfg)
    width, swiglu = int(eff["embed_dim"]), bool(eff["swiglu_mlp"])
    return make_config(width, int(eff["depth"]), int(eff["num_heads"]),
                       _timm_hidden(width, float(eff["mlp_ratio"]), swiglu, int(eff["swiglu_align_to"])), swiglu,
                       int(eff["num_reg_tokens"]), qkv_bias=bool(eff["qkv_bias"]), theta=float(eff["rope_temperature"]),
                       eps=arch.norm_eps, image=_square(eff["img_size"], "model_args.img_size"),
                       patch=_square(eff["patch_size"], "model_args.patch_size"), channels=int(eff["in_chans"]),
                       shift=eff["rope_shift_coords"], jitter=eff["rope_jitter_coords"],
                       rescale=eff["rope_rescale_coords"], drop_path=eff["drop_path_rate"])


def timm_pool(cfg: dict) -> str:
    args = cfg.get("model_args") or {}
    return str(args.get("global_pool", cfg.get("global_pool", "avg")))


def choose_timm_arch(config) -> TimmArch:
    """The registered architecture of the same MLP and qkv-bias kind with the nearest width."""
    same = [a for a in timm_archs().values() if a.swiglu_mlp == bool(config.use_gated_mlp)
            and a.qkv_bias == bool(config.query_bias)]
    if not same:
        raise ClawError(f"this timm table has no DINOv3 architecture with a {'SwiGLU' if config.use_gated_mlp else 'GELU'}"
                        f" MLP and {'a' if config.query_bias else 'no'} qkv bias; regenerate it with "
                        f"tools/make_timm_archs.py")
    return min(same, key=lambda a: (abs(a.embed_dim - config.hidden_size), a.name))


def config_to_timm(config, preprocess: dict | None = None) -> dict[str, Any]:
    """timm's ``config.json`` (as ``save_for_hf`` writes it) for this model."""
    check_hf(config, "as a timm DINOv3")
    for flag, bad, why in (("key_bias", True, "timm's k bias is a zero buffer"),
                           ("proj_bias", False, "timm's attention projection always has a bias"),
                           ("mlp_bias", False, "timm's MLP always has biases")):
        if getattr(config, flag) == bad:
            raise ClawError(f"not representable as a timm DINOv3 because {flag}={bad}: {why}")
    arch = choose_timm_arch(config)
    if not math.isclose(config.layer_norm_eps, arch.norm_eps, rel_tol=1e-9):
        raise ClawError(f"not representable as a timm DINOv3 because layer_norm_eps={config.layer_norm_eps}: timm's "
                        f"DINOv3 architectures fix LayerNorm eps {arch.norm_eps:g}, and a config.json cannot name "
                        f"another norm layer")
    width, hidden = config.hidden_size, config.intermediate_size
    size = _square(config.image_size, "image_size")
    want: dict[str, Any] = dict(embed_dim=width, depth=config.num_hidden_layers, num_heads=config.num_attention_heads,
                                num_reg_tokens=config.num_register_tokens,
                                patch_size=_square(config.patch_size, "patch_size"), img_size=size,
                                in_chans=config.num_channels, rope_temperature=float(config.rope_theta))
    args = {k: v for k, v in want.items() if v != getattr(arch, k)}
    align = arch.swiglu_align_to if arch.swiglu_mlp else 0
    if _timm_hidden(width, arch.mlp_ratio, arch.swiglu_mlp, align) != hidden:
        args["mlp_ratio"] = _mlp_ratio(width, hidden)
        if align and hidden % align:
            args["swiglu_align_to"] = 1          # SwiGLU without rounding the width up (0 would pack fc1)
    for _, timm_key, hf in ROPE_TRAINING:
        if getattr(config, hf) is not None:
            args[timm_key] = getattr(config, hf)
    if "img_size" in args:
        args["img_size"] = [size, size]
    args["global_pool"] = "token"     # timm's DINOv3 pools by average; transformers' pooler_output is the class token
    return timm_config_json(arch.name, width, args, config.num_channels, size,
                            {**default_preprocess(), **(preprocess or {})}, fixed_input_size=False)


def claims_timm(cfg: dict) -> bool:
    return str(cfg.get("architecture")) in timm_archs()


def default_preprocess() -> dict[str, Any]:
    """facebook/dinov3-*: ImageNet mean / std, a bilinear resize to the square image size."""
    return {"mean": IMAGENET_MEAN, "std": IMAGENET_STD, "interpolation": "bilinear", "crop_pct": 1.0}


def scan_timm_archs() -> tuple[TimmArch, ...]:
    """Every registered timm DINOv3 ViT, as the installed timm builds it (imports timm).

    The conversion path reads the same facts from ``mappings/dinov3/timm_archs.json`` (written by
    ``tools/make_timm_archs.py``; the tests check it against timm).  Each registered function is
    called with ``_create_eva`` replaced by a recorder, so the arguments are the ones it passes,
    over ``Eva``'s own defaults; a row refuses any argument DINOv3's layout does not fix."""
    import inspect

    import timm
    from timm.models import eva

    defaults = {k: p.default for k, p in inspect.signature(eva.Eva.__init__).parameters.items()}
    seen: dict[str, dict] = {}
    real = eva._create_eva
    try:
        eva._create_eva = lambda variant, pretrained=False, **kw: seen.__setitem__(variant, kw)
        for name in timm.list_models("vit_*_dinov3*"):
            timm.models.model_entrypoint(name)()
    finally:
        eva._create_eva = real
    out = []
    for name, kw in sorted(seen.items()):
        args = {**defaults, **kw}
        for key, value in TIMM_FIXED.items():
            if value is not None and key in args and args[key] != value:
                raise ClawError(f"timm {name}: {key}={args[key]!r}, which the DINOv3 layout does not have")
        norm = args["norm_layer"]
        out.append(TimmArch(name, int(args["embed_dim"]), int(args["depth"]), int(args["num_heads"]),
                            float(args["mlp_ratio"]), bool(args["swiglu_mlp"]), int(args["swiglu_align_to"]),
                            bool(args["qkv_bias"]), int(args["num_reg_tokens"]), int(args["patch_size"]),
                            int(args["img_size"]), int(args["in_chans"]), float(args["rope_temperature"]),
                            float(getattr(norm, "keywords", {}).get("eps", 1e-6)), args["init_values"]))
    return tuple(out)


# ------------------------------------------------------------------------------------
# the family
# ------------------------------------------------------------------------------------
def masked_key_bias_note(ckpt) -> list[str]:
    """The k third of a masked qkv bias is not kept: say so when it was not zeros."""
    if ckpt.format != "original" or not ckpt.table_params()["masked_key_bias"]:
        return []
    d = ckpt.config.hidden_size
    for i in range(ckpt.config.num_hidden_layers):
        if np.asarray(ckpt.store.read(f"blocks.{i}.attn.qkv.bias")[d:2 * d], dtype=np.float32).any():
            return ["the k third of blocks.N.attn.qkv.bias is masked out by bias_mask (multiplied by 0 in every forward "
                    "pass) and is not kept: written back to the original layout it is zeros, the same model"]
    return []


class Dinov3Family(TorchHubViT):
    name = "dinov3"
    display_name = "DINOv3"
    hub_prefix = "dinov3_"
    hf_model_types = ("dinov3_vit",)
    original_sentinels = ("rope_embed.periods", "patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "cls_token")
    timm_reader = "timm.models.eva"
    timm_reader_needs = ("storage_tokens",)   # without it, timm reads the file as an EVA masked-image checkpoint
    foreign_keys = {"embeddings.patch_embeddings.weight": "a transformers DINOv3", "blocks.0.gamma_1": "a timm DINOv3"}

    def __init__(self) -> None:
        super().__init__()
        self.codecs["original"] = FormatCodec(read=read_original, write=config_to_original)
        self.codecs["timm"] = FormatCodec(read=timm_to_config, write=config_to_timm, claims=claims_timm)

    def hub_models(self) -> dict[str, dict]:
        return hub_models()

    def hf_architecture(self, config) -> str:
        return HF_CLASS

    def tower_architecture(self, tower: str, with_projection: bool) -> str:
        return HF_CLASS

    def params(self, config) -> dict[str, Any]:
        gated, mlp_bias = bool(config.use_gated_mlp), bool(config.mlp_bias)
        return {"layers": config.num_hidden_layers, "D": config.hidden_size, "head_dim": head_dim(config),
                "rope_theta": float(config.rope_theta), "registers": config.num_register_tokens > 0, "gated": gated,
                "query_bias": bool(config.query_bias), "key_bias": bool(config.key_bias),
                "value_bias": bool(config.value_bias), "proj_bias": bool(config.proj_bias), "mlp_bias": mlp_bias,
                "masked_key_bias": bool(config.query_bias and not config.key_bias),
                "plain_bias": mlp_bias and not gated, "gated_bias": mlp_bias and gated, "layers_at": "layer"}

    def canonical_shapes(self, config) -> dict[str, tuple[int, ...]]:
        """The transformers 5 model's state dict, from the config (tests compare it with the model on ``meta``)."""
        D, L, H, M = config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.intermediate_size
        if (D // H) * H != D:
            raise ValueError(f"hidden_size {D} is not a multiple of num_attention_heads {H}")
        ph, pw = _pair(config.patch_size)
        s = Shapes()
        s.add("embeddings.cls_token", (1, 1, D))
        s.add("embeddings.mask_token", (1, 1, D))
        s.add("embeddings.register_tokens", (1, config.num_register_tokens, D))
        s.add("embeddings.patch_embeddings.weight", (D, config.num_channels, ph, pw))
        s.add("embeddings.patch_embeddings.bias", (D,))
        for i in range(L):
            p = f"model.layer.{i}"
            s.norm(f"{p}.norm1", D)
            for proj, bias in (("k_proj", config.key_bias), ("v_proj", config.value_bias),
                               ("q_proj", config.query_bias), ("o_proj", config.proj_bias)):
                s.linear(f"{p}.attention.{proj}", D, D, bias=bool(bias))
            s.add(f"{p}.layer_scale1.lambda1", (D,))
            s.norm(f"{p}.norm2", D)
            if config.use_gated_mlp:
                s.linear(f"{p}.mlp.gate_proj", M, D, bias=bool(config.mlp_bias))
            s.linear(f"{p}.mlp.up_proj", M, D, bias=bool(config.mlp_bias))
            s.linear(f"{p}.mlp.down_proj", D, M, bias=bool(config.mlp_bias))
            s.add(f"{p}.layer_scale2.lambda1", (D,))
        s.norm("norm", D)
        return dict(s)

    def refine(self, ckpt) -> None:
        """HF sources: which key spelling the file uses (``layer.N``, the Hub's, or ``model.layer.N``)."""
        if ckpt.format == "hf":
            keys = ckpt.store.keys()
            modern = any(k.startswith("model.layer.") for k in keys)
            legacy = any(k.startswith("layer.") for k in keys)
            if modern and legacy:
                raise ClawError(f"{ckpt.path}: mixes the layer.N spelling (the Hub's files, transformers' default "
                                f"save) with model.layer.N (save_original_format=False); write it again with one")
            ckpt.params["layers_at"] = "model.layer" if modern else "layer"
        ckpt.extras.preprocess = {**default_preprocess(), **ckpt.extras.preprocess}

    def target_notes(self, ckpt, target: str) -> list[str]:
        notes = masked_key_bias_note(ckpt)
        if ckpt.format == "original" and "local_cls_norm.weight" in ckpt.store:
            notes.append("local_cls_norm (untie_global_and_local_cls_norm: the norm of local crops, used only in "
                         "training) has no place in the target and is not written")
        if ckpt.format == "timm" and timm_pool(json.loads((Path(ckpt.path) / "config.json").read_text())) != "token":
            notes.append("the timm model pools by average (global_pool); transformers' pooler_output is the class "
                         "token, as facebookresearch's x_norm_clstoken")
        if target == "timm":
            notes += mask_token_note(ckpt)
        if target == "original":
            kw = config_to_original(ckpt.config)
            name = hub_name_for(kw)    # (not the 7B's: it expects local_cls_norm, which is not written)
            build = (f"torch.hub.load('facebookresearch/dinov3', '{name}', source='github', weights=PATH)" if name else
                     "dinov3.models.vision_transformer.DinoVisionTransformer(" +
                     ", ".join(f"{k}={v!r}" for k, v in kw.items()) + ").load_state_dict(torch.load(PATH))")
            notes.append(f"load it with {build}")
        return notes

    def write_hf_tower_extras(self, out_dir: Path, config, extras: Extras, tower: str) -> list[str]:
        """``preprocessor_config.json`` of transformers' DINOv3 image processor, as facebook/dinov3-* carry it."""
        pre = {**default_preprocess(), **extras.preprocess}
        size = _square(config.image_size, "image_size")
        write_json(Path(out_dir) / "preprocessor_config.json", {
            "do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": list(pre["mean"]),
            "image_processor_type": "DINOv3ViTImageProcessorFast", "image_std": list(pre["std"]),
            "resample": {"bicubic": 3, "bilinear": 2, "nearest": 0}.get(pre.get("interpolation"), 2),
            "rescale_factor": 1 / 255, "size": {"height": size, "width": size}})
        return []


FAMILY = Dinov3Family()
