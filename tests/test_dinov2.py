"""DINOv2: timm, facebookresearch torch-hub and transformers layouts, against the frameworks themselves.

Every variant shape (S / B / L / g at depth 1, plain, 4 registers, SwiGLU for g) goes
timm -> hf -> timm and original -> hf -> original.  Each output loads in its framework with no
missing or unexpected keys, reproduces the source framework's own forward pass within 1e-5
(fp32: timm's ``forward_features``, transformers' ``last_hidden_state``), and the round trips
give back the source's tensors bit for bit.  The references are timm (``save_for_hf``,
``local-dir:`` loading, and its ``checkpoint_filter_fn`` reader of torch-hub files) and
transformers, never clawconvert's own output.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import timm
import torch
import transformers
from safetensors.torch import load_file, save_file

import clawconvert
from clawconvert.families import get_family
from conftest import FIXTURES, assert_one_line_error

sys.path.insert(0, str(Path(__file__).parent))
import dinov2_synth as synth  # noqa: E402

TOL = 1e-5
FAM = get_family("dinov2")


def _pixels(seed: int = 1) -> torch.Tensor:
    return torch.randn(2, 3, synth.IMAGE, synth.IMAGE, generator=torch.Generator().manual_seed(seed))


def _hf(path: Path):
    cfg = json.loads((path / "config.json").read_text())
    cls = getattr(transformers, cfg["architectures"][0])
    model, info = cls.from_pretrained(str(path), output_loading_info=True, dtype=torch.float32)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return model.eval()


def _timm(path: Path):
    return timm.create_model(f"local-dir:{path}", pretrained=True).eval()   # timm's strict load


def _close(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    diff = float((a - b).abs().max())
    assert diff <= TOL, diff
    return diff


def _same_tensors(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def timm_source(tmp_path_factory):
    """timm's own save_for_hf of each variant, made once and shared by the tests (which only read it)."""
    root, made = tmp_path_factory.mktemp("dinov2-timm"), {}

    def get(variant: str) -> Path:
        if variant not in made:
            made[variant] = synth.timm_dir(variant, root / variant)
        return made[variant]
    return get


def _verify(variant: str) -> bool:
    """--verify runs both frameworks once more: the giant shapes (113 MB a layer) check it in one direction only."""
    return not variant.startswith("g")


@pytest.mark.parametrize("variant", list(synth.VARIANTS))
def test_timm_to_hf_to_timm(variant, tmp_path, timm_source):
    src = timm_source(variant)
    ref = _timm(src)
    r = clawconvert.convert(src, tmp_path / "hf", to="hf", verify=True)
    assert r.verification["passed"] and r.verification["max_abs_diff"] <= TOL
    hf = _hf(tmp_path / "hf")
    x = _pixels()
    with torch.no_grad():
        _close(hf(pixel_values=x).last_hidden_state, ref.forward_features(x))
    back = clawconvert.convert(tmp_path / "hf", tmp_path / "timm2", to="timm", verify=_verify(variant))
    assert back.verification is None or back.verification["passed"]
    _same_tensors(load_file(str(src / "model.safetensors")), load_file(str(tmp_path / "timm2" / "model.safetensors")))
    with torch.no_grad():
        assert torch.equal(_timm(tmp_path / "timm2").forward_features(x), ref.forward_features(x))
    cfg = json.loads((tmp_path / "timm2" / "config.json").read_text())
    assert cfg["architecture"] == synth.VARIANTS[variant][0] and cfg["num_classes"] == 0


@pytest.mark.parametrize("variant", list(synth.VARIANTS))
def test_original_to_hf_to_original(variant, tmp_path):
    src = synth.original_file(variant, tmp_path / "dinov2.pth")
    state = torch.load(src, weights_only=True)
    ref = synth.timm_from_original(variant, state)   # timm reads the torch-hub file its own way
    r = clawconvert.convert(src, tmp_path / "hf", to="hf", src_format="original", verify=_verify(variant))
    assert r.verification is None or (r.verification["passed"] and r.verification["max_abs_diff"] <= TOL)
    hf = _hf(tmp_path / "hf")
    x = _pixels()
    with torch.no_grad():
        _close(hf(pixel_values=x).last_hidden_state, ref.forward_features(x))
    clawconvert.convert(tmp_path / "hf", tmp_path / "back.pth", to="original", verify=not _verify(variant))
    _same_tensors(state, torch.load(tmp_path / "back.pth", weights_only=True, mmap=True))
    clawconvert.convert(tmp_path / "hf", tmp_path / "back.safetensors", to="original")
    _same_tensors(state, load_file(str(tmp_path / "back.safetensors")))


