"""extract-visual / extract-text: one tower, read alone, loadable by its framework, bit-exact.

Sources are the tiny OpenCLIP fixture and tiny transformers CLIPModels with seeded
weights, saved sharded so that the shards a tower does not touch can be watched.  Every
extracted tower is loaded by the framework it is meant for (transformers by class and with
AutoModel, LLaVA's vision_tower, timm.create_model, open_clip's tower builders) and its
outputs compared with the full model's tower on the same inputs.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import clawconvert
from clawconvert.errors import ClawError
from clawconvert.io.readers import SafetensorsStore
from conftest import FIXTURES, assert_one_line_error

try:  # the loopback Hub fixture of test_hub.py, for --push-to
    from test_hub import hub  # noqa: F401
    HAVE_HUB = True
except Exception:  # pragma: no cover - hub tests not in this checkout
    HAVE_HUB = False

transformers = pytest.importorskip("transformers")
from transformers import (AutoModel, CLIPConfig, CLIPModel, CLIPTextModel, CLIPTextModelWithProjection,  # noqa: E402
                          CLIPVisionModel, CLIPVisionModelWithProjection)

transformers.utils.logging.disable_progress_bar()
transformers.utils.logging.set_verbosity_error()

TINY = FIXTURES / "openclip_tiny"
PIXELS = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
IDS = torch.tensor([[49406, 320, 1125, 539, 49407, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
                    [49406, 2368, 6, 7, 8, 9, 10, 49407, 0, 0, 0, 0, 0, 0, 0, 0]])


def tiny_clip_config(**vision) -> CLIPConfig:
    # the vision/text projection_dim (default 512) differ from the model's 24 on purpose:
    # the *WithProjection tower configs must carry the model's projection width
    v = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             image_size=32, patch_size=8, hidden_act="quick_gelu")
    t = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
             max_position_embeddings=16, vocab_size=49408, hidden_act="quick_gelu")
    return CLIPConfig(vision_config={**v, **vision}, text_config=t, projection_dim=24)


def seeded(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval()


@pytest.fixture(scope="module")
def hf_sharded(tmp_path_factory) -> tuple[Path, CLIPModel]:
    """A tiny CLIPModel saved in 20 kB shards, with the model itself for reference."""
    model = seeded(CLIPModel(tiny_clip_config()))
    out = tmp_path_factory.mktemp("hf") / "clip"
    model.save_pretrained(out, max_shard_size="20KB")
    return out, model


def shards_by_tower(src: Path) -> dict[str, set[str]]:
    weight_map = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    out: dict[str, set[str]] = {"visual": set(), "text": set(), "other": set()}
    for key, shard in weight_map.items():
        tower = ("visual" if key.startswith(("vision_model.", "visual_projection.")) else
                 "text" if key.startswith(("text_model.", "text_projection.")) else "other")
        out[tower].add(shard)
    return out


@pytest.fixture
def reads(monkeypatch) -> list[tuple[str, str]]:
    """Every (file name, tensor) a SafetensorsStore reads data for: decoded (``_read``) or
    handed to the writer as a byte range to copy (``byte_range``)."""
    seen: list[tuple[str, str]] = []
    original_read, original_range = SafetensorsStore._read, SafetensorsStore.byte_range

    def spy(self, name, info):
        seen.append((info.file.name, name))
        return original_read(self, name, info)

    def spy_range(self, name):
        span = original_range(self, name)
        seen.append((span[0].name, name))
        return span
    monkeypatch.setattr(SafetensorsStore, "_read", spy)
    monkeypatch.setattr(SafetensorsStore, "byte_range", spy_range)
    return seen


def loading_problems(info: dict) -> dict:
    return {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}


# ------------------------------------------------------------------------------------
# transformers towers
# ------------------------------------------------------------------------------------
@pytest.mark.parametrize("with_projection", [False, True], ids=["plain", "projection"])
def test_hf_visual_tower_reads_only_its_shards_and_equals_the_full_model(hf_sharded, tmp_path, reads, with_projection):
    src, full = hf_sharded
    shards = shards_by_tower(src)
    text_only = shards["text"] - shards["visual"]
    assert text_only, "the fixture must have shards holding only text tensors"

    r = clawconvert.extract_visual(src, tmp_path / "v", with_projection=with_projection)

    # only the image tower's data was read, each tensor once, and never from a text-only shard
    read_files = {f for f, _ in reads}
    assert read_files <= shards["visual"] and not read_files & text_only
    assert sorted(n for _, n in reads) == sorted(k for k in full.state_dict() if k.startswith(
        ("vision_model.", "visual_projection.") if with_projection else "vision_model."))
    keys = set(load_file(tmp_path / "v" / "model.safetensors"))
    assert all(k.startswith("vision_model.") for k in keys - {"visual_projection.weight"})
    assert ("visual_projection.weight" in keys) == with_projection

    cfg = json.loads((tmp_path / "v" / "config.json").read_text())
    cls = CLIPVisionModelWithProjection if with_projection else CLIPVisionModel
    assert cfg["model_type"] == "clip_vision_model" and cfg["architectures"] == [cls.__name__]
    assert r.model_class == cls.__name__
    assert (tmp_path / "v" / "preprocessor_config.json").is_file()
    if with_projection:  # AutoModel ignores `architectures`: the projection variant loads by class
        tower, info = cls.from_pretrained(tmp_path / "v", output_loading_info=True)
    else:
        tower, info = AutoModel.from_pretrained(tmp_path / "v", output_loading_info=True)
        assert type(tower) is CLIPVisionModel
    assert not loading_problems(info)
    with torch.no_grad():
        out = tower.eval()(pixel_values=PIXELS)
        got = out.image_embeds if with_projection else out.pooler_output
        want = full.get_image_features(pixel_values=PIXELS) if with_projection else \
            full.vision_model(pixel_values=PIXELS).pooler_output
        want = want if isinstance(want, torch.Tensor) else want.pooler_output
    assert torch.equal(got, want)


@pytest.mark.parametrize("with_projection", [False, True], ids=["plain", "projection"])
def test_hf_text_tower_reads_only_its_shards_and_equals_the_full_model(hf_sharded, tmp_path, reads, with_projection):
    src, full = hf_sharded
    shards = shards_by_tower(src)
    r = clawconvert.extract_text(src, tmp_path / "t", with_projection=with_projection, verify=True)
    read_files = {f for f, _ in reads}
    # verify=True loads both models through transformers, not through the store: reads are extraction's only
    assert read_files <= shards["text"] and not read_files & (shards["visual"] - shards["text"])
    assert r.verification["bit_exact"] and r.verification["passed"]

    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    cfg = json.loads((tmp_path / "t" / "config.json").read_text())
    assert cfg["model_type"] == "clip_text_model" and cfg["architectures"] == [cls.__name__]
    assert cfg["projection_dim"] == 24 and cfg["eos_token_id"] == full.config.text_config.eos_token_id
    loader = cls if with_projection else AutoModel
    tower, info = loader.from_pretrained(tmp_path / "t", output_loading_info=True)
    assert type(tower) is cls and not loading_problems(info)
    with torch.no_grad():
        out = tower.eval()(input_ids=IDS)
        got = out.text_embeds if with_projection else out.pooler_output
        want = full.get_text_features(input_ids=IDS) if with_projection else full.text_model(input_ids=IDS).pooler_output
        want = want if isinstance(want, torch.Tensor) else want.pooler_output
    assert torch.equal(got, want)
    # the CLIP BPE tokenizer is written offline and tokenizes with the model's ids
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "t")
    assert tok("a photo")["input_ids"][0] == 49406 and tok("a photo")["input_ids"][-1] == 49407


def test_vision_tower_works_as_llava_vision_tower(tmp_path):
    """LLaVA's on-disk `vision_tower.` + our keys load with nothing missing; the tower computes the same."""
    full = seeded(CLIPModel(tiny_clip_config()))
    full.save_pretrained(tmp_path / "clip")
    clawconvert.extract_visual(tmp_path / "clip", tmp_path / "v")

    vision_config = transformers.CLIPVisionConfig.from_pretrained(tmp_path / "v")
    llava_cfg = transformers.LlavaConfig(
        vision_config=vision_config, image_token_index=60, projector_hidden_act="gelu",
        vision_feature_layer=-1, vision_feature_select_strategy="default",
        text_config=transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                             num_attention_heads=4, num_key_value_heads=4, vocab_size=64))
    llava = seeded(transformers.LlavaForConditionalGeneration(llava_cfg), seed=3)
    llava.save_pretrained(tmp_path / "llava")
    state = load_file(tmp_path / "llava" / "model.safetensors")
    state = {k: v for k, v in state.items() if "vision_tower" not in k}
    state.update({f"vision_tower.{k}": v for k, v in load_file(tmp_path / "v" / "model.safetensors").items()})
    from safetensors.torch import save_file
    save_file(state, tmp_path / "llava" / "model.safetensors", metadata={"format": "pt"})

    loaded, info = transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path / "llava",
                                                                               output_loading_info=True)
    assert not loading_problems(info)
    with torch.no_grad():
        got = loaded.eval().model.vision_tower(pixel_values=PIXELS, output_hidden_states=True)
        want = full.vision_model(pixel_values=PIXELS, output_hidden_states=True)
    assert torch.equal(got.hidden_states[-1], want.hidden_states[-1])
    assert torch.equal(got.pooler_output, want.pooler_output)


