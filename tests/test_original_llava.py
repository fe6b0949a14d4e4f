"""Original LLaVA (haotian-liu) checkpoints -> llava-hf, full and LoRA, 1.5 and 1.6.

The tiny checkpoints are written in the original repository's layout from its published key
names (``model.mm_projector.{0,2}``, ``model.vision_tower.vision_tower.vision_model.*`` when the
tower was saved, ``model.image_newline`` for 1.6; ``non_lora_trainables.bin`` with its
``base_model.model.`` prefix beside a LoRA adapter) and its config keys (``llava_llama``,
``mm_vision_select_layer``, ``mm_projector_type: mlp2x_gelu``, ``image_aspect_ratio``).  The
references are (1) transformers' conversion scripts' key mapping, applied here to the original
names as those scripts do, and (2) a forward built from the LLaVA repository's architecture
description: CLIP hidden state ``mm_vision_select_layer`` (-2), CLS dropped, Linear-GELU-Linear,
spliced at the image tokens into the (PEFT, for LoRA runs) language model.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from test_merge_lora import CONFIGS, randomize_adapter, tree_hash, write_tokenizer  # noqa: E402

from clawconvert.cli import main  # noqa: E402

TOL = 1e-5
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=28,
              patch_size=7, hidden_act="quick_gelu")
HIDDEN, VOCAB = 64, 60
# transformers' convert_llava_weights_to_hf.py KEYS_TO_MODIFY_MAPPING, applied in its order with str.replace
SCRIPT_MAPPING = {"model.vision_tower.": "", ".vision_resampler": "", "model.mm_projector": "multi_modal_projector",
                  "model": "model.model", "vision_model.model": "vision_model", "lm_head": "language_model.lm_head",
                  "model.model": "language_model.model", "multi_modal_projector.0": "multi_modal_projector.linear_1",
                  "multi_modal_projector.2": "multi_modal_projector.linear_2"}


def script_name(key: str) -> str:
    for old, new in SCRIPT_MAPPING.items():
        if old in key:
            key = key.replace(old, new)
    return key


def _llava_keys(config: dict) -> dict:
    return dict(mm_vision_tower="openai/clip-vit-large-patch14-336", mm_hidden_size=VISION["hidden_size"],
                mm_vision_select_layer=-2, mm_vision_select_feature="patch", mm_projector_type="mlp2x_gelu",
                mm_use_im_start_end=False, mm_use_im_patch_token=False, image_aspect_ratio="pad",
                mm_patch_merge_type="flat", tune_mm_mlp_adapter=False, **config)


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """A vicuna-like llama (with a tokenizer), a CLIP tower directory, and an mm_projector."""
    work = tmp_path_factory.mktemp("llava-original")
    torch.manual_seed(0)
    llm = transformers.LlamaForCausalLM(CONFIGS["llama"](hidden_size=HIDDEN, intermediate_size=128,
                                                         vocab_size=VOCAB, num_attention_heads=4))
    llm.save_pretrained(work / "vicuna")
    write_tokenizer(work / "vicuna", vocab=VOCAB)
    torch.manual_seed(1)
    transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**VISION)).save_pretrained(work / "clip")
    torch.manual_seed(2)
    proj = torch.nn.Sequential(torch.nn.Linear(VISION["hidden_size"], HIDDEN), torch.nn.GELU(),
                               torch.nn.Linear(HIDDEN, HIDDEN))
    return work, proj


def _write_original(parts, name: str, *, with_tower: bool = False, next_grid: list | None = None) -> Path:
    """An original-LLaVA checkpoint directory: sharded pytorch_model-*.bin + index, config, tokenizer."""
    work, proj = parts
    out = work / name
    out.mkdir()
    state = dict(transformers.LlamaForCausalLM.from_pretrained(work / "vicuna").state_dict())
    state.update({f"model.mm_projector.{k}": v for k, v in proj.state_dict().items()})
    if with_tower:
        tower = transformers.CLIPVisionModel.from_pretrained(work / "clip")
        torch.manual_seed(9)       # a trained tower: its weights differ from --vision's (which gives the config)
        state.update({f"model.vision_tower.vision_tower.vision_model.{k.removeprefix('vision_model.')}":
                      v + 0.01 * torch.randn(v.shape) for k, v in tower.state_dict().items()})
    if next_grid:
        state["model.image_newline"] = torch.randn(HIDDEN, generator=torch.Generator().manual_seed(5))
    keys = sorted(state)
    shards = [keys[: len(keys) // 2], keys[len(keys) // 2:]]
    weight_map = {}
    for i, names in enumerate(shards):
        fname = f"pytorch_model-{i + 1:05d}-of-00002.bin"
        torch.save({k: state[k].clone() for k in names}, out / fname)
        weight_map.update({k: fname for k in names})
    (out / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = json.loads((work / "vicuna" / "config.json").read_text())
    config = _llava_keys({**config, "model_type": "llava_llama", "architectures": ["LlavaLlamaForCausalLM"]})
    if next_grid:
        config.update(image_aspect_ratio="anyres", image_grid_pinpoints=next_grid, mm_patch_merge_type="spatial_unpad")
    (out / "config.json").write_text(json.dumps(config))
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (work / "vicuna" / f).is_file():
            (out / f).write_bytes((work / "vicuna" / f).read_bytes())
    return out


def _inputs(image_id: int, n: int = 16):
    ids = torch.tensor([[1, 5, 9] + [image_id] * n + [17, 33, 40, 7]])
    pixels = torch.randn(1, 3, 28, 28, generator=torch.Generator().manual_seed(11))
    return ids, pixels


def _clip(parts, original: dict | None = None):
    """The tower the LLaVA repository runs: --vision's, or the one the checkpoint saved."""
    clip = transformers.CLIPVisionModel.from_pretrained(parts[0] / "clip").eval()
    prefix = "model.vision_tower.vision_tower.vision_model."
    saved = {k.removeprefix(prefix): v for k, v in (original or {}).items() if k.startswith(prefix)}
    if saved:
        clip.load_state_dict(saved, strict=True)      # transformers 5 module names: no vision_model. level
    return clip


