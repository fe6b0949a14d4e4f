"""The light configs, shape formulas and side files against the real transformers / open_clip.

clawconvert's families build configs (:mod:`clawconvert.hfconfig`), canonical shapes and HF
side files without importing torch, transformers, open_clip or timm; everything here checks
that data against the frameworks themselves, so it cannot drift when they change.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import open_clip
import pytest
import transformers

from clawconvert import hfconfig
from clawconvert.errors import ClawError
from clawconvert.families import get_family
from clawconvert.families import clip as clip_fam
from conftest import ROOT

FIXTURES = ROOT / "fixtures"


# ------------------------------------------------------------------------------------
# defaults and validation
# ------------------------------------------------------------------------------------
@pytest.mark.parametrize("model_type", sorted(hfconfig.SCHEMAS))
def test_schema_defaults_and_fields_match_transformers(model_type):
    schema = hfconfig.SCHEMAS[model_type]
    real = getattr(transformers, schema.cls)().to_dict()
    base = transformers.PretrainedConfig().to_dict()
    own = {k for k in real if k not in base and k not in schema.subs and k not in ("id2label", "label2id")}
    own |= {k for k in ("pad_token_id", "bos_token_id", "eos_token_id") if k in real}
    assert set(schema.fields) == own, "fields of the transformers class and of hfconfig.SCHEMAS differ"
    ours = hfconfig.from_dict(model_type, {}).to_dict()
    for key in schema.fields:
        assert ours[key] == real[key], key
        kind = schema.fields[key][0]
        assert hfconfig.type_accepts(kind, real[key]), (key, kind, real[key])
    for attr, sub in schema.subs.items():
        assert real[attr]["model_type"] == sub
    assert ours["model_type"] == real["model_type"]


@pytest.mark.parametrize("model_type", ["clip", "siglip", "siglip2"])
def test_to_transformers_round_trip(model_type):
    data = {"text_config": {"hidden_size": 48, "num_attention_heads": 4, "vocab_size": 100},
            "vision_config": {"hidden_size": 32, "num_attention_heads": 4, "patch_size": 8}}
    cls = getattr(transformers, hfconfig.SCHEMAS[model_type].cls)
    ours = hfconfig.from_dict(model_type, data)
    theirs = cls.from_dict(data)
    assert ours.to_transformers().to_dict() == theirs.to_dict()
    for part in ("text_config", "vision_config"):
        want = {k: v for k, v in theirs.to_dict()[part].items() if k not in ("id2label", "label2id", "transformers_version")}
        got = {k: v for k, v in ours.to_dict()[part].items()}
        assert {k: got[k] for k in want if k in got} == {k: want[k] for k in got if k in want}


BAD = [("text_config", "hidden_size", "x"), ("text_config", "hidden_size", 1.5), ("text_config", "hidden_size", True),
       ("text_config", "hidden_act", 5), ("text_config", "layer_norm_eps", "a"), ("text_config", "layer_norm_eps", 1),
       ("text_config", "eos_token_id", "a"), ("vision_config", "num_hidden_layers", [2]),
       ("vision_config", "attention_dropout", "x"), ("text_config", "vocab_size", 2.0)]


@pytest.mark.parametrize("model_type", ["clip", "siglip", "siglip2"])
@pytest.mark.parametrize("part,key,value", BAD)
def test_bad_values_are_refused_like_transformers(model_type, part, key, value):
    cls = getattr(transformers, hfconfig.SCHEMAS[model_type].cls)
    data = {part: {key: value}}
    with pytest.raises(Exception):
        cls.from_dict(data)
    with pytest.raises(ValueError, match=key):
        hfconfig.from_dict(model_type, data)


def test_clip_heads_must_divide_the_width_like_transformers():
    data = {"text_config": {"hidden_size": 30, "num_attention_heads": 4}}
    with pytest.raises(Exception):
        transformers.CLIPConfig.from_dict(data)
    with pytest.raises(ValueError, match="not a multiple"):
        hfconfig.from_dict("clip", data)


def test_config_object_behaves_like_a_transformers_config(tmp_path):
    import copy
    cfg = hfconfig.from_dict("clip", {"projection_dim": 24, "text_config": {"hidden_size": 16, "num_attention_heads": 2}})
    cfg.architectures = ["CLIPModel"]
    sub = copy.deepcopy(cfg.vision_config)
    sub.projection_dim = 7
    assert cfg.vision_config.projection_dim == 512 and sub.projection_dim == 7
    cfg.save_pretrained(tmp_path)
    loaded = transformers.CLIPConfig.from_pretrained(tmp_path)
    assert loaded.architectures == ["CLIPModel"] and loaded.text_config.hidden_size == 16
    assert json.loads((tmp_path / "config.json").read_text())["transformers_version"] == transformers.__version__


# ------------------------------------------------------------------------------------
# canonical shapes: formulas == the transformers model on meta
# ------------------------------------------------------------------------------------
def _clip_configs():
    out = []
    for name in open_clip.list_models():
        try:
            out.append((name, clip_fam.openclip_to_config(open_clip.get_model_config(name))))
        except ClawError:
            continue
    return out


def _assert_same_shapes(family, config):
    ours = family.canonical_shapes(config)
    theirs = family.meta_shapes(config)
    assert list(ours.items()) == list(theirs.items())


def test_clip_shapes_match_the_meta_model_for_every_open_clip_config():
    configs = _clip_configs()
    assert len(configs) > 20
    fam = get_family("clip")
    for name, config in configs:
        _assert_same_shapes(fam, config)


def test_clip_shapes_accept_transformers_configs():
    cfg = transformers.CLIPConfig(text_config=dict(hidden_size=16, intermediate_size=40, num_hidden_layers=3,
                                                   num_attention_heads=2, max_position_embeddings=9),
                                  vision_config=dict(hidden_size=24, num_hidden_layers=1, num_attention_heads=3,
                                                     image_size=30, patch_size=10, num_channels=1), projection_dim=5)
    _assert_same_shapes(get_family("clip"), cfg)


SIGLIP_VARIANTS = [
    dict(),
    dict(vision_config=dict(vision_use_head=False, hidden_size=32, num_attention_heads=2, num_hidden_layers=1)),
    dict(text_config=dict(projection_size=40, hidden_size=24, num_attention_heads=3, num_hidden_layers=1,
                          vocab_size=77, max_position_embeddings=5),
         vision_config=dict(image_size=48, patch_size=12, hidden_size=40, intermediate_size=72, num_hidden_layers=2,
                            num_attention_heads=5)),
]


@pytest.mark.parametrize("variant", range(len(SIGLIP_VARIANTS)))
def test_siglip_shapes_match_the_meta_model(variant):
    _assert_same_shapes(get_family("siglip"), hfconfig.from_dict("siglip", SIGLIP_VARIANTS[variant]))


@pytest.mark.parametrize("variant", range(len(SIGLIP_VARIANTS)))
def test_siglip2_shapes_match_the_meta_model(variant):
    data = json.loads(json.dumps(SIGLIP_VARIANTS[variant]))
    vision = data.setdefault("vision_config", {})
    vision.pop("image_size", None)
    vision["num_patches"] = 49 if variant else 256
    _assert_same_shapes(get_family("siglip2"), hfconfig.from_dict("siglip2", data))


@pytest.mark.parametrize("name", ["siglip_tiny.npz", "siglip_tiny_scan.npz", "siglip2_naflex_tiny.npz"])
def test_big_vision_fixture_shapes_match_the_meta_model(name):
    from clawconvert.formats import open_checkpoint
    ckpt = open_checkpoint(FIXTURES / "big_vision" / name)
    try:
        assert type(ckpt.config) is hfconfig.HFConfig
        _assert_same_shapes(ckpt.family, ckpt.config)
    finally:
        getattr(ckpt.store, "close", lambda: None)()


def test_siglip_openclip_shapes_match_the_meta_model():
    from clawconvert.families.siglip import openclip_to_config
    fam = get_family("siglip")
    for name in ("ViT-B-16-SigLIP", "ViT-SO400M-14-SigLIP-384", "ViT-B-16-SigLIP2"):
        _assert_same_shapes(fam, openclip_to_config(open_clip.get_model_config(name)))


def test_bad_shapes_are_refused_like_the_meta_model():
    fam = get_family("siglip")
    for data in ({"text_config": {"hidden_size": 30, "num_attention_heads": 4}},
                 {"vision_config": {"hidden_size": -4, "num_attention_heads": 2}},
                 {"vision_config": {"patch_size": 0}}, {"vision_config": {"image_size": [32, 32]}}):
        config = hfconfig.from_dict("siglip", data)
        with pytest.raises(Exception):
            fam.meta_shapes(config)
        with pytest.raises((ValueError, TypeError, ZeroDivisionError)):
            fam.canonical_shapes(config)


# ------------------------------------------------------------------------------------
# side files and open_clip data, read without importing open_clip / transformers
# ------------------------------------------------------------------------------------
def test_openai_constants_and_bpe_tables_match_open_clip():
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
    from open_clip.tokenizer import bytes_to_unicode, default_bpe
    assert clip_fam.OPENAI_DATASET_MEAN == OPENAI_DATASET_MEAN
    assert clip_fam.OPENAI_DATASET_STD == OPENAI_DATASET_STD
    assert clip_fam.bytes_to_unicode() == bytes_to_unicode()
    assert Path(default_bpe()).resolve() == (clip_fam.open_clip_dir() / "bpe_simple_vocab_16e6.txt.gz").resolve()
    vocab, _ = clip_fam.clip_bpe()
    theirs = open_clip.tokenizer.SimpleTokenizer().encoder   # its special tokens are spelled <start_of_text> ...
    assert len(vocab) == len(theirs) == 49408
    assert {k: v for k, v in vocab.items() if v < 49406} == {k: v for k, v in theirs.items() if v < 49406}


def test_builtin_model_configs_match_open_clip():
    from clawconvert.formats.openclip import builtin_model_config, builtin_model_configs
    assert list(builtin_model_configs()) == open_clip.list_models()
    for name in open_clip.list_models():
        assert builtin_model_config(name) == open_clip.get_model_config(name)
    with pytest.raises(ClawError, match="did you mean ViT-B-32"):
        builtin_model_config("ViT-B-33")


def test_clip_tokenizer_files_are_what_transformers_writes(tmp_path):
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    ours.mkdir()
    theirs.mkdir()
    clip_fam.write_clip_tokenizer(ours, 21)
    vocab, pairs = clip_fam.clip_bpe()
    transformers.CLIPTokenizer(vocab=dict(vocab), merges=list(pairs), pad_token="<|endoftext|>",
                               model_max_length=21).save_pretrained(str(theirs))
    for f in theirs.iterdir():
        assert (ours / f.name).read_bytes() == f.read_bytes(), f.name
    tok = transformers.AutoTokenizer.from_pretrained(ours)
    text = ["a photo of a cat!!", "Hello   World, it's 2024 ✨"]
    want = open_clip.get_tokenizer("ViT-B-32", context_length=21)(text)
    got = tok(text, padding="max_length", max_length=21, truncation=True)["input_ids"]
    for g, w in zip(got, want.tolist()):
        n = g.index(49407) + 1
        assert g[:n] == w[:n]


@pytest.mark.parametrize("mode", ["shortest", "squash"])
def test_clip_preprocessor_is_what_transformers_writes(tmp_path, mode):
    pre = {"mean": (0.5, 0.4, 0.3), "std": (0.2, 0.3, 0.4), "interpolation": "bilinear", "resize_mode": mode}
    clip_fam.write_preprocessor(tmp_path, 40, pre)
    squash = mode == "squash"
    theirs = transformers.CLIPImageProcessor(
        do_resize=True, size={"height": 40, "width": 40} if squash else {"shortest_edge": 40}, resample=2,
        do_center_crop=not squash, crop_size={"height": 40, "width": 40}, do_rescale=True, rescale_factor=1 / 255,
        do_normalize=True, image_mean=list(pre["mean"]), image_std=list(pre["std"]), do_convert_rgb=True)
    theirs.save_pretrained(str(tmp_path / "t"))
    assert (tmp_path / "preprocessor_config.json").read_text() == (tmp_path / "t" / "preprocessor_config.json").read_text()
    assert type(transformers.AutoImageProcessor.from_pretrained(tmp_path)).__name__.startswith("CLIPImageProcessor")


def test_siglip_preprocessors_are_what_transformers_writes(tmp_path):
    from clawconvert.families import Extras
    cfg1 = hfconfig.from_dict("siglip", {"vision_config": {"image_size": 64}})
    (tmp_path / "s1").mkdir()
    get_family("siglip").write_hf_tower_extras(tmp_path / "s1", cfg1, Extras(), "visual")
    transformers.SiglipImageProcessor(do_resize=True, size={"height": 64, "width": 64}, resample=3, do_rescale=True,
                                      rescale_factor=1 / 255, do_normalize=True, image_mean=[0.5] * 3,
                                      image_std=[0.5] * 3).save_pretrained(str(tmp_path / "t1"))
    assert (tmp_path / "s1" / "preprocessor_config.json").read_text() == (tmp_path / "t1" / "preprocessor_config.json").read_text()
    cfg2 = hfconfig.from_dict("siglip2", {"vision_config": {"num_patches": 64, "patch_size": 8}})
    (tmp_path / "s2").mkdir()
    get_family("siglip2").write_hf_tower_extras(tmp_path / "s2", cfg2, Extras(), "visual")
    transformers.Siglip2ImageProcessor(do_resize=True, patch_size=8, max_num_patches=64, resample=2, do_rescale=True,
                                       rescale_factor=1 / 255, do_normalize=True, image_mean=[0.5] * 3,
                                       image_std=[0.5] * 3).save_pretrained(str(tmp_path / "t2"))
    assert (tmp_path / "s2" / "preprocessor_config.json").read_text() == (tmp_path / "t2" / "preprocessor_config.json").read_text()


# ------------------------------------------------------------------------------------
# no framework imports on the conversion path
# ------------------------------------------------------------------------------------
NO_FRAMEWORKS = r"""
import sys, json, tempfile
from pathlib import Path
FRAMEWORKS = ("torch", "transformers", "open_clip", "timm")
for name in ("torch", "transformers", "timm"):
    sys.modules[name] = None        # any import of them raises ImportError
