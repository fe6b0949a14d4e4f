"""big_vision .npz <-> transformers, proven against outputs big_vision itself produced.

``fixtures/big_vision/`` holds tiny SigLIP / SigLIP 2 NaFlex models written and run by
big_vision's own code (see its README): the converted transformers models must reproduce
big_vision's embeddings and logits; the torch reference forward behind ``--verify`` must too;
every big_vision <-> HF round trip must give the same bytes back, in both layouts.
"""
from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import clawconvert
from clawconvert.io.dtypes import as_torch
from clawconvert.errors import ClawError
from clawconvert.formats import open_checkpoint
from clawconvert.verify_big_vision import BigVisionSiglip

ROOT = Path(__file__).resolve().parents[1]
FIX = ROOT / "fixtures" / "big_vision"
TINY, SCAN, NAFLEX = FIX / "siglip_tiny.npz", FIX / "siglip_tiny_scan.npz", FIX / "siglip2_naflex_tiny.npz"
IO = {TINY: FIX / "siglip_tiny_io.npz", SCAN: FIX / "siglip_tiny_io.npz", NAFLEX: FIX / "siglip2_naflex_tiny_io.npz"}


def _inputs(io, naflex: bool):
    ids = torch.from_numpy(io["text"]).long()
    if naflex:  # the inputs the fixture README documents for HF Siglip2Model
        return {"pixel_values": torch.from_numpy(io["patches"]),
                "pixel_attention_mask": torch.from_numpy(io["ptype"]).long(),
                "spatial_shapes": torch.from_numpy(io["spatial_shapes"]).long()}, ids
    return {"pixel_values": torch.from_numpy(io["image_nchw"])}, ids


def _npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def _same_npz(a: Path, b: Path) -> None:
    x, y = _npz(a), _npz(b)
    assert sorted(x) == sorted(y)
    for k in x:
        assert x[k].dtype == y[k].dtype and x[k].shape == y[k].shape, k
        assert x[k].tobytes() == y[k].tobytes(), k


