"""merge-lora --vision: a classic research VLM becomes an HF LLaVA that gives the same logits.

The classic pipeline is run by hand here (vision last hidden state without CLS -> feature_proj
-> spliced into the LLM's input embeddings at the image-token positions -> the unmerged PEFT
LLM) and compared with ``LlavaForConditionalGeneration`` + ``AutoProcessor`` loaded from OUT.
"""
from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from test_merge_lora import (ALL_LINEAR, make_adapter, make_base, peft_logits, run_cli, tree_hash,  # noqa: E402
                             write_tokenizer)

from clawconvert.surgery.llava import vision_tower_source  # noqa: E402

TOL = 1e-4
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
              patch_size=8, hidden_act="gelu")
LLM_HIDDEN, VOCAB = 48, 64


def feature_proj(vision_hidden=32, llm_hidden=LLM_HIDDEN, seed=3) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(vision_hidden, llm_hidden), torch.nn.GELU(),
                               torch.nn.Linear(llm_hidden, llm_hidden))


@pytest.fixture(scope="module")
def vlm(tmp_path_factory):
    """Tiny CLIP tower + feature_proj (other_params.bin) + Qwen2 with a LoRA adapter."""
    work = tmp_path_factory.mktemp("llava")
    base = make_base(work / "qwen2", "qwen2", hidden_size=LLM_HIDDEN, intermediate_size=96,
                     tie_word_embeddings=True)
    write_tokenizer(base, vocab=VOCAB)                 # full vocabulary: <image> needs a new row
    adapter = make_adapter(base, work / "lora", target_modules=ALL_LINEAR)
    torch.manual_seed(1)
    vision = work / "clip-vision"
    transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**VISION)).save_pretrained(vision)
    proj = feature_proj()
    torch.save(proj.state_dict(), work / "other_params.bin")
    out = work / "llava"
    before = [tree_hash(p) for p in (base, adapter, vision)]
    assert run_cli(base, adapter, out, "--vision", vision, "--connector", work / "other_params.bin") == 0
    assert [tree_hash(p) for p in (base, adapter, vision)] == before
    return work, base, adapter, vision, proj, out


def _image(seed=0):
    from PIL import Image
    return Image.fromarray((np.random.RandomState(seed).rand(40, 52, 3) * 255).astype("uint8"))


def _classic_logits(base, adapter, vision, proj, input_ids, pixel_values, image_token_index):
    tower = transformers.CLIPVisionModel.from_pretrained(vision).eval()
    llm = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        llm = peft.PeftModel.from_pretrained(llm, adapter).eval()
    with torch.no_grad():
        features = proj(tower(pixel_values).last_hidden_state[:, 1:])          # drop CLS
        mask = input_ids == image_token_index
        embeds = llm.get_input_embeddings()(input_ids.masked_fill(mask, 0))
        embeds[mask] = features.reshape(-1, features.shape[-1])
        return llm(inputs_embeds=embeds).logits


def test_classic_vlm_and_merged_llava_give_the_same_logits(vlm):
    work, base, adapter, vision, proj, out = vlm
    processor = transformers.AutoProcessor.from_pretrained(out)
    model, info = transformers.LlavaForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    model.eval()
    config = model.config
    assert config.image_token_index == processor.tokenizer.convert_tokens_to_ids("<image>") == VOCAB
    assert config.vision_feature_layer == -1 and config.vision_feature_select_strategy == "default"

    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "describe the image"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert prompt.count("<image>") == 1 and prompt.startswith("<|im_start|>user")
    inputs = processor(images=_image(), text=prompt, return_tensors="pt")
    n_patches = (VISION["image_size"] // VISION["patch_size"]) ** 2
    assert (inputs.input_ids == config.image_token_index).sum() == n_patches == config.image_seq_length
    with torch.no_grad():
        merged = model(**inputs).logits
    classic = _classic_logits(base, adapter, vision, proj, inputs.input_ids, inputs.pixel_values,
                              config.image_token_index)
    diff = (merged[..., :VOCAB] - classic).abs().max().item()
    print(f"classic VLM vs merged LLaVA: max logit diff {diff:.2e} over {classic.numel()} logits")
    assert diff < TOL

    with torch.no_grad():
        generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, inputs.input_ids.shape[1] + 4)


