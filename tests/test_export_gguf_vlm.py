"""export --to gguf for the native VLMs: read back with gguf-py's reader, checked against the safetensors source.

Each tiny model of tests/vlm_models.py (transformers 5 configs, seeded weights) gets a
SentencePiece tokenizer and a preprocessor config, is exported, and the files are read back
with gguf's GGUFReader.  Every language-model tensor must carry the name gguf-py's own
TensorNameMap gives the HF tensor for the architecture llama.cpp's converter picks, with the
source's values after the converter's documented changes (written out here: the llama q/k
permute, Gemma's norm weight + 1); every mmproj tensor the name and values llama.cpp's
converter (conversion/qwenvl.py Qwen2VLVisionModel, qwen3vl.py Qwen3VLVisionModel, gemma.py
Gemma3VisionModel, smolvlm.py SmolVLMModel) gives it (the qkv and Conv3D cuts, the Qwen3-VL
merger and deepstack names re-written here); metadata against the transformers config.  The
sources are read with ``safetensors`` directly.  LLaVA-NeXT's mmproj (CLIP and SigLIP towers) is
checked against the source as llama.cpp's legacy scripts (llava_surgery_v2.py,
convert_image_encoder_to_gguf.py) write it, re-written here, with the export's documented
departures from them spelled out.  LLaVA-OneVision gets no mmproj (the note is checked).  That
llama.cpp runs such files and matches transformers is tests/test_runtime_llama_cpp_vlm.py
(CLAWCONVERT_SLOW=1: runtime-sized Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Gemma 3, Idefics3, SmolVLM and
LLaVA-NeXT).
"""
from __future__ import annotations

import dataclasses
import io
import json
import re

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
spm = pytest.importorskip("sentencepiece")
transformers = pytest.importorskip("transformers")

import runtime_models as rm  # noqa: E402
import vlm_models as vm  # noqa: E402
from conftest import assert_one_line_error, tree_hash  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402

import clawconvert  # noqa: E402

transformers.utils.logging.disable_progress_bar()
transformers.utils.logging.set_verbosity_error()

A, Q = gguf.MODEL_ARCH, gguf.GGMLQuantizationType
# case -> (llama.cpp architecture, the file prefixes of its language model, q/k permuted, Gemma norms)
LM = {
    "qwen2_vl": (A.QWEN2VL, {"model.": "model.", "lm_head.": "lm_head."}, False, False),
    "qwen2_5_vl": (A.QWEN2VL, {"model.": "model.", "lm_head.": "lm_head."}, False, False),
    "qwen3_vl": (A.QWEN3VL, {"model.language_model.": "model.", "lm_head.": "lm_head."}, False, False),
    "gemma3": (A.GEMMA3, {"language_model.model.": "model.", "language_model.lm_head.": "lm_head."}, False, True),
    "idefics3": (A.LLAMA, {"model.text_model.": "model.", "lm_head.": "lm_head."}, True, False),
    "smolvlm": (A.LLAMA, {"model.text_model.": "model.", "lm_head.": "lm_head."}, True, False),
    "llava_next": (A.LLAMA, {"language_model.model.": "model.", "language_model.lm_head.": "lm_head."}, True, False),
    "llava_onevision": (A.QWEN2, {"language_model.model.": "model.", "language_model.lm_head.": "lm_head."}, False, False),
}
MMPROJ = {"qwen2_vl": "qwen2vl_merger", "qwen2_5_vl": "qwen2.5vl_merger", "qwen3_vl": "qwen3vl_merger",
          "gemma3": "gemma3", "idefics3": "idefics3", "smolvlm": "idefics3"}
MEAN, STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]


def add_tokenizer_and_preprocessor(path) -> None:
    """A SentencePiece BPE (100 pieces, padded by the export to the 128 embedding rows) and image mean / std."""
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(list(rm.CORPUS) * 10), model_writer=buf, vocab_size=100,
                                   model_type="bpe", character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2,
                                   pad_id=-1, minloglevel=2)
    (path / "tokenizer.model").write_bytes(buf.getvalue())
    (path / "preprocessor_config.json").write_text(json.dumps({"image_mean": MEAN, "image_std": STD}))


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("gguf-vlm")