def test_hf_output_has_the_hub_spelling_and_5x_spelling_reads(tmp_path):
    """Written: the keys transformers' own save_pretrained writes (4.x / the Hub's spelling).
    Read: also the 5.x spelling (save_original_format=False)."""
    src = synth.timm_dir("g-reg4", tmp_path / "timm", seed=3, embed_dim=64, num_heads=1, mlp_ratio=5.5)
    clawconvert.convert(src, tmp_path / "hf", to="hf")
    hf = _hf(tmp_path / "hf")
    ours = set(load_file(str(tmp_path / "hf" / "model.safetensors")))
    hf.save_pretrained(tmp_path / "by_transformers")
    assert ours == set(load_file(str(tmp_path / "by_transformers" / "model.safetensors")))
    assert "encoder.layer.0.attention.attention.query.weight" in ours and "encoder.layer.0.mlp.weights_in.weight" in ours
    hf.save_pretrained(tmp_path / "v5", save_original_format=False)
    v5 = set(load_file(str(tmp_path / "v5" / "model.safetensors")))
    assert "encoder.layer.0.attention.q_proj.weight" in v5 and "encoder.layer.0.mlp.gate_proj.weight" in v5
    r = clawconvert.convert(tmp_path / "v5", tmp_path / "timm2", to="timm", verify=True)
    assert r.verification["max_abs_diff"] <= TOL
    _same_tensors(load_file(str(src / "model.safetensors")), load_file(str(tmp_path / "timm2" / "model.safetensors")))


def test_hf_to_timm_and_back_is_exact_in_function(tmp_path):
    """The class-position fold: original / hf -> timm -> hf keeps every output, not every byte."""
    src = synth.original_file("S-reg4", tmp_path / "reg.pth", seed=4)
    clawconvert.convert(src, tmp_path / "hf", to="hf", src_format="original")
    r = clawconvert.convert(tmp_path / "hf", tmp_path / "timm", to="timm", verify=True)
    assert any("no_embed_class" in n for n in r.notes)
    clawconvert.convert(tmp_path / "timm", tmp_path / "hf2", to="hf")
    a, b = (load_file(str(p / "model.safetensors")) for p in (tmp_path / "hf", tmp_path / "hf2"))
    pos = "embeddings.position_embeddings"
    assert torch.equal(a[pos][:, 1:], b[pos][:, 1:]) and not torch.equal(a[pos], b[pos])
    assert torch.equal(b[pos][:, :1], torch.full_like(b[pos][:, :1], -0.0))
    assert torch.equal(b["embeddings.cls_token"], a["embeddings.cls_token"] + a[pos][:, :1])
    x = _pixels()
    with torch.no_grad():
        assert torch.equal(_hf(tmp_path / "hf")(pixel_values=x).last_hidden_state,
                           _hf(tmp_path / "hf2")(pixel_values=x).last_hidden_state)


def test_mask_token_dropped_for_timm_with_a_note(tmp_path):
    src = synth.original_file("S", tmp_path / "s.pth")
    r = clawconvert.convert(src, tmp_path / "timm", to="timm", src_format="original")
    assert any("mask token" in n for n in r.notes)
    assert "mask_token" not in load_file(str(tmp_path / "timm" / "model.safetensors"))
    r = clawconvert.convert(tmp_path / "timm", tmp_path / "hf", to="hf")   # timm's: none, so zeros
    assert not load_file(str(tmp_path / "hf" / "model.safetensors"))["embeddings.mask_token"].any()
    assert not any("mask token" in n for n in clawconvert.convert(tmp_path / "hf", tmp_path / "t2", to="timm").notes)


