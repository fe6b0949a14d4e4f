"""Native VLMs: merge-lora reproduces the unmerged PEFT model with an image in the input, and the
extracted language model / vision tower reproduce the VLM's own, for every architecture table.

Every base is a tiny seeded model built from its transformers config (tests/vlm_models.py); every
adapter is made by real peft with LoRA on the language model AND the vision tower (the Qwen ViT's
fused qkv and attn.proj included) and the connector in modules_to_save, saved under transformers 5
module names while the base files use the spelling transformers writes (often the transformers 4
one).  The references are peft's unmerged forward and the VLM's own modules, never clawconvert's.
"""
from __future__ import annotations

import json
import warnings

import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from test_merge_lora import randomize_adapter, tree_hash  # noqa: E402
from vlm_models import CASES, IMAGE, build  # noqa: E402

from clawconvert.cli import main  # noqa: E402

TOL = 1e-5
SIDE_FILES = {"tokenizer.json": b'{"fake": "tokenizer"}', "tokenizer.model": b"\x00sentencepiece\xff",
              "chat_template.jinja": b"{{ messages }}", "preprocessor_config.json": b'{"size": 28}',
              "processor_config.json": b"{}", "video_preprocessor_config.json": b"{}"}


def _load(cls, path):
    model, info = cls.from_pretrained(path, output_loading_info=True, dtype=torch.float32)
    bad = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    assert not bad, f"{path}: {bad}"
    return model.eval()


@pytest.fixture(scope="module", params=list(CASES))
def merged(request, tmp_path_factory):
    """BASE (with side files), ADAPTER (LoRA on both towers + connector), OUT, and the references."""
    case = CASES[request.param]
    work = tmp_path_factory.mktemp(case.name)
    base, adapter, out = work / "base", work / "lora", work / "merged"
    model = build(case, base)
    for name, data in SIDE_FILES.items():
        (base / name).write_bytes(data)
    inputs = case.inputs(model)
    with torch.no_grad():
        base_logits = model(**inputs).logits
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=case.targets,
                                                        modules_to_save=case.connector, **case.lora))
        randomize_adapter(pm, std=0.1)
        pm.save_pretrained(adapter)
        fresh = case.model_class().from_pretrained(base, dtype=torch.float32)
        ref_model = peft.PeftModel.from_pretrained(fresh, adapter).eval()
    with torch.no_grad():
        ref = ref_model(**inputs).logits
    before = (tree_hash(base), tree_hash(adapter))
    assert main(["merge-lora", str(base), str(adapter), str(out)]) == 0
    assert (tree_hash(base), tree_hash(adapter)) == before
    return case, base, adapter, out, inputs, ref, base_logits


def test_merged_vlm_reproduces_unmerged_peft_with_an_image(merged):
    case, base, adapter, out, inputs, ref, base_logits = merged
    keys = json.loads((adapter / "adapter_config.json").read_text())
    assert keys["modules_to_save"]
    manifest = json.loads((out / "clawconvert_manifest.json").read_text())
    parts = manifest["merge"]["lora_modules_by_part"]
    assert parts.get("lm", 0) > 0 and parts.get("vision", 0) > 0, parts      # both towers carry LoRA
    assert any("merger" in k or "projector" in k or "connector" in k or "newline" in k
               for k in manifest["merge"]["replaced_from_adapter"])
    model = _load(case.model_class(), out)
    with torch.no_grad():
        got = model(**inputs).logits
    diff = (got - ref).abs().max().item()
    effect = (ref - base_logits).abs().max().item()
    print(f"{case.name}: max |merged - peft unmerged| {diff:.2e} (adapter effect {effect:.2e}); "
          f"layout {manifest['merge']['layout']}")
    assert effect > 1e-2
    assert diff < TOL
    for name, data in SIDE_FILES.items():
        assert (out / name).read_bytes() == data, name
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [case.model_class().__name__]


def test_extracted_language_model_reproduces_the_vlm_text_only(merged, tmp_path):
    case, base, adapter, out, *_ = merged
    lm = tmp_path / "lm"
    assert main(["extract-text", str(out), str(lm)]) == 0
    config = json.loads((lm / "config.json").read_text())
    assert config["architectures"] == [case.lm_class]
    ids = torch.tensor([[1, 5, 9, 17, 33, 40, 41, 7, 60, 3, 12, 2]])
    vlm = _load(case.model_class(), out)
    text = _load(getattr(transformers, case.lm_class), lm)
    with torch.no_grad():
        want, got = vlm(input_ids=ids).logits, text(input_ids=ids).logits
    diff = (got - want).abs().max().item()
    print(f"{case.name}: extracted {case.lm_class} vs the VLM on text: max |diff| {diff:.2e}")
    assert diff < TOL
    assert (lm / "tokenizer.json").read_bytes() == SIDE_FILES["tokenizer.json"]
    assert not (lm / "preprocessor_config.json").exists()


def test_extracted_vision_tower_or_a_clear_refusal(merged, tmp_path, capsys):
    case, base, adapter, out, inputs, *_ = merged
    dest = tmp_path / "vision"
    capsys.readouterr()
    rc = main(["extract-visual", str(out), str(dest)])
    if case.vision_class is None:
        err = capsys.readouterr().err.strip()
        assert rc == 2 and not dest.exists()
        assert len(err.splitlines()) == 1 and "no standalone model class" in err
        return
    assert rc == 0
    tower = _load(getattr(transformers, case.vision_class), dest)
    vlm = _load(case.model_class(), out)
    pixels = torch.randn(1, 3, 28, 28, generator=torch.Generator().manual_seed(3))
    inner = vlm.model.vision_tower if hasattr(vlm.model, "vision_tower") else vlm.model.vision_model
    with torch.no_grad():
        want = inner(pixel_values=pixels).last_hidden_state
        got = tower(pixel_values=pixels).last_hidden_state
    diff = (got - want).abs().max().item()
    print(f"{case.name}: extracted {case.vision_class} vs the VLM's tower: max |diff| {diff:.2e}")
    assert diff < TOL


def test_inspect_names_architecture_layout_parts_and_tie(merged, capsys):
    case, base, adapter, out, *_ = merged
    capsys.readouterr()
    assert main(["inspect", str(base), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    arch = info["architecture"]
    assert arch["class"] == case.model_class().__name__
    assert arch["layout"]["name"] and arch["layout"]["loaded_by"]
    assert {"lm", "vision", "connector"} <= set(arch["parts"])
    assert arch["parts"]["lm"]["tensors"] > 0 and arch["parts"]["vision"]["tensors"] > 0
    assert isinstance(arch["tie_word_embeddings"], bool)
    assert "tokenizer.json" in arch["side_files"]["present"]
    assert main(["inspect", str(base)]) == 0
    text = capsys.readouterr().out
    assert "layout" in text and case.model_class().__name__ in text