# forward-only vision fields, not the weights: llama.cpp's window is 112 pixels; Qwen3-VL's one deepstack
# merger reads vision layer 1, so that its GGUF name (the layer) differs from its place in the list (0)
VISION_EDITS = {"qwen2_5_vl": {"window_size": 112}, "qwen3_vl": {"deepstack_visual_indexes": [1]}}


def source(work, name):
    path = work / name
    if not path.exists():
        vm.build(vm.CASES[name], path)
        add_tokenizer_and_preprocessor(path)
        if name in VISION_EDITS:
            cfg = json.loads((path / "config.json").read_text())
            cfg["vision_config"].update(VISION_EDITS[name])
            (path / "config.json").write_text(json.dumps(cfg))
    return path


def _field(reader, key):
    return reader.fields[key].contents() if key in reader.fields else None


def _values(t) -> np.ndarray:
    shape = tuple(int(n) for n in reversed(t.shape))
    return np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shape)


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """convert_hf_to_gguf.py LlamaModel.permute."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _renamed(weights: dict, prefixes: dict) -> dict:
    return {new + k[len(old):]: v for k, v in weights.items() for old, new in prefixes.items() if k.startswith(old)}


def _compare(tensors: dict, expected: dict, outtype: str):
    assert set(tensors) == set(expected), (sorted(set(tensors) ^ set(expected)))
    for name, want in expected.items():
        got = _values(tensors[name])
        assert got.shape == want.shape, name
        exact = tensors[name].tensor_type == Q.F32
        tol = 1e-6 if exact else 2e-3
        assert np.abs(got - want).max() <= tol * max(1.0, float(np.abs(want).max())), name
        if want.ndim == 1:
            assert tensors[name].tensor_type == Q.F32, name


@pytest.mark.parametrize("name", list(LM))
def test_language_model(name, work):
    src = source(work, name)
    before = tree_hash(src)
    out = work / f"{name}-gguf"
    result = clawconvert.export(src, out, to="gguf", outtype="f32")
    assert tree_hash(src) == before
    with_mmproj = name in MMPROJ or name == "llava_next"          # LLaVA-NeXT's: test_llava_next_mmproj
    assert sorted(result.files) == sorted(["model-f32.gguf"] + (["mmproj-f32.gguf"] if with_mmproj else []))
    arch, prefixes, permute, gemma = LM[name]
    config = transformers.AutoConfig.from_pretrained(src)
    tc = config.text_config
    reader = gguf.GGUFReader(str(out / "model-f32.gguf"))
    a = gguf.MODEL_ARCH_NAMES[arch]
    assert _field(reader, "general.architecture") == a
    names = gguf.get_tensor_name_map(arch, tc.num_hidden_layers)
    expected = {}
    for key, value in _renamed(load_file(src / "model.safetensors"), prefixes).items():
        base, suffix = key.rsplit(".", 1)
        want = value.astype(np.float32)
        if permute and key.endswith("q_proj.weight"):
            want = _permute(want, tc.num_attention_heads)
        if permute and key.endswith("k_proj.weight"):
            want = _permute(want, tc.num_key_value_heads)
        if gemma and key.endswith("norm.weight"):               # Gemma3Model.norm_shift
            want = want + np.float32(1)
        expected[f"{names.get_name(base)}.{suffix}"] = want
    _compare({t.name: t for t in reader.tensors}, expected, "f32")
    # hyperparameters against the transformers config
    assert _field(reader, f"{a}.block_count") == tc.num_hidden_layers
    assert _field(reader, f"{a}.embedding_length") == tc.hidden_size
    assert _field(reader, f"{a}.feed_forward_length") == tc.intermediate_size
    assert _field(reader, f"{a}.attention.head_count") == tc.num_attention_heads
    assert _field(reader, f"{a}.attention.head_count_kv") == tc.num_key_value_heads
    assert _field(reader, f"{a}.attention.key_length") == tc.head_dim
    assert _field(reader, f"{a}.context_length") == tc.max_position_embeddings
    assert _field(reader, f"{a}.attention.layer_norm_rms_epsilon") == pytest.approx(tc.rms_norm_eps, rel=1e-6)
    assert _field(reader, f"{a}.vocab_size") == tc.vocab_size == len(_field(reader, "tokenizer.ggml.tokens"))
    rope = tc.rope_parameters
    if name == "gemma3":
        assert _field(reader, f"{a}.rope.freq_base") == rope["full_attention"]["rope_theta"]
        assert _field(reader, f"{a}.rope.freq_base_swa") == rope["sliding_attention"]["rope_theta"]
        assert _field(reader, f"{a}.attention.sliding_window") == tc.sliding_window
        assert _field(reader, "tokenizer.ggml.add_space_prefix") is False
        assert "output.weight" not in {t.name for t in reader.tensors}          # tied: llama.cpp reuses token_embd
    else:
        assert _field(reader, f"{a}.rope.freq_base") == rope["rope_theta"]
    if name.startswith("qwen"):          # M-RoPE sections, padded to [time, height, width, extra]
        assert _field(reader, f"{a}.rope.dimension_sections") == list(rope["mrope_section"]) + [0]
    if name == "qwen3_vl":
        assert _field(reader, f"{a}.n_deepstack_layers") == len(config.vision_config.deepstack_visual_indexes)
    sp = spm.SentencePieceProcessor(model_file=str(src / "tokenizer.model"))
    assert _field(reader, "tokenizer.ggml.tokens")[:sp.vocab_size()] == [sp.IdToPiece(i) for i in range(sp.vocab_size())]


def _qwen3_vl_expected(weights: dict, config) -> dict:
    """conversion/qwen3vl.py Qwen3VLVisionModel.modify_tensors: the deepstack mergers under the vision layer
    they read, the merger's linear_fc1 / fc2 as mm.0 / mm.2 and its norm as v.post_ln, the Conv3D cut into
    its two frames with its bias beside, the rest (qkv fused) through gguf-py's TensorNameMap."""
    vc = config.vision_config
    names = gguf.get_tensor_name_map(A.MMPROJ, vc.depth)
    T, N = gguf.MODEL_TENSOR, gguf.TENSOR_NAMES
    deepstack = {"norm": T.V_DS_NORM, "linear_fc1": T.V_DS_FC1, "linear_fc2": T.V_DS_FC2}
    merger = {"norm": N[T.V_POST_NORM], "linear_fc1": N[T.V_MMPROJ].format(bid=0),
              "linear_fc2": N[T.V_MMPROJ].format(bid=2)}
    out = {}
    for key, value in weights.items():
        if not key.startswith("model.visual."):
            continue
        value = value.astype(np.float32)
        base, suffix = key.removeprefix("model.").rsplit(".", 1)
        parts = base.split(".")
        if parts[1] == "deepstack_merger_list":
            layer = vc.deepstack_visual_indexes[int(parts[2])]
            out[f"{N[deepstack[parts[3]]].format(bid=layer)}.{suffix}"] = value
        elif parts[1] == "merger":
            out[f"{merger[parts[2]]}.{suffix}"] = value
        elif key.endswith("patch_embed.proj.weight"):
            out["v.patch_embd.weight"], out["v.patch_embd.weight.1"] = value[:, :, 0], value[:, :, 1]
        else:
            out[f"{names.get_name(base)}.{suffix}"] = value
    return out