def test_model_name_and_config_are_checked_against_the_shapes(tmp_path, cli):
    src = synth.original_file("B-reg4", tmp_path / "dinov2_vitb14_reg4_pretrain.pth", depth=1)
    r = cli("convert", src, tmp_path / "x", "--to", "hf", "--model-name", "dinov2_vitb14_reg")
    assert_one_line_error(r, "shapes contradict --model-name dinov2_vitb14_reg", "depth 12 there, 1 in the weights")
    r = cli("convert", src, tmp_path / "x", "--to", "hf", "--model-name", "dinov2_vits14")
    assert_one_line_error(r, "embed_dim 384 there, 768 in the weights", "num_register_tokens 0 there, 4")
    r = cli("convert", src, tmp_path / "x", "--to", "hf", "--model-name", "dinov2_vitb41")
    assert_one_line_error(r, "unknown DINOv2 torch-hub model 'dinov2_vitb41'", "dinov2_vitb14")
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"embed_dim": 768, "depth": 1, "num_heads": 8, "num_register_tokens": 4,
                               "img_size": 28, "ffn_layer": "swiglufused"}))
    r = cli("convert", src, tmp_path / "x", "--to", "hf", "--model-config", cfg)
    assert_one_line_error(r, "ffn_layer swiglufused there, mlp in the weights")
    cfg.write_text(json.dumps({"embed_dim": 768, "depth": 1, "num_heads": 8, "num_register_tokens": 4}))
    r = cli("convert", src, tmp_path / "hf8", "--to", "hf", "--model-config", cfg)
    assert r.code == 0, r.err
    assert json.loads((tmp_path / "hf8" / "config.json").read_text())["num_attention_heads"] == 8
    assert not (tmp_path / "x").exists()


def test_clip_and_siglip_checkpoints_given_a_dinov2_name_are_refused(tmp_path, cli):
    clip = FIXTURES / "openclip_tiny" / "open_clip_model.safetensors"
    r = cli("convert", clip, tmp_path / "x", "--to", "hf", "--model-name", "dinov2_vits14")
    assert_one_line_error(r, "not a DINOv2 torch-hub state dict (given 'dinov2_vits14')", "an OpenCLIP CLIP checkpoint")
    cfg = transformers.SiglipConfig(text_config={"hidden_size": 32, "num_attention_heads": 2, "num_hidden_layers": 1,
                                                 "intermediate_size": 64, "vocab_size": 50},
                                    vision_config={"hidden_size": 32, "num_attention_heads": 2, "num_hidden_layers": 1,
                                                   "intermediate_size": 64, "image_size": 28, "patch_size": 14})
    torch.save(transformers.SiglipModel(cfg).state_dict(), tmp_path / "siglip.pth")
    r = cli("convert", tmp_path / "siglip.pth", tmp_path / "x", "--to", "hf", "--model-name", "dinov2_vitb14")
    assert_one_line_error(r, "not a DINOv2 torch-hub state dict", "a transformers CLIP/SigLIP checkpoint")
    assert not (tmp_path / "x").exists()


