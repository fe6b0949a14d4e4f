"""export --to onnx: every exported tower run by onnxruntime and compared with the frameworks' own models.

References are transformers' full models (CLIPModel / SiglipModel: get_image_features,
get_text_features, the towers' last hidden states) and open_clip's encode_image for an
OpenCLIP source, never figures clawconvert computed.  fp32 must agree within 1e-4; the int8
files (onnxruntime dynamic quantisation) are bounded by cosine similarity and max deviation.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

onnxruntime = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")
transformers = pytest.importorskip("transformers")

from conftest import FIXTURES, assert_one_line_error, tree_hash  # noqa: E402

import clawconvert  # noqa: E402

transformers.utils.logging.disable_progress_bar()
transformers.utils.logging.set_verbosity_error()

FP32_TOL = 1e-4
INT8_MIN_COSINE = 0.99      # embeddings of the int8 model against fp32 PyTorch
INT8_MAX_DIFF = 0.5         # any output element; the tiny towers' activations are O(1)
VISION = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, image_size=32,
              patch_size=8)
TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, vocab_size=120,
            max_position_embeddings=16)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("onnx")


@pytest.fixture(scope="module")
def clip_dir(work):
    torch.manual_seed(0)
    cfg = transformers.CLIPConfig(vision_config=VISION, text_config={**TEXT, "eos_token_id": 2, "bos_token_id": 1},
                                  projection_dim=32)
    path = work / "clip"
    transformers.CLIPModel(cfg).eval().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def siglip_vision_dir(work):
    torch.manual_seed(1)
    path = work / "siglip-vision"
    transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**VISION)).eval().save_pretrained(path)
    return path


def _session(path):
    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _run(path, name, x):
    sess = _session(path)
    outs = sess.run(None, {name: x.numpy()})
    return {o.name: v for o, v in zip(sess.get_outputs(), outs)}


def _cosine(a, b):
    return float(np.min(np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))))


def _check_int8(path, name, x, reference: dict[str, np.ndarray], embeds: str):
    got = _run(path, name, x)
    worst = max(float(np.abs(got[k] - v).max()) for k, v in reference.items())
    cos = _cosine(got[embeds], reference[embeds])
    print(f"int8 {path.parent.name}: max |diff| {worst:.3g}, min cosine {embeds} {cos:.5f}")
    assert 0 < worst < INT8_MAX_DIFF          # quantised (not a copy of fp32), and close
    assert cos > INT8_MIN_COSINE


def test_clip_image_tower_from_full_model_matches_transformers(clip_dir, work, cli):
    out = work / "clip-vision-onnx"
    r = cli("export", clip_dir, out, "--to", "onnx", "--quantize", "int8")
    assert r.code == 0, r.err
    assert "verify OK" in r.out and "int8:" in r.out
    # the layout optimum and transformers.js read
    for f in ("model.onnx", "model_quantized.onnx", "onnx/model.onnx", "onnx/model_quantized.onnx", "config.json",
              "preprocessor_config.json", "clawconvert_manifest.json"):
        assert (out / f).is_file(), f
    onnx.checker.check_model(str(out / "model.onnx"))
    graph = onnx.load(str(out / "model.onnx")).graph
    assert [i.name for i in graph.input] == ["pixel_values"]
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param         # symbolic batch axis
    assert [o.name for o in graph.output] == ["last_hidden_state", "pooler_output", "image_embeds"]
    assert json.loads((out / "config.json").read_text())["model_type"] == "clip_vision_model"

    full = transformers.CLIPModel.from_pretrained(clip_dir).eval()
    x = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(7))   # batch 5: never seen by export
    with torch.no_grad():
        ref = {"last_hidden_state": full.vision_model(pixel_values=x).last_hidden_state.numpy(),
               "pooler_output": full.vision_model(pixel_values=x).pooler_output.numpy(),
               "image_embeds": full.get_image_features(pixel_values=x).pooler_output.numpy()}
    got = _run(out / "model.onnx", "pixel_values", x)
    for k, v in ref.items():
        diff = float(np.abs(got[k] - v).max())
        print(f"CLIP image tower ONNX fp32 vs transformers CLIPModel: {k} max |diff| {diff:.3g}")
        assert diff <= FP32_TOL, k
    _check_int8(out / "model_quantized.onnx", "pixel_values", x, ref, "image_embeds")
    manifest = json.loads((out / "clawconvert_manifest.json").read_text())
    assert manifest["verify"]["fp32"]["max_abs_diff"] <= FP32_TOL and "int8" in manifest["verify"]


def test_clip_text_tower_dynamic_batch_and_length(clip_dir, work):
    out = work / "clip-text-onnx"
    result = clawconvert.export(clip_dir, out, to="onnx", tower="text")
    assert result.source == "CLIPTextModelWithProjection"
    full = transformers.CLIPModel.from_pretrained(clip_dir).eval()
    for batch, length in ((4, 16), (2, 9)):
        ids = torch.randint(3, TEXT["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(batch))
        ids[:, -1] = 2                                                     # EOS pooled
        with torch.no_grad():
            ref = full.get_text_features(input_ids=ids).pooler_output.numpy()
            hidden = full.text_model(input_ids=ids).last_hidden_state.numpy()
        got = _run(out / "model.onnx", "input_ids", ids)
        assert np.abs(got["text_embeds"] - ref).max() <= FP32_TOL
        assert np.abs(got["last_hidden_state"] - hidden).max() <= FP32_TOL


def test_siglip_vision_tower_directory_and_int8(siglip_vision_dir, work):
    path = siglip_vision_dir
    out = work / "siglip-vision-onnx"
    result = clawconvert.export(path, out, to="onnx", quantize="int8")
    assert result.figures["fp32"]["max_abs_diff"] <= FP32_TOL
    model = transformers.SiglipVisionModel.from_pretrained(path).eval()
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        o = model(pixel_values=x)
    ref = {"last_hidden_state": o.last_hidden_state.numpy(), "pooler_output": o.pooler_output.numpy()}
    got = _run(out / "model.onnx", "pixel_values", x)
    assert list(got) == ["last_hidden_state", "pooler_output"]
    assert max(float(np.abs(got[k] - v).max()) for k, v in ref.items()) <= FP32_TOL
    _check_int8(out / "model_quantized.onnx", "pixel_values", x, ref, "pooler_output")


def test_openclip_source_matches_open_clip(work):
    """An OpenCLIP directory: the tower is extracted first; the reference is open_clip's own encode_image."""
    open_clip = pytest.importorskip("open_clip")
    src = FIXTURES / "openclip_tiny"
    out = work / "openclip-onnx"
    clawconvert.export(src, out, to="onnx")
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{src}")
    model.eval()
    size = json.loads((out / "config.json").read_text())["image_size"]
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = model.encode_image(x).numpy()
    diff = float(np.abs(_run(out / "model.onnx", "pixel_values", x)["image_embeds"] - ref).max())
    print(f"OpenCLIP fixture image tower ONNX fp32 vs open_clip encode_image: max |diff| {diff:.3g}")
    assert diff <= FP32_TOL