def _reference(parts, lm, ids, pixels, image_id: int, layer: int = -2, clip=None):
    """The LLaVA repository's forward: CLIP hidden state `layer`, CLS dropped, mm_projector, spliced."""
    work, proj = parts
    clip = clip or _clip(parts)
    with torch.no_grad():
        feats = proj(clip(pixel_values=pixels, output_hidden_states=True).hidden_states[layer][:, 1:])
        embeds = lm.get_input_embeddings()(ids.clamp(max=VOCAB - 1)).clone()
        embeds[ids == image_id] = feats.reshape(-1, HIDDEN)
        return lm(inputs_embeds=embeds).logits


def _convert(src: Path, out: Path, *extra) -> dict:
    before = tree_hash(src)
    assert main(["convert", str(src), str(out), "--to", "hf", *map(str, extra)]) == 0
    assert tree_hash(src) == before
    return json.loads((out / "config.json").read_text())


@pytest.mark.parametrize("with_tower", [False, True], ids=["tower-from-vision", "tower-in-checkpoint"])
def test_llava_15_full_checkpoint(parts, tmp_path, with_tower):
    src = _write_original(parts, f"llava-15-{with_tower}", with_tower=with_tower)
    out = tmp_path / "hf"
    config = _convert(src, out, "--vision", parts[0] / "clip")
    # the conversion script's choices: <image> then <pad> added, vocabulary padded to 64, layer -2, default
    assert config["architectures"] == ["LlavaForConditionalGeneration"]
    assert config["image_token_index"] == VOCAB and config["pad_token_id"] == VOCAB + 1
    assert config["text_config"]["vocab_size"] == 64 and config["text_config"]["model_type"] == "llama"
    assert config["vision_feature_layer"] == -2 and config["vision_feature_select_strategy"] == "default"
    assert not any(k.startswith("mm_") for k in config["text_config"])
    from safetensors.torch import load_file
    got = load_file(out / "model.safetensors")
    original = {}
    for f in src.glob("pytorch_model-*.bin"):
        original.update(torch.load(f, weights_only=True))
    expected = {script_name(k): v for k, v in original.items()}
    if not with_tower:
        clip = load_file(parts[0] / "clip" / "model.safetensors")    # transformers 5 drops the vision_model. level
        expected.update({"vision_tower." + (k if k.startswith("vision_model.") else "vision_model." + k): v
                         for k, v in clip.items()})
    assert set(got) == set(expected)
    for k, v in expected.items():
        n = v.shape[0] if k.endswith(("embed_tokens.weight", "lm_head.weight")) else None
        assert torch.equal(got[k][:n] if n else got[k], v), k
    model = transformers.LlavaForConditionalGeneration.from_pretrained(out, dtype=torch.float32).eval()
    ids, pixels = _inputs(config["image_token_index"])
    lm = transformers.LlamaForCausalLM.from_pretrained(parts[0] / "vicuna", dtype=torch.float32).eval()
    ref = _reference(parts, lm, ids, pixels, config["image_token_index"], clip=_clip(parts, original))
    with torch.no_grad():
        diff = (model(input_ids=ids, pixel_values=pixels).logits[..., :VOCAB] - ref[..., :VOCAB]).abs().max().item()
    print(f"original LLaVA 1.5 ({'tower in checkpoint' if with_tower else 'tower from --vision'}) -> llava-hf: "
          f"logits max |diff| {diff:.2e} against the repository's forward")
    assert diff < TOL
    processor = transformers.AutoProcessor.from_pretrained(out)
    assert processor.tokenizer.convert_tokens_to_ids("<image>") == VOCAB