def test_fp16_tower_is_bit_exact_against_the_fp16_full_model(hf_sharded, tmp_path):
    src, _ = hf_sharded
    r = clawconvert.extract_visual(src, tmp_path / "v16", dtype="fp16", with_projection=True, verify=True)
    assert {t.dtype for t in load_file(tmp_path / "v16" / "model.safetensors").values()} == {torch.float16}
    assert r.verification["bit_exact"] and r.verification["passed"]


# ------------------------------------------------------------------------------------
# OpenCLIP source: every target, verified; the printed load lines really load the tower
# ------------------------------------------------------------------------------------
@pytest.mark.parametrize("tower,to", [("visual", "hf"), ("visual", "openclip"), ("text", "hf"), ("text", "openclip")])
def test_openclip_source_verify_is_bit_exact(tmp_path, tower, to):
    fn = clawconvert.extract_visual if tower == "visual" else clawconvert.extract_text
    r = fn(TINY, tmp_path / "out", to=to, with_projection=True, verify=True)
    f = r.verification
    assert f["passed"] and f["bit_exact"] and f["max_abs_diff"] == 0.0
    if to == "hf":  # the full model was converted to transformers and checked against open_clip too
        assert f["full_vs_source"]["passed"] and f["full_vs_source"]["max_abs_diff"] < 1e-5
    manifest = json.loads((tmp_path / "out" / "clawconvert_manifest.json").read_text())
    assert manifest["target"]["tower"] == tower and manifest["verify"]["bit_exact"]
    assert set(manifest["files"]) == {p.name for p in (tmp_path / "out").iterdir()} - {"clawconvert_manifest.json"}