def test_new_embedding_row_is_the_mean_and_the_tie_is_kept(vlm):
    *_, out = vlm
    from safetensors.torch import load_file
    weights = load_file(out / "model.safetensors")
    embed = weights["language_model.model.embed_tokens.weight"]
    assert embed.shape == (VOCAB + 1, LLM_HIDDEN)
    torch.testing.assert_close(embed[VOCAB], embed[:VOCAB].mean(0), rtol=0, atol=1e-7)
    assert "language_model.lm_head.weight" not in weights     # still tied to embed_tokens
    assert any(k.startswith("vision_tower.vision_model.encoder.layers.") for k in weights)
    assert {k for k in weights if k.startswith("multi_modal_projector.")} == {
        f"multi_modal_projector.linear_{i}.{p}" for i in (1, 2) for p in ("weight", "bias")}
    config = json.loads((out / "config.json").read_text())
    assert config["text_config"]["vocab_size"] == VOCAB + 1 and config["tie_word_embeddings"] is True
    manifest = json.loads((out / "clawconvert_manifest.json").read_text())
    assert manifest["merge"]["extra_embedding_rows"] == 1
    assert manifest["merge"]["llava"]["connector"]["layout"] == "nn.Sequential"


def test_untied_language_model_grows_embedding_and_head(vlm, tmp_path):
    """A llama (untied) base: both embed_tokens and lm_head get the mean row; text-only logits unchanged."""
    work, _, _, vision, proj, _ = vlm
    base = make_base(tmp_path / "llama", "llama", hidden_size=LLM_HIDDEN, intermediate_size=96)
    write_tokenizer(base, vocab=VOCAB)
    adapter = make_adapter(base, tmp_path / "lora", target_modules=["q_proj", "down_proj", "lm_head"])
    out = tmp_path / "llava"
    assert run_cli(base, adapter, out, "--vision", vision, "--connector", work / "other_params.bin") == 0
    model, info = transformers.LlavaForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    for matrix in (model.get_input_embeddings().weight, model.lm_head.weight):
        assert matrix.shape == (VOCAB + 1, LLM_HIDDEN)
        torch.testing.assert_close(matrix[VOCAB], matrix[:VOCAB].mean(0), rtol=0, atol=1e-6)
    assert model.config.tie_word_embeddings is False
    ids = torch.tensor([[3, 7, 11, 5, 9]])
    with torch.no_grad():
        diff = (model.eval()(input_ids=ids).logits[..., :VOCAB] - peft_logits(base, adapter, ids)).abs().max()
    assert diff < TOL


def _adapter_with_projector(adapter, proj, path):
    """The adapter plus the connector under LLaVA's name, as modules_to_save would store it."""
    from safetensors.torch import load_file, save_file
    path.mkdir()
    (path / "adapter_config.json").write_text((adapter / "adapter_config.json").read_text())
    tensors = load_file(adapter / "adapter_model.safetensors")
    tensors.update({f"base_model.model.model.mm_projector.{k}": v for k, v in proj.state_dict().items()})
    save_file(tensors, path / "adapter_model.safetensors", metadata={"format": "pt"})
    return path


def test_connector_from_adapter_modules_to_save_in_llava_layout(vlm, tmp_path):
    """An adapter that carries the connector (LLaVA's model.mm_projector.{0,2}) needs no --connector."""
    from safetensors.torch import load_file
    work, base, adapter, vision, proj, _ = vlm
    with_proj = _adapter_with_projector(adapter, proj, tmp_path / "lora-with-projector")
    out = tmp_path / "llava-from-adapter"
    assert run_cli(base, with_proj, out, "--vision", vision) == 0
    weights = load_file(out / "model.safetensors")
    assert torch.equal(weights["multi_modal_projector.linear_1.weight"], proj[0].weight.detach())
    assert torch.equal(weights["multi_modal_projector.linear_2.bias"], proj[2].bias.detach())


