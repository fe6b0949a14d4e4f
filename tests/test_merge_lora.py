"""merge-lora: merged logits equal the unmerged PEFT model's (peft's own forward), tensor by tensor.

Every base is a tiny seeded transformers model; every adapter is made by real peft
(``get_peft_model``), its LoRA weights randomised so deltas are far from zero, saved with
``save_pretrained`` and loaded back with ``PeftModel.from_pretrained`` for the reference.
"""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from clawconvert.cli import main  # noqa: E402

transformers.utils.logging.disable_progress_bar()

TOL = 1e-4
IDS = torch.tensor([[1, 5, 9, 2, 33, 17, 4, 60, 3, 12, 7, 50]])

CONFIGS = {
    "llama": lambda **kw: transformers.LlamaConfig(**{**_SMALL, **kw}),
    "qwen2": lambda **kw: transformers.Qwen2Config(**{**_SMALL, **kw}),
    "mistral": lambda **kw: transformers.MistralConfig(**{**_SMALL, **kw}),
    "gemma": lambda **kw: transformers.GemmaConfig(**{**_SMALL, "head_dim": 8, **kw}),
    "gpt2": lambda **kw: transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=32, **kw),
}
_SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=64, max_position_embeddings=64, initializer_range=0.1)
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# ------------------------------------------------------------------------------------
# helpers shared with test_llava.py
# ------------------------------------------------------------------------------------
def make_base(path: Path, kind: str, seed: int = 0, dtype=torch.float32, **config) -> Path:
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(CONFIGS[kind](**config))
    model.to(dtype).save_pretrained(path)
    return path


def randomize_adapter(model, std: float = 0.2) -> None:
    """In place, so factors peft ties (ensure_weight_tying) stay tied."""
    gen = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.3 * torch.randn(p.shape, generator=gen))
            elif "lora_" in name or "modules_to_save" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * std)