@pytest.mark.parametrize("tower", ["visual", "text"])
def test_openclip_tower_loads_with_the_printed_lines(tmp_path, tower):
    import open_clip

    fn = clawconvert.extract_visual if tower == "visual" else clawconvert.extract_text
    r = fn(TINY, tmp_path / "oc", to="openclip")
    keys = set(load_file(tmp_path / "oc" / "open_clip_model.safetensors"))
    full = open_clip.create_model(f"local-dir:{TINY}").eval()
    expected = {k for k in full.state_dict() if k.startswith("visual.") == (tower == "visual")} - {"logit_scale"}
    assert keys == expected  # the tower's OpenCLIP names, projection included, nothing else
    scope: dict = {}
    exec("\n".join(r.load), scope)  # the lines the command prints and docs/extract.md shows
    module = scope[tower].eval()
    with torch.no_grad():
        if tower == "visual":
            assert torch.equal(module(PIXELS), full.encode_image(PIXELS))
        else:
            assert torch.equal(module(IDS), full.encode_text(IDS))


def test_training_checkpoint_file_gives_the_same_tower(tmp_path):
    """epoch_N.pt with DDP `module.` prefixes and optimizer state + --model-config: the same bytes."""
    state = load_file(TINY / "open_clip_model.safetensors")
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}, "optimizer": {}},
               tmp_path / "epoch_3.pt")
    clawconvert.extract_text(tmp_path / "epoch_3.pt", tmp_path / "a", model_config=TINY / "open_clip_config.json")
    clawconvert.extract_text(TINY, tmp_path / "b")
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------
# timm
# ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def xsmall_clip(tmp_path_factory) -> tuple[Path, CLIPModel]:
    """A CLIP whose image tower has the shape of timm's vit_xsmall_patch16_clip_224 (TinyCLIP 8M)."""
    cfg = tiny_clip_config(hidden_size=256, intermediate_size=1024, num_hidden_layers=10, num_attention_heads=4,
                           image_size=224, patch_size=16, hidden_act="gelu")
    cfg.text_config.hidden_act = "gelu"
    model = seeded(CLIPModel(cfg))
    with torch.no_grad():  # keep activations in a sane range through 10 random layers
        for p in model.vision_model.encoder.parameters():
            p.mul_(0.25)
    out = tmp_path_factory.mktemp("xs") / "clip"
    model.save_pretrained(out)
    return out, model