def test_siglip_tower_keeps_every_patch(vlm, tmp_path):
    _, base, adapter, _, _, _ = vlm
    torch.manual_seed(2)
    siglip = tmp_path / "siglip"
    transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**VISION)).save_pretrained(siglip)
    hf_proj = {"multi_modal_projector.linear_1.weight": torch.randn(LLM_HIDDEN, 32),
               "multi_modal_projector.linear_2.weight": torch.randn(LLM_HIDDEN, LLM_HIDDEN)}
    from safetensors.torch import save_file
    save_file(hf_proj, tmp_path / "projector.safetensors")
    out = tmp_path / "llava-siglip"
    assert run_cli(base, adapter, out, "--vision", siglip, "--connector", tmp_path / "projector.safetensors") == 0
    model, info = transformers.LlavaForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert model.config.vision_feature_select_strategy == "full" and model.config.multimodal_projector_bias is False
    processor = transformers.AutoProcessor.from_pretrained(out)
    inputs = processor(images=_image(1), text="<image> what is in this picture", return_tensors="pt")
    assert (inputs.input_ids == model.config.image_token_index).sum() == 16 == model.config.image_seq_length
    w1, w2 = hf_proj["multi_modal_projector.linear_1.weight"], hf_proj["multi_modal_projector.linear_2.weight"]
    with torch.no_grad():
        tower = transformers.SiglipVisionModel.from_pretrained(siglip).eval()
        hidden = tower(inputs.pixel_values, output_hidden_states=True).hidden_states[-1][0]   # all 16 patches
        expected = torch.nn.functional.gelu(hidden @ w1.T) @ w2.T
        got = model.eval().model.get_image_features(pixel_values=inputs.pixel_values).pooler_output[0]
    torch.testing.assert_close(got, expected, rtol=0, atol=TOL)


def test_openclip_tower_goes_through_extract_visual(vlm, tmp_path):
    """--vision with an OpenCLIP directory: features equal open_clip's own transformer output, projected."""
    open_clip = pytest.importorskip("open_clip")
    work, base, adapter, _, proj, _ = vlm
    source = Path(__file__).parent.parent / "fixtures" / "openclip_tiny"
    out = tmp_path / "llava-openclip"
    assert run_cli(base, adapter, out, "--vision", source, "--connector", work / "other_params.bin") == 0
    assert not list(tmp_path.glob(".clawconvert-tmp-*"))             # the scratch tower is gone
    model, info = transformers.LlavaForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    processor = transformers.AutoProcessor.from_pretrained(out)
    inputs = processor(images=_image(2), text="<image> describe", return_tensors="pt")
    reference = open_clip.create_model(f"local-dir:{source}").eval()
    captured = {}
    reference.visual.transformer.register_forward_hook(lambda m, i, o: captured.setdefault("tokens", o))
    with torch.no_grad():
        reference.encode_image(inputs.pixel_values)
        expected = proj(captured["tokens"][0, 1:])                       # last block's output, CLS dropped
        got = model.eval().model.get_image_features(pixel_values=inputs.pixel_values).pooler_output[0]
    diff = (got - expected).abs().max().item()
    print(f"OpenCLIP tower through extract-visual: max feature diff {diff:.2e}")
    assert diff < TOL


def test_vision_tower_source_takes_the_vision_half_of_a_clip_model(tmp_path):
    torch.manual_seed(0)
    config = transformers.CLIPConfig(vision_config=VISION, text_config=dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=50))
    transformers.CLIPModel(config).save_pretrained(tmp_path / "clip")
    store, vision_config = vision_tower_source(tmp_path / "clip")
    assert vision_config["model_type"] == "clip_vision_model" and vision_config["hidden_size"] == 32
    reference = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**VISION))
    want = {"vision/vision_model." + k for k in reference.state_dict()}   # canonical: the part, then CLIPVisionModel file names
    assert set(store.keys()) == want


