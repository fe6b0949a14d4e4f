"""Tiny native VLMs built from their transformers configs, with inputs that hold one image.

Shared by the native-VLM tests (merge-lora, extraction, inspect).  Each :class:`Case` is one
architecture: a config with seeded random weights, the LoRA targets that reach its language
model, its vision tower and (as modules_to_save) its connector, and ``inputs(model)``, which
builds ``input_ids`` with the right number of image tokens (counted by the model's own
``get_image_features``) plus the pixel tensors its forward takes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import transformers

VOCAB = 128
IMAGE, VIDEO, VSTART, VEND, BOI, EOI = 120, 121, 122, 123, 124, 125
TEXT = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, head_dim=32, pad_token_id=0, bos_token_id=1, eos_token_id=2,
            initializer_range=0.1)
MROPE = {"rope_type": "default", "mrope_section": [4, 6, 6], "rope_theta": 10000.0}
SIGLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=28,
              patch_size=7)
QWEN_VISION = dict(depth=2, num_heads=2, patch_size=4, spatial_merge_size=2, temporal_patch_size=2,
                   initializer_range=0.1)


def _ids(n_image: int, *, start: int | None = None, end: int | None = None) -> torch.Tensor:
    """A prompt: text, [start] n_image image tokens [end], more text."""
    pre, post = [1, 5, 9, 17, 33], [40, 41, 7, 60, 3, 12, 2]
    img = ([start] if start is not None else []) + [IMAGE] * n_image + ([end] if end is not None else [])
    return torch.tensor([pre + img + post])


def _count(features: Any) -> int:
    out = features.pooler_output if hasattr(features, "pooler_output") else features
    if isinstance(out, (list, tuple)):
        return sum(int(t.reshape(-1, t.shape[-1]).shape[0]) for t in out)
    return int(out.reshape(-1, out.shape[-1]).shape[0])


def _qwen_inputs(model, merge: int = 2) -> dict:
    grid = torch.tensor([[1, 4, 4]])
    cfg = model.config.vision_config
    dim = 3 * cfg.temporal_patch_size * cfg.patch_size ** 2
    pixels = torch.randn(int(grid.prod()), dim, generator=torch.Generator().manual_seed(7))
    n = int(grid.prod()) // merge ** 2
    ids = _ids(n, start=VSTART, end=VEND)
    return {"input_ids": ids, "pixel_values": pixels, "image_grid_thw": grid, "mm_token_type_ids": (ids == IMAGE).long()}


def _square(model, size: int = 28) -> torch.Tensor:
    return torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(7))


def _llava_inputs(model) -> dict:
    px = _square(model)
    with torch.no_grad():
        n = _count(model.model.get_image_features(pixel_values=px))
    return {"input_ids": _ids(n), "pixel_values": px}


def _anyres_inputs(model) -> dict:
    px = torch.randn(1, 2, 3, 28, 28, generator=torch.Generator().manual_seed(7))   # base view + one 1x1 tile
    sizes = torch.tensor([[28, 28]])
    with torch.no_grad():
        n = _count(model.model.get_image_features(pixel_values=px, image_sizes=sizes))
    return {"input_ids": _ids(n), "pixel_values": px, "image_sizes": sizes}


def _gemma3_inputs(model) -> dict:
    n = model.config.mm_tokens_per_image
    ids = _ids(n, start=BOI, end=EOI)
    return {"input_ids": ids, "pixel_values": _square(model), "token_type_ids": (ids == IMAGE).long()}


def _idefics3_inputs(model) -> dict:
    px = torch.randn(1, 1, 3, 28, 28, generator=torch.Generator().manual_seed(7))
    mask = torch.ones(1, 1, 28, 28, dtype=torch.long)
    with torch.no_grad():
        n = _count(model.model.get_image_features(pixel_values=px, pixel_attention_mask=mask))
    return {"input_ids": _ids(n), "pixel_values": px, "pixel_attention_mask": mask}


@dataclass
class Case:
    name: str
    config: Callable[[], Any]
    inputs: Callable[[Any], dict]
    targets: list[str]                 # LoRA target_modules: language model and vision tower
    connector: list[str]               # modules_to_save: the connector / merger
    lm_class: str | None               # the standalone causal LM extract-text writes (None: refused)
    vision_class: str | None = None    # the standalone vision model extract-visual writes (None: refused)
    lora: dict = field(default_factory=dict)
    tie: str | None = None             # what merge-lora must do with tied embeddings

    def model_class(self):
        config = self.config()
        return transformers.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING[type(config)]


def _qwen_text(**kw):
    return dict(TEXT, rope_parameters=MROPE, **kw)


CASES = {
    "qwen2_vl": Case(
        "qwen2_vl",
        lambda: transformers.Qwen2VLConfig(
            text_config=_qwen_text(), vision_config=dict(QWEN_VISION, embed_dim=32, hidden_size=64, mlp_ratio=2),
            image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=VSTART, vision_end_token_id=VEND),
        _qwen_inputs, ["q_proj", "v_proj", "down_proj", "qkv", "attn.proj", "fc1"], ["merger"], "Qwen2ForCausalLM"),
    "qwen2_5_vl": Case(
        "qwen2_5_vl",
        lambda: transformers.Qwen2_5_VLConfig(
            text_config=_qwen_text(), vision_config=dict(QWEN_VISION, hidden_size=32, out_hidden_size=64,
                                                         intermediate_size=64, fullatt_block_indexes=[1],
                                                         window_size=16),
            image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=VSTART, vision_end_token_id=VEND),
        _qwen_inputs, ["q_proj", "v_proj", "down_proj", "qkv", "attn.proj"], ["merger"], "Qwen2ForCausalLM"),
    "qwen3_vl": Case(
        "qwen3_vl",
        lambda: transformers.Qwen3VLConfig(
            text_config=_qwen_text(), vision_config=dict(QWEN_VISION, hidden_size=32, out_hidden_size=64,
                                                         intermediate_size=64, deepstack_visual_indexes=[0],
                                                         num_position_embeddings=64),
            image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=VSTART, vision_end_token_id=VEND),
        _qwen_inputs, ["q_proj", "v_proj", "down_proj", "qkv", "attn.proj", "linear_fc1"],
        ["merger", "deepstack_merger_list.0"], "Qwen3ForCausalLM"),
    "qwen3_vl_moe": Case(
        "qwen3_vl_moe",
        lambda: transformers.Qwen3VLMoeConfig(
            text_config=_qwen_text(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48,
                                   decoder_sparse_step=1),
            vision_config=dict(QWEN_VISION, hidden_size=32, out_hidden_size=64, intermediate_size=64,
                               deepstack_visual_indexes=[0], num_position_embeddings=64),
            image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=VSTART, vision_end_token_id=VEND),
        _qwen_inputs, ["q_proj", "o_proj", "qkv", "attn.proj", "linear_fc2"],    # experts are bare parameters
        ["merger"], None),
    "gemma3": Case(
        "gemma3",
        lambda: transformers.Gemma3Config(
            text_config=dict(TEXT, sliding_window=8, query_pre_attn_scalar=32),
            vision_config=dict(SIGLIP, vision_use_head=False), mm_tokens_per_image=4,
            image_token_index=IMAGE, boi_token_index=BOI, eoi_token_index=EOI),
        _gemma3_inputs, ["q_proj", "v_proj", "down_proj", "out_proj", "embed_tokens"], ["multi_modal_projector"],
        "Gemma3ForCausalLM", "SiglipVisionModel", tie="untied"),    # LoRA on the tied embedding: the head stays
    "idefics3": Case(
        "idefics3",
        lambda: transformers.Idefics3Config(
            text_config=dict(TEXT, model_type="llama"), vision_config=dict(SIGLIP), scale_factor=2,
            image_token_id=IMAGE),
        _idefics3_inputs, ["q_proj", "v_proj", "down_proj", "fc1"], ["connector"], "LlamaForCausalLM",
        "SiglipVisionModel"),
    "smolvlm": Case(
        "smolvlm",
        lambda: transformers.SmolVLMConfig(
            text_config=dict(TEXT, model_type="llama"), vision_config=dict(SIGLIP), scale_factor=2,
            image_token_id=IMAGE),
        _idefics3_inputs, ["q_proj", "v_proj", "o_proj", "fc2"], ["connector"], "LlamaForCausalLM",
        "SiglipVisionModel"),
    "llava": Case(
        "llava",
        lambda: transformers.LlavaConfig(
            text_config=dict(TEXT, model_type="llama"),
            vision_config=dict(SIGLIP, model_type="clip_vision_model"), image_token_index=IMAGE,
            vision_feature_layer=-2),
        _llava_inputs, ["q_proj", "v_proj", "down_proj", "fc1"], ["multi_modal_projector"], "LlamaForCausalLM",
        "CLIPVisionModel"),
    "llava_next": Case(
        "llava_next",
        lambda: transformers.LlavaNextConfig(
            text_config=dict(TEXT, model_type="mistral", sliding_window=None),
            vision_config=dict(SIGLIP, model_type="clip_vision_model"), image_token_index=IMAGE,
            image_grid_pinpoints=[[28, 28]]),
        _anyres_inputs, ["q_proj", "k_proj", "gate_proj", "fc2"], ["multi_modal_projector", "image_newline"],
        "MistralForCausalLM", "CLIPVisionModel"),
    "llava_onevision": Case(
        "llava_onevision",
        lambda: transformers.LlavaOnevisionConfig(
            text_config=dict(TEXT, model_type="qwen2"),
            vision_config=dict(SIGLIP, model_type="siglip_vision_model", vision_use_head=False),
            image_token_index=IMAGE, image_grid_pinpoints=[[28, 28]], vision_aspect_ratio="anyres_max_9"),
        _anyres_inputs, ["q_proj", "v_proj", "up_proj", "out_proj"], ["multi_modal_projector"],
        "Qwen2ForCausalLM", "SiglipVisionModel"),
}


def build(case: Case, path, seed: int = 0):
    """Save a seeded tiny model of ``case`` to ``path``; return it (fp32, eval)."""
    torch.manual_seed(seed)
    model = case.model_class()(case.config()).eval()
    with torch.no_grad():            # norms and biases away from their constant init, so each one matters
        gen = torch.Generator().manual_seed(seed + 1)
        for name, p in model.named_parameters():
            if p.ndim == 1 or "norm" in name or "image_newline" in name:
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    model.save_pretrained(path)
    return model


def save_lora(case: Case, model, path, std: float = 0.1):
    """Wrap ``model`` in a seeded peft LoRA on ``case``'s targets (connector in modules_to_save),
    save the adapter to ``path`` and return the PEFT model."""
    import warnings

    import peft
    from test_merge_lora import randomize_adapter

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=case.targets,
                                                        modules_to_save=case.connector, **case.lora))
        randomize_adapter(pm, std=std)
        pm.save_pretrained(path)
    return pm