def _mmproj_expected(name: str, weights: dict, config) -> dict:
    """convert_hf_to_gguf.py's names and values for the vision tower and connector, re-written here."""
    vc = config.vision_config
    if name == "qwen3_vl":
        return _qwen3_vl_expected(weights, config)
    if name in ("qwen2_vl", "qwen2_5_vl"):
        names = gguf.get_tensor_name_map(A.MMPROJ, max(vc.depth, 3))     # merger.mlp.2 is bid 2
        out = {}
        for key, value in weights.items():
            if not key.startswith("visual."):
                continue
            value = value.astype(np.float32)
            base, suffix = key.rsplit(".", 1)
            if key == "visual.patch_embed.proj.weight":                 # Conv3D -> two Conv2D frames
                out["v.patch_embd.weight"], out["v.patch_embd.weight.1"] = value[:, :, 0], value[:, :, 1]
            elif ".attn.qkv." in key:
                for part, chunk in zip("qkv", np.split(value, 3, axis=0)):
                    out[f"{names.get_name(base.replace('qkv', part))}.{suffix}"] = chunk
            else:
                out[f"{names.get_name(base)}.{suffix}"] = value
        return out
    prefixes = {"gemma3": {"vision_tower.": "vision_tower.vision_model.", "multi_modal_projector.": "multi_modal_projector."},
                "idefics3": {"model.vision_model.": "model.vision_model.", "model.connector.": "model.connector."}}
    prefixes["smolvlm"] = prefixes["idefics3"]
    names = gguf.get_tensor_name_map(A.MMPROJ, vc.num_hidden_layers)
    out = {}
    for key, value in _renamed(weights, prefixes[name]).items():
        value = value.astype(np.float32)
        key = key.replace("_weight", ".weight")                         # Gemma3VisionModel.filter_tensors
        base, suffix = key.rsplit(".", 1)
        if "soft_emb_norm" in key:
            value = value + np.float32(1)
        out[f"{names.get_name(base)}.{suffix}"] = value
    return out


