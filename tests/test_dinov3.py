"""DINOv3 ViT: timm, facebookresearch torch-hub and transformers layouts, against the frameworks themselves.

Every timm DINOv3 architecture goes timm -> hf -> timm, and every torch-hub entry point
original -> hf -> original (one block, two heads of the architecture's own head width).  Each
output loads in its framework with no missing or unexpected keys, reproduces the source
framework's own forward pass within 1e-5 (fp32: timm's ``forward_features``, transformers'
``last_hidden_state``), and the round trips give back the source's tensors bit for bit.  The
references are timm (``save_for_hf``, ``local-dir:`` loading, and its ``checkpoint_filter_fn``
reader of torch-hub files), transformers and, when its source is at hand
(``CLAWCONVERT_DINOV3_SRC=/path/to/facebookresearch/dinov3``), facebookresearch's own
``DinoVisionTransformer``; never clawconvert's own output.  ``CLAWCONVERT_SLOW=1`` adds the
real widths (7B: one 670 MB block).
"""
from __future__ import annotations

import json
import os
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
import dinov3_synth as synth  # noqa: E402

TOL = 1e-5
FAM = get_family("dinov3")
SLOW = pytest.mark.skipif(not os.environ.get("CLAWCONVERT_SLOW"), reason="real widths: CLAWCONVERT_SLOW=1")
FB_SRC = os.environ.get("CLAWCONVERT_DINOV3_SRC")


def FAM_ARCHS():
    from clawconvert.families.dinov3 import timm_archs
    return timm_archs()


def _pixels(seed: int = 1) -> torch.Tensor:
    return torch.randn(2, 3, synth.IMAGE, synth.IMAGE, generator=torch.Generator().manual_seed(seed))


def _hf(path: Path):
    model, info = transformers.DINOv3ViTModel.from_pretrained(str(path), output_loading_info=True, dtype=torch.float32)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return model.eval()


def _timm(path: Path):
    return timm.create_model(f"local-dir:{path}", pretrained=True).eval()   # timm's strict load