def _rewrite(src: Path, dst: Path, transform) -> Path:
    """Copy a fixture member by member through ``transform(key, array) -> [(key, array)]``."""
    with zipfile.ZipFile(dst, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as z:
        for k, v in _npz(src).items():
            for k2, v2 in transform(k, v):
                with z.open(k2 + ".npy", "w", force_zip64=True) as f:
                    np.lib.format.write_array(f, v2, allow_pickle=False)
    return dst


# ------------------------------------------------------------------------------------
# ground truth: big_vision's own outputs
# ------------------------------------------------------------------------------------
@pytest.mark.parametrize("src", [TINY, SCAN], ids=["per-layer", "stacked"])
def test_big_vision_to_hf_reproduces_big_vision_outputs(src, tmp_path):
    from transformers import SiglipModel
    res = clawconvert.convert(src, tmp_path / "hf", to="hf")
    io = np.load(IO[src])
    model, info = SiglipModel.from_pretrained(str(tmp_path / "hf"), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    pixels, ids = _inputs(io, False)
    with torch.no_grad():  # SigLIP text: padded to full length, no attention mask
        out = model.eval()(input_ids=ids, **pixels)
    got = {"zimg": out.image_embeds, "ztxt": out.text_embeds, "logits_per_image": out.logits_per_image,
           "logits_per_text": out.logits_per_text, "img_encoded": out.vision_model_output.last_hidden_state}
    for k, v in got.items():
        assert (v - torch.from_numpy(io[k])).abs().max() < 1e-5, k
    assert res.tensors == len(model.state_dict())


def test_naflex_to_siglip2_reproduces_big_vision_outputs(tmp_path):
    from transformers import Siglip2Model
    clawconvert.convert(NAFLEX, tmp_path / "hf", to="hf")
    io = np.load(IO[NAFLEX])
    model, info = Siglip2Model.from_pretrained(str(tmp_path / "hf"), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    pixels, ids = _inputs(io, True)
    with torch.no_grad():
        out = model.eval()(input_ids=ids, **pixels)
    for k, v in {"zimg": out.image_embeds, "ztxt": out.text_embeds, "logits_per_image": out.logits_per_image,
                 "logits_per_text": out.logits_per_text}.items():
        assert (v - torch.from_numpy(io[k])).abs().max() < 1e-5, k
    real = torch.from_numpy(io["ptype"]).bool()
    enc = out.vision_model_output.last_hidden_state[real]
    assert (enc - torch.from_numpy(io["img_encoded"])[real]).abs().max() < 1e-5


@pytest.mark.parametrize("src", [TINY, SCAN, NAFLEX], ids=["per-layer", "stacked", "naflex"])
def test_reference_forward_behind_verify_matches_big_vision(src):
    """--verify runs big_vision sources through verify_big_vision.py; it is checked here, not trusted."""
    ckpt = open_checkpoint(src)
    model = BigVisionSiglip({k: ckpt.store.read(k) for k in ckpt.store.keys()})
    io = np.load(IO[src])
    pixels, ids = _inputs(io, src == NAFLEX)
    image = pixels if src == NAFLEX else pixels["pixel_values"]
    with torch.no_grad():
        got = {"zimg_unnorm": model.encode_image(image), "ztxt_unnorm": model.encode_text(ids),
               "logits_per_image": model.logits(image, ids)}
    for k, v in got.items():
        assert (v - torch.from_numpy(io[k])).abs().max() < 1e-5, k


# ------------------------------------------------------------------------------------
# bit-exact round trips, both layouts
# ------------------------------------------------------------------------------------
@pytest.mark.parametrize("src,stacked", [(TINY, False), (SCAN, True), (NAFLEX, False), (NAFLEX, True)],
                         ids=["per-layer", "stacked", "naflex", "naflex-stacked"])
def test_big_vision_hf_big_vision_is_bit_exact(src, stacked, tmp_path):
    clawconvert.convert(src, tmp_path / "hf", to="hf")
    out = tmp_path / "out.npz"
    clawconvert.convert(tmp_path / "hf", out, to="big_vision", write_options={"stacked": stacked})
    if stacked == (src == SCAN):
        _same_npz(src, out)
        return
    # NaFlex has no scan twin from big_vision: the stacked file must survive another round
    assert any("/encoderblock/" in k for k in _npz(out))
    clawconvert.convert(out, tmp_path / "hf2", to="hf")
    clawconvert.convert(tmp_path / "hf2", tmp_path / "again.npz", to="big_vision", write_options={"stacked": True})
    _same_npz(out, tmp_path / "again.npz")


@pytest.mark.parametrize("stacked", [False, True], ids=["per-layer", "stacked"])
def test_hf_big_vision_hf_is_bit_exact(stacked, tmp_path):
    clawconvert.convert(TINY, tmp_path / "hf", to="hf")
    clawconvert.convert(tmp_path / "hf", tmp_path / "bv.npz", to="big_vision", write_options={"stacked": stacked})
    clawconvert.convert(tmp_path / "bv.npz", tmp_path / "back", to="hf")
    a, b = load_file(str(tmp_path / "hf" / "model.safetensors")), load_file(str(tmp_path / "back" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert json.loads((tmp_path / "hf" / "config.json").read_text()) == json.loads((tmp_path / "back" / "config.json").read_text())


def test_stacked_output_is_the_scan_layout(tmp_path):
    clawconvert.convert(TINY, tmp_path / "scan.npz", to="big_vision", write_options={"stacked": True})
    _same_npz(SCAN, tmp_path / "scan.npz")   # exactly big_vision's own scan file
    clawconvert.convert(SCAN, tmp_path / "flat.npz", to="big_vision")
    _same_npz(TINY, tmp_path / "flat.npz")


# ------------------------------------------------------------------------------------
# reading every released spelling
# ------------------------------------------------------------------------------------
def _bf16_void(a: np.ndarray) -> np.ndarray:
    bits = torch.from_numpy(a).to(torch.bfloat16).view(torch.int16).numpy()
    return bits.view(np.dtype("V2"))


def test_reader_accepts_no_prefix_mixed_layout_and_bfloat16_void(tmp_path):
    ref = open_checkpoint(TINY)
    plain = _rewrite(TINY, tmp_path / "plain.npz", lambda k, v: [(k[len("params/"):], v)])
    scan = _npz(SCAN)  # text tower stacked only, image per layer (as SigLIP 2 releases)
    mixed = tmp_path / "mixed.npz"
    with zipfile.ZipFile(mixed, "w") as z:
        for k, v in _npz(TINY).items():
            if k.startswith("params/txt/Encoder_0/encoderblock_"):
                continue
            with z.open(k + ".npy", "w") as f:
                np.lib.format.write_array(f, v)
        for k, v in scan.items():
            if k.startswith("params/txt/Encoder_0/encoderblock/"):
                with z.open(k + ".npy", "w") as f:
                    np.lib.format.write_array(f, v)
    for path in (plain, mixed):
        got = open_checkpoint(path)
        assert sorted(got.store.keys()) == sorted(ref.store.keys())
        for k in ref.store.keys():
            assert torch.equal(as_torch(got.store.read(k)), as_torch(ref.store.read(k))), (path.name, k)
    assert open_checkpoint(mixed).store.stacked == {"txt/Encoder_0/": 2}

    bf16 = _rewrite(SCAN, tmp_path / "bf16.npz", lambda k, v: [(k, _bf16_void(v))])
    got = open_checkpoint(bf16)
    for k in ref.store.keys():
        t = as_torch(got.store.read(k))   # the readers hand out numpy (bfloat16 via ml_dtypes)
        assert t.dtype == torch.bfloat16 and torch.equal(t, as_torch(ref.store.read(k)).to(torch.bfloat16)), k
    # bfloat16 survives big_vision -> HF -> big_vision as 2-byte void, bit for bit, stacked
    clawconvert.convert(bf16, tmp_path / "hf", to="hf")
    assert load_file(str(tmp_path / "hf" / "model.safetensors"))["logit_scale"].dtype == torch.bfloat16
    clawconvert.convert(tmp_path / "hf", tmp_path / "back.npz", to="big_vision", write_options={"stacked": True})
    _same_npz(bf16, tmp_path / "back.npz")


# ------------------------------------------------------------------------------------
# side files and config
# ------------------------------------------------------------------------------------
def test_hf_config_and_preprocessor(tmp_path):
    from transformers import AutoImageProcessor
    clawconvert.convert(TINY, tmp_path / "hf", to="hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    v, t = cfg["vision_config"], cfg["text_config"]
    assert cfg["architectures"] == ["SiglipModel"]
    assert (v["hidden_act"], t["hidden_act"], v["layer_norm_eps"], t["layer_norm_eps"]) == ("gelu_pytorch_tanh",) * 2 + (1e-6,) * 2
    assert (v["image_size"], v["patch_size"], v["hidden_size"], v["num_hidden_layers"], v["num_attention_heads"],
            v["intermediate_size"]) == (64, 16, 64, 2, 4, 160)
    assert (t["vocab_size"], t["max_position_embeddings"], t["hidden_size"], t["num_attention_heads"],
            t["intermediate_size"], t["projection_size"], t["pad_token_id"], t["eos_token_id"]) == (1000, 16, 48, 3, 96, 64, 1, 1)
    assert not any(k.startswith("clawconvert") for part in (v, t) for k in part)
    proc = AutoImageProcessor.from_pretrained(str(tmp_path / "hf"))
    assert type(proc).__name__.startswith("SiglipImageProcessor")
    assert list(proc.image_mean) == [0.5] * 3 and list(proc.image_std) == [0.5] * 3
    assert proc.size == {"height": 64, "width": 64} and int(proc.resample) == 3   # bicubic

    clawconvert.convert(NAFLEX, tmp_path / "hf2", to="hf")
    cfg = json.loads((tmp_path / "hf2" / "config.json").read_text())
    assert cfg["architectures"] == ["Siglip2Model"] and cfg["vision_config"]["num_patches"] == 16
    assert (cfg["text_config"]["pad_token_id"], cfg["text_config"]["eos_token_id"]) == (0, 1)
    proc = AutoImageProcessor.from_pretrained(str(tmp_path / "hf2"))
    assert type(proc).__name__.startswith("Siglip2ImageProcessor")
    assert int(proc.resample) == 2 and proc.patch_size == 8 and proc.max_num_patches == 16   # bilinear


def test_tokenizer_note_names_the_tokenizer_a_known_vocabulary_needs(tmp_path):
    from big_vision_synth import Shape, write
    gemma = Shape("tiny-gemma", width=32, depth=1, heads=2, mlp=64, patch=8, image=16, twidth=32, tdepth=1,
                  theads=2, tmlp=64, vocab=256000, length=8, head=32)
    src = write(tmp_path / "g.npz", gemma, dtype=np.float16)
    res = clawconvert.convert(src, tmp_path / "hf", to="hf")
    assert any("Gemma" in n and "google/siglip2" in n for n in res.notes), res.notes
    t = json.loads((tmp_path / "hf" / "config.json").read_text())["text_config"]
    assert (t["pad_token_id"], t["eos_token_id"], t["bos_token_id"]) == (0, 1, 2)
    proc = json.loads((tmp_path / "hf" / "preprocessor_config.json").read_text())
    assert proc["resample"] == 2   # SigLIP 2: bilinear


def test_identity_text_head_round_trips(tmp_path):
    """No txt/head (i18n So400m): HF gets an identity head, which goes back to no head."""
    from big_vision_synth import Shape, write
    headless = Shape("tiny-i18n", width=32, depth=1, heads=2, mlp=64, patch=8, image=16, twidth=32, tdepth=2,
                     theads=2, tmlp=64, vocab=300, length=8, head=None)
    src = write(tmp_path / "h.npz", headless, dtype=np.float32)
    clawconvert.convert(src, tmp_path / "hf", to="hf", verify=True)
    w = load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert torch.equal(w["text_model.head.weight"], torch.eye(32)) and not w["text_model.head.bias"].any()
    clawconvert.convert(tmp_path / "hf", tmp_path / "back.npz", to="big_vision", verify=True)
    _same_npz(src, tmp_path / "back.npz")
    assert "params/txt/head/kernel" not in _npz(tmp_path / "back.npz")


# ------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------
def test_cli_end_to_end(tmp_path, cli):
    r = cli("convert", TINY, tmp_path / "hf", "--to", "hf", "--verify")
    assert r.code == 0, r.err
    assert "big_vision reference forward" in r.out and "verify OK" in r.out
    assert "no tokenizer files written" in r.out
    assert {p.name for p in (tmp_path / "hf").iterdir()} >= {"config.json", "model.safetensors", "preprocessor_config.json"}
    r = cli("convert", tmp_path / "hf", tmp_path / "out.npz", "--to", "big_vision", "--verify")
    assert r.code == 0, r.err
    _same_npz(TINY, tmp_path / "out.npz")
    r = cli("convert", tmp_path / "hf", tmp_path / "scan.npz", "--to", "big_vision", "--stacked")
    assert r.code == 0, r.err
    _same_npz(SCAN, tmp_path / "scan.npz")
    r = cli("inspect", SCAN)
    assert r.code == 0 and "big_vision" in r.out and "siglip" in r.out
    r = cli("verify", TINY, tmp_path / "hf")
    assert r.code == 0 and "verify OK" in r.out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "out.npz", "scan.npz"]   # no temporaries left


def test_cli_refuses_openclip_for_a_shape_timm_does_not_have(tmp_path, cli):
    r = cli("convert", TINY, tmp_path / "oc", "--to", "openclip")
    assert r.code == 2
    line = r.err.strip().splitlines()[0]
    assert "no OpenCLIP form" in line and "closest: vit_base_patch16_siglip_224" in line
    assert "width 64, depth 2, heads 4, mlp 160, patch 16, image 64" in line
    r = cli("convert", NAFLEX, tmp_path / "oc", "--to", "openclip")
    assert r.code == 2 and "open_clip has no NaFlex SigLIP 2" in r.err
    r = cli("convert", TINY, tmp_path / "hf", "--to", "hf", "--stacked")
    assert r.code == 2 and "--stacked does not apply to --to hf" in r.err
    r = cli("convert", TINY, tmp_path / "out", "--to", "big_vision")
    assert r.code == 2 and ".npz" in r.err
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------
# bad input: one clear line, non-zero exit, nothing written
# ------------------------------------------------------------------------------------
def _drop(prefix):
    return lambda k, v: [] if k.startswith(prefix) else [(k, v)]


BAD = {
    "contradicting shapes": (lambda k, v: [(k, v[:, :150] if k.endswith("encoderblock_1/MlpBlock_0/Dense_0/kernel")
                                            and "img" in k else v)], "shape contradicts the config"),
    "missing text tower": (_drop("params/txt/"), "no text tower"),
    "missing image tower": (_drop("params/img/"), "no image tower"),
    "unknown extra tensor": (lambda k, v: [(k, v)] + ([("params/img/extra/kernel", v)] if k == "params/b" else []),
                             "unconsumed source tensor 'img/extra/kernel'"),
    "missing layer tensor": (_drop("params/img/Transformer/encoderblock_1/LayerNorm_1/scale"), "missing"),
    "head width disagrees": (lambda k, v: [(k, v[:, :32] if k == "params/txt/head/kernel" else
                                            v[:32] if k == "params/txt/head/bias" else v)], "shapes contradict each other"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_big_vision_file_is_one_clear_line(case, tmp_path, cli):
    transform, expected = BAD[case]
    src = _rewrite(TINY, tmp_path / "bad.npz", transform)
    out = tmp_path / "out"
    out.mkdir()
    r = cli("convert", src, out / "hf", "--to", "hf")
    assert r.code == 2, r.err
    first = r.err.strip().splitlines()[0]
    assert first.startswith("clawconvert: error:") and expected in r.err, r.err
    assert "Traceback" not in r.err
    assert list(out.iterdir()) == []


def test_stacked_depths_that_disagree_are_refused(tmp_path):
    src = _rewrite(SCAN, tmp_path / "bad.npz",
                   lambda k, v: [(k, np.concatenate([v, v[:1]]) if k.endswith("encoderblock/LayerNorm_0/scale")
                                  and "img" in k else v)])
    with pytest.raises(ClawError, match="disagree on depth"):
        open_checkpoint(src)