def test_bad_input_and_failed_check_write_nothing(clip_dir, siglip_vision_dir, work, cli):
    before = tree_hash(clip_dir)
    r = cli("export", clip_dir, work / "never", "--to", "onnx", "--tolerance", "0")
    assert r.code == 1 and "output not written" in r.err and not (work / "never").exists()
    r = cli("export", clip_dir, work / "never", "--to", "onnx", "--outtype", "q8_0")
    assert_one_line_error(r, "--outtype does not apply to --to onnx")
    r = cli("export", siglip_vision_dir, work / "never", "--to", "onnx", "--tower", "text")
    assert_one_line_error(r, "has no text tower")
    assert tree_hash(clip_dir) == before and not (work / "never").exists()


def test_siglip_text_tower_from_full_model(work):
    torch.manual_seed(2)
    path = work / "siglip"
    transformers.SiglipModel(transformers.SiglipConfig(vision_config=VISION, text_config=TEXT)).eval().save_pretrained(path)
    out = work / "siglip-text-onnx"
    assert clawconvert.export(path, out, to="onnx", tower="text").source == "SiglipTextModel"
    full = transformers.SiglipModel.from_pretrained(path).eval()
    ids = torch.randint(0, TEXT["vocab_size"], (3, TEXT["max_position_embeddings"]), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = full.get_text_features(input_ids=ids)
    ref = getattr(ref, "pooler_output", ref).numpy()
    diff = float(np.abs(_run(out / "model.onnx", "input_ids", ids)["pooler_output"] - ref).max())
    print(f"SigLIP text tower ONNX fp32 vs transformers SiglipModel.get_text_features: max |diff| {diff:.3g}")
    assert diff <= FP32_TOL


def test_dinov2_torch_hub_file_matches_timm(work):
    """A facebookresearch torch-hub file (registers): extracted first; the reference is timm reading the file its own
    way (checkpoint_filter_fn) and running forward_features, whose tokens are HF's last_hidden_state."""
    import dinov2_synth as synth
    src = synth.original_file("S-reg4", work / "dinov2.pth", seed=3)
    out = work / "dinov2-onnx"
    result = clawconvert.export(src, out, to="onnx", quantize="int8", src_format="original")
    assert result.source == "Dinov2WithRegistersModel"
    ref_model = synth.timm_from_original("S-reg4", torch.load(src, weights_only=True))
    x = torch.randn(3, 3, synth.IMAGE, synth.IMAGE, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        tokens = ref_model.forward_features(x)
    ref = {"last_hidden_state": tokens.numpy(), "pooler_output": tokens[:, 0].numpy()}
    got = _run(out / "model.onnx", "pixel_values", x)
    assert list(got) == ["last_hidden_state", "pooler_output"]
    for k, v in ref.items():
        diff = float(np.abs(got[k] - v).max())
        print(f"DINOv2 S-reg4 (torch-hub file) ONNX fp32 vs timm forward_features: {k} max |diff| {diff:.3g}")
        assert diff <= FP32_TOL, k
    _check_int8(out / "model_quantized.onnx", "pixel_values", x, ref, "pooler_output")


def test_dinov3_directory_matches_transformers(work):
    torch.manual_seed(4)
    cfg = transformers.DINOv3ViTConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=2, image_size=32, patch_size=16, num_register_tokens=4)
    path = work / "dinov3"
    transformers.DINOv3ViTModel(cfg).eval().save_pretrained(path)
    out = work / "dinov3-onnx"
    clawconvert.export(path, out, to="onnx")
    model = transformers.DINOv3ViTModel.from_pretrained(path).eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        o = model(pixel_values=x)
    got = _run(out / "model.onnx", "pixel_values", x)
    for k in ("last_hidden_state", "pooler_output"):
        diff = float(np.abs(got[k] - getattr(o, k).numpy()).max())
        print(f"DINOv3 ONNX fp32 vs transformers DINOv3ViTModel: {k} max |diff| {diff:.3g}")
        assert diff <= FP32_TOL, k