def _close(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    diff = float((a - b).abs().max())
    assert diff <= TOL, diff
    return diff


def _same_tensors(a: dict, b: dict, skip: tuple = ()) -> None:
    assert set(a) - set(skip) == set(b)
    for k in b:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def _model_config(name: str, path: Path, narrow: bool = True) -> Path:
    """The entry point's kwargs, cut to the tiny model's depth (and widths): what --model-config reads."""
    path.write_text(json.dumps({**synth.hub_kwargs(name, narrow), "depth": 1}))
    return path


def timm_to_hf_to_timm(arch: str, root: Path, narrow: bool = True) -> None:
    src = synth.timm_dir(arch, root / "timm", narrow=narrow)
    ref = _timm(src)
    r = clawconvert.convert(src, root / "hf", to="hf", verify=True)
    assert r.verification["passed"] and r.verification["max_abs_diff"] <= TOL
    x = _pixels()
    with torch.no_grad():
        want = ref.forward_features(x)
        out = _hf(root / "hf")(pixel_values=x)
        _close(out.last_hidden_state, want)
        assert torch.equal(out.pooler_output, out.last_hidden_state[:, 0])
    clawconvert.convert(root / "hf", root / "timm2", to="timm")
    _same_tensors(load_file(str(src / "model.safetensors")), load_file(str(root / "timm2" / "model.safetensors")))
    with torch.no_grad():
        assert torch.equal(_timm(root / "timm2").forward_features(x), want)
    cfg = json.loads((root / "timm2" / "config.json").read_text())
    assert cfg["num_classes"] == 0 and cfg["model_args"]["global_pool"] == "token"
    archs = FAM_ARCHS()
    if narrow:   # the nearest width of the same kind: every tiny model is two heads wide
        assert (archs[cfg["architecture"]].swiglu_mlp, archs[cfg["architecture"]].qkv_bias) == \
            (archs[arch].swiglu_mlp, archs[arch].qkv_bias)
    else:
        assert cfg["architecture"] == arch


def original_to_hf_to_original(name: str, root: Path, narrow: bool = True) -> None:
    src = synth.original_file(name, root / "dinov3.pth", narrow=narrow)
    state = torch.load(src, weights_only=True)
    ref = synth.timm_from_original(name, state, narrow=narrow)   # timm reads the torch-hub file its own way
    r = clawconvert.convert(src, root / "hf", to="hf", verify=True, model_config=_model_config(name, root / "kw.json", narrow))
    assert r.verification["passed"] and r.verification["max_abs_diff"] <= TOL
    x = _pixels()
    with torch.no_grad():
        _close(_hf(root / "hf")(pixel_values=x).last_hidden_state, ref.forward_features(x))
    back = clawconvert.convert(root / "hf", root / "back.pth", to="original")
    local = ("local_cls_norm.weight", "local_cls_norm.bias") if "local_cls_norm.weight" in state else ()
    assert bool(local) == any("local_cls_norm" in n for n in r.notes)
    _same_tensors(state, torch.load(root / "back.pth", weights_only=True, mmap=True), skip=local)
    assert any("load it with" in n for n in back.notes)
    clawconvert.convert(root / "hf", root / "back.safetensors", to="original")
    _same_tensors(state, load_file(str(root / "back.safetensors")), skip=local)
    again = clawconvert.convert(root / "back.safetensors", root / "hf2", to="hf")   # detected by its keys
    assert again.source_format == "original"
    _same_tensors(load_file(str(root / "hf" / "model.safetensors")), load_file(str(root / "hf2" / "model.safetensors")))


@pytest.mark.parametrize("arch", list(synth.TIMM))
def test_timm_to_hf_to_timm(arch, tmp_path):
    timm_to_hf_to_timm(arch, tmp_path)


@pytest.mark.parametrize("name", list(synth.HUB))
def test_original_to_hf_to_original(name, tmp_path):
    original_to_hf_to_original(name, tmp_path)


@SLOW
@pytest.mark.parametrize("arch", list(synth.TIMM))
def test_timm_to_hf_to_timm_at_real_widths(arch, tmp_path):
    timm_to_hf_to_timm(arch, tmp_path, narrow=False)


@SLOW
@pytest.mark.parametrize("name", list(synth.HUB))
def test_original_to_hf_to_original_at_real_widths(name, tmp_path):
    original_to_hf_to_original(name, tmp_path, narrow=False)


@pytest.fixture(scope="module")
def splus(tmp_path_factory) -> dict[str, Path]:
    """An S+ (SwiGLU, q/v bias, 4 registers) saved by timm and converted to hf: shared by the tests below."""
    root = tmp_path_factory.mktemp("dinov3")
    src = synth.timm_dir("vit_small_plus_patch16_dinov3_qkvb", root / "timm", seed=3)
    clawconvert.convert(src, root / "hf", to="hf")
    return {"timm": src, "hf": root / "hf", "root": root}


def test_hf_output_has_the_hub_spelling_and_5x_spelling_reads(splus, tmp_path):
    """Written: the keys transformers' own save_pretrained writes (layer.N, the Hub's spelling).
    Read: also the 5.x module names (save_original_format=False: model.layer.N)."""
    hf = _hf(splus["hf"])
    ours = set(load_file(str(splus["hf"] / "model.safetensors")))
    hf.save_pretrained(tmp_path / "by_transformers")
    assert ours == set(load_file(str(tmp_path / "by_transformers" / "model.safetensors")))
    assert "layer.0.attention.q_proj.weight" in ours and "layer.0.mlp.gate_proj.weight" in ours
    hf.save_pretrained(tmp_path / "v5", save_original_format=False)
    assert "model.layer.0.attention.q_proj.weight" in load_file(str(tmp_path / "v5" / "model.safetensors"))
    r = clawconvert.convert(tmp_path / "v5", tmp_path / "timm2", to="timm", verify=True)
    assert r.verification["max_abs_diff"] <= TOL
    _same_tensors(load_file(str(splus["timm"] / "model.safetensors")), load_file(str(tmp_path / "timm2" / "model.safetensors")))
    proc = transformers.AutoImageProcessor.from_pretrained(splus["hf"])
    assert type(proc).__name__.startswith("DINOv3ViTImageProcessor") and proc.size["height"] == synth.IMAGE


def test_a_masked_key_bias_is_not_kept_with_a_note(tmp_path):
    """LinearKMaskedBias multiplies the k third of qkv.bias by 0: it comes back as zeros, the rest bit for bit."""
    src = synth.original_file("dinov3_vits16", tmp_path / "s.pth", key_bias=0.3)
    kw = _model_config("dinov3_vits16", tmp_path / "kw.json")
    r = clawconvert.convert(src, tmp_path / "hf", to="hf", model_config=kw, verify=True)
    assert any("masked out by bias_mask" in n for n in r.notes)
    clawconvert.convert(tmp_path / "hf", tmp_path / "back.pth", to="original")
    a, b = torch.load(src, weights_only=True), torch.load(tmp_path / "back.pth", weights_only=True)
    bias, d = "blocks.0.attn.qkv.bias", a["cls_token"].shape[-1]
    assert torch.equal(b[bias][:d], a[bias][:d]) and torch.equal(b[bias][2 * d:], a[bias][2 * d:])
    assert not b[bias][d:2 * d].any() and a[bias][d:2 * d].all()
    _same_tensors({k: v for k, v in a.items() if k != bias}, {k: v for k, v in b.items() if k != bias})
    assert not any("masked out" in n for n in clawconvert.convert(tmp_path / "back.pth", tmp_path / "hf2", to="hf",
                                                                   model_config=kw).notes)


def test_without_registers(tmp_path, cli):
    """transformers keeps a (1, 0, D) register tensor; the original has no storage_tokens, and timm's
    reader of original files then cannot tell it is DINOv3: --verify says so in one line."""
    src = synth.timm_dir("vit_base_patch16_dinov3", tmp_path / "timm", num_reg_tokens=0)
    clawconvert.convert(src, tmp_path / "hf", to="hf")
    assert load_file(str(tmp_path / "hf" / "model.safetensors"))["embeddings.register_tokens"].shape == (1, 0, 128)
    x = _pixels()
    with torch.no_grad():
        _close(_hf(tmp_path / "hf")(pixel_values=x).last_hidden_state, _timm(src).forward_features(x))
    clawconvert.convert(tmp_path / "hf", tmp_path / "o.pth", to="original")
    assert "storage_tokens" not in torch.load(tmp_path / "o.pth", weights_only=True)
    r = cli("convert", tmp_path / "hf", tmp_path / "o2.pth", "--to", "original", "--verify")
    assert r.code == 1 and "tells them by storage_tokens" in r.err and r.err.count("\n") == 1
    assert not (tmp_path / "o2.pth").exists()
    clawconvert.convert(tmp_path / "o.pth", tmp_path / "timm2", to="timm", src_format="original")
    _same_tensors(load_file(str(src / "model.safetensors")), load_file(str(tmp_path / "timm2" / "model.safetensors")))


def test_model_name_and_config_are_checked_against_the_shapes(tmp_path, cli):
    src = synth.original_file("dinov3_vitb16", tmp_path / "dinov3_vitb16.pth")
    r = cli("convert", src, tmp_path / "x", "--to", "hf", "--model-name", "dinov3_vitb16")
    assert_one_line_error(r, "shapes contradict --model-name dinov3_vitb16", "depth 12 there, 1 in the weights",
                          "num_heads 12 there, 2 in the weights")
    r = cli("convert", src, tmp_path / "x", "--to", "hf", "--model-name", "dinov3_vitb61")
    assert_one_line_error(r, "unknown DINOv3 torch-hub model 'dinov3_vitb61'", "dinov3_vitb16")
    r = cli("convert", src, tmp_path / "x", "--to", "hf", "--model-name", "dinov2_vitb14")
    assert_one_line_error(r, "given --model-name dinov2_vitb14 (DINOv2), but it holds a DINOv3 torch-hub state dict")
    cfg = tmp_path / "cfg.json"
    for change, needle in (({"ffn_layer": "swiglu"}, "ffn_layer swiglu there, mlp in the weights"),
                           ({"ffn_ratio": 3.0}, "an MLP 384 wide there, 512 in the weights"),
                           ({"mask_k_bias": False}, "mask_k_bias False there, True in the weights"),
                           ({"pos_embed_rope_base": 1000.0}, "are not pos_embed_rope_base 1000.0"),
                           ({"pos_embed_rope_dtype": "bf16"}, "transformers computes RoPE in float32"),
                           ({"pos_embed_rope_normalize_coords": "max"}, "'separate'"),
                           ({"norm_layer": "rmsnorm"}, "norm_layer rmsnorm there"),
                           ({"mystery": 1}, "unknown key 'mystery'")):
        cfg.write_text(json.dumps({"embed_dim": 128, **change}))
        assert_one_line_error(cli("convert", src, tmp_path / "x", "--to", "hf", "--model-config", cfg), needle)
    cfg.write_text(json.dumps({"embed_dim": 128, "norm_layer": "layernorm", "img_size": 64}))
    r = cli("convert", src, tmp_path / "hf", "--to", "hf", "--model-config", cfg)
    assert r.code == 0, r.err
    out = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (out["layer_norm_eps"], out["image_size"], out["num_attention_heads"], out["rope_theta"]) == (1e-6, 64, 2, 100.0)
    assert not (tmp_path / "x").exists()


def test_files_no_transformers_form_has_are_refused(tmp_path, cli):
    state = synth.original_state_dict("dinov3_vits16")
    for change, needle in ((lambda s: s.update({"cls_norm.weight": torch.ones(128), "cls_norm.bias": torch.zeros(128)}),
                            "cls_norm (untie_cls_and_patch_norms)"),
                           (lambda s: s.pop("blocks.0.norm1.bias"), "norm_layer rmsnorm"),
                           (lambda s: s.update({"rope_embed.periods": s["rope_embed.periods"] * 3}),
                            "pos_embed_rope_min_period / max_period"),
                           (lambda s: s.update({"blocks.0.attn.qkv.bias_mask": torch.full((384,), float("nan"))}),
                            "never initialised")):
        bad = dict(state)
        change(bad)
        torch.save(bad, tmp_path / "bad.pth")
        assert_one_line_error(cli("convert", tmp_path / "bad.pth", tmp_path / "x", "--to", "hf", "--from", "original"),
                              needle)
    clip = FIXTURES / "openclip_tiny" / "open_clip_model.safetensors"
    r = cli("convert", clip, tmp_path / "x", "--to", "hf", "--model-name", "dinov3_vits16")
    assert_one_line_error(r, "not a DINOv3 torch-hub state dict (given 'dinov3_vits16')", "an OpenCLIP CLIP checkpoint")
    assert not (tmp_path / "x").exists()


def test_configs_a_layout_cannot_hold_are_refused(splus, tmp_path, cli):
    cfg = json.loads((splus["timm"] / "config.json").read_text())
    for change, needle in (({"num_classes": 1000}, "a classification head"),
                           ({"model_args": {**cfg["model_args"], "qk_norm": True}}, "model_args.qk_norm"),
                           ({"model_args": {**cfg["model_args"], "swiglu_align_to": 0}}, "GluMlp"),
                           ({"model_args": {**cfg["model_args"], "global_pool": "map"}}, "attention-pooling head"),
                           ({"model_args": {**cfg["model_args"], "mystery": 1}}, "does not know what it changes")):
        (tmp_path / "timm").mkdir(exist_ok=True)
        (tmp_path / "timm" / "model.safetensors").write_bytes((splus["timm"] / "model.safetensors").read_bytes())
        (tmp_path / "timm" / "config.json").write_text(json.dumps({**cfg, **change}))
        assert_one_line_error(cli("convert", tmp_path / "timm", tmp_path / "x", "--to", "hf"), needle)
    hf_cfg = json.loads((splus["hf"] / "config.json").read_text())
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "model.safetensors").write_bytes((splus["hf"] / "model.safetensors").read_bytes())
    for change, to, needle in (({"layer_norm_eps": 1e-6}, "timm", "fix LayerNorm eps 1e-05"),
                               ({"layer_norm_eps": 1e-7}, "original", "use 1e-5 or 1e-6"),
                               ({"hidden_act": "gelu"}, "original", "DINOv3's SwiGLU uses silu")):
        (tmp_path / "hf" / "config.json").write_text(json.dumps({**hf_cfg, **change}))
        dst = tmp_path / ("x.pth" if to == "original" else "x")
        assert_one_line_error(cli("convert", tmp_path / "hf", dst, "--to", to), needle)
        assert not dst.exists()
    from clawconvert.families.dinov3 import make_config
    from clawconvert.errors import ClawError
    for kw, fmt, needle in (({"key_bias": True}, "timm", "timm's k bias is a zero buffer"),
                            ({"proj_bias": False}, "timm", "always has a bias"),
                            ({"mlp_bias": False}, "timm", "always has biases")):
        with pytest.raises(ClawError, match=needle):
            FAM.codec(fmt).write(make_config(128, 1, 2, 512, False, 4, **kw))
    config = make_config(128, 1, 2, 512, False, 4)
    config.value_bias = False
    for fmt in ("timm", "original"):
        with pytest.raises(ClawError, match="one qkv bias"):
            FAM.codec(fmt).write(config)
    config = make_config(128, 1, 2, 500, True, 4)
    with pytest.raises(ClawError, match="SwiGLUFFN builds a multiple of 8"):
        FAM.codec("original").write(config)


