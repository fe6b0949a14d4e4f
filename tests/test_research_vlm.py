"""Research-code VLMs: the VLM-learning tutorial's training output becomes a runnable HF LLaVA.

Ground truth is ``../shared/fixtures/vlm_learning`` (see its README): a tiny Qwen-1 base, a tiny
CLIP, the trainer's ``checkpoint-1/`` (adapter_model.bin, other_params.bin, training_args.bin)
and ``io.npz``, the logits the tutorial's own code computed (LoRA active, image spliced in; also
text-only and without the LoRA).  Every comparison here is against those arrays or against
tiktoken itself, never against clawconvert's own output.  The fixture (50 MB) is read where CI
has it, beside the checkout, rather than copied into the repository.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from clawconvert.cli import main  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = next((p for p in (ROOT / "fixtures" / "vlm_learning", ROOT.parent / "shared" / "fixtures" / "vlm_learning")
                if (p / "io.npz").is_file()), None)
if FIXTURE is None:
    pytest.fail("the VLM-learning ground truth (../shared/fixtures/vlm_learning) is missing", pytrace=False)
TOL = 1e-5


@pytest.fixture(scope="module")
def io():
    return dict(np.load(FIXTURE / "io.npz"))


def _tiktoken_file() -> Path:
    """qwen.tiktoken as the dashscope wheel ships it (the file the fixture's ids were made with)."""
    from importlib.resources import files
    return Path(str(files("dashscope") / "resources" / "qwen.tiktoken"))


def _load(cls, path):
    model, info = cls.from_pretrained(path, output_loading_info=True, dtype=torch.float32)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return model.eval()


@pytest.fixture(scope="module")
def llava_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("tutorial") / "llava"
    before = {p: p.read_bytes() for p in (FIXTURE / "checkpoint-1").iterdir()}
    assert main(["merge-lora", str(FIXTURE / "qwen_base"), str(FIXTURE / "checkpoint-1"), str(out),
                 "--vision", str(FIXTURE / "clip_base")]) == 0
    assert {p: p.read_bytes() for p in (FIXTURE / "checkpoint-1").iterdir()} == before
    return out


def test_tutorial_checkpoint_is_a_llava_with_the_original_logits(llava_out, io):
    """One command, the connector found as checkpoint-1/other_params.bin; the tutorial's forward
    (last CLIP layer, CLS dropped, exact GELU projector, <|extra_0|> expanded to 256 patches)."""
    config = json.loads((llava_out / "config.json").read_text())
    assert config["image_token_index"] == int(io["replace_token_id"]) == 151646
    assert config["vision_feature_layer"] == -1 and config["vision_feature_select_strategy"] == "default"
    assert config["projector_hidden_act"] == "gelu" and config["text_config"]["model_type"] == "qwen2"
    manifest = json.loads((llava_out / "clawconvert_manifest.json").read_text())
    assert manifest["merge"]["llava"]["connector"]["origin"].endswith("other_params.bin")
    assert any("training_args.bin" in n for n in manifest["notes"])
    model = _load(transformers.LlavaForConditionalGeneration, llava_out)
    cols = torch.tensor(io["logits_vocab_ids"])
    with torch.no_grad():
        got = model(input_ids=torch.tensor(io["input_ids_expanded"]),
                    pixel_values=torch.tensor(io["pixel_values"])).logits
        text = model(input_ids=torch.tensor(io["input_ids_text_only"])).logits
    image_diff = (got[..., cols] - torch.tensor(io["logits"])).abs().max().item()
    last_diff = (got[:, -1] - torch.tensor(io["logits_last_full"])).abs().max().item()
    text_diff = (text[..., cols] - torch.tensor(io["logits_text_only"])).abs().max().item()
    lora_effect = np.abs(io["logits"] - io["logits_base_no_lora"]).max()
    print(f"tutorial -> HF LLaVA: image+LoRA logits {image_diff:.2e} (last row, all {got.shape[-1]} columns: "
          f"{last_diff:.2e}), text-only {text_diff:.2e}; the LoRA moves them by {lora_effect:.2f}")
    assert lora_effect > 0.1
    assert max(image_diff, last_diff, text_diff) < TOL


def test_without_qwen_tiktoken_the_output_says_what_is_missing(llava_out):
    manifest = json.loads((llava_out / "clawconvert_manifest.json").read_text())
    assert any("has no qwen.tiktoken" in n for n in manifest["notes"])
    assert not (llava_out / "tokenizer.json").exists()


@pytest.fixture(scope="module")
def qwen_with_tiktoken(tmp_path_factory):
    base = tmp_path_factory.mktemp("qwen-tok") / "qwen_base"
    shutil.copytree(FIXTURE / "qwen_base", base)
    shutil.copyfile(_tiktoken_file(), base / "qwen.tiktoken")
    return base


def test_tokenizer_from_qwen_tiktoken_is_the_tutorials(qwen_with_tiktoken, io, tmp_path):
    out = tmp_path / "llava"
    assert main(["merge-lora", str(qwen_with_tiktoken), str(FIXTURE / "checkpoint-1"), str(out),
                 "--vision", str(FIXTURE / "clip_base")]) == 0
    processor = transformers.AutoProcessor.from_pretrained(out)
    raw = str(io["raw_text"])
    assert processor.tokenizer(raw, add_special_tokens=False).input_ids == io["input_ids"][0].tolist()
    from PIL import Image
    image = Image.fromarray(np.zeros((224, 224, 3), np.uint8))
    ids = processor(text=raw, images=image, return_tensors="np")["input_ids"]
    assert ids.tolist() == io["input_ids_expanded"].tolist()      # <|extra_0|> -> 256 image tokens


def test_tokenizer_equals_tiktoken_token_for_token(qwen_with_tiktoken, tmp_path):
    import base64
    import random
    import unicodedata

    tiktoken = pytest.importorskip("tiktoken")
    from clawconvert.architectures import load_architecture
    out = tmp_path / "qwen2"
    assert main(["convert", str(qwen_with_tiktoken), str(out), "--to", "hf"]) == 0
    tok = transformers.AutoTokenizer.from_pretrained(out)
    spec = load_architecture("qwen").tokenizer
    ranks = {base64.b64decode(t): int(r) for t, r in
             (line.split() for line in _tiktoken_file().read_bytes().splitlines() if line)}
    names = spec["special_tokens"] + [f"<|extra_{i}|>" for i in range(205)]
    enc = tiktoken.Encoding("qwen", pat_str=spec["pattern"], mergeable_ranks=ranks,
                            special_tokens={t: 151643 + i for i, t in enumerate(names)})
    rng = random.Random(0)
    alphabet = [chr(c) for c in [*range(32, 127), *range(0x4E00, 0x4E60), *range(0x3040, 0x30A0),
                                 *range(0x400, 0x450), 0x1F600, 0xA0, 0x3000, 9, 10, 13]]
    texts = ["Hello world!  It's 2024... naïve café", "def f(x):\n    return x**2  # c\n\n", "这副图像描述了什么？",
             "<|im_start|>user\nhi<|im_end|>\n", "12345678901234567890 3.14", "ǅ ﬁ ① Ⅻ e\u0301"]
    texts += ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 50))) for _ in range(500)]
    for text in texts:
        assert tok(text, add_special_tokens=False).input_ids == \
            enc.encode(unicodedata.normalize("NFC", text), allowed_special="all"), repr(text)


