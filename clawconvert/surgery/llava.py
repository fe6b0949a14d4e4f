"""LLaVA assembly: connector layouts, the vision tower source, and the HF LLaVA config and processor.

A classic research VLM (vision tower -> Linear-GELU-Linear connector -> LLM) maps exactly
onto ``LlavaForConditionalGeneration``: the connector becomes ``multi_modal_projector``, the
vision tower's last hidden state without CLS is ``vision_feature_layer=-1`` with the
``default`` strategy, and the positions of the replace token become ``<image>`` tokens that
the processor expands to one per image feature.

The output uses the llava-hf file layout (``language_model.model.*``, ``language_model.lm_head``,
``vision_tower.vision_model.*``, ``multi_modal_projector.*``): transformers 4.x, 5.x and vLLM
all load it.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from ..errors import ClawError
from ..io.readers import TensorStore, open_tensors

# Connector file layouts: a regex over each key, and which of its layers is linear_1 / linear_2.
CONNECTOR_LAYOUTS = (
    # nn.Sequential(Linear, GELU, Linear).state_dict(): feature_proj / other_params.bin ("0.weight"),
    # LLaVA mm_projector.bin / non_lora_trainables.bin ("model.mm_projector.0.weight")
    ("nn.Sequential", re.compile(r"^(?P<prefix>(?:.+\.)?)(?P<layer>[02])\.(?P<param>weight|bias)$"),
     {"0": "linear_1", "2": "linear_2"}),
    # HF LlavaForConditionalGeneration: "multi_modal_projector.linear_1.weight"
    ("HF LLaVA", re.compile(r"^(?P<prefix>(?:.+\.)?multi_modal_projector\.)linear_(?P<layer>[12])\.(?P<param>weight|bias)$"),
     {"1": "linear_1", "2": "linear_2"}),
)

# HF model types --vision accepts -> (vision tower model_type, tokens besides patches: CLS)
VISION_MODEL_TYPES = {
    "clip": ("clip_vision_model", 1),
    "clip_vision_model": ("clip_vision_model", 1),
    "siglip": ("siglip_vision_model", 0),
    "siglip_vision_model": ("siglip_vision_model", 0),
}

# Output spelling of the language model's canonical names (see merge.canonical).
LLAVA_LM_PREFIXES = (("model.", "language_model.model."), ("lm_head.", "language_model.lm_head."))

CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}{{ '<image>' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{ '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
PLAIN_TEMPLATE = (  # llava-1.5 style
    "{% for message in messages %}{{ message['role'].upper() + ': ' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}{{ '<image>\\n' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{ '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def llava_name(canonical_lm_name: str) -> str:
    for old, new in LLAVA_LM_PREFIXES:
        if canonical_lm_name.startswith(old):
            return new + canonical_lm_name[len(old):]
    raise ClawError(f"internal: no LLaVA name for language model tensor '{canonical_lm_name}'")


# ------------------------------------------------------------------------------------
# connector
# ------------------------------------------------------------------------------------
@dataclass
class Connector:
    """Linear-GELU-Linear weights found in some file: output role -> (store, key)."""

    origin: str                                # where it came from, for messages and the manifest
    layout: str
    tensors: dict[str, tuple[TensorStore, str]]  # "linear_1.weight" -> (store, key)

    @property
    def bias(self) -> bool:
        return "linear_1.bias" in self.tensors

    def shape(self, role: str) -> tuple[int, ...]:
        store, key = self.tensors[role]
        return tuple(store.info(key).shape)

    def key(self, role: str) -> str:
        return self.tensors[role][1]


def looks_like_connector(name: str) -> bool:
    return any(pattern.match(name) for _, pattern, _ in CONNECTOR_LAYOUTS)


def detect_connector(store: TensorStore, names: Iterable[str], origin: str) -> Connector | None:
    """Find exactly one Linear-GELU-Linear group among ``names``; None when there is none."""
    found: dict[tuple[str, str], dict[str, str]] = {}
    for name in names:
        for layout, pattern, layers in CONNECTOR_LAYOUTS:
            m = pattern.match(name)
            if m:
                found.setdefault((layout, m["prefix"]), {})[f"{layers[m['layer']]}.{m['param']}"] = name
                break
    groups = {k: v for k, v in found.items() if {"linear_1.weight", "linear_2.weight"} <= set(v)}
    if not groups:
        return None
    if len(groups) > 1:
        where = ", ".join(f"'{p or '(no prefix)'}'" for _, p in groups)
        raise ClawError(f"{origin}: several connector-like groups ({where}); keep only the connector in the file")
    (layout, prefix), roles = next(iter(groups.items()))
    if ("linear_1.bias" in roles) != ("linear_2.bias" in roles):
        raise ClawError(f"{origin}: connector '{prefix}' has a bias on only one of its two Linear layers")
    return Connector(origin, layout, {role: (store, key) for role, key in roles.items()})


def open_connector(path: str | Path, unsafe_pickle: bool = False) -> Connector:
    store = open_tensors(path, unsafe_pickle=unsafe_pickle)
    conn = detect_connector(store, store.keys(), str(path))
    if conn is None:
        sample = ", ".join(sorted(store.keys())[:6])
        raise ClawError(f"{path}: unknown connector layout (keys: {sample}); expected nn.Sequential "
                        f"'0.weight, 0.bias, 2.weight, 2.bias', LLaVA 'model.mm_projector.{{0,2}}.*' or HF "
                        f"'multi_modal_projector.linear_{{1,2}}.*' (Linear-GELU-Linear)")
    return conn


def check_connector(conn: Connector, vision_hidden: int, text_hidden: int) -> None:
    """linear_1: vision width -> LLM width; linear_2: LLM width -> LLM width."""
    want = {"linear_1.weight": (text_hidden, vision_hidden), "linear_2.weight": (text_hidden, text_hidden)}
    if conn.bias:
        want.update({"linear_1.bias": (text_hidden,), "linear_2.bias": (text_hidden,)})
    for role, shape in want.items():
        if conn.shape(role) != shape:
            raise ClawError(f"{conn.origin}: connector tensor '{conn.key(role)}' has shape {conn.shape(role)}, "
                            f"but a vision width of {vision_hidden} and an LLM width of {text_hidden} need {shape}")


# ------------------------------------------------------------------------------------
# vision tower
# ------------------------------------------------------------------------------------
def _read_config(path: Path) -> dict:
    file = path / "config.json"
    if not file.is_file():
        raise ClawError(f"{path}: no config.json (expected a Hugging Face model directory)")
    try:
        config = json.loads(file.read_text())
        assert isinstance(config, dict)
        return config
    except Exception as e:
        raise ClawError(f"{file}: not valid JSON ({e.__class__.__name__})") from e


def vision_tower_source(src: str | Path, scratch: Path | None = None,
                        unsafe_pickle: bool = False) -> tuple[TensorStore, dict]:
    """The vision tower of ``src`` as (lazy tensors named ``vision_model.*``, HF vision_config dict).

    An HF ``CLIPModel`` / ``SiglipModel`` directory (``vision_model.*`` + ``vision_config``) or
    ``CLIPVisionModel`` / ``SiglipVisionModel`` directory is read in place.  Anything else
    (OpenCLIP, big_vision, ...) goes through ``extract-visual`` into an HF vision tower under
    ``scratch``, a directory the caller keeps until the tensors have been read.  The tensors'
    directory, ``store.path.parent``, also holds the tower's preprocessor config when it has one.
    """
    src = Path(src)
    if not (src / "config.json").is_file():     # not HF: OpenCLIP, big_vision, a checkpoint file
        if scratch is None:
            raise ClawError(f"{src}: not an HF model directory, and no scratch space to extract its vision tower")
        from .extract import extract

        src = extract(src, Path(scratch) / "vision_tower", tower="visual", to="hf",
                      unsafe_pickle=unsafe_pickle).destination
    config = _read_config(src)
    if config.get("model_type") not in VISION_MODEL_TYPES:
        raise ClawError(f"{src}: model_type '{config.get('model_type')}' is not an HF CLIP or SigLIP model; "
                        f"--vision takes {', '.join(VISION_MODEL_TYPES)} directories, or an OpenCLIP / big_vision "
                        f"source that extract-visual accepts")
    model_type = config["model_type"]
    tower_type, _ = VISION_MODEL_TYPES[model_type]
    vision_only = model_type == tower_type
    vision_config = dict(config if vision_only else config.get("vision_config") or {})
    for key in ("architectures", "transformers_version", "_name_or_path", "dtype", "torch_dtype"):
        vision_config.pop(key, None)
    vision_config["model_type"] = tower_type
    store = open_tensors(src, unsafe_pickle=unsafe_pickle)
    # transformers 5 may write a vision-only model without the 'vision_model.' level
    bare = vision_only and not any(k.startswith("vision_model.") for k in store.keys())
    store.rename(lambda k: "vision_model." + k if bare else (k if k.startswith("vision_model.") else None))
    if not len(store):
        raise ClawError(f"{src}: no vision_model.* tensors in its weights")
    return store, vision_config


def num_additional_tokens(vision_config: dict) -> int:
    return VISION_MODEL_TYPES[vision_config["model_type"]][1]


def image_processor_for(src: Path, vision_config: dict):
    """The tower directory's own preprocessor config when it has one; else the family's defaults at its size."""
    from transformers import AutoImageProcessor, CLIPImageProcessor, SiglipImageProcessor

    if (Path(src) / "preprocessor_config.json").is_file():
        return AutoImageProcessor.from_pretrained(str(src)), "from the vision source"
    size = int(vision_config.get("image_size", 224))
    if vision_config["model_type"] == "clip_vision_model":
        return (CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}),
                "CLIP defaults (the vision source has no preprocessor_config.json)")
    return (SiglipImageProcessor(size={"height": size, "width": size}),
            "SigLIP defaults (the vision source has no preprocessor_config.json)")


def image_token_count(vision_config: dict, strategy: str) -> int:
    side = int(vision_config.get("image_size", 224)) // int(vision_config.get("patch_size", 16))
    return side * side + num_additional_tokens(vision_config) - (1 if strategy == "default" else 0)


# ------------------------------------------------------------------------------------
# tokenizer, processor, config
# ------------------------------------------------------------------------------------
def load_tokenizer(base: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(base))
    except Exception as e:
        first = (str(e).strip().splitlines() or [e.__class__.__name__])[0][:200]
        raise ClawError(f"{base}: cannot load its tokenizer, which the LLaVA processor needs ({first})") from e


def add_image_token(tokenizer, token: str) -> tuple[int, bool]:
    """The image token's id, adding it as one special token when the vocabulary lacks it."""
    from tokenizers import AddedToken

    added = token not in tokenizer.get_vocab()
    if added:
        tokenizer.add_tokens([AddedToken(token, special=True, normalized=False)], special_tokens=True)
    ids = tokenizer.encode(token, add_special_tokens=False)
    if len(ids) != 1:
        raise ClawError(f"image token {token!r} does not encode as one token (got {ids})")
    return ids[0], added