@pytest.mark.parametrize("with_projection", [False, True], ids=["plain", "projection"])
def test_timm_tower_loads_with_create_model_and_matches_transformers(xsmall_clip, tmp_path, cli, with_projection):
    import timm

    src, full = xsmall_clip
    dst = tmp_path / "timm"
    res = cli("extract-visual", src, dst, "--to", "timm", "--verify", *(["--with-projection"] if with_projection else []))
    assert res.code == 0, res.err
    assert "timm architecture: vit_xsmall_patch16_clip_224" in res.out
    # --verify: timm against transformers' full model, a cross-framework figure within tolerance
    figures = json.loads((dst / "clawconvert_manifest.json").read_text())["verify"]
    assert figures["passed"] and not figures["bit_exact_required"] and figures["max_abs_diff"] <= 1e-4
    assert "verify OK: timm vit_xsmall_patch16_clip_224 vs transformers CLIPModel (full model)" in res.out
    n = 24 if with_projection else 0
    model = timm.create_model("vit_xsmall_patch16_clip_224", pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(dst / "model.safetensors"), num_classes=n)).eval()
    local = timm.create_model(f"local-dir:{dst}", pretrained=True).eval()
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got, got_local = model(x), local(x)
        want = full.get_image_features(pixel_values=x) if with_projection else \
            full.vision_model(pixel_values=x).pooler_output
        want = want if isinstance(want, torch.Tensor) else want.pooler_output
    assert got.shape == want.shape and torch.equal(got, got_local)
    assert (got - want).abs().max() < 1e-5, float((got - want).abs().max())
    # the printed line is the one that loads it
    assert f"pretrained_cfg_overlay=dict(file='{dst / 'model.safetensors'}', num_classes={n})" in res.out


def _timm_targets(config: CLIPConfig, with_projection: bool) -> dict:
    """What mappings/clip/timm.yaml writes for this config (names and shapes, no weights)."""
    from clawconvert.families import get_family
    from clawconvert.tables import load_table
    fam = get_family("clip")
    expected = fam.canonical_shapes(config)
    keep = fam.tower_prefixes("visual", with_projection)
    table = load_table("clip", "timm").expand(fam.params(config), list(expected))
    out = {}
    for rule in table.rules:
        if all(c.startswith(keep) for c in rule.canonical):
            out.update(zip(rule.format, rule.chain.save_shapes([expected[c] for c in rule.canonical])))
    if with_projection:
        out["head.bias"] = (config.projection_dim,)
    return out