# ------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------
def _fails(capsys, out, *args) -> str:
    capsys.readouterr()
    rc = run_cli(*args, out)
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert not out.exists()
    return err.splitlines()[0]


def test_connector_widths_that_do_not_match(vlm, tmp_path, capsys):
    _, base, adapter, vision, _, _ = vlm
    torch.save(feature_proj(vision_hidden=24).state_dict(), tmp_path / "narrow.bin")
    line = _fails(capsys, tmp_path / "o1", base, adapter, "--vision", vision, "--connector", tmp_path / "narrow.bin")
    assert "'0.weight'" in line and "(48, 24)" in line and "vision width of 32" in line
    torch.save(feature_proj(llm_hidden=40).state_dict(), tmp_path / "wrong-llm.bin")
    line = _fails(capsys, tmp_path / "o2", base, adapter, "--vision", vision, "--connector", tmp_path / "wrong-llm.bin")
    assert "'0.weight'" in line and "LLM width of 48" in line


def test_unknown_connector_layout(vlm, tmp_path, capsys):
    _, base, adapter, vision, _, _ = vlm
    torch.save({"proj.weight": torch.zeros(LLM_HIDDEN, 32)}, tmp_path / "single.bin")
    line = _fails(capsys, tmp_path / "o", base, adapter, "--vision", vision, "--connector", tmp_path / "single.bin")
    assert "unknown connector layout" in line and "proj.weight" in line


def test_vision_without_connector_and_non_vision_source(vlm, tmp_path, capsys):
    _, base, adapter, vision, proj, _ = vlm
    with_proj = _adapter_with_projector(adapter, proj, tmp_path / "lora-with-projector")
    line = _fails(capsys, tmp_path / "o0", base, with_proj)
    assert "'base_model.model.model.mm_projector.0.bias'" in line and "pass --vision" in line
    assert "needs a connector" in _fails(capsys, tmp_path / "o1", base, adapter, "--vision", vision)
    torch.save(feature_proj().state_dict(), tmp_path / "fp.bin")
    line = _fails(capsys, tmp_path / "o2", base, adapter, "--vision", base, "--connector", tmp_path / "fp.bin")
    assert "is not an HF vision model a LLaVA takes" in line


def test_verify_runs_the_classic_pipeline(vlm, tmp_path, capsys):
    _, base, adapter, vision, proj, _ = vlm
    out = tmp_path / "verified"
    capsys.readouterr()
    assert run_cli(base, adapter, out, "--vision", vision, "--connector", vlm[0] / "other_params.bin", "--verify") == 0
    printed = capsys.readouterr().out
    figures = json.loads((out / "clawconvert_manifest.json").read_text())["verify"]
    assert figures["passed"] and figures["max_abs_diff"] < TOL and "classic pipeline" in figures["reference"]
    assert "verify OK" in printed


def test_verify_fails_and_writes_nothing_when_the_merge_is_wrong(vlm, tmp_path, monkeypatch, capsys):
    from clawconvert.surgery import merge
    _, base, adapter, vision, proj, _ = vlm
    real = merge.build_tensor
    monkeypatch.setattr(merge, "build_tensor", lambda r, b, a, o: real(r, b, a, o) * 1.01)   # a wrong merge
    out = tmp_path / "wrong"
    capsys.readouterr()
    assert run_cli(base, adapter, out, "--vision", vision, "--connector", vlm[0] / "other_params.bin", "--verify") == 1
    assert "verify FAILED" in capsys.readouterr().err and not out.exists()