def test_extract_visual_inspect_and_verify(splus, tmp_path, cli):
    r = cli("extract-visual", splus["hf"], tmp_path / "v", "--to", "timm", "--verify")
    assert r.code == 0, r.err
    assert "verify OK" in r.out and "timm vit_small_plus_patch16_dinov3_qkvb" in r.out and "local-dir:" in r.out
    _same_tensors(load_file(str(splus["timm"] / "model.safetensors")), load_file(str(tmp_path / "v" / "model.safetensors")))
    r = cli("verify", splus["timm"], splus["hf"])
    assert r.code == 0 and "last_hidden_state" in r.out, r.err
    r = cli("inspect", splus["timm"], "--json")
    assert r.code == 0 and json.loads(r.out)["family"] == "dinov3"
    w = load_file(str(splus["hf"] / "model.safetensors"))
    w["layer.0.mlp.down_proj.bias"][0] += 0.05
    save_file(w, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "bad").mkdir()
    for f in ("config.json", "preprocessor_config.json"):
        (tmp_path / "bad" / f).write_bytes((splus["hf"] / f).read_bytes())
    (tmp_path / "model.safetensors").rename(tmp_path / "bad" / "model.safetensors")
    assert cli("verify", splus["timm"], tmp_path / "bad").code == 1


