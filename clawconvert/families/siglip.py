"""SigLIP (and fixed-resolution SigLIP 2): canonical keys are transformers ``SiglipModel``'s.

Tables in ``mappings/siglip/``.  NaFlex SigLIP 2 (a linear patch embedding and a 2-D
position grid) is ``Siglip2Model``, the :mod:`.siglip2` family.

Config translation
==================

big_vision stores no config: everything is read from tensor SHAPES (:func:`read_big_vision`).

====================================================  ========================================
big_vision tensor (``params/`` prefix stripped)       SiglipConfig
====================================================  ========================================
``img/embedding/kernel`` (P, P, 3, D)                 ``vision_config.patch_size`` P, width D
``img/pos_embedding`` (1, N, D), N = g * g            ``vision_config.image_size`` g * P
``img/Transformer/encoderblock_{i}`` count            ``vision_config.num_hidden_layers``
``.../query/kernel`` (D, H, hd)                       ``num_attention_heads`` H (H * hd == D)
``.../MlpBlock_0/Dense_0/kernel`` (D, M)              ``intermediate_size`` M
``txt/Embed_0/embedding`` (V, T)                      ``text_config.vocab_size`` V, width T
``txt/pos_embedding`` (1, L, T)                       ``text_config.max_position_embeddings`` L
``txt/head/kernel`` (T, E)                            ``text_config.projection_size`` E; absent:
                                                      identity head (canonical ``eye``/``zeros``)
``b`` (1,)                                            ``logit_bias``; absent: canonical 0
(always)                                              GELU tanh (``gelu_pytorch_tanh``), eps 1e-6
V = 256000 (Gemma, SigLIP 2)                          pad 0, eos 1, bos 2; otherwise pad = eos = 1
====================================================  ========================================

OpenCLIP builds a SigLIP image tower only from a registered timm architecture name, so
``config_to_openclip`` picks the timm SigLIP architecture whose shapes equal the model's
(:func:`match_timm_arch`) and refuses, naming the closest, when none does.  timm fixes the
image tower's activation per architecture (exact GELU for most, ``gelu_tanh`` for some), so
OpenCLIP -> HF takes the activation timm really computes, and a big_vision/HF model whose
image tower used tanh GELU gets a note when its timm twin uses exact GELU.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from ..errors import ClawError
import numpy as np

from . import Extras, Family, FormatCodec, Shapes, custom_block_blockers
from .clip import _mlp_ratio, copy_tokenizer, write_json

SIGLIP_EPS = 1e-6
# a Python-side flag on the text config: the model has no text head (identity in HF). It is
# never written to config.json (stripped in write_hf_extras); HF sources get it from the values.
NO_TEXT_HEAD = "clawconvert_no_text_head"
NO_LOGIT_BIAS = "clawconvert_no_logit_bias"

GELU_TANH = "gelu_pytorch_tanh"
_ACTS = {"gelu": "exact GELU", GELU_TANH: "tanh GELU"}


@dataclass(frozen=True)
class Vocab:
    """What a text vocabulary size says about the tokenizer a SigLIP was trained with."""

    what: str
    hf_repo: str          # a transformers repo whose tokenizer files fit
    openclip_tokenizer: str   # open_clip's hf_tokenizer_name for it
    pad: int
    eos: int
    bos: int | None
    siglip2: bool = False


VOCABS = {
    32000: Vocab("the SigLIP English sentencepiece tokenizer (c4-en, 32k)", "google/siglip-base-patch16-224",
                 "timm/ViT-B-16-SigLIP", pad=1, eos=1, bos=None),
    250000: Vocab("the multilingual SigLIP sentencepiece tokenizer (mc4, 250k)", "google/siglip-so400m-patch16-256-i18n",
                  "timm/ViT-B-16-SigLIP-i18n-256", pad=1, eos=1, bos=None),
    256000: Vocab("the Gemma tokenizer (256k; SigLIP 2 lowercases text)", "google/siglip2-base-patch16-224",
                  "timm/ViT-B-16-SigLIP2", pad=0, eos=1, bos=2, siglip2=True),
}
# token conventions of a vocabulary we do not know (the tiny fixtures): SigLIP 1's
SIGLIP1_IDS = dict(pad_token_id=1, eos_token_id=1, bos_token_id=None)
GEMMA_IDS = dict(pad_token_id=0, eos_token_id=1, bos_token_id=2)


def token_ids(vocab_size: int, siglip2: bool = False) -> dict[str, Any]:
    v = VOCABS.get(vocab_size)
    if v is not None:
        return dict(pad_token_id=v.pad, eos_token_id=v.eos, bos_token_id=v.bos)
    return dict(GEMMA_IDS if siglip2 else SIGLIP1_IDS)


def tokenizer_note(vocab_size: int) -> str:
    v = VOCABS.get(vocab_size)
    if v is None:
        return (f"no tokenizer files written: the source has none and a {vocab_size}-token vocabulary matches no "
                f"released SigLIP tokenizer; use the tokenizer the model was trained with")
    return (f"no tokenizer files written: the source has none; this model needs {v.what}, "
            f"e.g. the tokenizer files of {v.hf_repo}")


def is_siglip2_vocab(vocab_size: int) -> bool:
    return vocab_size in VOCABS and VOCABS[vocab_size].siglip2


# ------------------------------------------------------------------------------------
# big_vision: the architecture from tensor shapes
# ------------------------------------------------------------------------------------
def _shape(store, key: str, rank: int | None = None) -> tuple[int, ...]:
    if key not in store:
        raise ClawError(f"{store.path}: not a complete big_vision SigLIP: tensor '{key}' is missing")
    shape = tuple(int(d) for d in store.info(key).shape)
    if rank is not None and len(shape) != rank:
        raise ClawError(f"{store.path}: '{key}' has shape {shape}; a SigLIP checkpoint has a {rank}-d tensor there")
    return shape


def _encoder(store, prefix: str, what: str) -> dict[str, int]:
    """depth, width, heads, head_dim and mlp of one big_vision encoder, from layer 0's shapes."""
    rx = re.compile(re.escape(prefix) + r"encoderblock_(\d+)/")
    blocks = sorted({int(m.group(1)) for k in store.keys() if (m := rx.match(k))})
    if not blocks:
        raise ClawError(f"{store.path}: the {what} tower has no encoder blocks ({prefix}encoderblock_N/...)")
    if blocks != list(range(len(blocks))):
        raise ClawError(f"{store.path}: the {what} tower's encoder blocks are not numbered 0..{len(blocks) - 1} "
                        f"(found {blocks})")
    d, h, hd = _shape(store, f"{prefix}encoderblock_0/MultiHeadDotProductAttention_0/query/kernel", 3)
    d2, m = _shape(store, f"{prefix}encoderblock_0/MlpBlock_0/Dense_0/kernel", 2)
    if d2 != d:
        raise ClawError(f"{store.path}: shapes contradict each other: the {what} tower's attention is {d} wide "
                        f"but its MLP takes {d2}")
    if h * hd != d:
        raise ClawError(f"{store.path}: not representable: the {what} tower's attention has {h} heads of {hd} "
                        f"({h * hd}) on a width of {d}; transformers needs heads * head_dim == width")
    return {"depth": len(blocks), "width": d, "heads": h, "head_dim": hd, "mlp": m}