@pytest.mark.parametrize("name", list(MMPROJ))
@pytest.mark.parametrize("outtype", ["f32", "f16"])
def test_mmproj(name, outtype, work):
    src = source(work, name)
    out = work / f"{name}-gguf-{outtype}"
    clawconvert.export(src, out, to="gguf", outtype=outtype)
    config = transformers.AutoConfig.from_pretrained(src)
    vc, tc = config.vision_config, config.text_config
    reader = gguf.GGUFReader(str(out / f"mmproj-{outtype}.gguf"))
    tensors = {t.name: t for t in reader.tensors}
    _compare(tensors, _mmproj_expected(name, load_file(src / "model.safetensors"), config), outtype)
    qwen = name.startswith("qwen")
    # types: the converter's tensor_force_quant
    if "v.position_embd.weight" in tensors:
        assert tensors["v.position_embd.weight"].tensor_type == Q.F32
    if outtype == "f16":
        assert tensors["v.patch_embd.weight"].tensor_type == (Q.F16 if qwen else Q.F32)
        if qwen:
            assert tensors["v.patch_embd.weight.1"].tensor_type == Q.F16
        assert tensors["v.blk.0.attn_out.weight"].tensor_type == Q.F16
        if name == "gemma3":
            assert tensors["mm.input_projection.weight"].tensor_type == Q.F16
    assert _field(reader, "general.architecture") == "clip"
    assert _field(reader, "clip.projector_type") == MMPROJ[name]
    assert _field(reader, "clip.has_vision_encoder") is True
    assert _field(reader, "clip.vision.projection_dim") == tc.hidden_size
    assert _field(reader, "clip.vision.patch_size") == vc.patch_size
    assert _field(reader, "clip.vision.image_mean") == pytest.approx(MEAN)
    assert _field(reader, "clip.vision.image_std") == pytest.approx(STD)
    if qwen:
        assert _field(reader, "clip.vision.block_count") == vc.depth
        assert _field(reader, "clip.vision.attention.head_count") == vc.num_heads
        assert _field(reader, "clip.vision.attention.layer_norm_epsilon") == pytest.approx(1e-6)
    else:
        assert _field(reader, "clip.vision.block_count") == vc.num_hidden_layers
        assert _field(reader, "clip.vision.attention.head_count") == vc.num_attention_heads
        assert _field(reader, "clip.vision.image_size") == vc.image_size
        assert _field(reader, "clip.vision.attention.layer_norm_epsilon") == pytest.approx(vc.layer_norm_eps)
        assert _field(reader, "clip.use_gelu") is True
    if name in ("qwen2_vl", "qwen2_5_vl"):
        assert _field(reader, "clip.vision.image_size") == 560                  # the converter's default
    if name == "qwen2_vl":
        assert _field(reader, "clip.vision.embedding_length") == vc.embed_dim
        assert _field(reader, "clip.vision.feed_forward_length") == vc.hidden_size      # as the converter writes it
    if name == "qwen2_5_vl":
        assert _field(reader, "clip.vision.embedding_length") == vc.hidden_size
        assert _field(reader, "clip.vision.feed_forward_length") == vc.intermediate_size
        assert _field(reader, "clip.vision.n_wa_pattern") == vc.fullatt_block_indexes[0] + 1
        assert _field(reader, "clip.use_silu") is True
    if name == "qwen3_vl":     # the learned position grid's side, in pixels; one flag per vision layer
        assert _field(reader, "clip.vision.image_size") == int(vc.num_position_embeddings ** 0.5) * vc.patch_size
        assert _field(reader, "clip.vision.embedding_length") == vc.hidden_size
        assert _field(reader, "clip.vision.feed_forward_length") == vc.intermediate_size
        assert _field(reader, "clip.vision.spatial_merge_size") == vc.spatial_merge_size
        assert _field(reader, "clip.vision.is_deepstack_layers") == [i in vc.deepstack_visual_indexes
                                                                     for i in range(vc.depth)] == [False, True]
        assert _field(reader, "clip.use_gelu") is True
    if name == "gemma3":     # 4 patches a side, 2 tokens a side: pooled by 2 (clip.cpp's default is 4)
        side = vc.image_size // vc.patch_size
        assert _field(reader, "clip.vision.projector.scale_factor") == side // int(config.mm_tokens_per_image ** 0.5)
    if name in ("idefics3", "smolvlm"):
        assert _field(reader, "clip.vision.projector.scale_factor") == config.scale_factor
        assert _field(reader, "clip.vision.preproc_image_size") == vc.image_size


