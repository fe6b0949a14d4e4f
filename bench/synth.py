"""Synthetic checkpoints of real architectures, seeded random weights, streamed to disk.

Run by ``bench/run.py`` in its own process (the harness itself never imports torch, so its
small footprint cannot leak into the children's measured peak RSS)::

    python bench/synth.py openclip L14 fp32 OUT_DIR
    python bench/synth.py big_vision So400m fp32 OUT_DIR
    python bench/synth.py llm-lora 1B bf16 OUT_DIR
    python bench/synth.py vlm-lora 3B bf16 OUT_DIR

No model is ever instantiated with real storage: tensor names and shapes come from the
architecture built on the ``meta`` device (open_clip ``CLIP``, transformers
``AutoModelForCausalLM``) or, for big_vision ``.npz`` files, from the layout that
big_vision's SigLIP checkpoints use.  The writer is told every tensor up front
(``SafetensorsWriter`` writes the header first), then each tensor is drawn from its own
seeded generator, written, and dropped.  Peak memory is one tensor.

OUT_DIR is written under a temporary name and renamed when complete, with a
``bench_checkpoint.json`` describing it; the harness treats a directory with that file as
a valid cache entry.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

sys.path.insert(0, str(Path(__file__).resolve().parent))

from clawconvert.io.writers import NpzWriter, SafetensorsWriter  # noqa: E402
from scenarios import SYNTH_VERSION  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
PREPROCESS = {"mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711],
              "interpolation": "bicubic", "resize_mode": "shortest"}

# -- architectures --------------------------------------------------------------------
TINY_CLIP = {  # seconds to write, converts in seconds: the smoke test's scenario 1
    "embed_dim": 32, "quick_gelu": False,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 16, "mlp_ratio": 2.0, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2, "mlp_ratio": 2.0},
}
TINY_CLIP_2 = {**TINY_CLIP, "vision_cfg": {**TINY_CLIP["vision_cfg"], "layers": 4, "width": 128},
               "text_cfg": {**TINY_CLIP["text_cfg"], "layers": 4, "width": 64, "heads": 4}}
OPENCLIP = {"tiny": TINY_CLIP, "tiny2": TINY_CLIP_2,
            "B32": "ViT-B-32", "L14": "ViT-L-14", "H14": "ViT-H-14", "bigG": "ViT-bigG-14"}

# SigLIP as big_vision stores it; So400m/14 at 224 px (open_clip ViT-SO400M-14-SigLIP,
# HF google/siglip-so400m-patch14-224)
SIGLIP = {
    "tiny": dict(width=64, depth=2, heads=4, mlp=128, patch=14, image=56, vocab=32000, ctx=16,
                 text_width=64, text_depth=2, text_heads=4, text_mlp=128,
                 open_clip=None, timm=None),
    "So400m": dict(width=1152, depth=27, heads=16, mlp=4304, patch=14, image=224, vocab=32000, ctx=16,
                   text_width=1152, text_depth=27, text_heads=16, text_mlp=4304,
                   open_clip="ViT-SO400M-14-SigLIP", timm="vit_so400m_patch14_siglip_224"),
}

# a LLaMA-3.2-1B-shaped causal LM (1.24 B parameters, tied embeddings) and a rank-64 LoRA
# on every linear layer of every block
LLM = {
    "tiny": dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1000, max_position_embeddings=256, tie_word_embeddings=True,
                 shard="150KB", r=8),
    "1B": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, head_dim=64, vocab_size=128256, max_position_embeddings=131072,
               rope_theta=500000.0, tie_word_embeddings=True, shard="1GB", r=64),
}
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# a Qwen2.5-VL-3B-shaped VLM (3.75 B parameters, tied embeddings), files in the spelling
# transformers writes (model.*, visual.*), and a rank-16 LoRA on every linear layer of the
# language model and on the ViT's fused qkv and attn.proj, named as PEFT names them under
# transformers 5 (model.language_model.*, model.visual.*), with the merger in modules_to_save
VLM = {
    "tiny": dict(text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                           num_key_value_heads=1, vocab_size=1000, tie_word_embeddings=True),
                 vision=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                             fullatt_block_indexes=[1]),
                 shard="150KB", r=8),
    "3B": dict(text=dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                         num_key_value_heads=2, vocab_size=151936, max_position_embeddings=128000,
                         tie_word_embeddings=True),
               vision=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048,
                           fullatt_block_indexes=[7, 15, 23, 31]),
               shard="4GB", r=16),
}
VLM_VISION_TARGETS = ["qkv", "proj"]


def _seed(name: str, seed: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") & ((1 << 63) - 1)


def _tensor(name: str, shape, dtype: torch.dtype, seed: int, std: float = 0.02) -> torch.Tensor:
    """One seeded tensor, drawn in fp32 and cast; norms/scales near 1, everything else small."""
    g = torch.Generator().manual_seed(_seed(name, seed))
    t = torch.randn(tuple(shape), generator=g)
    last = name.rsplit("/", 1)[-1].rsplit(".", 1)[-1]
    if last in ("scale",) or (name.endswith("weight") and any(k in name for k in ("ln", "norm", "layer_norm"))):
        t.mul_(0.05).add_(1.0)
    else:
        t.mul_(std)
    return t.to(dtype)


def _stream_safetensors(out: Path, entries: list[tuple[str, tuple, torch.dtype]], seed: int,
                        basename: str, max_shard_size: int = 1 << 62, std: dict | None = None) -> list[Path]:
    writer = SafetensorsWriter(out, entries, max_shard_size=max_shard_size, basename=basename)
    try:
        for name, shape, dtype in entries:
            writer.write(name, _tensor(name, shape, dtype, seed, (std or {}).get(name, 0.02)))
        return writer.close()
    except BaseException:
        writer.abort()
        raise


def _meta_state(build) -> list[tuple[str, tuple]]:
    with torch.device("meta"):
        model = build()
    return [(k, tuple(v.shape)) for k, v in model.state_dict().items()]


# -- OpenCLIP directory -----------------------------------------------------------------
def openclip_config(size: str) -> dict:
    arch = OPENCLIP[size]
    if isinstance(arch, dict):
        return json.loads(json.dumps(arch))
    import open_clip
    return open_clip.get_model_config(arch)


def write_openclip(size: str, dtype: str, out: Path, seed: int) -> dict:
    from open_clip.model import CLIP

    cfg = openclip_config(size)
    shapes = _meta_state(lambda: CLIP(**cfg))
    entries = [(k, s, DTYPES[dtype]) for k, s in shapes]
    (out / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": PREPROCESS}, indent=2) + "\n")
    files = _stream_safetensors(out, entries, seed, "open_clip_model")
    return {"arch": OPENCLIP[size] if isinstance(OPENCLIP[size], str) else f"tiny CLIP ({size})",
            "params": sum(math.prod(s) for _, s in shapes), "weights": [f.name for f in files]}


# -- big_vision SigLIP .npz -------------------------------------------------------------
def siglip_npz_layout(a: dict) -> list[tuple[str, tuple]]:
    """Tensor names and shapes of a big_vision SigLIP checkpoint (unscanned blocks)."""
    D, H, M = a["width"], a["heads"], a["mlp"]
    out: list[tuple[str, tuple]] = []

    def mha(prefix, d, h):
        for n in ("query", "key", "value"):
            out.append((f"{prefix}{n}/kernel", (d, h, d // h)))
            out.append((f"{prefix}{n}/bias", (h, d // h)))
        out.append((f"{prefix}out/kernel", (h, d // h, d)))
        out.append((f"{prefix}out/bias", (d,)))

    def block(prefix, d, h, m):
        for ln in ("LayerNorm_0", "LayerNorm_1"):
            out.append((f"{prefix}{ln}/scale", (d,)))
            out.append((f"{prefix}{ln}/bias", (d,)))
        mha(f"{prefix}MultiHeadDotProductAttention_0/", d, h)
        out.append((f"{prefix}MlpBlock_0/Dense_0/kernel", (d, m)))
        out.append((f"{prefix}MlpBlock_0/Dense_0/bias", (m,)))
        out.append((f"{prefix}MlpBlock_0/Dense_1/kernel", (m, d)))
        out.append((f"{prefix}MlpBlock_0/Dense_1/bias", (d,)))

    p = "params/img/"
    n_patches = (a["image"] // a["patch"]) ** 2
    out.append((f"{p}embedding/kernel", (a["patch"], a["patch"], 3, D)))
    out.append((f"{p}embedding/bias", (D,)))
    out.append((f"{p}pos_embedding", (1, n_patches, D)))
    for i in range(a["depth"]):
        block(f"{p}Transformer/encoderblock_{i}/", D, H, M)
    out.append((f"{p}Transformer/encoder_norm/scale", (D,)))
    out.append((f"{p}Transformer/encoder_norm/bias", (D,)))
    out.append((f"{p}MAPHead_0/probe", (1, 1, D)))
    mha(f"{p}MAPHead_0/MultiHeadDotProductAttention_0/", D, H)
    out.append((f"{p}MAPHead_0/LayerNorm_0/scale", (D,)))
    out.append((f"{p}MAPHead_0/LayerNorm_0/bias", (D,)))
    out.append((f"{p}MAPHead_0/MlpBlock_0/Dense_0/kernel", (D, M)))
    out.append((f"{p}MAPHead_0/MlpBlock_0/Dense_0/bias", (M,)))
    out.append((f"{p}MAPHead_0/MlpBlock_0/Dense_1/kernel", (M, D)))
    out.append((f"{p}MAPHead_0/MlpBlock_0/Dense_1/bias", (D,)))

    t, TD, TH, TM = "params/txt/", a["text_width"], a["text_heads"], a["text_mlp"]
    out.append((f"{t}Embed_0/embedding", (a["vocab"], TD)))
    out.append((f"{t}pos_embedding", (1, a["ctx"], TD)))
    for i in range(a["text_depth"]):
        block(f"{t}Encoder_0/encoderblock_{i}/", TD, TH, TM)
    out.append((f"{t}Encoder_0/encoder_norm/scale", (TD,)))
    out.append((f"{t}Encoder_0/encoder_norm/bias", (TD,)))
    out.append((f"{t}head/kernel", (TD, D)))
    out.append((f"{t}head/bias", (D,)))
    out.append(("params/t", (1,)))
    out.append(("params/b", (1,)))
    return out


def write_big_vision(size: str, dtype: str, out: Path, seed: int) -> dict:
    a = SIGLIP[size]
    layout = siglip_npz_layout(a)
    writer = NpzWriter(out / "siglip.npz", keep_bfloat16=True)
    try:
        for name, shape in layout:
            t = _tensor(name, shape, DTYPES[dtype], seed)
            if name == "params/t":
                t.fill_(math.log(10.0))
            elif name == "params/b":
                t.fill_(-10.0)
            writer.write(name, t)
        writer.close()
    except BaseException:
        writer.abort()
        raise
    (out / "bench_arch.json").write_text(json.dumps(a, indent=2) + "\n")
    return {"arch": a["open_clip"] or "tiny SigLIP", "params": sum(math.prod(s) for _, s in layout),
            "weights": ["siglip.npz"]}


# -- causal LM + LoRA adapter --------------------------------------------------------------
def llm_config(size: str, dtype: str = "bf16"):
    import transformers

    a = {k: v for k, v in LLM[size].items() if k not in ("shard", "r")}
    return transformers.LlamaConfig(**a, dtype=str(DTYPES[dtype]).replace("torch.", ""), bos_token_id=1, eos_token_id=2)


def write_llm_lora(size: str, dtype: str, out: Path, seed: int) -> dict:
    import transformers
    from clawconvert.io.writers import parse_size

    cfg = llm_config(size, dtype)
    shapes = _meta_state(lambda: transformers.AutoModelForCausalLM.from_config(cfg))
    if cfg.tie_word_embeddings:
        shapes = [(k, s) for k, s in shapes if k != "lm_head.weight"]
    base = out / "base"
    base.mkdir()
    cfg.save_pretrained(base)
    files = _stream_safetensors(base, [(k, s, DTYPES[dtype]) for k, s in shapes], seed, "model",
                                max_shard_size=parse_size(LLM[size]["shard"]))

    r = LLM[size]["r"]
    adapter = out / "adapter"
    adapter.mkdir()
    lora = []
    for k, s in shapes:
        mod = k.rsplit(".", 1)[0]
        if k.endswith(".weight") and mod.rsplit(".", 1)[-1] in LORA_TARGETS:
            o, i = s
            lora.append((f"base_model.model.{mod}.lora_A.weight", (r, i), torch.float32))
            lora.append((f"base_model.model.{mod}.lora_B.weight", (o, r), torch.float32))
    _stream_safetensors(adapter, lora, seed + 1, "adapter_model", std={n: 0.01 for n, _, _ in lora})
    (adapter / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(base),
        "r": r, "lora_alpha": 2 * r, "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
        "target_modules": LORA_TARGETS, "use_rslora": False, "use_dora": False, "modules_to_save": None,
        "init_lora_weights": True, "inference_mode": True,
    }, indent=2) + "\n")
    return {"arch": "LLaMA-3.2-1B-shaped causal LM + LoRA r=%d on %s" % (r, ",".join(LORA_TARGETS))
            if size != "tiny" else f"tiny LLaMA + LoRA r={r}",
            "params": sum(math.prod(s) for _, s in shapes),
            "adapter_params": sum(math.prod(s) for _, s, _ in lora),
            "weights": [f"base/{f.name}" for f in files] + ["adapter/adapter_model.safetensors"]}


def write_vlm_lora(size: str, dtype: str, out: Path, seed: int) -> dict:
    import transformers
    from clawconvert.io.writers import parse_size

    spec = VLM[size]
    rope = {"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1000000.0}
    cfg = transformers.Qwen2_5_VLConfig(text_config=dict(spec["text"], rope_parameters=rope),
                                        vision_config=spec["vision"], tie_word_embeddings=True,
                                        dtype=str(DTYPES[dtype]).replace("torch.", ""))
    modules = _meta_state(lambda: transformers.Qwen2_5_VLForConditionalGeneration(cfg))
    modules = [(k, s) for k, s in modules if k != "lm_head.weight"]           # tied
    # files in the spelling transformers writes; modules (and so the adapter) in transformers 5's
    on_disk = [(k.replace("model.language_model.", "model.").replace("model.visual.", "visual."), s)
               for k, s in modules]
    base = out / "base"
    base.mkdir()
    cfg.save_pretrained(base)
    files = _stream_safetensors(base, [(k, s, DTYPES[dtype]) for k, s in on_disk], seed, "model",
                                max_shard_size=parse_size(spec["shard"]))
    r = spec["r"]
    adapter = out / "adapter"
    adapter.mkdir()
    lora, saved = [], []
    for k, s in modules:
        mod, leaf = k.rsplit(".", 1)[0], k.rsplit(".", 2)[-2]
        is_lm = k.startswith("model.language_model.layers.") and leaf in LORA_TARGETS
        is_vit = k.startswith("model.visual.blocks.") and leaf in VLM_VISION_TARGETS
        if k.endswith(".weight") and (is_lm or is_vit):
            o, i = s
            lora.append((f"base_model.model.{mod}.lora_A.weight", (r, i), torch.float32))
            lora.append((f"base_model.model.{mod}.lora_B.weight", (o, r), torch.float32))
        elif k.startswith("model.visual.merger."):
            saved.append((f"base_model.model.{k}", s, DTYPES[dtype]))
    _stream_safetensors(adapter, lora + saved, seed + 1, "adapter_model", std={n: 0.01 for n, _, _ in lora})
    (adapter / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(base),
        "r": r, "lora_alpha": 2 * r, "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
        "target_modules": r"model\.language_model\.layers\.\d+\.(self_attn|mlp)\.(%s)|model\.visual\.blocks\.\d+\.attn\.(%s)"
                          % ("|".join(LORA_TARGETS), "|".join(VLM_VISION_TARGETS)),
        "use_rslora": False, "use_dora": False, "modules_to_save": ["merger"],
        "init_lora_weights": True, "inference_mode": True,
    }, indent=2) + "\n")
    return {"arch": (f"Qwen2.5-VL-3B-shaped VLM + LoRA r={r} on the LM's linear layers and the ViT's qkv/proj, "
                     f"merger in modules_to_save") if size != "tiny" else f"tiny Qwen2.5-VL + LoRA r={r}",
            "params": sum(math.prod(s) for _, s in on_disk),
            "adapter_params": sum(math.prod(s) for _, s, _ in lora + saved),
            "weights": [f"base/{f.name}" for f in files] + ["adapter/adapter_model.safetensors"]}


KINDS = {"openclip": (write_openclip, OPENCLIP), "big_vision": (write_big_vision, SIGLIP),
         "llm-lora": (write_llm_lora, LLM), "vlm-lora": (write_vlm_lora, VLM)}


def synthesize(kind: str, size: str, dtype: str, out: Path, seed: int = 0) -> dict:
    write, sizes = KINDS[kind]
    if size not in sizes:
        raise SystemExit(f"unknown {kind} size {size!r} (known: {', '.join(sizes)})")
    out = Path(out)
    tmp = out.with_name(out.name + f".partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    t0 = time.perf_counter()
    info = write(size, dtype, tmp, seed)
    files = [p for p in tmp.rglob("*") if p.is_file()]
    info.update(kind=kind, size=size, dtype=dtype, seed=seed, synth_version=SYNTH_VERSION,
                bytes=sum(p.stat().st_size for p in files if p.name in {Path(w).name for w in info["weights"]}),
                seconds_to_write=round(time.perf_counter() - t0, 2))
    (tmp / "bench_checkpoint.json").write_text(json.dumps(info, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return info


if __name__ == "__main__":
    if len(sys.argv) not in (5, 6):
        raise SystemExit(__doc__)
    print(json.dumps(synthesize(sys.argv[1], sys.argv[2], sys.argv[3], Path(sys.argv[4]),
                                int(sys.argv[5]) if len(sys.argv) == 6 else 0)))