def make_adapter(base: Path, path: Path, std: float = 0.2, **lora) -> Path:
    model = transformers.AutoModelForCausalLM.from_pretrained(base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(model, peft.LoraConfig(**{"r": 4, "lora_alpha": 8, **lora}))
        randomize_adapter(pm, std)
        pm.save_pretrained(path)
    return path


def peft_logits(base: Path, adapter: Path, ids=IDS) -> torch.Tensor:
    """The reference: the unmerged adapter as peft loads it from disk."""
    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.PeftModel.from_pretrained(model, adapter).eval()
    with torch.no_grad():
        return pm(ids).logits


def hf_logits(path: Path, ids=IDS) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits


def tree_hash(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in Path(path).rglob("*") if p.is_file()):
        h.update(str(f.relative_to(path)).encode() + f.read_bytes())
    return h.hexdigest()


def run_cli(*args) -> int:
    return main(["merge-lora", *map(str, args)])


# ------------------------------------------------------------------------------------
# parity against peft's unmerged forward
# ------------------------------------------------------------------------------------
CASES = {
    # name: (base kind, base config, LoraConfig kwargs, expected tie action or None)
    "llama-all-linear": ("llama", {}, dict(target_modules=ALL_LINEAR), None),
    "qwen2-rslora-patterns": ("qwen2", {"tie_word_embeddings": True},
                              dict(target_modules=["q_proj", "v_proj", "down_proj"], use_rslora=True, r=4,
                                   rank_pattern={"v_proj": 2, r"layers\.1\.self_attn\.q_proj": 6},
                                   alpha_pattern={"down_proj": 3}), "kept"),
    "mistral-dora": ("mistral", {}, dict(target_modules=["q_proj", "k_proj", "o_proj", "up_proj"],
                                         use_dora=True), None),
    "gemma-embedding-lora-tied": ("gemma", {"tie_word_embeddings": True},
                                  dict(target_modules=["embed_tokens", "q_proj"]), "untied"),
    "qwen2-embedding-dora": ("qwen2", {}, dict(target_modules=["embed_tokens", "gate_proj"], use_dora=True), None),
    "qwen2-tied-ensure-weight-tying": ("qwen2", {"tie_word_embeddings": True},
                                       dict(target_modules=["embed_tokens", "lm_head", "q_proj"],
                                            ensure_weight_tying=True), "kept"),
    "qwen2-tied-lm-head-lora": ("qwen2", {"tie_word_embeddings": True},
                                dict(target_modules=["lm_head", "k_proj"]), "untied"),
    "qwen2-lora-bias-modules-to-save": ("qwen2", {}, dict(target_modules=["q_proj", "k_proj", "v_proj"],
                                                          lora_bias=True, modules_to_save=["lm_head"]), None),
    "qwen2-tied-modules-to-save-embed": ("qwen2", {"tie_word_embeddings": True},
                                         dict(target_modules=["o_proj"], modules_to_save=["embed_tokens"]), "untied"),
    "qwen2-tied-modules-to-save-ensure": ("qwen2", {"tie_word_embeddings": True},
                                          dict(target_modules=["o_proj"], modules_to_save=["embed_tokens"],
                                               ensure_weight_tying=True), "kept"),
    "llama-trained-biases": ("llama", {"attention_bias": True},
                             dict(target_modules=["q_proj", "o_proj"], bias="lora_only"), None),
    "gpt2-fan-in-fan-out": ("gpt2", {}, dict(target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True),
                            "kept"),
}


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("merge")


@pytest.mark.parametrize("case", list(CASES))
def test_merged_logits_equal_unmerged_peft(case, work, capsys):
    kind, config, lora, tie = CASES[case]
    base = make_base(work / f"{case}-base", kind, **config)
    adapter = make_adapter(base, work / f"{case}-lora", **lora)
    if case == "llama-trained-biases":   # bias="lora_only" saves the biases; make them differ from the base's
        _perturb_saved(adapter, ".base_layer.bias")
    out = work / f"{case}-out"
    before = (tree_hash(base), tree_hash(adapter))
    assert run_cli(base, adapter, out) == 0
    printed = capsys.readouterr().out
    assert (tree_hash(base), tree_hash(adapter)) == before

    ref, base_logits, merged = peft_logits(base, adapter), hf_logits(base), hf_logits(out)
    diff = (merged - ref).abs().max().item()
    print(f"{case}: max|merged - peft unmerged| = {diff:.2e}, adapter effect {(ref - base_logits).abs().max():.2e}")
    assert (ref - base_logits).abs().max() > 1e-2, "the adapter must change the outputs for the test to mean anything"
    assert diff < TOL

    manifest = json.loads((out / "clawconvert_manifest.json").read_text())
    assert manifest["merge"]["lora_modules"] > 0
    if tie is not None:
        assert manifest["merge"]["tie"]["action"] == tie
        assert f"tied embeddings {tie}" in printed
        saved = json.loads((out / "config.json").read_text())
        assert saved.get("tie_word_embeddings", True) is (tie == "kept")


def _perturb_saved(adapter: Path, suffix: str) -> None:
    from safetensors.torch import load_file, save_file
    f = adapter / "adapter_model.safetensors"
    sd = load_file(f)
    sd = {k: (v + 0.5 if k.endswith(suffix) else v) for k, v in sd.items()}
    assert any(k.endswith(suffix) for k in sd)
    save_file(sd, f, metadata={"format": "pt"})


def test_ensure_weight_tying_is_not_merged_twice(work):
    """peft's own merge_and_unload adds the tied delta twice; clawconvert's output does not."""
    base = make_base(work / "ewt-base", "qwen2", tie_word_embeddings=True)
    adapter = make_adapter(base, work / "ewt-lora", target_modules=["embed_tokens", "lm_head"],
                           ensure_weight_tying=True)
    assert run_cli(base, adapter, work / "ewt-out") == 0
    ref = peft_logits(base, adapter)
    model = transformers.AutoModelForCausalLM.from_pretrained(base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged_by_peft = peft.PeftModel.from_pretrained(model, adapter).merge_and_unload().eval()
    with torch.no_grad():
        peft_diff = (merged_by_peft(IDS).logits - ref).abs().max().item()
    ours = (hf_logits(work / "ewt-out") - ref).abs().max().item()
    print(f"tied ensure_weight_tying: peft merge_and_unload off by {peft_diff:.2e}, clawconvert {ours:.2e}")
    assert peft_diff > 1e-2 and ours < TOL


def test_bf16_delta_is_computed_in_fp32_and_cast_once(work):
    base = make_base(work / "bf16-base", "llama", dtype=torch.bfloat16)
    adapter = make_adapter(base, work / "bf16-lora", std=0.02, target_modules=["q_proj"])
    assert run_cli(base, adapter, work / "bf16-out") == 0
    from safetensors.torch import load_file
    merged = load_file(work / "bf16-out" / "model.safetensors")
    original = load_file(base / "model.safetensors")
    key = "model.layers.0.self_attn.q_proj.weight"
    assert merged[key].dtype == torch.bfloat16
    # the delta as peft computes it on a float32 copy of the same base
    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.PeftModel.from_pretrained(model, adapter)
    delta = pm.base_model.model.model.layers[0].self_attn.q_proj.get_delta_weight("default")
    once = (original[key].float() + delta).to(torch.bfloat16)
    twice = original[key] + delta.to(torch.bfloat16)          # bf16 delta added in bf16: two roundings
    assert torch.equal(merged[key], once)
    assert not torch.equal(once, twice)


def test_dtype_flag_and_sharding(work):
    base = make_base(work / "shard-base", "llama")
    adapter = make_adapter(base, work / "shard-lora", target_modules=["q_proj", "down_proj"])
    out = work / "shard-out"
    assert run_cli(base, adapter, out, "--dtype", "bf16", "--max-shard-size", "20KB") == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "bfloat16"
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert next(model.parameters()).dtype == torch.bfloat16
    diff = (model.float()(IDS).logits - peft_logits(base, adapter)).abs().max().item()
    assert diff < 0.1     # bf16 storage; the fp32 parity cases above hold the 1e-4 line


def test_tokenizer_and_side_files_are_copied(work):
    base = make_base(work / "tok-base", "llama")
    write_tokenizer(base)
    (base / "LICENSE").write_text("base license\n")
    adapter = make_adapter(base, work / "tok-lora", target_modules=["v_proj"])
    out = work / "tok-out"
    assert run_cli(base, adapter, out) == 0
    assert (out / "LICENSE").read_text() == "base license\n"
    assert (out / "generation_config.json").is_file()
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok("describe the image").input_ids == transformers.AutoTokenizer.from_pretrained(base)(
        "describe the image").input_ids


def write_tokenizer(path: Path, vocab: int = 60) -> None:
    """A word-level tokenizer with ChatML markers, smaller than the model's vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    words = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "user", "assistant", "describe", "the", "image",
             "what", "is", "in", "this", "picture", "a", "cat", "dog"]
    words += [f"w{i}" for i in range(vocab - len(words))]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<|endoftext|>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>",
                                               pad_token="<|endoftext|>",
                                               additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    tok.save_pretrained(path)


# ------------------------------------------------------------------------------------
# adapters named after transformers 4 vs 5 LLaVA modules, into a LLaVA base
# ------------------------------------------------------------------------------------
def test_llava_base_accepts_old_and_new_adapter_prefixes(work):
    from safetensors.torch import load_file, save_file
    torch.manual_seed(0)
    text = CONFIGS["qwen2"]()
    vision = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=4, image_size=16, patch_size=8)
    config = transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_index=63,
                                      vision_feature_layer=-1)
    base = work / "llava-base"
    transformers.LlavaForConditionalGeneration(config).save_pretrained(base)
    model = transformers.LlavaForConditionalGeneration.from_pretrained(base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(model, peft.LoraConfig(
            r=4, lora_alpha=8, target_modules=r".*language_model.*\.(q_proj|v_proj)")).eval()
        randomize_adapter(pm)
        new = work / "llava-lora-new"
        pm.save_pretrained(new)
        ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
        with torch.no_grad():
            ref = pm(input_ids=ids).logits
    keys = list(load_file(new / "adapter_model.safetensors"))
    assert any(".model.language_model.layers." in k for k in keys)      # transformers 5 module names
    old = work / "llava-lora-old"                                     # the same adapter, transformers 4 names
    old.mkdir()
    (old / "adapter_config.json").write_text((new / "adapter_config.json").read_text())
    save_file({k.replace("base_model.model.model.language_model.", "base_model.model.language_model.model."): v
               for k, v in load_file(new / "adapter_model.safetensors").items()},
              old / "adapter_model.safetensors", metadata={"format": "pt"})
    for adapter in (new, old):
        out = work / f"{adapter.name}-merged"
        assert run_cli(base, adapter, out) == 0
        merged = transformers.LlavaForConditionalGeneration.from_pretrained(out).eval()
        with torch.no_grad():
            diff = (merged(input_ids=ids).logits - ref).abs().max().item()
        print(f"LLaVA base, adapter named {adapter.name}: max diff {diff:.2e}")
        assert diff < TOL


# ------------------------------------------------------------------------------------
# streaming: peak memory follows the largest tensor, not the model
# ------------------------------------------------------------------------------------
MEMORY_SCRIPT = """
import re, sys
import peft, safetensors, transformers
from clawconvert.cli import main

def status(field):
    return int(re.search(field + r":\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024

assert main(["merge-lora", *sys.argv[1:4], "-q"]) == 0   # warm-up: every lazy import done
open("/proc/self/clear_refs", "w").write("5")          # reset the peak (VmHWM) to the current RSS
before = status("VmRSS")
rc = main(["merge-lora", *sys.argv[4:], "-q"])
print("GROWTH", status("VmHWM") - before, rc)
"""


def _synthetic_llama(work: Path, layers: int) -> tuple[Path, Path, int]:
    """A llama-shaped fp32 base (random weights written directly) and an r=8 all-linear adapter."""
    base, adapter = work / f"mem-base-{layers}", work / f"mem-lora-{layers}"
    base.mkdir()
    adapter.mkdir()
    cfg = CONFIGS["llama"](hidden_size=512, intermediate_size=1024, num_hidden_layers=layers, vocab_size=4096,
                           num_attention_heads=8, num_key_value_heads=8)
    cfg.save_pretrained(base)
    from safetensors.torch import save_file
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in transformers.AutoModelForCausalLM.from_config(cfg).state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    save_file({k: torch.randn(s, generator=gen) * 0.02 for k, s in shapes.items()}, base / "model.safetensors",
              metadata={"format": "pt"})
    (adapter / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ALL_LINEAR}))
    lora = {}
    for k, s in shapes.items():
        if k.endswith("_proj.weight"):
            m = "base_model.model." + k[: -len(".weight")]
            lora[m + ".lora_A.weight"] = torch.randn(8, s[1], generator=gen) * 0.01
            lora[m + ".lora_B.weight"] = torch.randn(s[0], 8, generator=gen) * 0.01
    save_file(lora, adapter / "adapter_model.safetensors", metadata={"format": "pt"})
    largest = max(4 * s[0] * (s[1] if len(s) > 1 else 1) for s in shapes.values())
    return base, adapter, largest


def test_peak_memory_follows_the_largest_tensor_not_the_model(work):
    """Peak RSS growth of a merge stays flat while the model grows almost fourfold (same tensor sizes)."""
    warm = make_base(work / "warm-base", "llama")
    warm_adapter = make_adapter(warm, work / "warm-lora", target_modules=["q_proj"])
    figures = {}
    for layers in (2, 12):
        base, adapter, largest = _synthetic_llama(work, layers)
        args = [warm, warm_adapter, work / f"warm-out-{layers}", base, adapter, work / f"mem-out-{layers}"]
        res = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, *map(str, args)],
                             capture_output=True, text=True, timeout=300)
        assert res.returncode == 0 and res.stdout.split()[-1] == "0", res.stderr[-2000:]
        figures[layers] = ((base / "model.safetensors").stat().st_size, int(res.stdout.split("GROWTH")[1].split()[0]))
    for layers, (size, growth) in figures.items():
        print(f"{layers} layers: model {size / 1e6:.0f} MB, largest tensor {largest / 1e6:.1f} MB, "
              f"peak RSS growth {growth / 1e6:.1f} MB")
    (small, grow_small), (big, grow_big) = figures[2], figures[12]
    assert grow_big < grow_small + 2 * largest      # 3.8x the model, no matching growth
    assert grow_big < big / 4


# ------------------------------------------------------------------------------------
# bad input: one clear line, exit 2, nothing written, sources untouched
# ------------------------------------------------------------------------------------
def _fails(capsys, out: Path, *args) -> str:
    capsys.readouterr()
    rc = run_cli(*args, out)
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert not out.exists()
    assert not list(out.parent.glob(".clawconvert-tmp-*"))
    first = err.splitlines()[0]
    assert first.startswith("clawconvert: error: ")
    return first


@pytest.fixture(scope="module")
def small(work):
    base = make_base(work / "bad-base", "llama")
    adapter = make_adapter(base, work / "bad-lora", target_modules=["q_proj", "v_proj"])
    return base, adapter


def test_adapter_shapes_that_do_not_fit(small, work, capsys):
    base, _ = small
    wide = make_base(work / "wide-base", "llama", hidden_size=48, intermediate_size=96)
    adapter = make_adapter(wide, work / "wide-lora", target_modules=["q_proj"])
    line = _fails(capsys, work / "o1", base, adapter)
    assert "lora_A.weight" in line and "q_proj" in line and "(4, 48)" in line


def test_target_module_missing_from_base(small, work, capsys):
    from safetensors.torch import load_file, save_file
    base, adapter = small
    bad = work / "renamed-lora"
    bad.mkdir()
    (bad / "adapter_config.json").write_text((adapter / "adapter_config.json").read_text())
    save_file({k.replace("layers.1.self_attn.v_proj", "layers.1.self_attn.qkv_proj"): v
               for k, v in load_file(adapter / "adapter_model.safetensors").items()},
              bad / "adapter_model.safetensors", metadata={"format": "pt"})
    before = tree_hash(bad)
    line = _fails(capsys, work / "o2", base, bad)
    assert "model.layers.1.self_attn.qkv_proj" in line and "lora_A" in line
    assert tree_hash(bad) == before


def test_rank_that_disagrees_with_the_config(small, work, capsys):
    base, adapter = small
    bad = work / "rank-lora"
    bad.mkdir()
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**cfg, "r": 8}))
    (bad / "adapter_model.safetensors").write_bytes((adapter / "adapter_model.safetensors").read_bytes())
    line = _fails(capsys, work / "o3", base, bad)
    assert "rank 8" in line and "lora_A.weight" in line


@pytest.mark.parametrize("option,value", [("layer_replication", [[0, 1]]), ("init_lora_weights", "pissa"),
                                          ("peft_type", "IA3")])
def test_adapters_whose_merge_is_not_a_delta_are_refused(small, work, capsys, option, value):
    base, adapter = small
    bad = work / f"opt-{option}"
    bad.mkdir()
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**cfg, option: value}))
    (bad / "adapter_model.safetensors").write_bytes((adapter / "adapter_model.safetensors").read_bytes())
    line = _fails(capsys, work / f"o-{option}", base, bad)
    assert option in line or str(value) in line


def test_not_an_adapter_and_existing_output(small, work, capsys):
    base, adapter = small
    assert "adapter_config.json" in _fails(capsys, work / "o4", base, base)
    existing = work / "exists"
    existing.mkdir()
    assert run_cli(base, adapter, existing) == 2
    assert "already exists" in capsys.readouterr().err


def test_linear_merges_are_filled_into_the_write_buffers(work, monkeypatch):
    """A plain Linear LoRA weight is merged a band at a time straight into the writer's buffers
    (no whole merged copy); its bytes equal the whole-tensor merge's."""
    from safetensors.numpy import load_file

    from clawconvert.io.writers import SafetensorsWriter
    from clawconvert.surgery.lora import Adapter, merged_linear
    base = make_base(work / "fill-base", "llama", dtype=torch.bfloat16)
    adapter = make_adapter(base, work / "fill-lora", std=0.02, target_modules=["q_proj", "down_proj"])
    filled = []
    real = SafetensorsWriter.fill
    monkeypatch.setattr(SafetensorsWriter, "fill", lambda self, name, f: (filled.append(name), real(self, name, f))[1])
    assert run_cli(base, adapter, work / "fill-out") == 0
    assert sorted(filled) == sorted(f"model.layers.{i}.{m}.weight" for i in range(2)
                                    for m in ("self_attn.q_proj", "mlp.down_proj"))
    got = load_file(work / "fill-out" / "model.safetensors")
    src = load_file(base / "model.safetensors")
    a = Adapter(adapter)
    for name in filled:
        module = a.modules[name.removesuffix(".weight")]
        want = merged_linear(src[name], a, module, src[name].dtype)
        assert got[name].tobytes() == want.tobytes(), name
