"""SigLIP / SigLIP 2 through OpenCLIP: open_clip's own loader, built-in configs, round trips.

* big_vision -> OpenCLIP gives exactly the tensors ``open_clip.convert.load_big_vision_weights``
  puts into open_clip's model, on random checkpoints with released shapes (B/16 always;
  L/16, So400m/14, So400m/16-i18n without text head and SigLIP 2 B/16 with the Gemma
  vocabulary when ``CLAWCONVERT_SLOW=1``: each is 0.4-2.2 GB).
* Every pair of formats round-trips bit-exact with the OpenCLIP legs on the B/16 shapes.
* Every SigLIP / SigLIP 2 built-in open_clip config converts OpenCLIP <-> HF with forward
  parity (timm image trunk and text tower cut to one layer: timm fixes depth by name, so
  the test builds the trunk with ``depth=1``; widths, heads, MLP, patch and image sizes,
  activations as registered).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from safetensors.torch import load_file

import clawconvert
from big_vision_synth import B16, L16, SIGLIP2_B16, SO400M14, SO400M16_I18N, write
from clawconvert.errors import ClawError
from clawconvert.families import siglip as siglip_family
from clawconvert.families.siglip import openclip_to_config

SLOW = pytest.mark.skipif(not os.environ.get("CLAWCONVERT_SLOW"), reason="released-size checkpoint: CLAWCONVERT_SLOW=1")
SIGLIP_CONFIGS = [n for n in open_clip.list_models() if "siglip" in n.lower() and not n.startswith("nllb")]
# one per distinct timm trunk / text tower kind in the default run; image-size variants with CLAWCONVERT_SLOW=1
EVERY_KIND = {"ViT-B-16-SigLIP", "ViT-B-16-SigLIP2-256", "ViT-B-32-SigLIP2-256", "ViT-L-16-SigLIP-256",
              "ViT-SO400M-14-SigLIP", "ViT-SO400M-16-SigLIP-i18n-256", "ViT-gopt-16-SigLIP2-256"}


def _same_npz(a: Path, b: Path) -> None:
    with np.load(a) as x, np.load(b) as y:
        assert sorted(x.files) == sorted(y.files)
        for k in x.files:
            assert x[k].dtype == y[k].dtype and x[k].tobytes() == y[k].tobytes(), k


def _same_safetensors(a: Path, b: Path) -> None:
    x, y = load_file(str(a)), load_file(str(b))
    assert x.keys() == y.keys()
    for k in x:
        assert x[k].dtype == y[k].dtype and torch.equal(x[k], y[k]), k


def _open_clip_loaded(name: str, npz: Path) -> dict[str, torch.Tensor]:
    """What open_clip itself makes of a big_vision file: its built-in model + its own loader."""
    from open_clip.convert import load_big_vision_weights
    from open_clip.model import CustomTextCLIP
    cfg = {k: v for k, v in open_clip.get_model_config(name).items() if k != "custom_text"}
    with torch.device("meta"):  # no init: every tensor starts as NaN, so one the loader skips cannot match
        model = CustomTextCLIP(**cfg)
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for t in model.state_dict().values():
            t.fill_(float("nan"))
    load_big_vision_weights(model, str(npz))
    return model.state_dict()


def _check_against_open_clip(shape, npz: Path, out: Path) -> dict:
    clawconvert.convert(npz, out, to="openclip")
    ours = load_file(str(out / "open_clip_model.safetensors"))
    ref = _open_clip_loaded(shape.openclip, npz)
    assert ours.keys() == ref.keys()
    for k in ref:   # fp16 source: open_clip upcasts on copy_, we keep fp16; values must be identical
        assert torch.equal(ref[k], ours[k].to(ref[k].dtype)), k
    cfg = json.loads((out / "open_clip_config.json").read_text())["model_cfg"]
    builtin = open_clip.get_model_config(shape.openclip)
    assert cfg["vision_cfg"]["timm_model_name"] == builtin["vision_cfg"]["timm_model_name"]
    t, bt = cfg["text_cfg"], builtin["text_cfg"]
    for key in ("width", "heads", "layers", "vocab_size", "context_length"):
        assert t[key] == bt[key], key
    assert int(t["width"] * t.get("mlp_ratio", 4.0)) == int(bt["width"] * bt.get("mlp_ratio", 4.0))
    assert t.get("proj_type", "linear") == bt.get("proj_type", "linear")
    assert t.get("act_kwargs") == {"approximate": "tanh"}   # big_vision's text GELU, which open_clip can express
    assert cfg["embed_dim"] == builtin["embed_dim"] and cfg["init_logit_bias"] == -10
    return cfg


# ------------------------------------------------------------------------------------
# big_vision -> OpenCLIP == open_clip's own loader, released shapes
# ------------------------------------------------------------------------------------
@pytest.fixture
def scratch(tmp_path):
    """tmp_path, removed right after the test: released-size checkpoints must not pile up on disk."""
    yield tmp_path
    shutil.rmtree(tmp_path, ignore_errors=True)


@pytest.fixture(scope="module")
def b16(tmp_path_factory):
    d = tmp_path_factory.mktemp("b16")
    yield {"flat": write(d / "b16.npz", B16), "scan": write(d / "b16_scan.npz", B16, stacked=("img", "txt")), "dir": d}
    shutil.rmtree(d, ignore_errors=True)


def test_b16_big_vision_to_openclip_equals_open_clip_loader(b16, scratch):
    _check_against_open_clip(B16, b16["flat"], scratch / "oc")
    # the same weights stacked (scan layout) give the same OpenCLIP checkpoint
    clawconvert.convert(b16["scan"], scratch / "oc_scan", to="openclip")
    _same_safetensors(scratch / "oc" / "open_clip_model.safetensors", scratch / "oc_scan" / "open_clip_model.safetensors")


@SLOW
@pytest.mark.parametrize("shape", [L16, SO400M14, SO400M16_I18N, SIGLIP2_B16], ids=lambda s: s.name)
def test_released_shapes_big_vision_to_openclip_equal_open_clip_loader(shape, scratch):
    # SigLIP 2 releases stack the text tower
    npz = write(scratch / "src.npz", shape, stacked=("txt",) if shape is SIGLIP2_B16 else ())
    cfg = _check_against_open_clip(shape, npz, scratch / "oc")
    if shape.head is None:
        assert cfg["text_cfg"]["proj_type"] == "none"
    clawconvert.convert(scratch / "oc", scratch / "back.npz", to="big_vision",
                        write_options={"stacked": "txt" if shape is SIGLIP2_B16 else False})
    _same_npz(npz, scratch / "back.npz")
    (scratch / "back.npz").unlink()
    if shape.head is None:   # HF's identity head, and back to none
        clawconvert.convert(npz, scratch / "hf", to="hf")
        npz.unlink()
        w = load_file(str(scratch / "hf" / "model.safetensors"))
        assert torch.equal(w["text_model.head.weight"].float(), torch.eye(shape.twidth))
        clawconvert.convert(scratch / "hf", scratch / "oc2", to="openclip")
        _same_safetensors(scratch / "oc" / "open_clip_model.safetensors", scratch / "oc2" / "open_clip_model.safetensors")


# ------------------------------------------------------------------------------------
# every pair round-trips bit-exact, OpenCLIP legs on B/16 shapes
# ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def b16_oc(b16, tmp_path_factory):
    out = tmp_path_factory.mktemp("b16oc") / "oc"
    clawconvert.convert(b16["flat"], out, to="openclip")
    yield out
    shutil.rmtree(out.parent, ignore_errors=True)


WEIGHTS = "open_clip_model.safetensors"


def test_big_vision_openclip_big_vision_bit_exact_both_layouts(b16, b16_oc, scratch):
    clawconvert.convert(b16_oc, scratch / "back.npz", to="big_vision")
    _same_npz(b16["flat"], scratch / "back.npz")
    clawconvert.convert(b16["scan"], scratch / "oc_scan", to="openclip")
    clawconvert.convert(scratch / "oc_scan", scratch / "back_scan.npz", to="big_vision", write_options={"stacked": True})
    _same_npz(b16["scan"], scratch / "back_scan.npz")


def test_openclip_big_vision_openclip_bit_exact(b16_oc, scratch):
    clawconvert.convert(b16_oc, scratch / "bv.npz", to="big_vision", write_options={"stacked": True})
    clawconvert.convert(scratch / "bv.npz", scratch / "oc2", to="openclip")
    _same_safetensors(b16_oc / WEIGHTS, scratch / "oc2" / WEIGHTS)
    assert (json.loads((b16_oc / "open_clip_config.json").read_text())
            == json.loads((scratch / "oc2" / "open_clip_config.json").read_text()))


def test_openclip_hf_openclip_and_hf_openclip_hf_bit_exact(b16_oc, scratch):
    clawconvert.convert(b16_oc, scratch / "hf", to="hf")
    clawconvert.convert(scratch / "hf", scratch / "oc2", to="openclip")
    _same_safetensors(b16_oc / WEIGHTS, scratch / "oc2" / WEIGHTS)
    clawconvert.convert(scratch / "oc2", scratch / "hf2", to="hf")
    _same_safetensors(scratch / "hf" / "model.safetensors", scratch / "hf2" / "model.safetensors")
    a, b = (json.loads((p / "config.json").read_text()) for p in (scratch / "hf", scratch / "hf2"))
    assert a == b


def test_big_vision_to_openclip_drift_is_the_gelu_variant_only(b16, scratch):
    """timm's B/16 SigLIP trunk computes exact GELU; big_vision tanh: verify names it and measures it."""
    res = clawconvert.convert(b16["flat"], scratch / "oc", to="openclip", verify=True)
    f = res.verification
    print(f"big_vision -> OpenCLIP B/16: image {f['image_embeds']:.2e}, text {f['text_embeds']:.2e}, "
          f"logits {f['logits_per_image']:.2e}")
    assert f["passed"] and f["tolerance"] == 5e-2
    assert f["text_embeds"] < 1e-5            # text: tanh GELU via act_kwargs, same function
    assert 1e-5 < f["image_embeds"] < 5e-3    # image: exact vs tanh GELU only
    assert any("exact GELU where this model uses tanh GELU" in n for n in res.notes)
    cfg = json.loads((scratch / "oc" / "open_clip_config.json").read_text())["model_cfg"]
    assert cfg["vision_cfg"]["timm_model_name"] == "vit_base_patch16_siglip_224"
    # OpenCLIP -> HF keeps what open_clip computes: exact GELU in the image tower, tanh in text
    clawconvert.convert(scratch / "oc", scratch / "hf", to="hf")
    hf = json.loads((scratch / "hf" / "config.json").read_text())
    assert hf["vision_config"]["hidden_act"] == "gelu" and hf["text_config"]["hidden_act"] == "gelu_pytorch_tanh"