def _check_towers(store) -> None:
    keys = store.keys()
    for tower, what in (("img/", "image"), ("txt/", "text")):
        if not any(k.startswith(tower) for k in keys):
            raise ClawError(f"{store.path}: not a complete big_vision SigLIP: no {what} tower ({tower}...)")
    if "t" not in store:
        raise ClawError(f"{store.path}: not a complete big_vision SigLIP: no 't' (log temperature)")
    if "img/MAPHead_0/probe" not in store:
        raise ClawError(f"{store.path}: not representable: the image tower has no MAP head (img/MAPHead_0); "
                        f"SiglipModel pools with one")
    for key in ("img/head/kernel", "img/head/bias"):
        if key in store:
            raise ClawError(f"{store.path}: not representable: '{key}' is an image head, which SiglipModel has not")


def read_text_tower(store) -> tuple[dict[str, Any], bool]:
    """SiglipTextConfig kwargs from the text tower's shapes, and whether it has a head."""
    enc = _encoder(store, "txt/Encoder_0/", "text")
    vocab, t = _shape(store, "txt/Embed_0/embedding", 2)
    one, length, t2 = _shape(store, "txt/pos_embedding", 3)
    if t != enc["width"] or t2 != t or one != 1:
        raise ClawError(f"{store.path}: shapes contradict each other: text embedding {(vocab, t)}, text position "
                        f"embedding {(one, length, t2)}, text attention width {enc['width']}")
    has_head = "txt/head/kernel" in store
    text = dict(vocab_size=vocab, hidden_size=t, intermediate_size=enc["mlp"], num_hidden_layers=enc["depth"],
                num_attention_heads=enc["heads"], max_position_embeddings=length, hidden_act=GELU_TANH,
                layer_norm_eps=SIGLIP_EPS)
    if has_head:
        t3, e = _shape(store, "txt/head/kernel", 2)
        if t3 != t:
            raise ClawError(f"{store.path}: shapes contradict each other: txt/head/kernel takes {t3}, the text tower is {t} wide")
        text["projection_size"] = e
    return text, has_head