def test_canonical_shapes_match_the_meta_model():
    from clawconvert.families.dinov3 import make_config
    for args, kw in (((128, 2, 2, 512, True, 4), {}), ((256, 1, 2, 512, True, 0), {"qkv_bias": False}),
                     ((192, 1, 3, 768, False, 4), {"key_bias": True, "proj_bias": False}),
                     ((64, 1, 1, 256, False, 1), {"mlp_bias": False})):
        config = make_config(*args, **kw)
        assert list(FAM.canonical_shapes(config).items()) == list(FAM.meta_shapes(config).items())


def test_timm_dinov3_table_matches_the_installed_timm():
    from clawconvert.families.dinov3 import scan_timm_archs, timm_archs
    assert {a.name: a for a in scan_timm_archs()} == timm_archs(), "regenerate it: python tools/make_timm_archs.py"
    assert set(synth.TIMM) == set(timm_archs()) == set(timm.list_models("vit_*_dinov3*"))


def test_hub_names_build_what_timm_builds_for_the_torch_hub_files():
    """hub_models.json against timm's DINOv3 architectures, which load those very files (meta device)."""
    from clawconvert.families.dinov3 import hub_models, swiglu_hidden, SWIGLU_ALIGN
    for name, kw in hub_models().items():
        arch, args = synth.HUB[name]
        with torch.device("meta"):
            m = timm.create_model(arch, pretrained=False, num_classes=0, **args)
        b = m.blocks[0]
        hidden = (swiglu_hidden(kw["embed_dim"], kw["ffn_ratio"], SWIGLU_ALIGN[kw["ffn_layer"]])
                  if kw["ffn_layer"].startswith("swiglu") else int(kw["embed_dim"] * kw["ffn_ratio"]))
        fc1 = b.mlp.fc1_g if hasattr(b.mlp, "fc1_g") else b.mlp.fc1
        assert (kw["embed_dim"], kw["num_heads"], kw["n_storage_tokens"], hidden, kw["qkv_bias"]) == \
            (m.embed_dim, b.attn.num_heads, m.reg_token.shape[1], fc1.out_features, b.attn.q_bias is not None), name
        assert (name != "dinov3_vitl16plus") == (kw["depth"] == len(m.blocks))   # timm has no L+: H+ with L's width
        # written back, a published shape names its entry point (not the 7B's: it wants local_cls_norm)
        from clawconvert.families.dinov3 import hub_name_for, make_config
        config = make_config(kw["embed_dim"], kw["depth"], kw["num_heads"], hidden, kw["ffn_layer"] != "mlp",
                             kw["n_storage_tokens"], qkv_bias=kw["qkv_bias"])
        written = FAM.codec("original").write(config)
        assert hub_name_for(written) == (None if kw["untie_global_and_local_cls_norm"] else name)
        assert (written["ffn_layer"], written["ffn_ratio"]) == (kw["ffn_layer"], kw["ffn_ratio"])


