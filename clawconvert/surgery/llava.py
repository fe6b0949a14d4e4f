"""LLaVA assembly: connector layouts, the vision tower source, and the HF LLaVA config and processor.

A classic research VLM (vision tower -> Linear-GELU-Linear connector -> LLM) maps exactly
onto ``LlavaForConditionalGeneration``: the connector becomes ``multi_modal_projector``, the
vision tower's last hidden state without CLS is ``vision_feature_layer=-1`` with the
``default`` strategy, and the positions of the replace token become ``<image>`` tokens that
the processor expands to one per image feature.

Which names the output uses is llava.yaml's ``write`` layout (llava-hf: ``language_model.model.*``,
``vision_tower.vision_model.*``, ``multi_modal_projector.*``, which transformers 4.x, 5.x and vLLM
all load); which file layouts a connector or a vision tower may come in is its ``part_sources``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from ..architectures import Layout, load_architecture
from ..errors import ClawError
from ..io.readers import TensorStore, open_tensors

CONNECTOR_ROLES = ("linear_1.weight", "linear_1.bias", "linear_2.weight", "linear_2.bias",
                   "image_newline")           # LLaVA-NeXT's row between tiles, when the file holds one

# Built-in chat templates with image items; IMAGE is replaced by the configured image token.
# Their sources spell the role markers literally ('<|im_start|>', 'USER: ', 'ASSISTANT: '), which
# is how llama.cpp recognises a template without running Jinja (llama_chat_apply_template).
_CONTENT = ("{% if message['content'] is string %}{{ message['content'] }}{% else %}"
            "{% for item in message['content'] %}{% if item['type'] == 'image' %}{{ IMAGE }}"
            "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}")
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}" + _CONTENT +
    "{{ '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
PLAIN_TEMPLATE = (  # llava-1.5 style: "USER: <image>\n... ASSISTANT:"
    "{% for message in messages %}{% if message['role'] == 'user' %}{{ 'USER: ' }}"
    "{% elif message['role'] == 'assistant' %}{{ 'ASSISTANT: ' }}{% elif message['role'] == 'system' %}"
    "{{ 'SYSTEM: ' }}{% else %}{{ message['role'].upper() + ': ' }}"
    "{% endif %}" + _CONTENT.replace("{{ IMAGE }}", "{{ IMAGE + '\\n' }}") +
    "{{ '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def chat_template(template: str, image_token: str) -> str:
    return template.replace("IMAGE", repr(image_token))


def _table():
    return load_architecture("llava")


# ------------------------------------------------------------------------------------
# connector
# ------------------------------------------------------------------------------------
@dataclass
class Connector:
    """Linear-GELU-Linear weights found in some file: role (``linear_1.weight``...) -> (store, key)."""

    origin: str                                # where it came from, for messages and the manifest
    layout: str                                # the part_sources layout of llava.yaml that explains it
    tensors: dict[str, tuple[TensorStore, str]]

    @property
    def bias(self) -> bool:
        return "linear_1.bias" in self.tensors

    def shape(self, role: str) -> tuple[int, ...]:
        store, key = self.tensors[role]
        return tuple(store.info(key).shape)

    def key(self, role: str) -> str:
        return self.tensors[role][1]


def _connector_match(layout: Layout, name: str) -> tuple[str, str] | None:
    """(leading prefix, role) when ``name`` is a connector tensor under ``layout`` after some prefix
    (``feature_proj.``, ``base_model.model.``...) at a dot boundary."""
    starts = [0] + [i + 1 for i, ch in enumerate(name) if ch == "."]
    for i in starts:
        canonical = layout.to_canonical(name[i:])
        if canonical is not None and canonical.removeprefix("connector/") in CONNECTOR_ROLES:
            return name[:i], canonical.removeprefix("connector/")
    return None


def looks_like_connector(name: str) -> bool:
    return any(_connector_match(lay, name) for lay in _table().part_sources["connector"])


def detect_connector(store: TensorStore, names: Iterable[str], origin: str) -> Connector | None:
    """Find exactly one Linear-GELU-Linear group among ``names``; None when there is none."""
    found: dict[tuple[str, str], dict[str, str]] = {}
    for name in names:
        # the layout that explains the most of the name ('model.mm_projector.0.weight' is LLaVA's
        # mm_projector, not an nn.Sequential under a 'model.mm_projector.' prefix)
        matches = [(len(m[0]), i, lay.name, m) for i, lay in enumerate(_table().part_sources["connector"])
                   if (m := _connector_match(lay, name))]
        if matches:
            _, _, layout, (prefix, role) = min(matches)
            found.setdefault((layout, prefix), {})[role] = name
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
        known = "; ".join(f"{lay.name} ('{lay.prefixes[0][1]}...')" for lay in _table().part_sources["connector"])
        raise ClawError(f"{path}: unknown connector layout (keys: {sample}); expected a Linear-GELU-Linear "
                        f"state dict in one of the layouts of mappings/architectures/llava.yaml: {known}")
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


def vision_towers() -> dict[str, dict]:
    """``--vision`` model types (llava.yaml's ``vision_towers``): {tower model_type, prefix_tokens}."""
    return _table().vision_towers


def vision_tower_source(src: str | Path, scratch: Path | None = None,
                        unsafe_pickle: bool = False) -> tuple[TensorStore, dict]:
    """The vision tower of ``src`` as (lazy tensors under their canonical ``vision/...`` names,
    HF vision_config dict).

    An HF ``CLIPModel`` / ``SiglipModel`` directory or ``CLIPVisionModel`` / ``SiglipVisionModel``
    directory is read in place, through llava.yaml's ``part_sources.vision`` layouts.  Anything
    else (OpenCLIP, big_vision, ...) goes through ``extract-visual`` into an HF vision tower under
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
    towers = vision_towers()
    if config.get("model_type") not in towers:
        raise ClawError(f"{src}: model_type '{config.get('model_type')}' is not an HF vision model a LLaVA takes; "
                        f"--vision takes {', '.join(towers)} directories, or an OpenCLIP / big_vision "
                        f"source that extract-visual accepts")
    model_type = config["model_type"]
    tower_type = towers[model_type]["tower"]
    vision_only = model_type == tower_type
    vision_config = dict(config if vision_only else config.get("vision_config") or {})
    for key in ("architectures", "transformers_version", "_name_or_path", "dtype", "torch_dtype"):
        vision_config.pop(key, None)
    vision_config["model_type"] = tower_type
    store = open_tensors(src, unsafe_pickle=unsafe_pickle)
    full, bare = _table().part_source("vision", "full-model"), _table().part_source("vision", "bare")
    # a full model keeps the tower under vision_model.; transformers 5 writes a lone tower without that level
    layout = full if not vision_only or any(full.to_canonical(k) for k in store.keys()) else bare
    store.rename(layout.to_canonical)
    if not len(store):
        raise ClawError(f"{src}: no vision tower tensors in its weights (layout {layout.name}: "
                        f"'{layout.prefixes[0][1]}...')")
    return store, vision_config


def num_additional_tokens(vision_config: dict) -> int:
    """Tokens before the patches in the tower's last hidden state (CLS, registers)."""
    from ..architectures import evaluate_config
    expr = vision_towers()[vision_config["model_type"]]["prefix_tokens"]
    defaults = {"num_register_tokens": {"dinov2_with_registers": 4}.get(vision_config["model_type"], 0)}  # configs' defaults
    return int(evaluate_config(str(expr), {**defaults, **vision_config}, "llava.yaml vision_towers"))


def tower_layout(vision_config: dict) -> str | None:
    """The LLaVA layout a model with this tower is written in, when not the table's default."""
    return vision_towers()[vision_config["model_type"]].get("write")


def image_processor_for(src: Path, vision_config: dict):
    """The tower directory's own preprocessor config when it has one; else the family's defaults at its size."""
    from transformers import AutoImageProcessor, CLIPImageProcessor, SiglipImageProcessor

    if (Path(src) / "preprocessor_config.json").is_file():
        return AutoImageProcessor.from_pretrained(str(src)), "from the vision source"
    size = int(vision_config.get("image_size", 224))
    if vision_config["model_type"] == "clip_vision_model":
        return (CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}),
                "CLIP defaults (the vision source has no preprocessor_config.json)")
    if vision_config["model_type"].startswith(("dinov2", "dinov3")):
        from transformers import BitImageProcessor
        return (BitImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                                  image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]),
                "DINOv2/v3 defaults (ImageNet mean/std; the vision source has no preprocessor_config.json)")
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