# open_clip stays importable (its files are found with importlib.util.find_spec): the check is the list below
from clawconvert.families import Extras, all_families
from clawconvert.families.clip import openclip_to_config
from clawconvert.families.siglip import read_big_vision
from clawconvert.families.siglip2 import read_big_vision as read_big_vision2
import numpy as np

fams = all_families()
root = Path(sys.argv[1])
out = Path(tempfile.mkdtemp())
cfg = json.loads((root / "openclip_tiny" / "open_clip_config.json").read_text())
config = openclip_to_config(cfg["model_cfg"])
fams["clip"].canonical_shapes(config)
config.architectures = [fams["clip"].hf_architecture(config)]
config.save_pretrained(out / "clip")
fams["clip"].write_hf_extras(out / "clip", config, Extras(preprocess=cfg["preprocess_cfg"]))
fams["clip"].codec("openclip").write(config)
hf = fams["clip"].config_from_dict(json.loads((out / "clip" / "config.json").read_text()))
assert hf == config, (hf, config)


class Store:  # big_vision shapes only, the way the readers report them
    def __init__(self, path):
        self.path = path
        with np.load(path) as z:
            self.shapes = {k.removeprefix("params/"): z[k].shape for k in z.files}
    def keys(self):
        return list(self.shapes)
    def __contains__(self, k):
        return k in self.shapes
    def info(self, k):
        return type("Info", (), {"shape": self.shapes[k]})