def _mark(config, text_head: bool, logit_bias: bool):
    setattr(config.text_config, NO_TEXT_HEAD, not text_head)
    setattr(config.text_config, NO_LOGIT_BIAS, not logit_bias)
    return config


def read_big_vision(store):
    """big_vision tensor shapes -> a ``SiglipConfig``-like HFConfig (fixed-resolution SigLIP / SigLIP 2)."""
    from ..hfconfig import make

    _check_towers(store)
    enc = _encoder(store, "img/Transformer/", "image")
    p1, p2, c, d = _shape(store, "img/embedding/kernel", 4)
    if p1 != p2 or c != 3:
        raise ClawError(f"{store.path}: not representable: img/embedding/kernel {(p1, p2, c, d)} is not a square "
                        f"patch over 3 channels")
    one, n, d2 = _shape(store, "img/pos_embedding", 3)
    g = math.isqrt(n)
    if g * g != n or one != 1:
        raise ClawError(f"{store.path}: not representable: img/pos_embedding {(one, n, d2)} is not a square grid "
                        f"of patches (a class token or a non-square image)")
    if d != enc["width"] or d2 != d:
        raise ClawError(f"{store.path}: shapes contradict each other: patch embedding width {d}, position embedding "
                        f"width {d2}, image attention width {enc['width']}")
    vision = dict(hidden_size=d, intermediate_size=enc["mlp"], num_hidden_layers=enc["depth"],
                  num_attention_heads=enc["heads"], image_size=g * p1, patch_size=p1, num_channels=3,
                  hidden_act=GELU_TANH, layer_norm_eps=SIGLIP_EPS)
    text, has_head = read_text_tower(store)
    _check_joint(store, d, text, has_head)
    text.update(token_ids(text["vocab_size"]))
    config = make("siglip", text_config=text, vision_config=vision)
    return _mark(config, has_head, "b" in store)


def _check_joint(store, width: int, text: dict, has_head: bool) -> None:
    out = text.get("projection_size", text["hidden_size"])
    if out != width:
        where = "txt/head/kernel maps the text to" if has_head else "the text tower (no head) is"
        raise ClawError(f"{store.path}: shapes contradict each other: {where} {out} wide but the image "
                        f"embedding is {width} wide")


def claims_big_vision(store) -> bool:
    """Fixed-resolution SigLIP: a 4-d convolutional patch embedding (NaFlex's is 2-d)."""
    return not (("img/embedding/kernel" in store and len(store.info("img/embedding/kernel").shape) == 2))


# ------------------------------------------------------------------------------------
# timm SigLIP architectures (OpenCLIP builds its image tower from one of these names)
# ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TimmArch:
    name: str
    width: int
    depth: int
    heads: int
    mlp: int
    patch: int
    image: int
    act: str          # "gelu" or "gelu_pytorch_tanh", as HF spells them
    eps: float

    def describe(self) -> str:
        return (f"{self.name} (width {self.width}, depth {self.depth}, heads {self.heads}, mlp {self.mlp}, "
                f"patch {self.patch}, image {self.image})")


def _timm_model(name: str, **kw):
    import timm
    import torch

    from ..verify import quiet
    with quiet(), torch.device("meta"):
        return timm.create_model(name, pretrained=False, num_classes=0, **kw)


def _act_name(act) -> str:
    import torch
    if isinstance(act, torch.nn.GELU):
        return "gelu" if act.approximate == "none" else GELU_TANH
    if type(act).__name__ == "GELUTanh":
        return GELU_TANH
    return type(act).__name__


def _arch_from(name: str, model, depth: int | None) -> TimmArch | None:
    """Shapes of a timm ViT that has SigLIP's structure; None when it has not (gap pooling...)."""
    import torch
    if (getattr(model, "attn_pool", None) is None or getattr(model, "cls_token", None) is not None
            or getattr(model, "reg_token", None) is not None or not isinstance(model.norm_pre, torch.nn.Identity)
            or not isinstance(model.fc_norm, torch.nn.Identity) or model.pos_embed is None):
        return None
    block = model.blocks[0]
    if not isinstance(block.ls1, torch.nn.Identity) or block.attn.qkv.bias is None:
        return None
    n = model.pos_embed.shape[1]
    g = math.isqrt(n)
    patch = model.patch_embed.patch_size[0]
    img = model.patch_embed.img_size[0]
    if g * g != n:
        return None
    return TimmArch(name, model.embed_dim, depth if depth is not None else len(model.blocks), block.attn.num_heads,
                    block.mlp.fc1.out_features, patch, img, _act_name(block.mlp.act), float(model.norm.eps))