MEMORY_CHILD = r"""
import re, sys
import clawconvert.api, open_clip, transformers, timm
def status(field):
    return int(re.search(field + r":\s+(\d+) kB", open("/proc/self/status").read()).group(1)) / 1024
base = status("VmRSS")
open("/proc/self/clear_refs", "w").write("5")
clawconvert.api.convert(sys.argv[1], sys.argv[2], to=sys.argv[3], write_options={"stacked": sys.argv[3] == "big_vision"})
print(status("VmHWM") - base)
"""


def _added_peak_mb(src: Path, dst: Path, to: str) -> float:
    r = subprocess.run([sys.executable, "-c", MEMORY_CHILD, str(src), str(dst), to], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    return float(r.stdout.strip().splitlines()[-1])


NEEDS_PROC = pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux peak-RSS reset")


@NEEDS_PROC
def test_stacked_b16_conversion_memory_stays_far_below_its_size(b16, scratch):
    """Stacked leaves are read one layer at a time (an offset read), written through spill files."""
    size = b16["scan"].stat().st_size / 1e6
    hf = scratch / "hf"
    added = _added_peak_mb(b16["scan"], hf, "hf")
    back = _added_peak_mb(hf, scratch / "scan.npz", "big_vision")
    print(f"B/16 stacked ({size:.0f} MB): -> hf added {added:.0f} MB peak RSS, hf -> stacked big_vision {back:.0f} MB")
    assert added < 0.3 * size and back < 0.3 * size   # largest tensor: the 49 MB token embedding


@SLOW
@NEEDS_PROC
def test_so400m_stacked_conversion_memory_stays_far_below_its_size(scratch):
    npz = write(scratch / "so400m.npz", SO400M14, stacked=("img", "txt"))
    size = npz.stat().st_size / 1e6
    added = _added_peak_mb(npz, scratch / "hf", "hf")
    back = _added_peak_mb(scratch / "hf", scratch / "scan.npz", "big_vision")
    print(f"So400m/14 stacked ({size:.0f} MB): -> hf added {added:.0f} MB peak RSS, hf -> stacked big_vision {back:.0f} MB")
    assert added < 0.15 * size and back < 0.15 * size


# ------------------------------------------------------------------------------------
# every built-in SigLIP config: OpenCLIP <-> HF parity
# ------------------------------------------------------------------------------------
@pytest.fixture
def shallow_timm(monkeypatch):
    """timm SigLIP trunks one block deep (timm fixes depth by name; everything else as registered)."""
    import timm
    create = timm.create_model

    def shallow(name, *args, **kwargs):
        if "siglip" in str(name):
            kwargs["depth"] = 1
        return create(name, *args, **kwargs)

    monkeypatch.setattr(timm, "create_model", shallow)
    # clawconvert reads timm's shapes from its shipped table; here they come from the shallow timm
    siglip_family._scan_timm_arch_cached.cache_clear()
    shallow_archs = {a.name: a for a in siglip_family.scan_timm_archs()}
    monkeypatch.setattr(siglip_family, "_known_archs", lambda: shallow_archs)
    yield
    siglip_family._scan_timm_arch_cached.cache_clear()


def _seeded_openclip_dir(cfg: dict, out: Path, seed: int = 0) -> Path:
    from open_clip.model import CustomTextCLIP
    torch.manual_seed(seed)
    with torch.device("meta"):  # every parameter is overwritten below: skip timm's slow init
        model = CustomTextCLIP(**{k: v for k, v in cfg.items() if k != "custom_text"})
    model = model.to_empty(device="cpu")
    assert not list(model.buffers())
    with torch.no_grad():
        for name, p in model.named_parameters():
            is_norm = name.endswith("weight") and p.dim() == 1 and ("norm" in name or "ln_" in name)
            p.copy_(torch.randn_like(p) * (0.02 if p.dim() > 1 else 0.1) + (1.0 if is_norm else 0.0))
        model.logit_scale.fill_(2.3)
        model.logit_bias.fill_(-10.0)
    out.mkdir()
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "open_clip_model.safetensors"))
    pre = {"mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bicubic", "resize_mode": "squash"}
    (out / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": pre}))
    return out


@pytest.mark.parametrize("name", [n if n in EVERY_KIND else pytest.param(n, marks=SLOW) for n in SIGLIP_CONFIGS])
def test_builtin_siglip_config_openclip_hf_parity_and_round_trip(name, shallow_timm, scratch):
    cfg = json.loads(json.dumps(open_clip.get_model_config(name)))
    cfg["text_cfg"]["layers"] = 1
    if cfg["text_cfg"]["vocab_size"] > 100_000:   # 250k/256k embeddings only slow CI; not under test here
        cfg["text_cfg"]["vocab_size"] = 4096
    src = _seeded_openclip_dir(cfg, scratch / "src")
    clawconvert.convert(src, scratch / "hf", to="hf")
    clawconvert.convert(scratch / "hf", scratch / "back", to="openclip")
    _same_safetensors(src / "open_clip_model.safetensors", scratch / "back" / "open_clip_model.safetensors")
    back = json.loads((scratch / "back" / "open_clip_config.json").read_text())["model_cfg"]
    assert back["vision_cfg"]["timm_model_name"] == cfg["vision_cfg"]["timm_model_name"]
    assert back["text_cfg"].get("act_kwargs") == cfg["text_cfg"].get("act_kwargs")
    assert back["text_cfg"].get("proj_type", "linear") == cfg["text_cfg"].get("proj_type", "linear")

    from transformers import SiglipModel
    hf, info = SiglipModel.from_pretrained(str(scratch / "hf"), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    oc = open_clip.create_model(f"local-dir:{src}").eval()
    size = hf.config.vision_config.image_size
    pixels = torch.rand(2, 3, size, size) * 2 - 1
    ids = torch.randint(3, cfg["text_cfg"]["vocab_size"], (2, cfg["text_cfg"]["context_length"]))
    normalize = torch.nn.functional.normalize
    with torch.no_grad():
        oi, ot = oc.encode_image(pixels), oc.encode_text(ids)
        ol = oc.logit_scale.exp() * normalize(oi, dim=-1) @ normalize(ot, dim=-1).T + oc.logit_bias
        hf.eval()
        hi = hf.get_image_features(pixel_values=pixels).pooler_output
        ht = hf.get_text_features(input_ids=ids).pooler_output
        hl = hf(input_ids=ids, pixel_values=pixels).logits_per_image
    print(f"{name}: image {(oi - hi).abs().max():.1e}, text {(ot - ht).abs().max():.1e}, logits {(ol - hl).abs().max():.1e}")
    assert (oi - hi).abs().max() < 1e-5
    assert (ot - ht).abs().max() < 1e-5
    assert (ol - hl).abs().max() < 1e-4


def test_siglip_configs_open_clip_cannot_build_are_refused():
    with pytest.raises(ClawError, match="text_cfg.hf_model_name"):
        openclip_to_config(open_clip.get_model_config("nllb-clip-base-siglip"))
    cfg = json.loads(json.dumps(open_clip.get_model_config("ViT-B-16-SigLIP")))
    cfg["text_cfg"]["no_causal_mask"] = False
    with pytest.raises(ClawError, match="causal text tower"):
        openclip_to_config(cfg)
    cfg = json.loads(json.dumps(open_clip.get_model_config("ViT-B-16-SigLIP")))
    cfg["vision_cfg"]["timm_proj"] = "linear"
    with pytest.raises(ClawError, match="extra image projection"):
        openclip_to_config(cfg)