for name, read, fam in (("siglip_tiny.npz", read_big_vision, "siglip"),
                        ("siglip2_naflex_tiny.npz", read_big_vision2, "siglip2")):
    config = read(Store(root / "big_vision" / name))
    fams[fam].canonical_shapes(config)
    fams[fam].params(config)
    config.architectures = [fams[fam].hf_architecture(config)]
    (out / fam).mkdir()
    config.save_pretrained(out / fam)
    fams[fam].write_hf_extras(out / fam, config, Extras())
    fams[fam].config_from_dict(json.loads((out / fam / "config.json").read_text()))
    fams[fam].tower_config(config, "visual").save_pretrained(out / fam / "visual")
import shutil
shutil.rmtree(out)
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in FRAMEWORKS and sys.modules[m] is not None)))
"""


def test_families_import_no_framework_on_the_conversion_path():
    res = subprocess.run([sys.executable, "-c", NO_FRAMEWORKS, str(FIXTURES)], capture_output=True, text=True,
                         cwd=ROOT, env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads(res.stdout.strip().splitlines()[-1]) == []


def test_openclip_format_reads_builtin_configs_without_open_clip():
    code = ("import sys\nfrom clawconvert.formats.openclip import builtin_model_config, FORMAT\n"
            "builtin_model_config('ViT-B-32')\n"
            "print([m for m in sys.modules if m.split('.')[0] in ('transformers', 'open_clip', 'timm')])")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip().splitlines()[-1] == "[]"


def test_timm_siglip_table_matches_the_installed_timm():
    """mappings/siglip/timm_archs.json (read instead of importing timm) is what timm builds."""
    from clawconvert.families.siglip import _known_archs, scan_timm_archs

    scanned = {a.name: a for a in scan_timm_archs()}
    assert scanned == _known_archs(), "regenerate it: python tools/make_timm_archs.py"