# LLaVA-NeXT with a SigLIP tower (pooling head kept in the weights, patch rows all kept: "full") and a grid of
# several pinpoints, beside vlm_models' CLIP case (one pinpoint)
LLAVA_NEXT = {
    "llava_next": vm.CASES["llava_next"],
    "llava_next_siglip": dataclasses.replace(vm.CASES["llava_next"], config=lambda: transformers.LlavaNextConfig(
        text_config=dict(vm.TEXT, model_type="mistral", sliding_window=None),
        vision_config=dict(vm.SIGLIP, model_type="siglip_vision_model"), image_token_index=vm.IMAGE,
        vision_feature_select_strategy="full", vision_feature_layer=-1,
        image_grid_pinpoints=[[28, 28], [28, 56], [56, 28], [56, 56]])),
}


def _legacy_name(name: str) -> str:
    """convert_image_encoder_to_gguf.py get_tensor_name, for the names a LLaVA-NeXT mmproj holds."""
    if name == "image_newline":
        return "model.image_newline"
    if name.startswith("multi_modal_projector"):
        return name.replace("multi_modal_projector", "mm").replace("linear_1", "0").replace("linear_2", "2")
    for old, new in [("vision_model", "v"), ("encoder.layers", "blk"), ("embeddings.", ""), ("_proj", ""),
                     ("self_attn.", "attn_"), ("layer_norm", "ln"), ("layernorm", "ln"), ("mlp.fc1", "ffn_down"),
                     ("mlp.fc2", "ffn_up"), ("embedding", "embd"), ("final", "post"), ("layrnorm", "ln")]:
        name = name.replace(old, new)
    return name


def _legacy_mmproj(weights: dict, config, outtype: str) -> dict:
    """What llava_surgery_v2.py + convert_image_encoder_to_gguf.py --clip-model-is-vision --llava-projector write:
    {name: (numpy value, GGML type)}.  The surgery keeps ``vision_model.*`` and the projector (with image_newline);
    the converter writes the tower's state dict without post_layernorm and the layers past the feature layer,
    4-D tensors f16, and, in f16 files, 2-D ``.weight``s f16 (the projector's 2-D tensors f16 in any file)."""
    vc = config.vision_config
    layers = vc.num_hidden_layers
    feature = config.vision_feature_layer % (layers + 1)
    out = {}
    for key, value in weights.items():
        if key.startswith("vision_tower."):
            name = "vision_model." + key.removeprefix("vision_tower.").removeprefix("vision_model.")
            m = re.match(r"vision_model\.encoder\.layers\.(\d+)\.", name)
            if name.startswith("vision_model.post_layernorm.") or (m and int(m.group(1)) >= feature):
                continue
            half = value.ndim == 4 or (outtype == "f16" and name.endswith(".weight") and value.ndim == 2)
        elif key.startswith("multi_modal_projector.") or key == "image_newline":
            name, half = key, value.ndim == 2
        else:
            continue
        out[_legacy_name(name)] = (value.astype(np.float32), Q.F16 if half else Q.F32)
    return out


