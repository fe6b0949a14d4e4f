"""DINOv2 ViT (with and without registers): canonical keys are transformers 5's ``Dinov2Model`` /
``Dinov2WithRegistersModel`` state dicts; tables in ``mappings/dinov2/``.

Three layouts, side by side in ``docs/dinov2.md``: facebookresearch's torch-hub state dicts
(``original``), timm's ``vit_*_patch14[_reg4]_dinov2`` (``timm``) and transformers (``hf``, both
key spellings).  The model is one image tower: ``extract-visual`` is a conversion.

Config translation
==================

The original ``.pth`` carries no config: the architecture is read from tensor SHAPES
(:func:`infer_original`), and ``--model-name`` (a torch-hub entry point, ``hub_models.json``) or
``--model-config`` (DinoVisionTransformer keyword arguments as JSON) add the head count and are
checked against the shapes.

==============================================  ==============================================
original tensor / DinoVisionTransformer kwarg    Dinov2Config / Dinov2WithRegistersConfig
==============================================  ==============================================
``patch_embed.proj.weight`` (D, C, P, P)         ``hidden_size`` D, ``num_channels`` C, ``patch_size`` P
``pos_embed`` (1, 1 + g * g, D)                  ``image_size`` g * P
``blocks.{i}`` count                             ``num_hidden_layers``
``num_heads`` (not in the shapes)                ``num_attention_heads``; without a config D / 64
                                                 (every published DINOv2 has 64-wide heads)
``mlp.fc1`` (M, D), M = r * D                    ``mlp_ratio`` r (an integer in transformers)
``mlp.w12`` (2h, D)                              ``use_swiglu_ffn``, the integer ``mlp_ratio`` r with
                                                 (int(r * D * 2 / 3) + 7) // 8 * 8 == h
``register_tokens`` (1, R, D)                    ``Dinov2WithRegistersModel``, ``num_register_tokens`` R
(always)                                         GELU, LayerNorm eps 1e-6, LayerScale, qkv bias
==============================================  ==============================================

timm's ``config.json`` names an architecture (``mappings/dinov2/timm_archs.json``, what the
installed timm builds for each, made by ``tools/make_timm_archs.py``) and ``model_args`` that
override it; writing timm picks the architecture of the same MLP kind and register-ness with
the nearest width and records what differs in ``model_args``, so ``timm.create_model(
"local-dir:DIR", pretrained=True)`` builds exactly this model.

Register models in timm fold the class position into the class token (``no_embed_class``);
the ``fold`` op (:class:`clawconvert.ops.Fold`) undoes it: timm -> hf -> timm is exact bit for
bit, hf / original -> timm -> back exact in function (every output equal), not in bytes.
"""
from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from ..errors import ClawError
from . import Extras, Family, FormatCodec, Shapes
from .clip import _mlp_ratio, write_json

EPS = 1e-6
HEAD_DIM = 64
IMAGENET_MEAN = (0.485, 0.456, 0.406)    # timm's IMAGENET_DEFAULT_MEAN, what every DINOv2 is trained with
IMAGENET_STD = (0.229, 0.224, 0.225)
MAX_RATIO = 64                           # the integer mlp_ratio values tried for a SwiGLU width
ORIGINAL_KWARGS = ("embed_dim", "depth", "num_heads", "mlp_ratio", "ffn_layer", "num_register_tokens", "img_size",
                   "patch_size", "in_chans", "init_values", "block_chunks", "interpolate_antialias",
                   "interpolate_offset", "qkv_bias", "ffn_bias", "proj_bias", "drop_path_rate", "drop_path_uniform",
                   "arch")


def _data(name: str) -> dict:
    return json.loads(resources.files("clawconvert.mappings").joinpath(f"dinov2/{name}").read_text())


@lru_cache(maxsize=1)
def hub_models() -> dict[str, dict]:
    """torch-hub entry point -> its DinoVisionTransformer kwargs (``mappings/dinov2/hub_models.json``)."""
    data = _data("hub_models.json")
    return {name: {**data["defaults"], **kw} for name, kw in data["models"].items()}


# ------------------------------------------------------------------------------------
# the MLP width in transformers' terms (an integer mlp_ratio)
# ------------------------------------------------------------------------------------
def swiglu_hidden(width: int, ratio: float) -> int:
    """The SwiGLU width DINOv2 (SwiGLUFFNFused) and transformers compute from ``mlp_ratio``."""
    return (int(int(width * ratio) * 2 / 3) + 7) // 8 * 8


