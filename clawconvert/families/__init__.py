"""Model families: the canonical key space, config translation and framework hooks.

Each module in this package defines one :class:`Family` instance named ``FAMILY``; they are
found by discovery (:func:`all_families`), so adding a family is adding a module plus its
tables in ``mappings/<family>/``, with no edits elsewhere.

Nothing here imports torch, transformers, open_clip or timm on the conversion path: configs
are :class:`clawconvert.hfconfig.HFConfig` objects and canonical shapes come from formulas
(:class:`Shapes`); the frameworks are imported lazily by the hooks that need them
(``hf_model_class``, ``meta_shapes``, ``--verify``).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

from ..errors import ClawError
from ..registry import discover, lookup

Shape = tuple[int, ...]   # as ops.Shape (ops imports torch in the old core)


@dataclass
class Extras:
    """What travels beside the weights: preprocessing, tokenizer, license, provenance."""

    preprocess: dict[str, Any] = field(default_factory=dict)   # open_clip-style preprocess_cfg
    tokenizer_dir: Path | None = None       # a directory holding HF tokenizer files to copy
    tokenizer_note: str | None = None       # why no tokenizer can be written, if so
    license: str | None = None
    source: dict[str, Any] = field(default_factory=dict)


@dataclass
class FormatCodec:
    """How one family's config reads from and writes to one format.

    ``read`` turns the format's own config (whatever the format module found: a dict, a
    tensor store for shape inference) into the canonical transformers config; ``write``
    turns a canonical config back into the format's config (or raises ClawError naming the
    option that cannot be represented).
    """

    read: Callable[..., Any]
    write: Callable[..., Any]
    claims: Callable[..., bool] = lambda *a, **k: False
    params: Callable[..., dict] = lambda *a, **k: {}    # table params the format's config implies


class Family:
    """Base class; subclasses describe one family (``clip``, ``siglip``, ...)."""

    name: str = ""
    hf_model_types: tuple[str, ...] = ()     # config.json model_type values owned
    # tower -> canonical key prefixes: the tower's body first, then its projection (if separate)
    towers: dict[str, tuple[str, ...]] = {}
    timm_architectures: str = ""             # timm.list_models() glob of the image towers timm.yaml writes
    whole_model_tower: str | None = None     # a single-tower family (DINOv2): extracting it is converting

    def __init__(self) -> None:
        self.codecs: dict[str, FormatCodec] = {}

    # -- canonical config --------------------------------------------------------------
    def config_from_dict(self, data: dict) -> Any:
        """``config.json`` content -> canonical config (an :class:`~clawconvert.hfconfig.HFConfig`)."""
        from ..hfconfig import from_dict
        return from_dict(self.hf_model_types[0], data)

    def hf_architecture(self, config: Any) -> str:
        """The transformers class name of the whole model (``config.json``'s ``architectures``)."""
        raise NotImplementedError

    def hf_model_class(self, config: Any) -> type:
        """The transformers class itself (imports transformers, hence torch)."""
        import transformers
        return getattr(transformers, self.hf_architecture(config))

    def params(self, config: Any) -> dict[str, Any]:
        """Counts and strings the tables' placeholders and op sizes refer to."""
        raise NotImplementedError

    def canonical_shapes(self, config: Any) -> dict[str, Shape]:
        """Every canonical tensor and its shape, in the order of the transformers model's state dict,
        from formulas over the config (:meth:`meta_shapes` builds the real model; tests compare them)."""
        raise NotImplementedError

    def meta_shapes(self, config: Any) -> dict[str, Shape]:
        """The transformers model's own state-dict shapes, built on ``meta`` (imports torch + transformers)."""
        import torch

        from ..verify import quiet
        tcfg = config.to_transformers() if hasattr(config, "to_transformers") else config
        with quiet(), torch.device("meta"):
            model = self.hf_model_class(config)(tcfg)
        return {k: tuple(v.shape) for k, v in model.state_dict().items()}

    def codec(self, fmt: str) -> FormatCodec:
        if fmt not in self.codecs:
            raise ClawError(f"the {self.name} family has no {fmt} form (it has: {', '.join(self.codecs)})")
        return self.codecs[fmt]

    def write_hf_extras(self, out_dir: Path, config: Any, extras: Extras) -> list[str]:
        """Write preprocessor/tokenizer files beside HF weights; return notes for the user."""
        return []

    def refine(self, ckpt: Any) -> None:
        """Complete an opened checkpoint's config with what only its weights or format tell
        (SigLIP: an HF identity text head means "no head"); called by ``open_checkpoint``."""

    def target_notes(self, ckpt: Any, target: str) -> list[str]:
        """What a conversion of ``ckpt`` to ``target`` changes that the user should know."""
        return []

    def runner(self, ckpt: Any) -> Any:
        """A :class:`~clawconvert.verify.Runner` for ``ckpt`` when this family's forward passes are
        not CLIP's (image / text / logits); None: the format's own runner."""
        return None

    def expected_drift(self, ckpt: Any, target: str) -> float:
        """How far ``--verify`` may find the outputs apart when the target framework computes
        something slightly different by construction (e.g. exact instead of tanh GELU); 0: nothing."""
        return 0.0

    # -- towers (clawconvert extract-visual / extract-text) ---------------------------------
    def tower_prefixes(self, tower: str, with_projection: bool) -> tuple[str, ...]:
        """Canonical key prefixes of one tower: its body, plus its projection when asked for."""
        if tower not in self.towers:
            raise ClawError(f"the {self.name} family has no {tower} tower (it has: {', '.join(self.towers)})")
        body, *projection = self.towers[tower]
        return (body, *projection) if with_projection else (body,)

    def tower_config(self, config: Any, tower: str) -> Any:
        """The transformers config of one tower alone (e.g. ``CLIPVisionConfig``)."""
        raise ClawError(f"the {self.name} family cannot cut out its {tower} tower")

    def tower_architecture(self, tower: str, with_projection: bool) -> str:
        """The transformers class name that loads one tower (e.g. ``CLIPVisionModelWithProjection``)."""
        raise ClawError(f"the {self.name} family cannot cut out its {tower} tower")

    def tower_model_class(self, tower: str, with_projection: bool) -> type:
        """The transformers class that loads one tower (imports transformers, hence torch)."""
        import transformers
        return getattr(transformers, self.tower_architecture(tower, with_projection))

    def write_hf_tower_extras(self, out_dir: Path, config: Any, extras: Extras, tower: str) -> list[str]:
        """Write the side files one HF tower needs (image processor / tokenizer); return notes."""
        return []

    def __repr__(self) -> str:
        return f"<family {self.name}>"


def custom_block_blockers(cfg_key: str, tower: str) -> list[tuple[str, str, Any, str]]:
    """Blocker rows for open_clip's custom attention-block options, which no HF class has."""
    return [
        (cfg_key, "block_type", lambda v: v not in (None, "default"), f"custom attention blocks in the {tower} tower"),
        (cfg_key, "qk_norm", bool, f"q/k normalisation in the {tower} tower"),
        (cfg_key, "scaled_cosine_attn", bool, f"scaled cosine attention in the {tower} tower"),
        (cfg_key, "scale_heads", bool, f"per-head attention scales in the {tower} tower"),
        (cfg_key, "scale_attn_inner", bool, f"inner attention LayerNorm in the {tower} tower"),
        (cfg_key, "scale_attn", bool, f"post-attention LayerNorm in the {tower} tower"),
        (cfg_key, "scale_fc", bool, f"MLP LayerNorm in the {tower} tower"),
    ]


class Shapes(dict):
    """Builds a transformers state dict's ``{name: shape}`` in module order, checking every size the
    way the transformers constructors would (a negative size, heads that do not divide the width)."""

    def add(self, name: str, shape: tuple) -> None:
        for d in shape:
            if not isinstance(d, int) or isinstance(d, bool):
                raise TypeError(f"{name}: size {d!r} is not an integer")
            if d < 0:
                raise ValueError(f"{name}: negative size {d} in {shape}")
        self[name] = tuple(shape)

    def linear(self, name: str, out: int, inp: int, bias: bool = True) -> None:
        self.add(f"{name}.weight", (out, inp))
        if bias:
            self.add(f"{name}.bias", (out,))

    def norm(self, name: str, width: int) -> None:
        self.add(f"{name}.weight", (width,))
        self.add(f"{name}.bias", (width,))

    def attention(self, name: str, width: int, heads: int) -> None:
        """CLIP/SigLIP attention: k, v, q, out projections, all with biases."""
        if (width // heads) * heads != width:
            raise ValueError(f"{name}: embed_dim {width} must be divisible by num_heads {heads}")
        for proj in ("k_proj", "v_proj", "q_proj", "out_proj"):
            self.linear(f"{name}.{proj}", width, width)

    def mlp(self, name: str, width: int, inner: int) -> None:
        self.linear(f"{name}.fc1", inner, width)
        self.linear(f"{name}.fc2", width, inner)

    def encoder(self, prefix: str, cfg: Any, norm_first: bool) -> None:
        """``num_hidden_layers`` encoder layers: CLIP's module order (attention, norm1, mlp, norm2) or
        SigLIP's (norm1, attention, norm2, mlp); both compute pre-norm."""
        width, heads, inner = cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size
        for i in range(cfg.num_hidden_layers):
            p = f"{prefix}.layers.{i}"
            if norm_first:
                self.norm(f"{p}.layer_norm1", width)
                self.attention(f"{p}.self_attn", width, heads)
                self.norm(f"{p}.layer_norm2", width)
                self.mlp(f"{p}.mlp", width, inner)
            else:
                self.attention(f"{p}.self_attn", width, heads)
                self.norm(f"{p}.layer_norm1", width)
                self.mlp(f"{p}.mlp", width, inner)
                self.norm(f"{p}.layer_norm2", width)


@lru_cache(maxsize=None)
def all_families() -> dict[str, Family]:
    return discover(sys.modules[__name__], "FAMILY", Family)


def get_family(name: str) -> Family:
    return lookup(all_families(), name, "model family")


def family_for_hf_model_type(model_type: str) -> Family:
    for fam in all_families().values():
        if model_type in fam.hf_model_types:
            return fam
    known = sorted(t for f in all_families().values() for t in f.hf_model_types)
    raise ClawError(f"unsupported transformers model_type '{model_type}' (supported: {', '.join(known)})")


def family_claiming(fmt: str, *args: Any) -> Family | None:
    """The family whose ``fmt`` codec claims a format-specific config (e.g. an OpenCLIP model_cfg)."""
    for fam in all_families().values():
        codec = fam.codecs.get(fmt)
        if codec is not None and codec.claims(*args):
            return fam
    return None