def _scan_timm_arch(name: str) -> TimmArch | None:
    """Build one timm model on ``meta`` and read its SigLIP shape (imports timm and torch)."""
    try:
        model = _timm_model(name)
    except Exception as e:  # an unknown or broken name
        raise ClawError(f"timm cannot build '{name}': {str(e).splitlines()[0][:200]}") from e
    return _arch_from(name, model, None)


def scan_timm_archs() -> tuple[TimmArch, ...]:
    """Every registered timm SigLIP ViT with a MAP head, as the installed timm builds it.

    The conversion path reads the same facts from ``mappings/siglip/timm_archs.json`` (written
    by ``tools/make_timm_archs.py``; ``tests/test_hfconfig.py`` checks it against timm), so
    converting does not import timm and torch."""
    import timm
    out = []
    for name in timm.list_models("vit_*siglip*"):
        try:
            shallow = _arch_from(name, _timm_model(name, depth=1), depth=-1)
        except Exception:  # an entry point that does not take depth: skip it
            continue
        if shallow is not None:
            arch = _scan_timm_arch(name)
            if arch is not None:
                out.append(arch)
    return tuple(out)


@lru_cache(maxsize=1)
def _known_archs() -> dict[str, TimmArch]:
    import json
    from importlib import resources

    text = resources.files("clawconvert.mappings").joinpath("siglip/timm_archs.json").read_text()
    rows = json.loads(text)["architectures"]
    return {r["name"]: TimmArch(**r) for r in rows}


def timm_arch(name: str) -> TimmArch | None:
    """The SigLIP shape of a timm architecture: from the shipped table, or from timm itself for
    a name the table does not know (a newer timm)."""
    known = _known_archs()
    if name in known:
        return known[name]
    return _scan_timm_arch_cached(name)


@lru_cache(maxsize=None)
def _scan_timm_arch_cached(name: str) -> TimmArch | None:
    return _scan_timm_arch(name)


def _shallow_archs() -> tuple[TimmArch, ...]:
    return tuple(_known_archs().values())


def _geometry(vision) -> tuple[int, int, int, int, int, int]:
    """The image tower's grid size in patches stands for its image size (378 and 384 share 27 x 27)."""
    image = vision.image_size if isinstance(vision.image_size, int) else vision.image_size[0]
    patch = vision.patch_size if isinstance(vision.patch_size, int) else vision.patch_size[0]
    return vision.hidden_size, vision.num_hidden_layers, vision.num_attention_heads, vision.intermediate_size, patch, image