def test_qwen1_llm_alone_converts_to_qwen2(io, tmp_path):
    out = tmp_path / "qwen2"
    assert main(["convert", str(FIXTURE / "qwen_base"), str(out), "--to", "hf"]) == 0
    model = _load(transformers.Qwen2ForCausalLM, out)
    cols = torch.tensor(io["logits_vocab_ids"])
    with torch.no_grad():        # the tutorial's spliced input (the LoRA does not touch the embeddings)
        got = model(inputs_embeds=torch.tensor(io["inputs_embeds_spliced"])).logits
    diff = (got[..., cols] - torch.tensor(io["logits_base_no_lora"])).abs().max().item()
    print(f"Qwen-1 -> Qwen2ForCausalLM, no LoRA: logits max |diff| {diff:.2e}")
    assert diff < TOL


def test_qwen1_merge_without_vision_is_a_qwen2_causal_lm(io, tmp_path):
    out = tmp_path / "merged"
    assert main(["merge-lora", str(FIXTURE / "qwen_base"), str(FIXTURE / "checkpoint-1"), str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["architectures"] == ["Qwen2ForCausalLM"]
    model = _load(transformers.Qwen2ForCausalLM, out)
    cols = torch.tensor(io["logits_vocab_ids"])
    with torch.no_grad():
        got = model(input_ids=torch.tensor(io["input_ids_text_only"])).logits
    diff = (got[..., cols] - torch.tensor(io["logits_text_only"])).abs().max().item()
    print(f"Qwen-1 + fused c_attn LoRA -> Qwen2ForCausalLM: text-only logits max |diff| {diff:.2e}")
    assert diff < TOL


# ------------------------------------------------------------------------------------
# bad input: one line, exit 2, nothing written
# ------------------------------------------------------------------------------------
def _fails(capsys, *args) -> str:
    capsys.readouterr()
    rc = main(["merge-lora", *map(str, args)])
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert not Path(args[2]).exists() and not list(Path(args[2]).parent.glob(".clawconvert-tmp-*"))
    return err.splitlines()[0]


def test_checkpoint_folder_without_an_adapter(tmp_path, capsys):
    folder = tmp_path / "checkpoint-2"
    folder.mkdir()
    shutil.copyfile(FIXTURE / "checkpoint-1" / "other_params.bin", folder / "other_params.bin")
    line = _fails(capsys, FIXTURE / "qwen_base", folder, tmp_path / "out", "--vision", FIXTURE / "clip_base")
    assert "no adapter_config.json" in line


def test_connector_that_contradicts_the_widths(tmp_path, capsys):
    folder = tmp_path / "checkpoint-wide"
    shutil.copytree(FIXTURE / "checkpoint-1", folder)
    wide = {k: torch.zeros(32, 64) if k == "0.weight" else v
            for k, v in torch.load(folder / "other_params.bin", weights_only=True).items()}
    torch.save(wide, folder / "other_params.bin")
    line = _fails(capsys, FIXTURE / "qwen_base", folder, tmp_path / "out", "--vision", FIXTURE / "clip_base")
    assert "'0.weight' has shape (32, 64)" in line and "vision width of 48" in line


def test_base_of_another_architecture_than_the_adapter(tmp_path, capsys):
    qwen2 = tmp_path / "qwen2"
    assert main(["convert", str(FIXTURE / "qwen_base"), str(qwen2), "--to", "hf"]) == 0
    line = _fails(capsys, qwen2, FIXTURE / "checkpoint-1", tmp_path / "out")
    assert "targets 'transformer.h.0.attn.c_attn', which BASE does not have" in line