def hf_mlp_ratio(width: int, hidden: int, swiglu: bool) -> int:
    """The integer ``mlp_ratio`` that gives transformers this MLP width, or a one-line refusal."""
    if swiglu:
        for r in range(1, MAX_RATIO + 1):
            if swiglu_hidden(width, r) == hidden:
                return r
        raise ClawError(f"not representable as transformers Dinov2Model because the SwiGLU MLP is {hidden} wide on a "
                        f"width of {width}: transformers computes (int(mlp_ratio * {width} * 2 / 3) + 7) // 8 * 8 "
                        f"from an integer mlp_ratio, and none gives {hidden}")
    if hidden % width:
        raise ClawError(f"not representable as transformers Dinov2Model because the MLP is {hidden} wide on a width of "
                        f"{width}: transformers' mlp_ratio is an integer")
    return hidden // width


def mlp_hidden(config) -> int:
    """The MLP's inner width of a Dinov2Config (per half for SwiGLU)."""
    if config.use_swiglu_ffn:
        return swiglu_hidden(config.hidden_size, config.mlp_ratio)
    return int(config.hidden_size * config.mlp_ratio)


def _square(value: Any, what: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise ClawError(f"not representable as transformers Dinov2Model because {what}={list(value)} is not square")
        value = value[0]
    return int(value)


def _pair(value: Any) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


def registers(config) -> int:
    return int(getattr(config, "num_register_tokens", 0)) if config.model_type == "dinov2_with_registers" else 0


def make_config(width: int, depth: int, heads: int, hidden: int, swiglu: bool, regs: int, image: int, patch: int,
                channels: int = 3):
    """A Dinov2Config / Dinov2WithRegistersConfig-like HFConfig from the architecture's numbers."""
    from ..hfconfig import make

    if heads <= 0 or width % heads:
        raise ClawError(f"not representable as transformers Dinov2Model because {heads} heads do not divide the width "
                        f"{width}")
    if image % patch:
        raise ClawError(f"image size {image} is not a multiple of the patch size {patch}")
    kw = dict(hidden_size=width, num_hidden_layers=depth, num_attention_heads=heads,
              mlp_ratio=hf_mlp_ratio(width, hidden, swiglu), hidden_act="gelu", layer_norm_eps=EPS,
              image_size=image, patch_size=patch, num_channels=channels, qkv_bias=True, layerscale_value=1.0,
              use_swiglu_ffn=swiglu)
    if regs:
        return make("dinov2_with_registers", num_register_tokens=regs, **kw)
    return make("dinov2", use_mask_token=True, **kw)


def _check_hf_numerics(config, where: str) -> None:
    """What the tables cannot see: the activation, the norms, the layer scale and the biases."""
    if not config.use_swiglu_ffn and config.hidden_act != "gelu":
        raise ClawError(f"not representable {where} because hidden_act={config.hidden_act!r}: DINOv2 uses exact GELU")
    if not math.isclose(config.layer_norm_eps, EPS, rel_tol=0, abs_tol=1e-12):
        raise ClawError(f"not representable {where} because layer_norm_eps={config.layer_norm_eps}: DINOv2 uses 1e-6")
    if not config.qkv_bias:
        raise ClawError(f"not representable {where} because qkv_bias is false: DINOv2's qkv has a bias")


# ------------------------------------------------------------------------------------
# original (facebookresearch torch hub): the architecture from shapes, checked against a config
# ------------------------------------------------------------------------------------
def _shape(store, key: str, rank: int, what: str = "DINOv2") -> tuple[int, ...]:
    if key not in store:
        raise ClawError(f"{store.path}: not a complete {what} state dict: tensor '{key}' is missing")
    shape = tuple(int(d) for d in store.info(key).shape)
    if len(shape) != rank:
        raise ClawError(f"{store.path}: '{key}' has shape {shape}; a {what} checkpoint has a {rank}-d tensor there")
    return shape


def infer_original(store) -> dict[str, Any]:
    """DinoVisionTransformer kwargs from a torch-hub state dict's shapes (``num_heads`` excepted)."""
    d, c, p1, p2 = _shape(store, "patch_embed.proj.weight", 4)
    if p1 != p2:
        raise ClawError(f"{store.path}: not representable: patch_embed.proj.weight {(d, c, p1, p2)} is not a square patch")
    one, n, d2 = _shape(store, "pos_embed", 3)
    g = math.isqrt(max(n - 1, 0))
    if one != 1 or g * g != n - 1 or g == 0:
        raise ClawError(f"{store.path}: not representable: pos_embed {(one, n, d2)} is not a class position plus a "
                        f"square grid of patches")
    if _shape(store, "cls_token", 3) != (1, 1, d) or d2 != d:
        raise ClawError(f"{store.path}: shapes contradict each other: patch embedding width {d}, pos_embed width {d2}, "
                        f"cls_token {store.info('cls_token').shape}")
    blocks = sorted({int(k.split(".")[1]) for k in store.keys() if k.startswith("blocks.") and k.split(".")[1].isdigit()})
    if not blocks or blocks != list(range(len(blocks))):
        raise ClawError(f"{store.path}: the blocks are not numbered 0..N-1 (found {blocks[:8]}); "
                        f"a DINOv2 torch-hub state dict has blocks.0 ... blocks.N-1")
    if "blocks.0.ls1.gamma" not in store:
        raise ClawError(f"{store.path}: not representable as transformers Dinov2Model because the blocks have no "
                        f"LayerScale (blocks.0.ls1.gamma; init_values None)")
    kw: dict[str, Any] = dict(embed_dim=d, depth=len(blocks), img_size=g * p1, patch_size=p1, in_chans=c)
    if "blocks.0.mlp.w12.weight" in store:
        two_h, d3 = _shape(store, "blocks.0.mlp.w12.weight", 2)
        kw.update(ffn_layer="swiglufused", hidden=two_h // 2)
    else:
        m, d3 = _shape(store, "blocks.0.mlp.fc1.weight", 2)
        kw.update(ffn_layer="mlp", hidden=m)
    if d3 != d:
        raise ClawError(f"{store.path}: shapes contradict each other: the MLP takes {d3}, the model is {d} wide")
    kw["num_register_tokens"] = _shape(store, "register_tokens", 3)[1] if "register_tokens" in store else 0
    return kw


def _declared_hidden(kw: dict) -> int:
    ratio = float(kw.get("mlp_ratio", 4.0))
    if str(kw.get("ffn_layer", "mlp")).startswith("swiglu"):
        return swiglu_hidden(int(kw["embed_dim"]), ratio)
    return int(int(kw["embed_dim"]) * ratio)


def read_original(store, declared: dict | None = None, origin: str = "") -> Any:
    """The canonical config of a torch-hub state dict; ``declared`` (``--model-name`` / ``--model-config``)
    must agree with the shapes, which say everything but the head count."""
    inferred = infer_original(store)
    declared = dict(declared or {})
    unknown = sorted(set(declared) - set(ORIGINAL_KWARGS) - {"_about"})
    if unknown:
        raise ClawError(f"{origin}: not a DINOv2 model config: unknown key '{unknown[0]}' "
                        f"(DinoVisionTransformer takes {', '.join(ORIGINAL_KWARGS[:-1])})")
    if declared:
        wrong = []
        for key in ("embed_dim", "depth", "patch_size", "in_chans", "num_register_tokens"):
            if key in declared and int(declared[key]) != inferred[key]:
                wrong.append(f"{key} {declared[key]} there, {inferred[key]} in the weights")
        if "img_size" in declared and _square(declared["img_size"], "img_size") != inferred["img_size"]:
            wrong.append(f"img_size {declared['img_size']} there, {inferred['img_size']} in the weights")
        if "ffn_layer" in declared:
            kind = "swiglufused" if str(declared["ffn_layer"]).startswith("swiglu") else declared["ffn_layer"]
            if kind != inferred["ffn_layer"]:
                wrong.append(f"ffn_layer {declared['ffn_layer']} there, {inferred['ffn_layer']} in the weights")
            elif "embed_dim" in declared and _declared_hidden({**declared, "ffn_layer": kind}) != inferred["hidden"]:
                wrong.append(f"an MLP {_declared_hidden(declared)} wide there, {inferred['hidden']} in the weights")
        if "init_values" in declared and not declared["init_values"]:
            wrong.append("no LayerScale there (init_values), LayerScale in the weights")
        if wrong:
            raise ClawError(f"{store.path}: shapes contradict {origin}: {'; '.join(wrong)}")
    heads = int(declared.get("num_heads", inferred["embed_dim"] // HEAD_DIM))
    if "num_heads" not in declared and inferred["embed_dim"] % HEAD_DIM:
        raise ClawError(f"{store.path}: the head count is not in the weights and the width {inferred['embed_dim']} is "
                        f"not a multiple of 64; pass --model-config with num_heads")
    return make_config(inferred["embed_dim"], inferred["depth"], heads, inferred["hidden"],
                       inferred["ffn_layer"] == "swiglufused", inferred["num_register_tokens"], inferred["img_size"],
                       inferred["patch_size"], inferred["in_chans"])


def config_to_original(config) -> dict[str, Any]:
    """DinoVisionTransformer kwargs that build this model (what ``--model-config`` reads back)."""
    _check_hf_numerics(config, "in the original DINOv2 layout")
    kw: dict[str, Any] = dict(embed_dim=config.hidden_size, depth=config.num_hidden_layers,
                              num_heads=config.num_attention_heads, mlp_ratio=float(config.mlp_ratio),
                              ffn_layer="swiglufused" if config.use_swiglu_ffn else "mlp",
                              num_register_tokens=registers(config),
                              img_size=_square(config.image_size, "image_size"),
                              patch_size=_square(config.patch_size, "patch_size"), in_chans=config.num_channels,
                              init_values=1.0, block_chunks=0)
    if registers(config):   # the hub's _reg models (and transformers' Dinov2WithRegisters) resize antialiased
        kw.update(interpolate_antialias=True, interpolate_offset=0.0)
    return kw


def hub_name_for(kw: dict[str, Any]) -> str | None:
    """The torch-hub entry point that builds exactly these kwargs, if any."""
    for name, hub in hub_models().items():
        if all(hub.get(k) == v for k, v in kw.items() if k in ("embed_dim", "depth", "num_heads", "ffn_layer",
                                                                "num_register_tokens", "img_size", "patch_size")):
            return name
    return None


# ------------------------------------------------------------------------------------
# timm: architectures (data) and config.json <-> canonical config
# ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TimmArch:
    """What a registered timm DINOv2 architecture fixes (``mappings/dinov2/timm_archs.json``)."""

    name: str
    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float        # timm's hidden_features = int(embed_dim * mlp_ratio); SwiGLU: both halves
    mlp: str                # "mlp" (GELU) or "swiglu" (SwiGLUPacked)
    reg_tokens: int
    no_embed_class: bool
    patch_size: int
    img_size: int
    in_chans: int


@lru_cache(maxsize=1)
def timm_archs() -> dict[str, TimmArch]:
    return {r["name"]: TimmArch(**r) for r in _data("timm_archs.json")["architectures"]}


# model_args keys that change nothing in the weights or forward_features (training, init, pooling head)
TIMM_IGNORED = ("drop_rate", "pos_drop_rate", "patch_drop_rate", "proj_drop_rate", "attn_drop_rate",
                "drop_path_rate", "weight_init", "fix_init", "dynamic_img_size", "dynamic_img_pad", "global_pool",
                "init_values", "num_classes")
TIMM_SHAPE_ARGS = ("embed_dim", "depth", "num_heads", "mlp_ratio", "reg_tokens", "no_embed_class", "patch_size",
                   "img_size", "in_chans")
# model_args keys whose only value DINOv2 has
TIMM_FIXED = {"class_token": True, "qkv_bias": True, "qk_norm": False, "pre_norm": False, "fc_norm": None,
              "no_embed_class": None}


def _timm_refuse(key: str, value: Any, why: str) -> ClawError:
    return ClawError(f"not representable as transformers Dinov2Model because timm {key}={value!r}: {why}")


def screen_timm_args(cfg: dict, archs: dict, family: str, model_class: str, known: tuple[str, ...],
                     ignored: tuple[str, ...], fixed: dict[str, Any], refuse) -> tuple[Any, dict[str, Any]]:
    """(the architecture a timm ``config.json`` names, its ``model_args``), every argument either
    ``known`` (it changes shapes or is read later), ``ignored`` or at its one ``fixed`` value,
    and no classification head; anything else refused in one line (shared by DINOv2 and DINOv3)."""
    name = cfg.get("architecture")
    if name not in archs:
        raise ClawError(f"timm architecture {name!r} is not a {family} ViT (known: {', '.join(archs)})")
    args = cfg.get("model_args") or {}
    if not isinstance(args, dict):
        raise ClawError("timm config.json: model_args is not an object")
    for key, value in args.items():
        if key in known or key in ignored:
            continue
        if key in fixed and (fixed[key] is None or value == fixed[key]):
            continue
        if key in fixed:
            raise refuse(f"model_args.{key}", value, f"{family} has no such variant")
        raise refuse(f"model_args.{key}", value, "clawconvert does not know what it changes")
    for where, classes in (("num_classes", cfg.get("num_classes", 0)), ("model_args.num_classes", args.get("num_classes", 0))):
        if classes:
            raise refuse(where, classes, f"a classification head; {model_class} has none "
                                         f"(save the backbone with num_classes=0)")
    return archs[name], args


def timm_effective(cfg: dict) -> tuple[TimmArch, dict[str, Any]]:
    """The architecture a timm ``config.json`` names and the arguments it is built with."""
    arch, args = screen_timm_args(cfg, timm_archs(), "DINOv2", "Dinov2Model", TIMM_SHAPE_ARGS, TIMM_IGNORED,
                                  TIMM_FIXED, _timm_refuse)
    eff = {k: getattr(arch, k) for k in TIMM_SHAPE_ARGS}
    eff.update({k: v for k, v in args.items() if k in TIMM_SHAPE_ARGS})
    if args.get("init_values", 1.0) in (None, 0, 0.0):
        raise _timm_refuse("model_args.init_values", args["init_values"], "no LayerScale; Dinov2Model always has one")
    if eff["reg_tokens"] and not eff["no_embed_class"]:
        raise _timm_refuse("no_embed_class", False, "register tokens with positions; DINOv2 gives registers none")
    return arch, eff


def timm_to_config(cfg: dict):
    arch, eff = timm_effective(cfg)
    width = int(eff["embed_dim"])
    fc1 = int(width * float(eff["mlp_ratio"]))
    swiglu = arch.mlp == "swiglu"
    return make_config(width, int(eff["depth"]), int(eff["num_heads"]), fc1 // 2 if swiglu else fc1, swiglu,
                       int(eff["reg_tokens"]), _square(eff["img_size"], "model_args.img_size"),
                       _square(eff["patch_size"], "model_args.patch_size"), int(eff["in_chans"]))


def timm_params(cfg: dict) -> dict[str, Any]:
    """Table params a timm config implies: whether pos_embed holds the class position."""
    _, eff = timm_effective(cfg)
    return {"fold_class_position": bool(eff["no_embed_class"])}


def choose_timm_arch(config) -> TimmArch:
    """The registered architecture of the same MLP kind and register-ness with the nearest width."""
    kind = "swiglu" if config.use_swiglu_ffn else "mlp"
    regs = registers(config) > 0
    same = [a for a in timm_archs().values() if a.mlp == kind and (a.reg_tokens > 0) == regs]
    if not same:
        raise ClawError(f"this timm table has no DINOv2 architecture with a {kind} MLP"
                        f"{' and registers' if regs else ''}; regenerate it with tools/make_timm_archs.py")
    return min(same, key=lambda a: (abs(a.embed_dim - config.hidden_size), a.name))


def config_to_timm(config, preprocess: dict | None = None) -> dict[str, Any]:
    """timm's ``config.json`` (as ``save_for_hf`` writes it) for this model."""
    _check_hf_numerics(config, "as a timm DINOv2")
    arch = choose_timm_arch(config)
    width = config.hidden_size
    fc1 = mlp_hidden(config) * (2 if config.use_swiglu_ffn else 1)
    want: dict[str, Any] = dict(embed_dim=width, depth=config.num_hidden_layers, num_heads=config.num_attention_heads,
                                reg_tokens=registers(config), no_embed_class=arch.no_embed_class,
                                patch_size=_square(config.patch_size, "patch_size"),
                                img_size=_square(config.image_size, "image_size"), in_chans=config.num_channels)
    args = {k: v for k, v in want.items() if v != getattr(arch, k)}
    if int(width * arch.mlp_ratio) != fc1:
        args["mlp_ratio"] = _mlp_ratio(width, fc1)
    if "img_size" in args:
        args["img_size"] = [args["img_size"]] * 2
    return timm_config_json(arch.name, width, args, want["in_chans"], want["img_size"],
                            {**default_preprocess(), **(preprocess or {})})


def timm_config_json(arch: str, width: int, args: dict, in_chans: int, size: int, pre: dict,
                     fixed_input_size: bool = True) -> dict[str, Any]:
    """A backbone's ``config.json`` as timm's ``save_for_hf`` writes it (no head, token pooling)."""
    return {
        "architecture": arch, "num_classes": 0, "num_features": width, "global_pool": "token",
        **({"model_args": args} if args else {}),
        "pretrained_cfg": {
            "custom_load": False, "input_size": [in_chans, size, size], "fixed_input_size": fixed_input_size,
            "interpolation": pre.get("interpolation", "bicubic"), "crop_pct": float(pre.get("crop_pct", 1.0)),
            "crop_mode": "center", "mean": list(pre["mean"]), "std": list(pre["std"]), "num_classes": 0,
            "pool_size": None, "first_conv": "patch_embed.proj", "classifier": "head",
        },
    }


def claims_timm(cfg: dict) -> bool:
    return str(cfg.get("architecture")) in timm_archs()


def default_preprocess() -> dict[str, Any]:
    return {"mean": IMAGENET_MEAN, "std": IMAGENET_STD, "interpolation": "bicubic", "crop_pct": 1.0}


def timm_preprocess(cfg: dict) -> dict[str, Any]:
    pre = cfg.get("pretrained_cfg") or {}
    return {k: (tuple(pre[k]) if isinstance(pre[k], list) else pre[k])
            for k in ("mean", "std", "interpolation", "crop_pct") if k in pre}


def scan_timm_archs() -> tuple[TimmArch, ...]:
    """Every registered timm DINOv2 ViT, as the installed timm builds it (imports timm and torch).

    The conversion path reads the same facts from ``mappings/dinov2/timm_archs.json`` (written by
    ``tools/make_timm_archs.py``; the tests check it against timm).  timm's ``mlp_ratio`` is read
    back exactly from a model built on ``meta`` a million wide: ``int(1e6 * ratio)`` keeps six
    digits, all timm's DINOv2 ratios have (4, 2.66667 * 2)."""
    import timm
    import torch

    from ..verify import quiet
    out = []
    for name in timm.list_models("vit_*_dinov2"):
        with quiet(), torch.device("meta"):
            m = timm.create_model(name, pretrained=False)
            wide = timm.create_model(name, pretrained=False, embed_dim=10 ** 6, num_heads=1, depth=1)
        b = m.blocks[0]
        out.append(TimmArch(name, int(m.embed_dim), len(m.blocks), int(b.attn.num_heads),
                            wide.blocks[0].mlp.fc1.out_features / 10 ** 6,
                            "swiglu" if type(b.mlp).__name__ == "GluMlp" else "mlp", int(m.num_reg_tokens),
                            bool(m.no_embed_class), int(m.patch_embed.patch_size[0]), int(m.patch_embed.img_size[0]),
                            int(m.patch_embed.proj.in_channels)))
    return tuple(out)


# ------------------------------------------------------------------------------------
# the family
# ------------------------------------------------------------------------------------
def mask_token_note(ckpt) -> list[str]:
    """timm has no mask token: say so when the source's is not the zeros timm's reader would give."""
    import numpy as np

    from ..tables import load_table
    rule = load_table(ckpt.family.name, ckpt.format).expand(
        ckpt.table_params(), list(ckpt.family.canonical_shapes(ckpt.config))).by_canonical.get("embeddings.mask_token")
    if rule is None or not rule.format or rule.format[0] not in ckpt.store:
        return []
    if not np.asarray(ckpt.store.read(rule.format[0]), dtype=np.float32).any():
        return []
    return ["timm's ViT has no mask token: the source's (trained; only masked-image-modelling training uses it, "
            "never a forward pass) is not written, as timm's own reader of the original checkpoints drops it"]


class TorchHubViT(Family):
    """What the one-tower ViT families published as torch-hub state dicts (DINOv2, DINOv3) share:
    hub names and research-code kwargs for the original layout, one image tower (``extract-visual``
    is a conversion), and forward passes in each layout's own framework (``verify_dinov2``)."""

    towers = {"visual": ("",)}            # one image tower: every canonical key
    whole_model_tower = "visual"
    display_name = ""                     # "DINOv2", in messages
    hub_prefix = ""                       # every torch-hub entry point starts with it
    original_sentinels: tuple[str, ...] = ()   # keys every torch-hub state dict of the family holds
    timm_reader = ""                      # the timm module whose checkpoint_filter_fn reads those files
    timm_reader_needs: tuple[str, ...] = ()   # keys that reader recognises the family's files by
    foreign_keys: dict[str, str] = {}     # keys that say "another layout of this family" (refusals)

    def hub_models(self) -> dict[str, dict]:
        raise NotImplementedError

    # -- the original layout's configs: torch-hub names and the research code's kwargs -------------
    def owns_model_name(self, name: str) -> bool:
        return bool(name) and str(name).startswith(self.hub_prefix)

    def owns_model_config(self, data: dict) -> bool:
        return "embed_dim" in data and "vision_cfg" not in data and "architecture" not in data

    def model_kwargs(self, name: str) -> dict[str, Any]:
        models = self.hub_models()
        if name not in models:
            import difflib
            close = difflib.get_close_matches(name, list(models), n=3)
            raise ClawError(f"unknown {self.display_name} torch-hub model '{name}'"
                            + (f" (did you mean {', '.join(close)}?)" if close else f" (known: {', '.join(models)})"))
        return dict(models[name])

    def config_from_dict(self, data: dict):
        from ..hfconfig import from_dict
        model_type = data.get("model_type")
        return from_dict(model_type if model_type in self.hf_model_types else self.hf_model_types[0], data)

    # -- the one tower (extract-visual is a conversion) ---------------------------------------
    def write_hf_extras(self, out_dir: Path, config, extras: Extras) -> list[str]:
        return self.write_hf_tower_extras(out_dir, config, extras, "visual")

    def tower_config(self, config, tower: str):
        return copy.deepcopy(config)

    # -- verification ------------------------------------------------------------------------
    def runner(self, ckpt):
        from ..verify_dinov2 import runner
        return runner(ckpt)

    def sample_inputs(self, config, batch: int = 2, seed: int = 0):
        import torch
        g = torch.Generator().manual_seed(seed)
        size = _square(config.image_size, "image_size")
        return torch.randn(batch, config.num_channels, size, size, generator=g), None


class Dinov2Family(TorchHubViT):
    name = "dinov2"
    display_name = "DINOv2"
    hub_prefix = "dinov2_"
    hf_model_types = ("dinov2", "dinov2_with_registers")
    original_sentinels = ("pos_embed", "patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "mask_token")
    timm_reader = "timm.models.vision_transformer"
    foreign_keys = {"embeddings.patch_embeddings.projection.weight": "a transformers DINOv2", "reg_token": "a timm"}

    def __init__(self) -> None:
        super().__init__()
        self.codecs["original"] = FormatCodec(read=read_original, write=config_to_original)
        self.codecs["timm"] = FormatCodec(read=timm_to_config, write=config_to_timm, claims=claims_timm,
                                          params=timm_params)

    def hub_models(self) -> dict[str, dict]:
        return hub_models()

    def hf_architecture(self, config) -> str:
        return "Dinov2WithRegistersModel" if config.model_type == "dinov2_with_registers" else "Dinov2Model"

    def params(self, config) -> dict[str, Any]:
        regs = registers(config)
        return {"layers": config.num_hidden_layers, "D": config.hidden_size, "swiglu": bool(config.use_swiglu_ffn),
                "registers": regs > 0, "legacy_keys": True, "fold_class_position": regs > 0}

    def canonical_shapes(self, config) -> dict[str, tuple[int, ...]]:
        """The transformers 5 model's state dict, from the config (tests compare it with the model on ``meta``)."""
        D, L, H = config.hidden_size, config.num_hidden_layers, config.num_attention_heads
        if (D // H) * H != D:
            raise ValueError(f"hidden_size {D} is not a multiple of num_attention_heads {H}")
        ph, pw = _pair(config.patch_size)
        ih, iw = _pair(config.image_size)
        s = Shapes()
        s.add("embeddings.cls_token", (1, 1, D))
        if config.model_type == "dinov2_with_registers" or config.use_mask_token:
            s.add("embeddings.mask_token", (1, D))
        s.add("embeddings.position_embeddings", (1, (ih // ph) * (iw // pw) + 1, D))
        if config.model_type == "dinov2_with_registers":
            s.add("embeddings.register_tokens", (1, config.num_register_tokens, D))
        s.add("embeddings.patch_embeddings.projection.weight", (D, config.num_channels, ph, pw))
        s.add("embeddings.patch_embeddings.projection.bias", (D,))
        hidden = mlp_hidden(config)
        for i in range(L):
            p = f"encoder.layer.{i}"
            s.norm(f"{p}.norm1", D)
            for proj in ("q_proj", "k_proj", "v_proj"):
                s.linear(f"{p}.attention.{proj}", D, D, bias=bool(config.qkv_bias))
            s.linear(f"{p}.attention.o_proj", D, D)
            s.add(f"{p}.layer_scale1.lambda1", (D,))
            s.norm(f"{p}.norm2", D)
            if config.use_swiglu_ffn:
                s.linear(f"{p}.mlp.gate_proj", hidden, D)
                s.linear(f"{p}.mlp.up_proj", hidden, D)
                s.linear(f"{p}.mlp.down_proj", D, hidden)
            else:
                s.mlp(f"{p}.mlp", D, hidden)
            s.add(f"{p}.layer_scale2.lambda1", (D,))
        s.norm("layernorm", D)
        return dict(s)

    def refine(self, ckpt) -> None:
        """HF sources: which key spelling the file uses (4.x / the Hub's, or 5.x); preprocessing defaults."""
        if ckpt.format == "hf":
            keys = ckpt.store.keys()
            modern = any(".attention.q_proj." in k or ".mlp.gate_proj." in k for k in keys)
            legacy = any(".attention.attention." in k or ".mlp.weights_in." in k for k in keys)
            if modern and legacy:
                raise ClawError(f"{ckpt.path}: mixes transformers 4.x key names (attention.attention.query) with "
                                f"5.x names (attention.q_proj); write it again with one transformers version")
            ckpt.params["legacy_keys"] = not modern
        ckpt.extras.preprocess = {**default_preprocess(), **ckpt.extras.preprocess}

    def target_notes(self, ckpt, target: str) -> list[str]:
        notes = []
        if target == "timm":
            notes += mask_token_note(ckpt)
            if registers(ckpt.config) and ckpt.format != "timm":
                notes.append("timm stores the class position inside cls_token (no_embed_class): converting back gives "
                             "the same outputs, not the same bytes (docs/dinov2.md)")
        if target == "original":
            kw = config_to_original(ckpt.config)
            name = hub_name_for(kw)
            build = (f"torch.hub.load('facebookresearch/dinov2', '{name}', pretrained=False)" if name else
                     "dinov2.models.vision_transformer.DinoVisionTransformer(" +
                     ", ".join(f"{k}={v!r}" for k, v in kw.items() if k != "ffn_layer") +
                     f", ffn_layer={kw['ffn_layer']!r})")
            notes.append(f"load it with {build}.load_state_dict(torch.load(PATH))")
            if kw["num_heads"] * HEAD_DIM != kw["embed_dim"]:
                notes.append(f"the file does not say the head count ({kw['num_heads']}, not width / 64): read it back "
                             f"with --model-config giving num_heads {kw['num_heads']}")
        return notes

    def tower_architecture(self, tower: str, with_projection: bool) -> str:
        return "Dinov2Model"

    def write_hf_tower_extras(self, out_dir: Path, config, extras: Extras, tower: str) -> list[str]:
        """``preprocessor_config.json`` of a ``BitImageProcessor``, as facebook/dinov2-* carry it."""
        pre = {**default_preprocess(), **extras.preprocess}
        size = _square(config.image_size, "image_size")
        resize = int(math.floor(size / float(pre.get("crop_pct", 1.0))))
        write_json(Path(out_dir) / "preprocessor_config.json", {
            "crop_size": {"height": size, "width": size}, "do_center_crop": True, "do_convert_rgb": True,
            "do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": list(pre["mean"]),
            "image_processor_type": "BitImageProcessor", "image_std": list(pre["std"]),
            "resample": {"bicubic": 3, "bilinear": 2, "nearest": 0}.get(pre.get("interpolation"), 3),
            "rescale_factor": 1 / 255, "size": {"shortest_edge": resize}})
        return []


FAMILY = Dinov2Family()