@pytest.mark.parametrize("vision,projection,arch", [
    (dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, patch_size=32,
          image_size=224, hidden_act="quick_gelu"), 512, "vit_base_patch32_clip_quickgelu_224"),   # OpenAI B/32
    (dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, patch_size=32,
          image_size=224, hidden_act="gelu"), 512, "vit_base_patch32_clip_224"),                   # LAION B/32
    (dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, patch_size=14,
          image_size=336, hidden_act="quick_gelu"), 768, "vit_large_patch14_clip_quickgelu_336"),  # OpenAI L/14@336
    (dict(hidden_size=1664, intermediate_size=8192, num_hidden_layers=48, num_attention_heads=16, patch_size=14,
          image_size=224, hidden_act="gelu"), 1280, "vit_gigantic_patch14_clip_224"),              # bigG
])
def test_timm_architecture_matching(vision, projection, arch):
    from clawconvert.families import get_family
    from clawconvert.surgery.timm_towers import match_architecture

    cfg = CLIPConfig(vision_config=vision, text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                                            num_attention_heads=2), projection_dim=projection)
    for with_projection in (False, True):
        targets = _timm_targets(cfg, with_projection)
        assert match_architecture(get_family("clip"), cfg, targets, projection if with_projection else 0) == arch


def test_timm_refuses_a_tower_no_architecture_holds_naming_the_closest(tmp_path):
    from clawconvert.families import get_family
    from clawconvert.surgery.timm_towers import match_architecture

    # B/32 but LayerNorm eps 1e-6: same shapes as vit_base_patch32_clip_224, other numerics
    cfg = CLIPConfig(vision_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                        num_attention_heads=12, patch_size=32, image_size=224, hidden_act="gelu",
                                        layer_norm_eps=1e-6),
                     text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2))
    with pytest.raises(ClawError, match=r"closest: vit_base_patch32_clip_224, which differs in LayerNorm eps 1e-05"):
        match_architecture(get_family("clip"), cfg, _timm_targets(cfg, False), 0)
    # the tiny fixture: refused before anything is written, closest named
    with pytest.raises(ClawError, match=r"no timm architecture holds this clip image tower .*closest: vit_"):
        clawconvert.extract_visual(TINY, tmp_path / "t", to="timm")
    assert not (tmp_path / "t").exists() and not list(tmp_path.iterdir())


@pytest.mark.skipif(not HAVE_HUB, reason="needs the loopback Hub fixture of tests/test_hub.py")
def test_push_to_uploads_the_tower_with_a_provenance_card(hub, tmp_path, cli):
    r = cli("extract-visual", TINY, tmp_path / "v", "--with-projection", "--push-to", "alice/tiny-vision", "-q")
    assert r.code == 0, r.err
    assert "pushed to alice/tiny-vision" in r.out
    files = hub.files("alice/tiny-vision")
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "clawconvert_manifest.json"} <= set(files)
    card = files["README.md"].decode()
    assert "image-feature-extraction" in card and "CLIPVisionModelWithProjection" in card


# ------------------------------------------------------------------------------------
# bad inputs: one line, exit 2, nothing written
# ------------------------------------------------------------------------------------
def test_source_without_the_tower(tmp_path, cli):
    r = cli("extract-text", TINY, tmp_path / "text-oc", "--to", "openclip")
    assert r.code == 0, r.err
    # an OpenCLIP checkpoint holding only text tensors has no image tower
    bad = cli("extract-visual", tmp_path / "text-oc", tmp_path / "x")
    assert_one_line_error(bad, "has no visual tower", "text tower only")
    # a transformers CLIPTextModel directory is a lone tower
    assert cli("extract-text", TINY, tmp_path / "text-hf").code == 0
    bad = cli("extract-visual", tmp_path / "text-hf", tmp_path / "x")
    assert_one_line_error(bad, "holds only the text tower", "clip_text_model", "no visual tower")
    bad = cli("extract-text", tmp_path / "text-hf", tmp_path / "x")
    assert_one_line_error(bad, "already a lone clip text tower")
    assert not (tmp_path / "x").exists()