def test_timm_configs_dinov2_has_no_form_for_are_refused(tmp_path, cli, timm_source):
    src = tmp_path / "timm"
    src.mkdir()
    for f in timm_source("S").iterdir():    # a copy: its config.json is rewritten below
        (src / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((src / "config.json").read_text())
    for change, needle in (({"num_classes": 1000}, "a classification head"),
                           ({"model_args": {**cfg["model_args"], "qk_norm": True}}, "model_args.qk_norm"),
                           ({"model_args": {**cfg["model_args"], "mystery": 1}}, "does not know what it changes"),
                           ({"architecture": "vit_base_patch16_224"}, "no model family reads timm architecture")):
        (src / "config.json").write_text(json.dumps({**cfg, **change}))
        assert_one_line_error(cli("convert", src, tmp_path / "x", "--to", "hf"), needle)
    assert not (tmp_path / "x").exists()


def test_extract_visual_is_a_verified_conversion(tmp_path, cli, timm_source):
    src = timm_source("L-reg4")
    clawconvert.convert(src, tmp_path / "hf", to="hf")
    r = cli("extract-visual", tmp_path / "hf", tmp_path / "v", "--to", "timm", "--verify")
    assert r.code == 0, r.err
    assert "verify OK" in r.out and "timm vit_large_patch14_reg4_dinov2" in r.out and "local-dir:" in r.out
    _same_tensors(load_file(str(src / "model.safetensors")), load_file(str(tmp_path / "v" / "model.safetensors")))
    r = cli("extract-visual", src, tmp_path / "v_hf", "--verify")
    assert r.code == 0 and "Dinov2WithRegistersModel" in r.out, r.err
    proc = transformers.AutoImageProcessor.from_pretrained(tmp_path / "v_hf")
    assert type(proc).__name__.startswith("BitImageProcessor") and list(proc.image_mean) == [0.485, 0.456, 0.406]


def test_canonical_shapes_match_the_meta_model():
    from clawconvert.families.dinov2 import make_config
    for args in ((64, 2, 4, 176, True, 4, 28, 14), (96, 1, 3, 384, False, 0, 42, 14), (384, 1, 6, 1536, False, 2, 28, 14),
                 (1536, 1, 24, 4096, True, 0, 28, 14)):
        config = make_config(*args)
        assert list(FAM.canonical_shapes(config).items()) == list(FAM.meta_shapes(config).items())


def test_timm_dinov2_table_matches_the_installed_timm():
    from clawconvert.families.dinov2 import scan_timm_archs, timm_archs
    assert {a.name: a for a in scan_timm_archs()} == timm_archs(), "regenerate it: python tools/make_timm_archs.py"


def test_hub_names_build_what_timm_builds_for_the_torch_hub_files():
    """hub_models.json against timm's DINOv2 architectures, which load those very files."""
    from clawconvert.families.dinov2 import hub_models, timm_archs
    archs = timm_archs()
    for name, kw in hub_models().items():
        size = {"s": "small", "b": "base", "l": "large", "g": "giant"}[name[len("dinov2_vit")]]
        arch = archs[f"vit_{size}_patch14_{'reg4_' if name.endswith('_reg') else ''}dinov2"]
        assert (kw["embed_dim"], kw["depth"], kw["num_heads"], kw["num_register_tokens"], kw["img_size"]) == \
            (arch.embed_dim, arch.depth, arch.num_heads, arch.reg_tokens, arch.img_size)
        assert (kw["ffn_layer"] == "swiglufused") == (arch.mlp == "swiglu")


def test_facebookresearch_code_reads_the_original_output(tmp_path):
    """facebookresearch's own DinoVisionTransformer (PyPI `dinov2`, the pre-register code; optional:
    pip install --no-deps dinov2==0.0.1.dev2) loads the .pth clawconvert writes, strictly, and
    computes what transformers computes on the converted model."""
    vt = pytest.importorskip("dinov2.models.vision_transformer")
    from functools import partial
    from dinov2.layers import MemEffAttention, NestedTensorBlock
    for variant in ("S", "B", "L", "g"):
        src = synth.original_file(variant, tmp_path / f"{variant}.pth")
        clawconvert.convert(src, tmp_path / variant, to="hf", src_format="original")
        clawconvert.convert(tmp_path / variant, tmp_path / f"{variant}-back.pth", to="original")
        kw = FAM.codec("original").write(clawconvert.formats.open_checkpoint(tmp_path / variant).config)
        model = vt.DinoVisionTransformer(**{k: v for k, v in kw.items() if k not in ("num_register_tokens",
                                                                                    "interpolate_antialias",
                                                                                    "interpolate_offset")},
                                         block_fn=partial(NestedTensorBlock, attn_class=MemEffAttention)).eval()
        model.load_state_dict(torch.load(tmp_path / f"{variant}-back.pth", weights_only=True), strict=True)
        x = _pixels()
        with torch.no_grad():
            out = model.forward_features(x)
            hf = _hf(tmp_path / variant)(pixel_values=x).last_hidden_state
        diff = _close(torch.cat([out["x_norm_clstoken"][:, None], out["x_norm_patchtokens"]], 1), hf)
        print(f"facebookresearch DinoVisionTransformer vs transformers, {variant}: max |diff| {diff:.2g}")


def test_inspect_and_verify_commands(tmp_path, cli, timm_source):
    src = timm_source("S-reg4")
    clawconvert.convert(src, tmp_path / "hf", to="hf")
    r = cli("verify", src, tmp_path / "hf")
    assert r.code == 0 and "last_hidden_state 0" in r.out, r.err
    w = load_file(str(tmp_path / "hf" / "model.safetensors"))
    w["encoder.layer.0.mlp.fc2.bias"][0] += 0.05
    save_file(w, str(tmp_path / "hf" / "model.safetensors"), metadata={"format": "pt"})
    assert cli("verify", src, tmp_path / "hf").code == 1
    r = cli("inspect", src, "--json")
    assert r.code == 0 and json.loads(r.out)["family"] == "dinov2"