def _as_exported(legacy: dict, outtype: str) -> dict:
    """The export's departures from the legacy scripts (docs/deploy.md), applied to their output: gguf-py's
    ffn_up / ffn_down for fc1 / fc2 (the script swaps them; clip.cpp's is_ffn_swapped reads either), the
    SigLIP pooling head left out (clip.cpp never reads it), and convert_hf_to_gguf.py's types: the position
    embedding f32, the patch embedding f32 in f32 files, every 2-D matrix --outtype."""
    swap = {"ffn_down": "ffn_up", "ffn_up": "ffn_down"}
    out = {}
    for name, (value, qtype) in legacy.items():
        if name.startswith("v.head."):
            continue
        name = re.sub(r"\.(ffn_down|ffn_up)\.", lambda m: f".{swap[m.group(1)]}.", name)
        if name == "v.position_embd.weight":
            qtype = Q.F32
        elif value.ndim >= 2:
            qtype = Q.F16 if outtype == "f16" else Q.F32
        out[name] = (value, qtype)
    return out


@pytest.mark.parametrize("name", list(LLAVA_NEXT))
@pytest.mark.parametrize("outtype", ["f32", "f16"])
def test_llava_next_mmproj(name, outtype, work):
    """The tower, mm.0 / mm.2 and model.image_newline as the legacy scripts write them (names, shapes, types,
    values), the clip.* metadata against the transformers config."""
    src = work / name
    if not src.exists():
        vm.build(LLAVA_NEXT[name], src)
        add_tokenizer_and_preprocessor(src)
    out = work / f"{name}-gguf-{outtype}"
    result = clawconvert.export(src, out, to="gguf", outtype=outtype)
    assert sorted(result.files) == [f"mmproj-{outtype}.gguf", f"model-{outtype}.gguf"]
    assert any("lays a LLaVA-NeXT image out as its tiles, then the overview" in n for n in result.notes)
    config = transformers.AutoConfig.from_pretrained(src)
    vc, tc = config.vision_config, config.text_config
    reader = gguf.GGUFReader(str(out / f"mmproj-{outtype}.gguf"))
    tensors = {t.name: t for t in reader.tensors}
    weights = load_file(src / "model.safetensors")
    legacy = _legacy_mmproj(weights, config, outtype)
    assert "model.image_newline" in legacy and any(k.startswith("v.head.") for k in legacy) == (name != "llava_next")
    expected = _as_exported(legacy, outtype)
    assert set(tensors) == set(expected), sorted(set(tensors) ^ set(expected))
    for key, (want, qtype) in expected.items():
        got = _values(tensors[key])
        assert got.shape == want.shape and tensors[key].tensor_type == qtype, key
        tol = 0 if qtype == Q.F32 else 2e-3 * max(1.0, float(np.abs(want).max()))
        assert np.abs(got - want).max() <= tol, key
    newline = tensors["model.image_newline"]
    assert newline.tensor_type == Q.F32 and _values(newline).tolist() == weights["image_newline"].tolist()
    feature = config.vision_feature_layer % (vc.num_hidden_layers + 1)
    assert _field(reader, "general.architecture") == "clip"
    assert _field(reader, "clip.projector_type") == "mlp"
    assert _field(reader, "clip.has_vision_encoder") is True and _field(reader, "clip.has_llava_projector") is True
    assert _field(reader, "clip.vision.image_grid_pinpoints") == [v for p in config.image_grid_pinpoints for v in p]
    assert _field(reader, "clip.vision.mm_patch_merge_type") == "spatial_unpad"
    assert _field(reader, "clip.vision.feature_layer") == [feature]
    assert _field(reader, "clip.vision.block_count") == feature
    assert _field(reader, "clip.vision.image_size") == vc.image_size
    assert _field(reader, "clip.vision.patch_size") == vc.patch_size
    assert _field(reader, "clip.vision.embedding_length") == vc.hidden_size
    assert _field(reader, "clip.vision.feed_forward_length") == vc.intermediate_size
    assert _field(reader, "clip.vision.attention.head_count") == vc.num_attention_heads
    assert _field(reader, "clip.vision.attention.layer_norm_epsilon") == pytest.approx(vc.layer_norm_eps)
    assert _field(reader, "clip.vision.projection_dim") == tc.hidden_size
    assert _field(reader, "clip.vision.image_mean") == pytest.approx(MEAN)
    assert _field(reader, "clip.vision.image_std") == pytest.approx(STD)
    assert _field(reader, "clip.use_gelu") is (vc.hidden_act != "quick_gelu")