def test_unknown_family_and_wrong_targets(tmp_path, cli, capsys):
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 8}))
    assert_one_line_error(cli("extract-visual", bert, tmp_path / "x"), "unsupported transformers model_type 'bert'")
    oc = tmp_path / "rn50"
    oc.mkdir()
    cfg = json.loads((TINY / "open_clip_config.json").read_text())
    cfg["model_cfg"]["vision_cfg"]["layers"] = [1, 1, 1, 1]
    (oc / "open_clip_config.json").write_text(json.dumps(cfg))
    (oc / "open_clip_model.safetensors").write_bytes((TINY / "open_clip_model.safetensors").read_bytes())
    assert_one_line_error(cli("extract-visual", oc, tmp_path / "x"), "ModifiedResNet")
    with pytest.raises(ClawError, match="timm holds image models only"):
        clawconvert.api.extract_text(TINY, tmp_path / "x", to="timm")
    with pytest.raises(SystemExit) as exit_:  # argparse refuses it: exit 2, usage + one error line
        cli("extract-text", TINY, tmp_path / "x", "--to", "timm")
    assert exit_.value.code == 2
    capsys.readouterr()
    assert not (tmp_path / "x").exists()
    # an existing destination is kept unless --overwrite
    (tmp_path / "x").mkdir()
    assert_one_line_error(cli("extract-visual", TINY, tmp_path / "x"), "already exists")
    assert cli("extract-visual", TINY, tmp_path / "x", "--overwrite").code == 0


# ------------------------------------------------------------------------------------
# SigLIP: runs once the siglip family implements the tower hooks
# ------------------------------------------------------------------------------------
def _siglip_with_tower_hooks():
    from clawconvert.families import Family, all_families
    fam = all_families().get("siglip")
    if fam is None or type(fam).tower_config is Family.tower_config:
        pytest.skip("the siglip family does not implement Family.tower_config / tower_model_class yet")
    return fam


@pytest.mark.parametrize("tower", ["visual", "text"])
def test_siglip_towers_load_by_automodel_and_are_bit_exact(tmp_path, tower):
    _siglip_with_tower_hooks()
    cfg = transformers.SiglipConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8),
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         vocab_size=128, max_position_embeddings=16, pad_token_id=1, eos_token_id=1,
                         bos_token_id=None))   # SigLIP 1's sentencepiece: pad = eos = 1
    full = seeded(transformers.SiglipModel(cfg))
    full.save_pretrained(tmp_path / "siglip")
    fn = clawconvert.extract_visual if tower == "visual" else clawconvert.extract_text
    r = fn(tmp_path / "siglip", tmp_path / "t", verify=True)
    assert r.verification["bit_exact"]
    cls = transformers.SiglipVisionModel if tower == "visual" else transformers.SiglipTextModel
    # transformers 5 maps siglip_vision_model in AutoModel but not siglip_text_model: that one loads by class
    loader = AutoModel if tower == "visual" else cls
    model, info = loader.from_pretrained(tmp_path / "t", output_loading_info=True)
    assert type(model) is cls and not loading_problems(info)
    prefix = "vision_model." if tower == "visual" else "text_model."
    assert all(k.startswith(prefix) for k in load_file(tmp_path / "t" / "model.safetensors"))
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        if tower == "visual":
            got, want = model.eval()(pixel_values=PIXELS).pooler_output, full.get_image_features(pixel_values=PIXELS)
        else:
            got, want = model.eval()(input_ids=ids).pooler_output, full.get_text_features(input_ids=ids)
    want = want if isinstance(want, torch.Tensor) else want.pooler_output
    assert torch.equal(got, want)
