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
from vlm_models import CASES, build, save_lora  # noqa: E402

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
    save_lora(case, model, adapter)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fresh = case.model_class().from_pretrained(base, dtype=torch.float32)
        ref_model = peft.PeftModel.from_pretrained(fresh, adapter).eval()
    with torch.no_grad():
        ref = ref_model(**inputs).logits
    before = (tree_hash(base), tree_hash(adapter))
    assert main(["merge-lora", str(base), str(adapter), str(out), "--verify"]) == 0   # peft, text only
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
    assert manifest["verify"]["passed"] and manifest["verify"]["max_abs_diff"] < 1e-4
    for name, data in SIDE_FILES.items():
        assert (out / name).read_bytes() == data, name
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [case.model_class().__name__]
    if case.tie:
        assert manifest["merge"]["tie"]["action"] == case.tie
        assert config["tie_word_embeddings"] is (case.tie == "kept")


def test_extracted_language_model_reproduces_the_vlm_text_only(merged, tmp_path):
    case, base, adapter, out, *_ = merged
    lm = tmp_path / "lm"
    if case.lm_class is None:
        assert main(["extract-text", str(out), str(lm)]) == 2 and not lm.exists()
        return
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


# ------------------------------------------------------------------------------------
# adapters from elsewhere: old module names, the standalone LLM, another model
# ------------------------------------------------------------------------------------
def _adapter(model, path, **lora):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, **lora))
        randomize_adapter(pm, std=0.1)
        pm.save_pretrained(path)
    return path


def _peft_logits(cls, base, adapter, **inputs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.PeftModel.from_pretrained(cls.from_pretrained(base, dtype=torch.float32), adapter).eval()
    with torch.no_grad():
        return model(**inputs).logits


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    case = CASES["qwen2_5_vl"]
    work = tmp_path_factory.mktemp("qwen-grafts")
    model = build(case, work / "base")
    adapter = _adapter(model, work / "lora", target_modules=["q_proj", "qkv", "down_proj"], modules_to_save=["merger"])
    return case, work, work / "base", adapter, case.inputs(model)


def test_adapter_saved_under_transformers_4_module_names(qwen):
    """The same adapter, its keys spelled as transformers < 4.52 named the modules."""
    from safetensors.torch import load_file, save_file
    case, work, base, adapter, inputs = qwen
    old = work / "lora-old-names"
    old.mkdir()
    (old / "adapter_config.json").write_text((adapter / "adapter_config.json").read_text())
    renamed = {k.replace("base_model.model.model.language_model.", "base_model.model.model.")
                .replace("base_model.model.model.visual.", "base_model.model.visual."): v
               for k, v in load_file(adapter / "adapter_model.safetensors").items()}
    assert any(k.startswith("base_model.model.visual.blocks.") for k in renamed)
    save_file(renamed, old / "adapter_model.safetensors", metadata={"format": "pt"})
    ref = _peft_logits(case.model_class(), base, adapter, **inputs)
    for name, lora in (("new", adapter), ("old", old)):
        out = work / f"merged-{name}"
        assert main(["merge-lora", str(base), str(lora), str(out)]) == 0
        with torch.no_grad():
            got = _load(case.model_class(), out)(**inputs).logits
        assert (got - ref).abs().max().item() < TOL, name


def test_text_only_lora_trained_on_the_standalone_llm_grafts_onto_the_vlm(qwen, tmp_path):
    case, work, base, adapter, inputs = qwen
    lm = tmp_path / "lm"
    assert main(["extract-text", str(base), str(lm)]) == 0
    text_model = transformers.Qwen2ForCausalLM.from_pretrained(lm, dtype=torch.float32)
    lm_lora = _adapter(text_model, tmp_path / "lm-lora", target_modules=["q_proj", "v_proj", "gate_proj"])
    ids = torch.tensor([[1, 5, 9, 17, 33, 40, 41, 7, 60, 3, 12, 2]])
    ref = _peft_logits(transformers.Qwen2ForCausalLM, lm, lm_lora, input_ids=ids)
    out = tmp_path / "grafted"
    assert main(["merge-lora", str(base), str(lm_lora), str(out)]) == 0
    vlm = _load(case.model_class(), out)
    with torch.no_grad():
        diff = (vlm(input_ids=ids).logits - ref).abs().max().item()
    print(f"standalone-LLM LoRA grafted onto Qwen2.5-VL: text logits max |diff| {diff:.2e}")
    assert diff < TOL
    # the vision tower is untouched: the image path differs from the base only through the LM
    from safetensors import safe_open
    with safe_open(base / "model.safetensors", "pt") as a, safe_open(out / "model.safetensors", "pt") as b:
        for key in (k for k in a.keys() if k.startswith("visual.")):
            assert torch.equal(a.get_tensor(key), b.get_tensor(key)), key


def _fails(capsys, *args) -> str:
    capsys.readouterr()
    rc = main(["merge-lora", *map(str, args)])
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert not args[-1].exists() and not list(args[-1].parent.glob(".clawconvert-tmp-*"))
    assert len(err.splitlines()) == 1 or err.splitlines()[1].startswith("  ")
    return err.splitlines()[0]


def test_adapter_for_another_vlm_is_refused(qwen, tmp_path, capsys):
    case, work, base, adapter, inputs = qwen
    other = build(CASES["qwen2_vl"], tmp_path / "qwen2-vl")       # Qwen2-VL's ViT MLP is fc1/fc2
    lora = _adapter(other, tmp_path / "qwen2-vl-lora", target_modules=["fc1", "q_proj"])
    line = _fails(capsys, base, lora, tmp_path / "out")
    assert "targets 'model.visual.blocks.0.mlp.fc1', which BASE does not have" in line


def test_base_without_its_vision_weights(qwen, tmp_path, capsys):
    import shutil

    from safetensors.torch import load_file, save_file
    case, work, base, adapter, inputs = qwen
    bad = tmp_path / "no-vision"
    shutil.copytree(base, bad)
    save_file({k: v for k, v in load_file(base / "model.safetensors").items() if not k.startswith("visual.")},
              bad / "model.safetensors", metadata={"format": "pt"})
    line = _fails(capsys, bad, adapter, tmp_path / "out")
    assert "BASE has no vision tensors" in line and "'visual.'" in line


def test_tokenizer_larger_than_the_embedding(qwen, tmp_path, capsys):
    import shutil
    case, work, base, adapter, inputs = qwen
    bad = tmp_path / "big-tokenizer"
    shutil.copytree(base, bad)
    vocab = {f"w{i}": i for i in range(200)}
    (bad / "tokenizer.json").write_text(json.dumps({"model": {"type": "WordLevel", "vocab": vocab},
                                                    "added_tokens": [{"id": 200, "content": "<x>"}]}))
    line = _fails(capsys, bad, adapter, tmp_path / "out")
    assert "ids up to 200" in line and "128 rows" in line
