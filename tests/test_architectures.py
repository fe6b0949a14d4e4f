"""Architecture tables (mappings/architectures/*.yaml) against the installed transformers.

The tables are data that merge-lora, extraction and inspect read instead of importing
transformers; every fact in them that transformers also knows is checked here, so they
cannot drift: each row's class and tie_word_embeddings default, the tied pair, and every
layout's prefixes against the real module tree and the files transformers writes.
"""
from __future__ import annotations

import pytest
import yaml

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

from clawconvert.architectures import (Layout, _validate, all_architectures, architecture_for,  # noqa: E402
                                       load_architecture)
from clawconvert.errors import ClawError  # noqa: E402

CAUSAL = load_architecture("causal_lm")


@pytest.mark.parametrize("model_type", sorted(CAUSAL.model_types))
def test_causal_lm_rows_match_transformers(model_type):
    from transformers import CONFIG_MAPPING, MODEL_FOR_CAUSAL_LM_MAPPING
    row = CAUSAL.row(model_type)
    config = CONFIG_MAPPING[model_type]()
    assert config.tie_word_embeddings is row["tie_word_embeddings"], model_type
    cls = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    assert cls.__name__ == row["class"]
    embed, head = (name.removeprefix("lm/") for name in CAUSAL.tied_pair(model_type))
    tied = cls._tied_weights_keys
    assert tied is not None and tied.get(head) == embed, (model_type, tied)


def test_conv1d_rows_are_the_conv1d_models():
    from transformers import CONFIG_MAPPING, MODEL_FOR_CAUSAL_LM_MAPPING
    from transformers.pytorch_utils import Conv1D
    for model_type in CAUSAL.model_types:
        config = CONFIG_MAPPING[model_type](num_hidden_layers=1) if model_type != "gpt2" else \
            CONFIG_MAPPING[model_type](n_layer=1)
        with torch.device("meta"):
            model = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)](config)
        has = any(isinstance(m, Conv1D) for m in model.modules())
        assert has is bool(CAUSAL.row(model_type).get("conv1d")), model_type


VLM_TYPES = sorted(mt for a in all_architectures().values() if a.name != "causal_lm" for mt in a.model_types
                   if not a.row(mt).get("remote_code"))      # Qwen-1 exists only as remote code: never imported


@pytest.mark.parametrize("model_type", VLM_TYPES)
def test_vlm_rows_match_transformers(model_type):
    from transformers import CONFIG_MAPPING, MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING
    arch = architecture_for(model_type)
    config = CONFIG_MAPPING[model_type]()
    assert config.tie_word_embeddings is arch.tie_default(model_type)
    assert MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING[type(config)].__name__ == arch.row(model_type)["class"]


def test_layout_translation_is_longest_prefix_and_invertible():
    arch = load_architecture("qwen2_5_vl")
    old, new = arch.layout("transformers-4"), arch.layout("transformers-5")
    assert old.to_canonical("visual.merger.ln_q.weight") == "connector/merger.ln_q.weight"
    assert old.to_canonical("visual.blocks.0.attn.qkv.weight") == "vision/blocks.0.attn.qkv.weight"
    assert new.to_file("lm/model.layers.0.mlp.up_proj.weight") == "model.language_model.layers.0.mlp.up_proj.weight"
    assert new.to_file("lm/lm_head.weight") == "lm_head.weight"
    keys = ["model.language_model.embed_tokens.weight", "model.visual.blocks.0.attn.qkv.weight", "lm_head.weight"]
    assert arch.detect_layout(keys, "x").name == "transformers-5"
    assert arch.detect_layout(["model.embed_tokens.weight", "visual.patch_embed.proj.weight"], "x").name == \
        "transformers-4"


def test_llava_layouts_tell_the_vision_model_level_apart():
    arch = load_architecture("llava")
    hf = ["language_model.model.embed_tokens.weight", "vision_tower.vision_model.embeddings.patch_embedding.weight"]
    v5 = ["language_model.model.embed_tokens.weight", "vision_tower.embeddings.patch_embedding.weight"]
    assert arch.detect_layout(hf, "x").name == "llava-hf"
    assert arch.detect_layout(v5, "x").name == "transformers-5-files"
    for keys in (hf, v5):
        lay = arch.detect_layout(keys, "x")
        assert lay.to_canonical(keys[1]) == "vision/vision_model.embeddings.patch_embedding.weight"


def test_keys_no_layout_explains_are_named():
    with pytest.raises(ClawError, match="fit no known qwen2_vl layout, e.g. 'vision_tower.x'"):
        load_architecture("qwen2_vl").detect_layout(["model.norm.weight", "vision_tower.x"], "base")


@pytest.mark.parametrize("bad,message", [
    ({"layouts": {"x": {"prefixes": {"lm/": "a.", "vision/": "a."}}}}, "share one file prefix"),
    ({"layouts": {"x": {"prefixes": {"tower/": "a."}}}}, "unknown part 'tower'"),
    ({"layouts": {"x": {"prefixes": {"lm/": "a."}}}, "write": "y"}, "names no layout"),
    ({"model_types": {"m": {"tie": True}}}, "keys must be among"),
])
def test_table_schema_errors_name_the_entry(bad, message):
    data = {"architecture": "t", "model_types": {"m": {}}, "parts": {"lm": {}, "vision": {}},
            "layouts": {"x": {"prefixes": {"lm/": "model."}}}}
    data.update(bad)
    with pytest.raises(ClawError, match=message):
        _validate("t", yaml.safe_load(yaml.safe_dump(data)), b"")


def test_every_layout_prefix_is_spelled_by_transformers_itself():
    """Each VLM's newest layout matches the module tree of a real (meta) model and the oldest
    the keys transformers writes; checked on the installed transformers for every table."""
    from transformers import CONFIG_MAPPING, MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING
    for arch in all_architectures().values():
        if arch.name == "causal_lm":
            continue
        for model_type in (mt for mt in arch.model_types if mt in VLM_TYPES):
            config = CONFIG_MAPPING[model_type]()
            with torch.device("meta"):
                model = MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING[type(config)](config)
            modules = [k for k in model.state_dict()]
            lay = arch.detect_layout(modules, model_type)
            assert lay.name.startswith("transformers-5") or lay.name == "hf", (model_type, lay.name)
            parts = {lay.to_canonical(k).split("/")[0] for k in modules}
            assert parts == set(arch.parts), (model_type, parts)
            assert isinstance(lay, Layout)