def choose_chat_template(tokenizer, path: Path | None, image_token: str = "<image>") -> tuple[str, str]:
    if path is not None:
        try:
            return Path(path).read_text(), f"from {path}"
        except OSError as e:
            raise ClawError(f"{path}: cannot read chat template: {e.strerror or e}") from e
    if "<|im_start|>" in tokenizer.get_vocab():
        return chat_template(CHATML_TEMPLATE, image_token), f"built-in ChatML template with {image_token} image items"
    return (chat_template(PLAIN_TEMPLATE, image_token),
            f"built-in 'USER: ... ASSISTANT:' template with {image_token} image items")


def llava_config(text_config: dict, vision_config: dict, *, image_token_index: int, image_seq_length: int,
                 vision_feature_layer: int, strategy: str, projector_bias: bool, dtype: str | None,
                 grid_pinpoints: list | None = None, pad_token_id: int | None = None):
    """``LlavaConfig``, or ``LlavaNextConfig`` with ``grid_pinpoints`` (LLaVA 1.6 anyres)."""
    from transformers import LlavaConfig, LlavaNextConfig

    layers = int(vision_config.get("num_hidden_layers", 12))
    if not -(layers + 1) <= vision_feature_layer <= layers:
        raise ClawError(f"--vision-feature-layer {vision_feature_layer} is outside the vision tower's "
                        f"{layers + 1} hidden states (-{layers + 1}..{layers})")
    common = dict(vision_config=vision_config, text_config=text_config, image_token_index=image_token_index,
                  image_seq_length=image_seq_length, projector_hidden_act="gelu",
                  vision_feature_layer=vision_feature_layer, vision_feature_select_strategy=strategy,
                  multimodal_projector_bias=projector_bias,
                  tie_word_embeddings=bool(text_config.get("tie_word_embeddings", False)))
    if grid_pinpoints:
        config = LlavaNextConfig(**common, image_grid_pinpoints=grid_pinpoints)
        config.architectures = ["LlavaNextForConditionalGeneration"]
    else:
        config = LlavaConfig(**common)
        config.architectures = ["LlavaForConditionalGeneration"]
    if pad_token_id is not None:
        config.pad_token_id = pad_token_id
    if dtype:
        config.dtype = dtype
    return config


def processor_class(grid_pinpoints: list | None):
    from transformers import LlavaNextProcessor, LlavaProcessor
    return LlavaNextProcessor if grid_pinpoints else LlavaProcessor


def next_image_processor(base, grid_pinpoints: list):
    """LLaVA-NeXT's image processor with the tower's own preprocessing (size, crop, mean, std)."""
    from transformers import LlavaNextImageProcessor
    keep = {k: getattr(base, k) for k in ("size", "crop_size", "image_mean", "image_std", "do_center_crop",
                                         "resample") if getattr(base, k, None) is not None}
    return LlavaNextImageProcessor(image_grid_pinpoints=grid_pinpoints, **keep)
