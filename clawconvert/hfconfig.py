"""Transformers-style model configs without transformers (no torch import on the conversion path).

:class:`HFConfig` stands in for ``CLIPConfig`` / ``SiglipConfig`` / ``Siglip2Config`` and
their tower configs: attribute access and assignment, ``to_dict()`` (the ``config.json``
content), ``save_pretrained(dir)``, ``copy.deepcopy``, and :meth:`HFConfig.to_transformers`
for the code that needs the real object (``--verify``, building models).

:data:`SCHEMAS` holds, per ``model_type``, every field of the transformers class with its
type and default (``tests/test_hfconfig.py`` compares it with the installed transformers
classes, so it cannot drift).  :func:`from_dict` refuses what transformers' strict
dataclass validation refuses at ``from_dict`` time (a string width, a bool for an int, a
hidden size that is not a multiple of the head count in CLIP), with one-line errors.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

# field types, as transformers annotates them:
#   int / float / str / bool: exactly that type (bool is no int, int is no float)
#   num: int or float; size: int or a list/tuple of ints; ids: int or a list of ints
#   a trailing "?" also allows None
# a default "@field" is that field's value (SigLIP text: projection_size defaults to hidden_size)
_CLIP_TEXT = {
    "vocab_size": ("int", 49408), "hidden_size": ("int", 512), "intermediate_size": ("int", 2048),
    "projection_dim": ("int?", 512), "num_hidden_layers": ("int", 12), "num_attention_heads": ("int", 8),
    "max_position_embeddings": ("int", 77), "hidden_act": ("str", "quick_gelu"), "layer_norm_eps": ("float?", 1e-5),
    "attention_dropout": ("num?", 0.0), "initializer_range": ("float", 0.02), "initializer_factor": ("float?", 1.0),
    "pad_token_id": ("int?", 1), "bos_token_id": ("int?", 49406), "eos_token_id": ("ids?", 49407),
}
_CLIP_VISION = {
    "hidden_size": ("int", 768), "intermediate_size": ("int", 3072), "projection_dim": ("int", 512),
    "num_hidden_layers": ("int", 12), "num_attention_heads": ("int", 12), "num_channels": ("int", 3),
    "image_size": ("size?", 224), "patch_size": ("size?", 32), "hidden_act": ("str", "quick_gelu"),
    "layer_norm_eps": ("float", 1e-5), "attention_dropout": ("num?", 0.0), "initializer_range": ("float", 0.02),
    "initializer_factor": ("float", 1.0),
}
_SIGLIP_TEXT = {
    "vocab_size": ("int", 32000), "hidden_size": ("int", 768), "intermediate_size": ("int", 3072),
    "num_hidden_layers": ("int", 12), "num_attention_heads": ("int", 12), "max_position_embeddings": ("int", 64),
    "hidden_act": ("str", "gelu_pytorch_tanh"), "layer_norm_eps": ("float", 1e-6), "attention_dropout": ("num", 0.0),
    "pad_token_id": ("int?", 1), "bos_token_id": ("int?", 49406), "eos_token_id": ("ids?", 49407),
    "projection_size": ("int?", "@hidden_size"),
}
_SIGLIP_VISION = {
    "hidden_size": ("int", 768), "intermediate_size": ("int", 3072), "num_hidden_layers": ("int", 12),
    "num_attention_heads": ("int", 12), "num_channels": ("int", 3), "image_size": ("size", 224),
    "patch_size": ("size", 16), "hidden_act": ("str", "gelu_pytorch_tanh"), "layer_norm_eps": ("float", 1e-6),
    "attention_dropout": ("num", 0.0), "vision_use_head": ("bool", True),
}
_SIGLIP2_VISION = {**{k: v for k, v in _SIGLIP_VISION.items() if k != "image_size"}, "num_patches": ("int", 256)}
# DINOv2: no intermediate_size (the MLP width is int(hidden_size * mlp_ratio), mlp_ratio an int);
# the backbone fields (stage names, out features / indices) follow num_hidden_layers (_backbone_stages)
_DINOV2_COMMON = {
    "hidden_size": ("int", 768), "num_hidden_layers": ("int", 12), "num_attention_heads": ("int", 12),
    "mlp_ratio": ("int", 4), "hidden_act": ("str", "gelu"), "hidden_dropout_prob": ("num", 0.0),
    "attention_probs_dropout_prob": ("num", 0.0), "initializer_range": ("float", 0.02),
    "layer_norm_eps": ("float", 1e-6), "image_size": ("size", 224), "patch_size": ("size", 14),
    "num_channels": ("int", 3), "qkv_bias": ("bool", True), "layerscale_value": ("float", 1.0),
    "drop_path_rate": ("num", 0.0), "use_swiglu_ffn": ("bool", False), "apply_layernorm": ("bool", True),
    "reshape_hidden_states": ("bool", True),
    "stage_names": ("list?", None), "out_features": ("list?", None), "out_indices": ("list?", None),
}
_DINOV2 = {**_DINOV2_COMMON, "use_mask_token": ("bool", True)}
_DINOV2_REG = {**_DINOV2_COMMON, "patch_size": ("size", 16), "num_register_tokens": ("int", 4)}
# DINOv3 ViT: an explicit intermediate_size, RoPE (rope_theta), one bias flag per projection
_DINOV3_VIT = {
    "patch_size": ("size", 16), "hidden_size": ("int", 384), "intermediate_size": ("int", 1536),
    "num_hidden_layers": ("int", 12), "num_attention_heads": ("int", 6), "hidden_act": ("str", "gelu"),
    "attention_dropout": ("num", 0.0), "initializer_range": ("float", 0.02), "layer_norm_eps": ("float", 1e-5),
    "rope_theta": ("float", 100.0), "image_size": ("size", 224), "num_channels": ("int", 3),
    "query_bias": ("bool", True), "key_bias": ("bool", False), "value_bias": ("bool", True),
    "proj_bias": ("bool", True), "mlp_bias": ("bool", True), "layerscale_value": ("float", 1.0),
    "drop_path_rate": ("num", 0.0), "use_gated_mlp": ("bool", False), "num_register_tokens": ("int", 0),
    "pos_embed_shift": ("float?", None), "pos_embed_jitter": ("float?", None), "pos_embed_rescale": ("float?", 2.0),
    "apply_layernorm": ("bool", True), "reshape_hidden_states": ("bool", True),
    "stage_names": ("list?", None), "out_features": ("list?", None), "out_indices": ("list?", None),
}


def _backbone_stages(values: dict[str, Any]) -> None:
    """What transformers' BackboneConfigMixin sets when they are not given: one stage per layer,
    the last one out."""
    n = values["num_hidden_layers"]
    if values.get("stage_names") is None:
        values["stage_names"] = ["stem"] + [f"stage{i}" for i in range(1, n + 1)]
    if values.get("out_features") is None and values.get("out_indices") is None:
        values["out_features"], values["out_indices"] = [values["stage_names"][-1]], [len(values["stage_names"]) - 1]
    elif values.get("out_features") is None:
        values["out_features"] = [values["stage_names"][i] for i in values["out_indices"]]
    elif values.get("out_indices") is None:
        values["out_indices"] = [values["stage_names"].index(f) for f in values["out_features"]]


class Schema:
    def __init__(self, model_type: str, cls: str, fields: dict[str, tuple[str, Any]],
                 subs: dict[str, str] | None = None, heads_divide: bool = False,
                 derive: Any = None) -> None:
        self.model_type = model_type
        self.cls = cls                      # the transformers class name
        self.fields = fields
        self.subs = subs or {}              # attribute -> sub-config model_type
        self.heads_divide = heads_divide    # transformers validates hidden_size % num_attention_heads == 0
        self.derive = derive                # fills fields whose default depends on others (backbone stages)


SCHEMAS: dict[str, Schema] = {s.model_type: s for s in [
    Schema("clip", "CLIPConfig", {"projection_dim": ("int?", 512), "logit_scale_init_value": ("num?", 2.6592),
                                  "initializer_factor": ("float?", 1.0)},
           {"text_config": "clip_text_model", "vision_config": "clip_vision_model"}),
    Schema("clip_text_model", "CLIPTextConfig", _CLIP_TEXT, heads_divide=True),
    Schema("clip_vision_model", "CLIPVisionConfig", _CLIP_VISION, heads_divide=True),
    Schema("siglip", "SiglipConfig", {"initializer_factor": ("float", 1.0)},
           {"text_config": "siglip_text_model", "vision_config": "siglip_vision_model"}),
    Schema("siglip_text_model", "SiglipTextConfig", _SIGLIP_TEXT),
    Schema("siglip_vision_model", "SiglipVisionConfig", _SIGLIP_VISION),
    Schema("siglip2", "Siglip2Config", {"initializer_factor": ("float", 1.0)},
           {"text_config": "siglip2_text_model", "vision_config": "siglip2_vision_model"}),
    Schema("siglip2_text_model", "Siglip2TextConfig", _SIGLIP_TEXT),
    Schema("siglip2_vision_model", "Siglip2VisionConfig", _SIGLIP2_VISION),
    Schema("dinov2", "Dinov2Config", _DINOV2, derive=_backbone_stages),
    Schema("dinov2_with_registers", "Dinov2WithRegistersConfig", _DINOV2_REG, derive=_backbone_stages),
    Schema("dinov3_vit", "DINOv3ViTConfig", _DINOV3_VIT, derive=_backbone_stages),
]}

# keys transformers rewrites on save rather than carrying over
_DROPPED = ("transformers_version", "model_type")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


_CHECKS = {
    "int": _is_int,
    "float": lambda v: isinstance(v, float),
    "num": lambda v: _is_int(v) or isinstance(v, float),
    "str": lambda v: isinstance(v, str),
    "bool": lambda v: isinstance(v, bool),
    "size": lambda v: _is_int(v) or (isinstance(v, (list, tuple)) and all(_is_int(x) for x in v)),
    "ids": lambda v: _is_int(v) or (isinstance(v, list) and all(_is_int(x) for x in v)),
    "list": lambda v: isinstance(v, (list, tuple)),
}


def type_accepts(kind: str, value: Any) -> bool:
    if kind.endswith("?"):
        return value is None or _CHECKS[kind[:-1]](value)
    return _CHECKS[kind](value)


def _installed_transformers_version() -> str | None:
    from importlib import metadata
    try:
        return metadata.version("transformers")
    except metadata.PackageNotFoundError:
        return None


class HFConfig:
    """One transformers config as plain attributes; sub-configs are HFConfig attributes too."""

    def __init__(self, model_type: str, **values: Any) -> None:
        if model_type not in SCHEMAS:
            raise ValueError(f"unknown model_type {model_type!r}")
        self.__dict__["model_type"] = model_type
        self.__dict__.update(values)

    @property
    def schema(self) -> Schema:
        return SCHEMAS[self.model_type]

    def to_dict(self) -> dict[str, Any]:
        """The ``config.json`` content (``transformers_version`` at the top level only, as transformers saves it)."""
        out = self._values()
        version = _installed_transformers_version()
        if version:
            out["transformers_version"] = version
        return out

    def _values(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in self.__dict__.items():
            if k == "architectures" and v is None:
                continue
            out[k] = v._values() if isinstance(v, HFConfig) else copy.deepcopy(v)
        return out

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def save_pretrained(self, save_directory: str | Path) -> None:
        d = Path(save_directory)
        d.mkdir(parents=True, exist_ok=True)
        (d / "config.json").write_text(self.to_json_string(), encoding="utf-8")

    def to_transformers(self) -> Any:
        """The real transformers config (imports transformers, hence torch)."""
        import transformers
        data = self.to_dict()
        data.pop("transformers_version", None)
        return getattr(transformers, self.schema.cls).from_dict(data)

    def __eq__(self, other: Any) -> bool:
        return isinstance(other, HFConfig) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"{self.schema.cls}-like {self.to_json_string()}"


class Field(int):
    """An integer config value that remembers its field (``vision_config.hidden_size``).

    Shapes computed from a :func:`labelled` config carry it wherever a size *is* a field, so a
    shape that contradicts the config says which field it contradicts; arithmetic on it
    (``grid * grid + 1``) gives a plain int, a size no single field sets."""

    field: str

    def __new__(cls, value: int, field: str) -> "Field":
        out = int.__new__(cls, value)
        out.field = field
        return out

    __repr__ = int.__repr__
    __str__ = int.__repr__


def labelled(config: Any, prefix: str = "") -> Any:
    """A copy of ``config`` whose integer fields are :class:`Field` values named by their path
    (any other config comes back as it is)."""
    if not isinstance(config, HFConfig):
        return config
    out = copy.copy(config)
    for k, v in config.__dict__.items():
        if isinstance(v, HFConfig):
            out.__dict__[k] = labelled(v, f"{prefix}{k}.")
        elif _is_int(v):
            out.__dict__[k] = Field(v, f"{prefix}{k}")
    return out


def _field_error(model_type: str, key: str, kind: str, value: Any) -> ValueError:
    shown = json.dumps(value, default=str)[:60]
    want = {"int": "an integer", "float": "a float", "num": "a number", "str": "a string", "bool": "true or false",
            "size": "an integer or a list of integers", "ids": "an integer or a list of integers",
            "list": "a list"}[kind.rstrip("?")]
    return ValueError(f"{model_type}: field '{key}' must be {want}{' or null' if kind.endswith('?') else ''} "
                      f"(got {shown})")


def from_dict(model_type: str, data: dict[str, Any] | None) -> HFConfig:
    """An HFConfig of ``model_type`` from ``config.json`` content: defaults filled in, types checked."""
    schema = SCHEMAS[model_type]
    if data is not None and not isinstance(data, dict):
        raise ValueError(f"{model_type}: not a JSON object")
    data = dict(data or {})
    for key in _DROPPED:
        data.pop(key, None)
    values: dict[str, Any] = {}
    for attr, sub_type in schema.subs.items():
        sub = data.pop(attr, None)
        legacy = data.pop(f"{attr}_dict", None)    # old CLIP configs: text_config_dict overrides text_config
        if sub is not None and not isinstance(sub, (dict, HFConfig)):
            raise ValueError(f"{model_type}: field '{attr}' must be an object (got {json.dumps(sub, default=str)[:60]})")
        if legacy is not None and not isinstance(legacy, dict):
            raise ValueError(f"{model_type}: field '{attr}_dict' must be an object")
        sub = sub._values() if isinstance(sub, HFConfig) else dict(sub or {})
        values[attr] = from_dict(sub_type, {**sub, **(legacy or {})})
    derived = []
    for key, (kind, default) in schema.fields.items():
        if key in data:
            value = data.pop(key)
            if not type_accepts(kind, value):
                raise _field_error(model_type, key, kind, value)
            values[key] = value
        elif isinstance(default, str) and default.startswith("@"):
            derived.append((key, default[1:]))
        else:
            values[key] = copy.deepcopy(default)
    for key, source in derived:
        values[key] = values[source]
    for key, source in ((k, d[1:]) for k, (_, d) in schema.fields.items() if isinstance(d, str) and d.startswith("@")):
        if values[key] is None:
            values[key] = values[source]
    values.update(data)   # keys transformers does not know travel along, as transformers keeps them
    if schema.derive is not None:
        schema.derive(values)
    if schema.heads_divide and values["hidden_size"] % values["num_attention_heads"]:
        raise ValueError(f"{model_type}: hidden_size {values['hidden_size']} is not a multiple of "
                         f"num_attention_heads {values['num_attention_heads']}")
    return HFConfig(model_type, **values)


def make(model_type: str, **kwargs: Any) -> HFConfig:
    """Like ``CLIPConfig(text_config={...}, vision_config={...}, projection_dim=...)``."""
    return from_dict(model_type, kwargs)