def test_no_mmproj_says_why(work):
    result = clawconvert.export(source(work, "llava_onevision"), work / "ov-gguf", to="gguf")
    assert result.files == ["model-f16.gguf"]
    assert any("no mmproj: llama.cpp's mtmd has no LLaVA-OneVision projector" in n for n in result.notes)


def _edited(work, name, new, edit):
    src = source(work, name)
    bad = work / new
    if not bad.exists():
        bad.mkdir()
        for f in src.iterdir():
            (bad / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((src / "config.json").read_text())
    edit(cfg)
    (bad / "config.json").write_text(json.dumps(cfg))
    return bad


def test_refusals_write_nothing(work, cli):
    moe = source(work, "qwen3_vl_moe")
    r = cli("export", moe, work / "never", "--to", "gguf")
    assert_one_line_error(r, "the Qwen3-VL MoE language model (qwen3vlmoe: fused 3-D expert tensors) is not written")
    bad = _edited(work, "qwen2_5_vl", "qwen2_5_vl-window16", lambda c: c["vision_config"].update(window_size=16))
    r = cli("export", bad, work / "never", "--to", "gguf")
    assert_one_line_error(r, "vision.window_size is 16, not 112: clip.cpp's qwen2.5vl graph attends in windows of 112")
    bad = _edited(work, "gemma3", "gemma3-scalar", lambda c: c["text_config"].update(query_pre_attn_scalar=64))
    r = cli("export", bad, work / "never", "--to", "gguf")
    assert_one_line_error(r, "query_pre_attn_scalar is 64, not 32: llama.cpp's gemma3 graph scales attention by")
    bad = _edited(work, "gemma3", "gemma3-layers", lambda c: c["text_config"].update(
        layer_types=["full_attention", "sliding_attention"]))
    r = cli("export", bad, work / "never", "--to", "gguf")
    assert_one_line_error(r, "layer_types differs from that pattern")
    bad = _edited(work, "qwen2_5_vl", "qwen2_5_vl-fullatt", lambda c: c["vision_config"].update(
        depth=5, fullatt_block_indexes=[1, 4]))
    r = cli("export", bad, work / "never", "--to", "gguf")
    assert_one_line_error(r, "fullatt_block_indexes [1, 4] are not evenly spaced")
    for pinpoints, said in [([[28, 42]], "clip.cpp cuts the image into 28-pixel tiles, and every side must be"),
                            ([[28, 28], [28, 56]], "lack the transpose of a pair: clip.cpp reads each pair as (width")]:
        bad = _edited(work, "llava_next", f"llava_next-{len(pinpoints)}",
                      lambda c, p=pinpoints: c.update(image_grid_pinpoints=p))
        r = cli("export", bad, work / "never", "--to", "gguf")
        assert_one_line_error(r, said)
    for part, edit, said in [
            ("vision", {"hidden_act": "gelu"}, "vision.hidden_act is 'gelu', not 'gelu_pytorch_tanh'"),
            ("vision", {"num_position_embeddings": 48}, "num_position_embeddings 48 is not a square"),
            ("vision", {"deepstack_visual_indexes": [2]}, "vision layers [2] are not distinct layers of the tower's"),
            ("text", {"num_hidden_layers": 1},      # the one deepstack merger would feed the last layer
             "deepstack_visual_indexes lists 1, num_hidden_layers is 1: llama.cpp's qwen3vl graph aborts")]:
        bad = _edited(work, "qwen3_vl", f"qwen3_vl-{next(iter(edit))}",
                      lambda c, p=part, e=edit: c[f"{p}_config"].update(e))
        r = cli("export", bad, work / "never", "--to", "gguf")
        assert_one_line_error(r, said)
    assert not (work / "never").exists()
