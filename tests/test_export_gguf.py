"""export --to gguf: the files read back with gguf-py's reader, checked against the HF checkpoints and gguf-py's own tables.

Sources are what users export: merge-lora outputs (a llama with a SentencePiece tokenizer, a
qwen2 with a byte-level BPE) and CLIP / SigLIP LLaVAs assembled by merge-lora --vision.
Tensor names are checked against gguf-py's TensorNameMap (llama.cpp's own name table), shapes
and data against the HF safetensors, the q/k reordering against convert_hf_to_gguf.py's
permute (written out here), vocabularies against sentencepiece / tokenizers.  That llama.cpp
runs the files is tests/test_runtime_llama_cpp.py (CLAWCONVERT_SLOW=1).
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
pytest.importorskip("sentencepiece")
pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

import runtime_models as rm  # noqa: E402
from conftest import assert_one_line_error, tree_hash  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

import clawconvert  # noqa: E402

transformers.utils.logging.disable_progress_bar()
transformers.utils.logging.set_verbosity_error()


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("gguf")


@pytest.fixture(scope="module")
def llama(work):
    return rm.merged(work, rm.llama_base(work / "llama-base"), "llama-merged")


@pytest.fixture(scope="module")
def llava_clip(work, llama):
    return rm.llava(work, "clip", work / "llama-base")


@pytest.fixture(scope="module")
def llava_siglip(work, llama):
    return rm.llava(work, "siglip", work / "llama-base")


def _reader(path):
    return gguf.GGUFReader(str(path))


def _field(reader, key):
    return reader.fields[key].contents()


def _tensors(reader) -> dict:
    return {t.name: t for t in reader.tensors}


def _values(t) -> np.ndarray:
    """A tensor's values as float32 in numpy (row-major) shape, dequantised by gguf-py."""
    shape = tuple(int(n) for n in reversed(t.shape))
    return np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shape)


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """convert_hf_to_gguf.py LlamaModel.permute."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _hf_lm_names(weights: dict, prefix_map: dict[str, str]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in weights.items():
        for old, new in prefix_map.items():
            if k.startswith(old):
                out[new + k[len(old):]] = v
    return out


def _check_lm(reader, hf: dict[str, torch.Tensor], config: dict, arch, permute: bool):
    n = config["num_hidden_layers"]
    names = gguf.get_tensor_name_map(arch, n)
    tensors = _tensors(reader)
    assert len(tensors) == len(hf)
    for key, value in hf.items():
        base, suffix = key.rsplit(".", 1)
        name = f"{names.get_name(base)}.{suffix}"          # llama.cpp's own name for the HF tensor
        assert name in tensors, (key, name)
        got = _values(tensors[name])
        want = value.float().numpy()
        if permute and key.endswith("q_proj.weight"):
            want = _permute(want, config["num_attention_heads"])
        if permute and key.endswith("k_proj.weight"):
            want = _permute(want, config["num_key_value_heads"])
        assert got.shape == want.shape, key
        tol = 0 if tensors[name].tensor_type == gguf.GGMLQuantizationType.F32 else 2e-2
        assert np.abs(got - want).max() <= tol * max(1.0, float(np.abs(want).max())), key
        if value.dim() == 1 or name.endswith("_norm.weight"):
            assert tensors[name].tensor_type == gguf.GGMLQuantizationType.F32
    a = _field(reader, "general.architecture")
    assert _field(reader, f"{a}.block_count") == n
    assert _field(reader, f"{a}.embedding_length") == config["hidden_size"]
    assert _field(reader, f"{a}.feed_forward_length") == config["intermediate_size"]
    assert _field(reader, f"{a}.attention.head_count") == config["num_attention_heads"]
    assert _field(reader, f"{a}.attention.head_count_kv") == config["num_key_value_heads"]
    assert _field(reader, f"{a}.context_length") == config["max_position_embeddings"]
    assert abs(_field(reader, f"{a}.attention.layer_norm_rms_epsilon") - config["rms_norm_eps"]) < 1e-12
    assert _field(reader, f"{a}.rope.freq_base") == 10000.0


@pytest.mark.parametrize("outtype", ["f32", "q8_0"])
def test_llama_causal_lm(llama, work, outtype):
    out = work / f"llama-gguf-{outtype}"
    result = clawconvert.export(llama, out, to="gguf", outtype=outtype)
    assert result.files == [f"model-{outtype}.gguf"]
    reader = _reader(out / f"model-{outtype}.gguf")
    assert _field(reader, "general.architecture") == "llama"
    config = json.loads((llama / "config.json").read_text())
    _check_lm(reader, load_file(llama / "model.safetensors"), config, gguf.MODEL_ARCH.LLAMA, permute=True)
    types = {t.tensor_type for t in reader.tensors}
    if outtype == "q8_0":
        assert gguf.GGMLQuantizationType.Q8_0 in types
    # the SentencePiece vocabulary, piece by piece
    import sentencepiece
    sp = sentencepiece.SentencePieceProcessor(model_file=str(llama / "tokenizer.model"))
    tokens = _field(reader, "tokenizer.ggml.tokens")
    assert _field(reader, "tokenizer.ggml.model") == "llama"
    assert tokens[:sp.vocab_size()] == [sp.IdToPiece(i) for i in range(sp.vocab_size())]
    assert _field(reader, "tokenizer.ggml.scores")[300] == pytest.approx(sp.GetScore(300))
    assert _field(reader, "tokenizer.ggml.token_type")[5] == gguf.TokenType.BYTE      # <0x02>: byte fallback
    assert _field(reader, "tokenizer.ggml.bos_token_id") == 1 and _field(reader, "tokenizer.ggml.eos_token_id") == 2
    assert len(tokens) == config["vocab_size"]


def test_qwen2_byte_level_bpe(work):
    qwen = rm.merged(work, rm.qwen2_base(work / "qwen2-base"), "qwen2-merged")
    out = work / "qwen2-gguf"
    clawconvert.export(qwen, out, to="gguf", outtype="f32")
    reader = _reader(out / "model-f32.gguf")
    config = json.loads((qwen / "config.json").read_text())
    assert _field(reader, "general.architecture") == "qwen2"
    hf = load_file(qwen / "model.safetensors")
    assert "lm_head.weight" not in hf and "output.weight" not in _tensors(reader)      # tied: llama.cpp reuses token_embd
    _check_lm(reader, hf, config, gguf.MODEL_ARCH.QWEN2, permute=False)
    assert "blk.0.attn_q.bias" in _tensors(reader)
    tok = json.loads((qwen / "tokenizer.json").read_text())
    assert _field(reader, "tokenizer.ggml.model") == "gpt2" and _field(reader, "tokenizer.ggml.pre") == "qwen2"
    assert len(_field(reader, "tokenizer.ggml.merges")) == len(tok["model"]["merges"])
    tokens = _field(reader, "tokenizer.ggml.tokens")
    assert all(tokens[i] == t for t, i in tok["model"]["vocab"].items())
    im_end = next(t["id"] for t in tok["added_tokens"] if t["content"] == "<|im_end|>")
    assert _field(reader, "tokenizer.ggml.token_type")[im_end] == gguf.TokenType.CONTROL


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_llava_language_model_and_mmproj(kind, work, request):
    src = request.getfixturevalue(f"llava_{kind}")
    before = tree_hash(src)
    out = work / f"llava-{kind}-gguf"
    result = clawconvert.export(src, out, to="gguf")                      # f16, the default
    assert sorted(result.files) == ["mmproj-f16.gguf", "model-f16.gguf"]
    assert tree_hash(src) == before
    config = json.loads((src / "config.json").read_text())
    weights = load_file(src / "model.safetensors")

    lm = _reader(out / "model-f16.gguf")
    lm_hf = _hf_lm_names(weights, {"language_model.model.": "model.", "language_model.lm_head.": "lm_head."})
    _check_lm(lm, lm_hf, config["text_config"], gguf.MODEL_ARCH.LLAMA, permute=True)
    tokens = _field(lm, "tokenizer.ggml.tokens")
    image = config["image_token_index"]
    assert tokens[image] == "<image>" and _field(lm, "tokenizer.ggml.token_type")[image] == gguf.TokenType.CONTROL
    assert len(tokens) == config["text_config"]["vocab_size"]
    assert "chat_template" in "".join(lm.fields)                          # the processor's template travels along

    mm = _reader(out / "mmproj-f16.gguf")
    vc = config["vision_config"]
    layers = vc["num_hidden_layers"]
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.MMPROJ, layers)
    tensors = _tensors(mm)
    vision = _hf_lm_names(weights, {"vision_tower.": "vision_tower.", "multi_modal_projector.": "multi_modal_projector."})
    expected = {}
    for key, value in vision.items():
        if ".post_layernorm." in key or ".head." in key:                  # LLaVA's features skip them
            continue
        base, suffix = key.rsplit(".", 1)
        name = names.get_name(key) if key.endswith("class_embedding") else f"{names.get_name(base)}.{suffix}"
        if "multi_modal_projector.linear_" in key:                         # gguf-py maps linear_{bid} with bid 0, 2
            name = f"mm.{ {'1': 0, '2': 2}[key.split('linear_')[1][0]] }.{suffix}"
        expected[name] = value
    assert set(tensors) == set(expected)
    for name, value in expected.items():
        got, want = _values(tensors[name]), value.float().numpy()
        assert got.shape == want.shape, name
        assert np.abs(got - want).max() <= 2e-3 * max(1.0, float(np.abs(want).max())), name
    F32, F16 = gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16
    assert tensors["v.position_embd.weight"].tensor_type == F32
    assert tensors["v.patch_embd.weight"].tensor_type == F16 and tensors["mm.0.weight"].tensor_type == F16
    assert _field(mm, "general.architecture") == "clip" and _field(mm, "clip.projector_type") == "mlp"
    assert _field(mm, "clip.has_vision_encoder") is True
    assert _field(mm, "clip.use_gelu") is True                            # gelu (CLIP here) / gelu_pytorch_tanh (SigLIP)
    assert _field(mm, "clip.vision.feature_layer") == [layers]            # vision_feature_layer -1: after the last layer
    assert _field(mm, "clip.vision.block_count") == layers
    assert _field(mm, "clip.vision.image_size") == vc["image_size"]
    assert _field(mm, "clip.vision.patch_size") == vc["patch_size"]
    assert _field(mm, "clip.vision.embedding_length") == vc["hidden_size"]
    assert _field(mm, "clip.vision.attention.head_count") == vc["num_attention_heads"]
    assert _field(mm, "clip.vision.projection_dim") == config["text_config"]["hidden_size"]
    mean = json.loads((src / "processor_config.json").read_text())["image_processor"]["image_mean"]
    assert _field(mm, "clip.vision.image_mean") == pytest.approx(mean)
    assert ("v.class_embd" in tensors) == (kind == "clip") and ("v.pre_ln.weight" in tensors) == (kind == "clip")


def test_refusals_write_nothing(llava_clip, llava_siglip, work, cli):
    bad = work / "llava-full-strategy"
    bad.mkdir()
    for f in llava_clip.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    config = json.loads((bad / "config.json").read_text())
    config["vision_feature_select_strategy"] = "full"
    (bad / "config.json").write_text(json.dumps(config))
    r = cli("export", bad, work / "never", "--to", "gguf")
    assert_one_line_error(r, "llama.cpp's LLaVA graph drops the class token")
    r = cli("export", llava_siglip, work / "never", "--to", "gguf", "--quantize", "int8")
    assert_one_line_error(r, "--quantize does not apply to --to gguf")
    gpt2 = work / "gpt2"
    transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64)).save_pretrained(gpt2)
    r = cli("export", gpt2, work / "never", "--to", "gguf")
    assert_one_line_error(r, "does not know the language model type 'gpt2'")
    r = cli("export", llava_siglip, llava_siglip / "inside", "--to", "gguf")
    assert_one_line_error(r, "destination is the source or inside it")
    assert not (work / "never").exists()


def test_gguf_export_imports_no_framework(llama, work):
    """The export reads configs and tokenizers as data: torch and transformers stay out of the process."""
    import subprocess
    import sys
    code = ("import sys; from clawconvert.cli import main; "
            f"rc = main(['export', {str(llama)!r}, {str(work / 'lean-gguf')!r}, '--to', 'gguf']); "
            "bad = [m for m in ('torch', 'transformers', 'open_clip', 'timm') if m in sys.modules]; "
            "print(rc, bad); sys.exit(rc or bool(bad))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr[-2000:]


def test_architecture_defaults_are_transformers_defaults():
    """mappings/gguf_architectures.yaml's defaults, against the installed config classes."""
    from clawconvert.exporters.gguf import _architectures
    classes = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
               "qwen2": transformers.Qwen2Config, "llava": transformers.LlavaConfig,
               "llava_next": transformers.LlavaNextConfig,
               "gemma3_text": transformers.Gemma3TextConfig, "qwen2_vl_text": transformers.Qwen2VLTextConfig,
               "qwen2_5_vl_text": transformers.Qwen2_5_VLTextConfig, "qwen3_vl_text": transformers.Qwen3VLTextConfig,
               "qwen3_vl_moe_text": transformers.Qwen3VLMoeTextConfig}
    for model_type, fields in _architectures()["defaults"].items():
        config = classes[model_type]()
        for key, value in fields.items():
            got = getattr(config, key, None)
            if got is None and key == "rope_theta":
                got = config.rope_parameters["rope_theta"]
            assert got == value, (model_type, key, got, value)
    assert set(_architectures()["architectures"]) <= set(classes)
