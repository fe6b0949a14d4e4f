"""Native VLMs sized for vLLM's CPU backend, with the tokenizer and processor files a user's checkpoint has.

tests/vlm_models.py builds each architecture with 128 made-up token ids and no processor: enough
for transformers' forward, not for a runtime, which tokenizes a prompt and lets the family's own
processor expand the image placeholder.  Here each :class:`RuntimeCase` adds to one of its cases:

* a byte-level BPE tokenizer (tests/runtime_models.py) holding the family's special tokens, and
  the config's vocabulary and token ids taken from it;
* head dims vLLM's CPU attention takes (32; vision towers too), a context of 512;
* the family's processor (image processor at the tiny image size, a chat template with image
  items) saved with ``save_pretrained``: ``tokenizer.json``, ``chat_template.jinja``,
  ``preprocessor_config.json``, ``processor_config.json`` (and the video processor where the
  family has one), as the Hub's checkpoints ship them.

``base(case, path)`` writes such a BASE (``preprocessor_config.json`` and
``video_preprocessor_config.json`` beside the unified ``processor_config.json`` transformers 5
writes); the LoRA targets and connector are vlm_models' own.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import tokenizers
import transformers

import runtime_models as rm
import vlm_models as vm

QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
                "<|video_pad|>"]
GEMMA_SPECIAL = ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>",
                 "<image_soft_token>"]
IDEFICS_SPECIAL = (["<|endoftext|>", "<|im_start|>", "<end_of_utterance>", "<fake_token_around_image>", "<image>",
                    "<global-img>"] + [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)])
LLAVA_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"]
SIGLIP = dict(vm.SIGLIP, hidden_size=64, intermediate_size=128)                  # 2 heads of 32
QWEN_VISION = dict(vm.QWEN_VISION, num_heads=2)
QWEN_PIXELS = dict(patch_size=4, temporal_patch_size=2, merge_size=2,
                   size={"shortest_edge": 16 * 16, "longest_edge": 64 * 64})
PROMPT = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "describe the image"}]}]


def chat_template(turn: str, end: str, image: str, generation: str, roles: dict | None = None) -> str:
    """A Jinja chat template: ``turn`` opens a message (``{role}`` in it), image items are ``image``."""
    role = "{{ %r.get(m['role'], m['role']) }}" % (roles,) if roles else "{{ m['role'] }}"
    return ("{% for m in messages %}" + turn.replace("{role}", role)
            + "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
            + "{% if c['type'] == 'image' %}" + image + "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
            + "{% endfor %}{% endif %}" + end + "{% endfor %}"
            + "{% if add_generation_prompt %}" + generation + "{% endif %}")


CHATML = dict(turn="<|im_start|>{role}\n", end="<|im_end|>\n", generation="<|im_start|>assistant\n")
QWEN_TEMPLATE = chat_template(image="<|vision_start|><|image_pad|><|vision_end|>", **CHATML)


def tokenizer(special: list[str], **kw) -> transformers.PreTrainedTokenizerFast:
    return transformers.PreTrainedTokenizerFast(tokenizer_object=rm.byte_bpe(special), **kw)


def text_config(tok, **kw) -> dict:
    ids = dict(vocab_size=len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
               eos_token_id=tok.eos_token_id)
    return dict(vm.TEXT, max_position_embeddings=512, **ids, **kw)


def _qwen_tokenizer():
    return tokenizer(QWEN_SPECIAL, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                     additional_special_tokens=QWEN_SPECIAL[1:])


def _qwen_ids(tok) -> dict:
    ids = tok.convert_tokens_to_ids
    return dict(image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
                vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"))


def _qwen_processor(processor: str, image: str, video: str):
    def make(tok):
        return getattr(transformers, processor)(
            image_processor=getattr(transformers, image)(**QWEN_PIXELS),
            video_processor=getattr(transformers, video)(**QWEN_PIXELS), tokenizer=tok, chat_template=QWEN_TEMPLATE)
    return make


def _gemma_tokenizer():
    tok = tokenizer(GEMMA_SPECIAL, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                    additional_special_tokens=GEMMA_SPECIAL[3:],
                    extra_special_tokens={"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                                          "image_token": "<image_soft_token>"})
    # Gemma's vocabulary has runs of 1-4 newlines as single pieces, and vLLM's Gemma 3 processor looks
    # them up by name (it re-merges the "\n\n" it puts around each image with the prompt's newlines)
    tok.add_tokens([tokenizers.AddedToken("\n" * n, normalized=False) for n in (4, 3, 2, 1)])
    return tok


def _gemma_processor(tok):
    template = chat_template(turn="<start_of_turn>{role}\n", end="<end_of_turn>\n", image="<start_of_image>",
                             generation="<start_of_turn>model\n", roles={"assistant": "model"})
    return transformers.Gemma3Processor(
        image_processor=transformers.Gemma3ImageProcessor(size={"height": 28, "width": 28}, do_pan_and_scan=False),
        tokenizer=tok, image_seq_length=4, chat_template="{{ bos_token }}" + template)


def _idefics_tokenizer():
    return tokenizer(IDEFICS_SPECIAL, bos_token="<|im_start|>", eos_token="<end_of_utterance>",
                     pad_token="<|endoftext|>", additional_special_tokens=IDEFICS_SPECIAL[1:])


IDEFICS_TEMPLATE = chat_template(turn="<|im_start|>{role}:", end="<end_of_utterance>\n", image="<image>",
                                 generation="<|im_start|>Assistant:", roles={"user": "User", "assistant": "Assistant"})
IDEFICS_PIXELS = dict(size={"longest_edge": 56}, max_image_size={"longest_edge": 28}, do_image_splitting=True)


def _idefics3_processor(tok):
    return transformers.Idefics3Processor(image_processor=transformers.Idefics3ImageProcessor(**IDEFICS_PIXELS),
                                          tokenizer=tok, image_seq_len=4, chat_template=IDEFICS_TEMPLATE)


def _smolvlm_processor(tok):
    return transformers.SmolVLMProcessor(
        image_processor=transformers.SmolVLMImageProcessor(**IDEFICS_PIXELS),
        video_processor=transformers.SmolVLMVideoProcessor(size={"longest_edge": 28}), tokenizer=tok,
        image_seq_len=4, chat_template=IDEFICS_TEMPLATE)


def _llava_tokenizer():
    return tokenizer(LLAVA_SPECIAL, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                     additional_special_tokens=LLAVA_SPECIAL[1:])


LLAVA_TEMPLATE = chat_template(image="<image>\n", **CHATML)
PINPOINTS = [[28, 28], [28, 56], [56, 28]]


def _llava_next_processor(tok):
    return transformers.LlavaNextProcessor(
        image_processor=transformers.LlavaNextImageProcessor(size={"shortest_edge": 28},
                                                             crop_size={"height": 28, "width": 28},
                                                             image_grid_pinpoints=PINPOINTS),
        tokenizer=tok, patch_size=SIGLIP["patch_size"], vision_feature_select_strategy="default",
        num_additional_image_tokens=1, chat_template=LLAVA_TEMPLATE)


def _llava_onevision_processor(tok):
    return transformers.LlavaOnevisionProcessor(
        image_processor=transformers.LlavaOnevisionImageProcessor(size={"height": 28, "width": 28},
                                                                  image_grid_pinpoints=PINPOINTS),
        video_processor=transformers.LlavaOnevisionVideoProcessor(size={"height": 28, "width": 28}),
        tokenizer=tok, num_image_tokens=(28 // SIGLIP["patch_size"]) ** 2, vision_feature_select_strategy="full",
        chat_template=LLAVA_TEMPLATE)


def _id(tok, token: str) -> int:
    return tok.convert_tokens_to_ids(token)


@dataclass
class RuntimeCase:
    name: str                                     # the vlm_models.CASES key
    tokenizer: Callable[[], Any]
    config: Callable[[Any], Any]                  # tokenizer -> config
    processor: Callable[[Any], Any]               # tokenizer -> processor
    runner: dict = field(default_factory=dict)    # extra request keys for tests/vllm_runner.py

    @property
    def case(self) -> vm.Case:
        return vm.CASES[self.name]


def _qwen_text(tok, rope_parameters=vm.MROPE, **kw):
    return text_config(tok, rope_parameters=rope_parameters, **kw)


def _idefics_case(name: str, config_class: str, processor) -> RuntimeCase:
    """Idefics3 and SmolVLM share the tokenizer and the config fields (llama LM, SigLIP, scale factor 2)."""
    return RuntimeCase(
        name, _idefics_tokenizer,
        lambda tok: getattr(transformers, config_class)(
            text_config=text_config(tok, model_type="llama"), vision_config=dict(SIGLIP), scale_factor=2,
            image_token_id=_id(tok, "<image>")),
        processor)


CASES = {
    "qwen2_vl": RuntimeCase(
        "qwen2_vl", _qwen_tokenizer,
        lambda tok: transformers.Qwen2VLConfig(
            text_config=_qwen_text(tok), vision_config=dict(QWEN_VISION, embed_dim=64, hidden_size=64, mlp_ratio=2),
            **_qwen_ids(tok)),
        _qwen_processor("Qwen2VLProcessor", "Qwen2VLImageProcessor", "Qwen2VLVideoProcessor")),
    "qwen2_5_vl": RuntimeCase(
        "qwen2_5_vl", _qwen_tokenizer,
        lambda tok: transformers.Qwen2_5_VLConfig(
            text_config=_qwen_text(tok), vision_config=dict(QWEN_VISION, hidden_size=64, out_hidden_size=64,
                                                            intermediate_size=128, fullatt_block_indexes=[1],
                                                            window_size=16),
            **_qwen_ids(tok)),
        _qwen_processor("Qwen2_5_VLProcessor", "Qwen2VLImageProcessor", "Qwen2VLVideoProcessor")),
    "qwen3_vl": RuntimeCase(
        "qwen3_vl", _qwen_tokenizer,
        lambda tok: transformers.Qwen3VLConfig(
            # Qwen's configs say "mrope_interleaved": true; transformers interleaves regardless, vLLM reads the flag
            # (default false: without it vLLM runs sectioned M-RoPE and its logprobs are 0.049 off here)
            text_config=_qwen_text(tok, rope_parameters=dict(vm.MROPE, mrope_interleaved=True)),
            vision_config=dict(QWEN_VISION, hidden_size=64, out_hidden_size=64,
                               intermediate_size=128, deepstack_visual_indexes=[0],
                               num_position_embeddings=64),
            **_qwen_ids(tok)),
        _qwen_processor("Qwen3VLProcessor", "Qwen2VLImageProcessor", "Qwen3VLVideoProcessor")),
    "gemma3": RuntimeCase(
        "gemma3", _gemma_tokenizer,
        lambda tok: transformers.Gemma3Config(
            text_config=text_config(tok, sliding_window=8, query_pre_attn_scalar=32),
            vision_config=dict(SIGLIP, vision_use_head=False), mm_tokens_per_image=4,
            image_token_index=_id(tok, "<image_soft_token>"), boi_token_index=_id(tok, "<start_of_image>"),
            eoi_token_index=_id(tok, "<end_of_image>")),
        _gemma_processor),
    "idefics3": _idefics_case("idefics3", "Idefics3Config", _idefics3_processor),
    "smolvlm": _idefics_case("smolvlm", "SmolVLMConfig", _smolvlm_processor),
    "llava_next": RuntimeCase(
        "llava_next", _llava_tokenizer,
        lambda tok: transformers.LlavaNextConfig(
            text_config=text_config(tok, model_type="mistral", sliding_window=None),
            vision_config=dict(SIGLIP, model_type="clip_vision_model"), image_token_index=_id(tok, "<image>"),
            image_grid_pinpoints=PINPOINTS),
        _llava_next_processor),
    "llava_onevision": RuntimeCase(
        "llava_onevision", _llava_tokenizer,
        lambda tok: transformers.LlavaOnevisionConfig(
            text_config=text_config(tok, model_type="qwen2"),
            vision_config=dict(SIGLIP, model_type="siglip_vision_model", vision_use_head=False),
            image_token_index=_id(tok, "<image>"), video_token_index=_id(tok, "<video>"),
            image_grid_pinpoints=PINPOINTS, vision_aspect_ratio="anyres_max_9"),
        _llava_onevision_processor),
}


def base(rc: RuntimeCase, path: Path, seed: int = 0):
    """Write BASE (seeded weights, tokenizer, processor files) to ``path``; return (model, processor)."""
    tok = rc.tokenizer()
    config = rc.config(tok)
    model = vm.build(dataclasses.replace(rc.case, config=lambda: config), path, seed=seed)
    processor = rc.processor(tok)
    processor.save_pretrained(path)               # tokenizer files, chat_template.jinja, processor_config.json
    for part in ("image_processor", "video_processor"):      # and the per-part files the Hub's checkpoints carry
        if getattr(processor, part, None) is not None:
            getattr(processor, part).save_pretrained(path)
    return model, processor
