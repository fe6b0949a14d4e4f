"""Tiny models the deployment runtimes accept, built with the real libraries (shared by the export tests).

* language models: llama (SentencePiece BPE tokenizer with byte fallback, trained here by
  sentencepiece and kept as ``tokenizer.model`` as Llama repositories ship it) and qwen2
  (byte-level BPE ``tokenizer.json`` trained here by tokenizers); head dim 32, which llama.cpp
  and vLLM's CPU attention accept;
* vision towers: CLIP and SigLIP, head dim 32, 32x32 images of 8x8 patches;
* LLaVA checkpoints assembled by ``clawconvert merge-lora --vision`` from a base, a peft LoRA
  and a Linear-GELU-Linear connector (``other_params.bin``), exactly as a user would.
"""
from __future__ import annotations

import io
import shutil
import warnings
from pathlib import Path

import torch

CORPUS = ("the quick brown fox jumps over the lazy dog", "describe the image", "what is in this picture",
          "a cat sits on a mat", "a dog runs in the park", "USER: ASSISTANT: hello there, how are you today",
          "colours: red green blue yellow black white", "one two three four five six seven eight nine ten")
LLM = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
           max_position_embeddings=512, initializer_range=0.05)
VISION = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, image_size=32,
              patch_size=8)
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def sentencepiece_model(path: Path, vocab_size: int = 320) -> Path:
    """A SentencePiece BPE model with byte fallback (the Llama tokenizer's kind)."""
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(list(CORPUS) * 10), model_writer=buf, vocab_size=vocab_size,
                                   model_type="bpe", byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1,
                                   eos_id=2, pad_id=-1, normalization_rule_name="identity", minloglevel=2)
    path.write_bytes(buf.getvalue())
    return path


def llama_base(path: Path, seed: int = 0) -> Path:
    import transformers

    path.mkdir(parents=True)
    spdir = path.parent / f"{path.name}-sp"
    spdir.mkdir()
    sentencepiece_model(spdir / "tokenizer.model")
    tok = transformers.LlamaTokenizer.from_pretrained(str(spdir))
    shutil.rmtree(spdir)
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=len(tok), bos_token_id=1, eos_token_id=2, **LLM)
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    sentencepiece_model(path / "tokenizer.model")           # as Llama repositories ship it beside tokenizer.json
    return path


def byte_bpe(special_tokens: list[str], vocab_size: int = 320):
    """A byte-level BPE (Qwen2's kind) trained on CORPUS; ``special_tokens`` get the first ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(list(CORPUS) * 10, trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=special_tokens))
    return tk


def qwen2_base(path: Path, seed: int = 0) -> Path:
    import transformers

    path.mkdir(parents=True)
    tk = byte_bpe(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                               additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    torch.manual_seed(seed)
    cfg = transformers.Qwen2Config(vocab_size=len(tok), eos_token_id=tok.eos_token_id, tie_word_embeddings=True, **LLM)
    transformers.Qwen2ForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def lora(base: Path, path: Path, seed: int = 1234, std: float = 0.05) -> Path:
    import peft
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=ALL_LINEAR))
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in pm.named_parameters():
                if "lora_" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * std)
        pm.save_pretrained(path)
    return path


def vision_tower(path: Path, kind: str, seed: int = 1) -> Path:
    import transformers

    torch.manual_seed(seed)
    if kind == "clip":
        model = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(hidden_act="gelu", **VISION))
    else:
        model = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**VISION))
    model.save_pretrained(path)
    return path


def connector(path: Path, vision_hidden: int, llm_hidden: int, seed: int = 3) -> Path:
    torch.manual_seed(seed)
    proj = torch.nn.Sequential(torch.nn.Linear(vision_hidden, llm_hidden), torch.nn.GELU(),
                               torch.nn.Linear(llm_hidden, llm_hidden))
    torch.save(proj.state_dict(), path)
    return path


def merged(work: Path, base: Path, name: str, *extra: str) -> Path:
    """``clawconvert merge-lora BASE LORA OUT [extra...]`` with a fresh LoRA; returns OUT."""
    from clawconvert.cli import main

    adapter = lora(base, work / f"{name}-lora")
    out = work / name
    assert main(["merge-lora", str(base), str(adapter), str(out), *map(str, extra)]) == 0
    return out


def llava(work: Path, kind: str, base: Path | None = None) -> Path:
    """A CLIP or SigLIP LLaVA over a llama base, assembled by merge-lora --vision."""
    base = base or llama_base(work / f"llama-for-{kind}")
    tower = vision_tower(work / f"{kind}-tower", kind)
    conn = connector(work / f"{kind}-connector.bin", VISION["hidden_size"], LLM["hidden_size"])
    return merged(work, base, f"llava-{kind}", "--vision", tower, "--connector", conn)