def choose_chat_template(tokenizer, path: Path | None) -> tuple[str, str]:
    if path is not None:
        try:
            return Path(path).read_text(), f"from {path}"
        except OSError as e:
            raise ClawError(f"{path}: cannot read chat template: {e.strerror or e}") from e
    if "<|im_start|>" in tokenizer.get_vocab():
        return CHATML_TEMPLATE, "built-in ChatML template with image items"
    return PLAIN_TEMPLATE, "built-in 'USER: ... ASSISTANT:' template with image items"


def llava_config(text_config: dict, vision_config: dict, *, image_token_index: int, image_seq_length: int,
                 vision_feature_layer: int, strategy: str, projector_bias: bool, dtype: str | None):
    from transformers import LlavaConfig

    layers = int(vision_config.get("num_hidden_layers", 12))
    if not -(layers + 1) <= vision_feature_layer <= layers:
        raise ClawError(f"--vision-feature-layer {vision_feature_layer} is outside the vision tower's "
                        f"{layers + 1} hidden states (-{layers + 1}..{layers})")
    config = LlavaConfig(
        vision_config=vision_config, text_config=text_config, image_token_index=image_token_index,
        image_seq_length=image_seq_length, projector_hidden_act="gelu",
        vision_feature_layer=vision_feature_layer, vision_feature_select_strategy=strategy,
        multimodal_projector_bias=projector_bias,
        tie_word_embeddings=bool(text_config.get("tie_word_embeddings", False)))
    config.architectures = ["LlavaForConditionalGeneration"]
    if dtype:
        config.dtype = dtype
    return config