def test_llava_15_lora_output(parts, tmp_path):
    """A LoRA run's output folder: adapter + non_lora_trainables.bin + the llava config, merged into vicuna."""
    work, proj = parts
    lora_dir = tmp_path / "llava-v1.5-7b-lora"
    base = transformers.LlamaForCausalLM.from_pretrained(work / "vicuna")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj",
                                                                                         "up_proj", "down_proj"]))
        randomize_adapter(pm, std=0.1)
        pm.save_pretrained(lora_dir)
    torch.save({f"base_model.model.model.mm_projector.{k}": v for k, v in proj.state_dict().items()},
               lora_dir / "non_lora_trainables.bin")
    vicuna_cfg = json.loads((work / "vicuna" / "config.json").read_text())
    (lora_dir / "config.json").write_text(json.dumps(_llava_keys({**vicuna_cfg, "model_type": "llava_llama"})))
    torch.save({"step": 1}, lora_dir / "trainer_state_like.bin")        # unrelated files are left alone
    out = tmp_path / "hf"
    assert main(["merge-lora", str(work / "vicuna"), str(lora_dir), str(out), "--vision", str(work / "clip")]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["vision_feature_layer"] == -2                 # read from the LoRA folder's config.json
    manifest = json.loads((out / "clawconvert_manifest.json").read_text())
    assert manifest["merge"]["llava"]["connector"]["origin"].endswith("non_lora_trainables.bin")
    model = transformers.LlavaForConditionalGeneration.from_pretrained(out, dtype=torch.float32).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lm = peft.PeftModel.from_pretrained(transformers.LlamaForCausalLM.from_pretrained(
            work / "vicuna", dtype=torch.float32), lora_dir).eval()
    ids, pixels = _inputs(config["image_token_index"])
    ref = _reference(parts, lm, ids, pixels, config["image_token_index"])
    with torch.no_grad():
        diff = (model(input_ids=ids, pixel_values=pixels).logits[..., :VOCAB] - ref[..., :VOCAB]).abs().max().item()
    print(f"original LLaVA 1.5 LoRA -> llava-hf: logits max |diff| {diff:.2e} against the unmerged PEFT forward")
    assert diff < TOL


def test_llava_16_anyres_is_llava_next(parts, tmp_path):
    grid = [[28, 28], [28, 56]]
    src = _write_original(parts, "llava-16", next_grid=grid)
    out = tmp_path / "hf"
    config = _convert(src, out, "--vision", parts[0] / "clip")
    assert config["architectures"] == ["LlavaNextForConditionalGeneration"]
    assert config["image_grid_pinpoints"] == grid and config["vision_feature_layer"] == -2
    from safetensors.torch import load_file
    got = load_file(out / "model.safetensors")
    original = {}
    for f in src.glob("pytorch_model-*.bin"):
        original.update(torch.load(f, weights_only=True))
    assert torch.equal(got["image_newline"], original["model.image_newline"])     # the NeXT script keeps it
    model = transformers.LlavaNextForConditionalGeneration.from_pretrained(out, dtype=torch.float32).eval()
    pixels = torch.randn(1, 2, 3, 28, 28, generator=torch.Generator().manual_seed(4))   # base view + one tile
    with torch.no_grad():
        packed = model.model.get_image_features(pixel_values=pixels, image_sizes=torch.tensor([[28, 28]]))
        packed = torch.cat(list(packed.pooler_output), dim=0)
        base_view = _reference_features(parts, pixels[:, 0])
    diff = (packed[:16] - base_view).abs().max().item()     # the base view's 16 patch features come first
    print(f"original LLaVA 1.6 -> LLaVA-NeXT: base-view image features max |diff| {diff:.2e}")
    assert diff < TOL
    ids = torch.tensor([[1, 5, 9, 17, 33, 40, 7]])
    lm = transformers.LlamaForCausalLM.from_pretrained(parts[0] / "vicuna", dtype=torch.float32).eval()
    with torch.no_grad():
        text_diff = (model(input_ids=ids).logits[..., :VOCAB] - lm(input_ids=ids).logits).abs().max().item()
    assert text_diff < TOL
    processor = transformers.AutoProcessor.from_pretrained(out)
    assert type(processor).__name__ == "LlavaNextProcessor"


def _reference_features(parts, pixels):
    work, proj = parts
    clip = transformers.CLIPVisionModel.from_pretrained(work / "clip").eval()
    with torch.no_grad():
        return proj(clip(pixel_values=pixels, output_hidden_states=True).hidden_states[-2][:, 1:])[0]


def test_original_llava_without_a_tower_or_vision(parts, tmp_path, capsys):
    src = _write_original(parts, "llava-no-tower")
    capsys.readouterr()
    assert main(["convert", str(src), str(tmp_path / "out"), "--to", "hf"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "openai/clip-vit-large-patch14-336" in err and "--vision" in err
    assert not (tmp_path / "out").exists()