@pytest.mark.skipif(not FB_SRC, reason="facebookresearch/dinov3's source: CLAWCONVERT_DINOV3_SRC=/path/to/dinov3")
@pytest.mark.parametrize("narrow", [True, pytest.param(False, marks=SLOW)])
def test_facebookresearch_code_reads_and_writes_what_transformers_computes(narrow, tmp_path):
    """facebookresearch's own DinoVisionTransformer (the repository's code, no dependency) loads the synthetic
    state dicts strictly, and the .pth clawconvert writes back; its x_norm_clstoken / x_storage_tokens /
    x_norm_patchtokens equal transformers' last_hidden_state on the converted model."""
    sys.path.insert(0, FB_SRC)
    from dinov3.models.vision_transformer import DinoVisionTransformer
    for name in synth.HUB:
        kw = {**synth.hub_kwargs(name, narrow), "depth": 1}
        state = synth.original_state_dict(name, narrow=narrow, key_bias=0.3)
        model = DinoVisionTransformer(**kw).eval()
        model.load_state_dict(state, strict=True)
        torch.save(state, tmp_path / f"{name}.pth")
        clawconvert.convert(tmp_path / f"{name}.pth", tmp_path / name, to="hf",
                            model_config=_model_config(name, tmp_path / f"{name}.json", narrow))
        clawconvert.convert(tmp_path / name, tmp_path / f"{name}-back.pth", to="original")
        back_kw = FAM.codec("original").write(clawconvert.formats.open_checkpoint(tmp_path / name).config)
        back = DinoVisionTransformer(**{**back_kw, "untie_global_and_local_cls_norm": False}).eval()
        back.load_state_dict(torch.load(tmp_path / f"{name}-back.pth", weights_only=True), strict=True)
        x = _pixels()
        with torch.no_grad():
            def tokens(m):
                o = m.forward_features(x)
                return torch.cat([o["x_norm_clstoken"][:, None], o["x_storage_tokens"], o["x_norm_patchtokens"]], 1)
            ours = tokens(model)
            diff = _close(ours, _hf(tmp_path / name)(pixel_values=x).last_hidden_state)
            assert torch.equal(tokens(back), ours)    # the k third of the bias was 0.3: masked, so the same model
        print(f"facebookresearch DinoVisionTransformer vs transformers, {name}: max |diff| {diff:.2g}")