def match_timm_arch(vision) -> tuple[TimmArch, list[str]]:
    """The registered timm SigLIP architecture with exactly this image tower; notes about it."""
    width, depth, heads, mlp, patch, image = _geometry(vision)
    want = dict(width=width, heads=heads, mlp=mlp, patch=patch)
    grid = image // patch
    shallow = [a for a in _shallow_archs() if all(getattr(a, k) == v for k, v in want.items())
               and a.image // a.patch == grid]
    full = [a for a in shallow if a.depth == depth]
    # prefer the exact image size, then the same activation
    full.sort(key=lambda a: (a.image != image, a.act != vision.hidden_act, a.name))
    notes: list[str] = []
    if full:
        arch = full[0]
        if arch.act != vision.hidden_act:
            ours = _ACTS.get(vision.hidden_act, vision.hidden_act)
            others = [a.name for a in full if a.act == vision.hidden_act]
            alt = (f"{', '.join(others)} computes {ours} but has another image size" if others else
                   f"no timm SigLIP architecture of this shape computes {ours}")
            notes.append(f"the OpenCLIP image tower is timm's {arch.name}, which computes {_ACTS.get(arch.act, arch.act)} "
                         f"where this model uses {ours}: image embeddings move slightly (1e-4 to 4e-4 measured); {alt}")
        if arch.image != image:
            notes.append(f"image size {image} written as {arch.image}: {arch.name} has the same {grid}x{grid} patch grid")
        return arch, notes

    def distance(a: TimmArch):
        fields = [a.width == width, a.heads == heads, a.mlp == mlp, a.patch == patch, a.image // a.patch == grid]
        return (fields.count(False), abs(math.log(a.width / width)), abs(a.image - image), a.name)

    candidates = sorted(_shallow_archs(), key=distance)
    closest = timm_arch(candidates[0].name) if candidates else None
    hint = f"; closest: {closest.describe()}" if closest else ""
    raise ClawError(f"no OpenCLIP form: open_clip builds a SigLIP image tower only from a registered timm "
                    f"architecture and none has this one (width {width}, depth {depth}, heads {heads}, mlp {mlp}, "
                    f"patch {patch}, image {image}){hint}")


# ------------------------------------------------------------------------------------
# OpenCLIP model_cfg <-> SiglipConfig
# ------------------------------------------------------------------------------------
# (tower, option, is_blocking(value), why): options with no SiglipModel equivalent
BLOCKERS: list[tuple[str, str, Any, str]] = [
    ("vision_cfg", "timm_pool", lambda v: v != "map", "image pooling other than the MAP head"),
    ("vision_cfg", "timm_proj", lambda v: v not in ("none", "", None), "an extra image projection after the trunk"),
    ("text_cfg", "hf_model_name", bool, "a Hugging Face text encoder tower (hf-text)"),
    ("text_cfg", "no_causal_mask", lambda v: not v, "a causal text tower (SigLIP's text tower sees every token)"),
    ("text_cfg", "pool_type", lambda v: v != "last", "text pooling other than the last token"),
    ("text_cfg", "proj_type", lambda v: v not in ("linear", "none"), "a text projection other than linear"),
    ("text_cfg", "embed_cls", bool, "a CLS token in the text tower"),
    ("text_cfg", "final_ln_after_pool", bool, "LayerNorm after pooling in the text tower"),
    ("text_cfg", "ls_init_value", lambda v: v is not None, "LayerScale in the text tower"),
    ("text_cfg", "use_pad_mask", bool, "a padding mask in the text tower"),
    *custom_block_blockers("text_cfg", "text"),
    ("", "quick_gelu", bool, "QuickGELU"),
    ("", "multimodal_cfg", bool, "a multimodal text decoder (CoCa)"),
]


def _refuse(where: str, value: Any, why: str) -> ClawError:
    return ClawError(f"not representable as transformers SiglipModel because {where}={value!r}: {why}")


def openclip_to_config(model_cfg: dict):
    """OpenCLIP SigLIP ``model_cfg`` -> a ``SiglipConfig``-like HFConfig (raises ClawError when not representable)."""
    from ..hfconfig import make

    for tower, option, blocks, why in BLOCKERS:
        part = model_cfg.get(tower, {}) if tower else model_cfg
        if option in part and blocks(part[option]):
            raise _refuse(f"{tower}.{option}" if tower else option, part[option], why)
    v, t = model_cfg["vision_cfg"], model_cfg["text_cfg"]
    name = v.get("timm_model_name")
    if not name or "siglip" not in str(name).lower():
        raise _refuse("vision_cfg.timm_model_name", name, "only timm SigLIP image towers convert")
    if "naflex" in str(name).lower():
        raise _refuse("vision_cfg.timm_model_name", name, "NaFlex towers convert through big_vision / Siglip2Model only")
    arch = timm_arch(str(name))
    if arch is None:
        raise _refuse("vision_cfg.timm_model_name", name, "this timm architecture is not a SigLIP ViT with a MAP head")
    if v.get("timm_pool", "map") != "map":
        raise _refuse("vision_cfg.timm_pool", v.get("timm_pool"), "image pooling other than the MAP head")
    E = int(model_cfg["embed_dim"])
    if E != arch.width:
        raise _refuse("embed_dim", E, f"the image tower {name} is {arch.width} wide and has no projection")
    width = int(t.get("width", 512))
    heads = int(t.get("heads", 8))
    if width % heads:
        raise ClawError(f"text_cfg.width={width} is not a multiple of text_cfg.heads={heads}")
    act_kwargs = t.get("act_kwargs") or {}
    if set(act_kwargs) - {"approximate"} or act_kwargs.get("approximate", "none") not in ("none", "tanh"):
        raise _refuse("text_cfg.act_kwargs", act_kwargs, "only exact or tanh GELU")
    nk = t.get("norm_kwargs") or {}
    if set(nk) - {"eps"}:
        raise _refuse("text_cfg.norm_kwargs", nk, "only a LayerNorm eps")
    text_head = t.get("proj_type", "linear") != "none"
    if text_head and not t.get("proj_bias", False):
        raise _refuse("text_cfg.proj_bias", t.get("proj_bias", False), "SiglipModel's text head has a bias")
    if not text_head and width != E:
        raise _refuse("text_cfg.proj_type", "none", f"the text tower is {width} wide, the image tower {E}")
    vocab = int(t.get("vocab_size", 49408))
    text = dict(vocab_size=vocab, hidden_size=width, intermediate_size=int(width * float(t.get("mlp_ratio", 4.0))),
                num_hidden_layers=int(t.get("layers", 12)), num_attention_heads=heads,
                max_position_embeddings=int(t.get("context_length", 77)),
                hidden_act=GELU_TANH if act_kwargs.get("approximate") == "tanh" else "gelu",
                layer_norm_eps=float(nk.get("eps", 1e-5)), projection_size=E, **token_ids(vocab))
    vision = dict(hidden_size=arch.width, intermediate_size=arch.mlp, num_hidden_layers=arch.depth,
                  num_attention_heads=arch.heads, image_size=arch.image, patch_size=arch.patch, num_channels=3,
                  hidden_act=arch.act, layer_norm_eps=arch.eps)
    config = make("siglip", text_config=text, vision_config=vision)
    return _mark(config, text_head, model_cfg.get("init_logit_bias") is not None)


def config_to_openclip(config) -> dict:
    """``SiglipConfig`` -> OpenCLIP ``model_cfg`` (raises ClawError when not representable)."""
    v, t = config.vision_config, config.text_config
    if not getattr(v, "vision_use_head", True):
        raise ClawError("not representable in OpenCLIP: the image tower has no MAP head (vision_use_head false)")
    arch, _ = match_timm_arch(v)
    if not math.isclose(arch.eps, v.layer_norm_eps, rel_tol=0, abs_tol=1e-12):
        raise ClawError(f"not representable in OpenCLIP: timm's {arch.name} uses LayerNorm eps {arch.eps}, "
                        f"this image tower {v.layer_norm_eps}")
    if t.hidden_act not in _ACTS:
        raise ClawError(f"not representable in OpenCLIP: text hidden_act {t.hidden_act!r} (open_clip: exact or tanh GELU)")
    text: dict[str, Any] = dict(context_length=t.max_position_embeddings, vocab_size=t.vocab_size)
    known = VOCABS.get(t.vocab_size)
    if known is not None:
        text.update(hf_tokenizer_name=known.openclip_tokenizer, tokenizer_kwargs={"clean": "canonicalize"})
    text.update(width=t.hidden_size, heads=t.num_attention_heads, layers=t.num_hidden_layers)
    if t.intermediate_size != 4 * t.hidden_size:
        text["mlp_ratio"] = _mlp_ratio(t.hidden_size, t.intermediate_size)
    text.update(no_causal_mask=True, pool_type="last")
    if has_text_head(config):
        text["proj_bias"] = True
    else:
        text["proj_type"] = "none"
    text["norm_kwargs"] = {"eps": t.layer_norm_eps}
    if t.hidden_act == GELU_TANH:
        text["act_kwargs"] = {"approximate": "tanh"}
    cfg: dict[str, Any] = {"embed_dim": v.hidden_size}
    if has_logit_bias(config):
        cfg["init_logit_bias"] = -10
    cfg.update(custom_text=True,
               vision_cfg={"image_size": arch.image, "timm_model_name": arch.name, "timm_model_pretrained": False,
                           "timm_pool": "map", "timm_proj": "none"},
               text_cfg=text)
    return cfg


def claims_openclip(model_cfg: dict) -> bool:
    """SigLIP claims OpenCLIP configs with a timm SigLIP trunk or a logit bias (clip takes the rest)."""
    v = model_cfg.get("vision_cfg", {})
    return "siglip" in str(v.get("timm_model_name") or "").lower() or model_cfg.get("init_logit_bias") is not None


def has_text_head(config) -> bool:
    return not getattr(config.text_config, NO_TEXT_HEAD, False)


def has_logit_bias(config) -> bool:
    return not getattr(config.text_config, NO_LOGIT_BIAS, False)


ACTIVATION_DRIFT = 5e-2


def activation_changes(config, target: str) -> bool:
    """Does the target framework compute another GELU than this model's config says?"""
    v, t = config.vision_config, config.text_config
    if target == "openclip":
        return match_timm_arch(v)[0].act != v.hidden_act
    if target == "big_vision":  # big_vision computes tanh GELU in both towers
        return v.hidden_act != GELU_TANH or t.hidden_act != GELU_TANH
    return False


# ------------------------------------------------------------------------------------
# HF side files
# ------------------------------------------------------------------------------------
_RESAMPLE = {"bicubic": 3, "bilinear": 2, "nearest": 0, "lanczos": 1}


def siglip_preprocess(siglip2: bool) -> dict[str, Any]:
    """open_clip-style preprocess_cfg of SigLIP: [-1, 1] inputs, squashed; SigLIP 2 resizes bilinearly."""
    return {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "interpolation": "bilinear" if siglip2 else "bicubic",
            "resize_mode": "squash"}


def strip_flags(out_dir: Path) -> None:
    """config.json carries only transformers' own keys: drop clawconvert's in-memory flags."""
    path = Path(out_dir) / "config.json"
    data = json.loads(path.read_text())
    for part in ("text_config", "vision_config"):
        for flag in (NO_TEXT_HEAD, NO_LOGIT_BIAS):
            (data.get(part) or {}).pop(flag, None)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_tokenizer(out_dir: Path, vocab_size: int, extras: Extras) -> list[str]:
    if extras.tokenizer_dir is not None:
        return copy_tokenizer(extras.tokenizer_dir, out_dir)
    return [extras.tokenizer_note or tokenizer_note(vocab_size)]


class SiglipFamily(Family):
    name = "siglip"
    hf_model_types = ("siglip",)
    towers = {"visual": ("vision_model.",), "text": ("text_model.",)}

    def __init__(self) -> None:
        super().__init__()
        self.codecs["openclip"] = FormatCodec(read=openclip_to_config, write=config_to_openclip, claims=claims_openclip)
        self.codecs["big_vision"] = FormatCodec(read=read_big_vision, write=lambda config: {},
                                                claims=claims_big_vision)

    def hf_architecture(self, config) -> str:
        return "SiglipModel"

    def params(self, config) -> dict[str, Any]:
        v, t = config.vision_config, config.text_config
        return {"vision_layers": v.num_hidden_layers, "text_layers": t.num_hidden_layers,
                "VD": v.hidden_size, "VH": v.num_attention_heads, "Vhd": v.hidden_size // v.num_attention_heads,
                "TD": t.hidden_size, "TH": t.num_attention_heads, "Thd": t.hidden_size // t.num_attention_heads,
                "E": t.projection_size, "text_head": has_text_head(config), "logit_bias": has_logit_bias(config)}

    def canonical_shapes(self, config) -> dict[str, tuple[int, ...]]:
        """``SiglipModel``'s state dict, from the config (tests compare it with the model on ``meta``)."""
        v = config.vision_config
        grid = v.image_size // v.patch_size
        return siglip_shapes(config, patch_embedding=(v.hidden_size, v.num_channels, v.patch_size, v.patch_size),
                             positions=grid * grid)

    def is_siglip2(self, config) -> bool:
        return is_siglip2_vocab(config.text_config.vocab_size)

    def refine(self, ckpt) -> None:
        """HF checkpoints: an identity text head means "no head" (i18n So400m); SigLIP preprocessing defaults."""
        if ckpt.format == "hf":
            store, t = ckpt.store, ckpt.config.text_config
            w, b = "text_model.head.weight", "text_model.head.bias"
            identity = (w in store and b in store and tuple(store.info(w).shape) == (t.hidden_size, t.hidden_size)
                        and np.array_equal(_as_float32(store.read(w)), np.eye(t.hidden_size, dtype=np.float32))
                        and not _as_float32(store.read(b)).any())
            setattr(t, NO_TEXT_HEAD, identity)
            setattr(t, NO_LOGIT_BIAS, False)
            pre = dict(ckpt.extras.preprocess)
            if pre:  # SiglipImageProcessor resizes to (height, width): open_clip's "squash"
                pre["resize_mode"] = "squash"
            ckpt.extras.preprocess = {**siglip_preprocess(self.is_siglip2(ckpt.config)), **pre}
        elif not ckpt.extras.preprocess:
            ckpt.extras.preprocess = siglip_preprocess(self.is_siglip2(ckpt.config))

    def target_notes(self, ckpt, target: str) -> list[str]:
        notes = []
        config = ckpt.config
        if target == "openclip":
            notes += match_timm_arch(config.vision_config)[1]
            if config.text_config.vocab_size not in VOCABS:
                notes.append(tokenizer_note(config.text_config.vocab_size).replace(
                    "no tokenizer files written", "no hf_tokenizer_name in the OpenCLIP config"))
        if target == "big_vision":
            for part, what in ((config.vision_config, "image"), (config.text_config, "text")):
                if part.hidden_act != GELU_TANH:
                    notes.append(f"big_vision computes tanh GELU; this model's {what} tower used "
                                 f"{_ACTS.get(part.hidden_act, part.hidden_act)}")
        return notes

    def expected_drift(self, ckpt, target: str) -> float:
        """exact vs tanh GELU moves embeddings by ~1e-4 (random B/16: 4e-4 image, 1e-4 logits);
        verify then allows 5e-2, still far below what a mis-mapped tensor does (O(1))."""
        return ACTIVATION_DRIFT if activation_changes(ckpt.config, target) else 0.0

    def write_hf_extras(self, out_dir: Path, config, extras: Extras) -> list[str]:
        strip_flags(out_dir)
        return (self.write_hf_tower_extras(out_dir, config, extras, "visual")
                + self.write_hf_tower_extras(out_dir, config, extras, "text"))

    # -- towers (extract-visual / extract-text): the text head lives inside text_model ------
    def tower_config(self, config, tower: str):
        return tower_config(config, tower)

    def tower_architecture(self, tower: str, with_projection: bool) -> str:
        return {"visual": "SiglipVisionModel", "text": "SiglipTextModel"}[tower]

    def write_hf_tower_extras(self, out_dir: Path, config, extras: Extras, tower: str) -> list[str]:
        if tower == "text":
            return write_tokenizer(out_dir, config.text_config.vocab_size, extras)
        pre = {**siglip_preprocess(self.is_siglip2(config)), **extras.preprocess}
        size = config.vision_config.image_size
        # what SiglipImageProcessor(...).save_pretrained writes
        write_json(Path(out_dir) / "preprocessor_config.json", {
            "do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
            "image_mean": list(pre["mean"]), "image_processor_type": "SiglipImageProcessor",
            "image_std": list(pre["std"]), "resample": _RESAMPLE.get(pre["interpolation"], 3),
            "rescale_factor": 1 / 255, "size": {"height": size, "width": size}})
        return []


def _as_float32(x):
    if hasattr(x, "detach"):  # torch tensor (old core)
        x = x.detach().float().numpy()
    return np.asarray(x, dtype=np.float32)


def siglip_shapes(config, patch_embedding: tuple[int, ...], positions: int) -> dict[str, tuple[int, ...]]:
    """``SiglipModel`` / ``Siglip2Model`` state dicts: they differ only in the patch embedding's
    weight shape (a convolution / a Dense over flattened patches) and the position count."""
    t, v = config.text_config, config.vision_config
    T, D = t.hidden_size, v.hidden_size
    s = Shapes()
    s.add("logit_scale", (1,))
    s.add("logit_bias", (1,))
    s.add("text_model.embeddings.token_embedding.weight", (t.vocab_size, T))
    s.add("text_model.embeddings.position_embedding.weight", (t.max_position_embeddings, T))
    s.encoder("text_model.encoder", t, norm_first=True)
    s.norm("text_model.final_layer_norm", T)
    s.linear("text_model.head", t.projection_size, T)   # always there: an identity when the model has none
    s.add("vision_model.embeddings.patch_embedding.weight", patch_embedding)
    s.add("vision_model.embeddings.patch_embedding.bias", (D,))
    s.add("vision_model.embeddings.position_embedding.weight", (positions, D))
    s.encoder("vision_model.encoder", v, norm_first=True)
    s.norm("vision_model.post_layernorm", D)
    if getattr(v, "vision_use_head", True):   # the MAP head: probe, torch MultiheadAttention, norm, MLP
        if (D // v.num_attention_heads) * v.num_attention_heads != D:
            raise ValueError(f"vision_model.head: embed_dim {D} must be divisible by num_heads {v.num_attention_heads}")
        s.add("vision_model.head.probe", (1, 1, D))
        s.add("vision_model.head.attention.in_proj_weight", (3 * D, D))
        s.add("vision_model.head.attention.in_proj_bias", (3 * D,))
        s.linear("vision_model.head.attention.out_proj", D, D)
        s.norm("vision_model.head.layernorm", D)
        s.mlp("vision_model.head.mlp", D, v.intermediate_size)
    return dict(s)


def tower_config(config, tower: str):
    """One tower's transformers config alone, without clawconvert's in-memory flags."""
    import copy
    sub = copy.deepcopy(config.vision_config if tower == "visual" else config.text_config)
    for flag in (NO_TEXT_HEAD, NO_LOGIT_BIAS):
        sub.__dict__.pop(flag, None)
    return sub

FAMILY = SiglipFamily()