@pytest.mark.parametrize("kind,registers", [("dinov2", 0), ("dinov2", 4), ("dinov3", 2)])
def test_dinov2_tower(vlm, tmp_path, kind, registers):
    """A DINOv2 (with and without registers) or DINOv3 LLaVA tower: transformers runs it; vLLM's LLaVA
    does not take these towers (docs/dinov2.md).  The LLaVA equals the classic pipeline (--verify) and keeps
    registers as image tokens under the 'default' strategy, as transformers' LLaVA drops only CLS."""
    _, base, adapter, _, _, _ = vlm
    torch.manual_seed(4)
    cfg = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=28,
               patch_size=7)
    if kind == "dinov3":
        tower = transformers.DINOv3ViTModel(transformers.DINOv3ViTConfig(**cfg, num_register_tokens=registers))
    elif registers:
        tower = transformers.Dinov2WithRegistersModel(transformers.Dinov2WithRegistersConfig(
            **cfg, num_register_tokens=registers))
    else:
        tower = transformers.Dinov2Model(transformers.Dinov2Config(**cfg))
    tower.save_pretrained(tmp_path / "dinov2")
    torch.save(feature_proj(32).state_dict(), tmp_path / "proj.bin")
    out = tmp_path / "llava"
    assert run_cli(base, adapter, out, "--vision", tmp_path / "dinov2", "--connector", tmp_path / "proj.bin",
                   "--verify") == 0
    config = json.loads((out / "config.json").read_text())
    assert config["vision_config"]["model_type"] == {("dinov2", 0): "dinov2", ("dinov2", 4): "dinov2_with_registers",
                                                     ("dinov3", 2): "dinov3_vit"}[kind, registers]
    assert config["image_seq_length"] == 16 + registers
    figures = json.loads((out / "clawconvert_manifest.json").read_text())["verify"]
    assert figures["passed"] and figures["max_abs_diff"] < TOL
    model = transformers.LlavaForConditionalGeneration.from_pretrained(out, output_loading_info=True)[1]
    assert not any(model[k] for k in ("missing_keys", "unexpected_keys"))


def test_llava_carries_what_other_readers_need(vlm, tmp_path):
    """What llama.cpp's converter (under transformers 4.57) and vLLM read beside the weights:
    text_config.architectures, the base's tokenizer.model, a tokenizer_config.json transformers 4.x
    reads (a class both know, added tokens listed, no list-valued extra_special_tokens) and a chat
    template with the configured image token and literal role markers."""
    _, base, adapter, vision, _, _ = vlm
    work = tmp_path / "base-with-spm"
    shutil.copytree(base, work)
    (work / "tokenizer.model").write_bytes(b"\x0a\x05spm-bytes-as-the-base-has-them")
    out = tmp_path / "llava"
    assert run_cli(work, adapter, out, "--vision", vision, "--connector", vlm[0] / "other_params.bin",
                   "--image-token", "<img>") == 0
    config = json.loads((out / "config.json").read_text())
    assert config["text_config"]["architectures"] == json.loads((base / "config.json").read_text())["architectures"]
    assert (out / "tokenizer.model").read_bytes() == (work / "tokenizer.model").read_bytes()
    tok_config = json.loads((out / "tokenizer_config.json").read_text())
    assert tok_config["tokenizer_class"] != "TokenizersBackend"        # transformers 5 only
    assert not isinstance(tok_config.get("extra_special_tokens"), list)
    added = {v["content"]: int(k) for k, v in tok_config["added_tokens_decoder"].items()}
    assert added["<img>"] == config["image_token_index"]
    template = (out / "chat_template.jinja").read_text()
    assert "'<img>'" in template and "<image>" not in template and "<|im_start|>" in template
    processor = transformers.AutoProcessor.from_pretrained(out)
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text",
                                          "text": "describe"}]}], add_generation_prompt=True)
    assert "<img>" in text


def test_plain_template_spells_its_role_markers():
    from clawconvert.surgery.llava import PLAIN_TEMPLATE, chat_template
    src = chat_template(PLAIN_TEMPLATE, "<image>")
    assert "'USER: '" in src and "'ASSISTANT: '" in src        # how llama.cpp recognises the vicuna format
