"""Run in vLLM's own venv (tools/build_vllm_venv.sh) by tests/test_runtime_vllm.py: one model, one prompt.

    python vllm_runner.py MODEL_DIR REQUEST.json RESULT.json

REQUEST: {"prompt": str, "image": path or null, "logprobs": k, and optionally "engine": {extra
``LLM(...)`` arguments, e.g. "limit_mm_per_prompt": {"image": 1, "video": 0} for a family that
also takes video, "mm_processor_kwargs"}}.  The prompt is a string with the family's image
placeholder; vLLM's own processor (the checkpoint's, through transformers) expands it.
RESULT: the prompt's token ids as vLLM tokenized and expanded them, the generated token and the
top-k logprobs of the first generated position ({token id: logprob}).  vLLM runs on the CPU,
eager, in float32.  Only main() imports vLLM, so the project's venv can compile this file.
"""
from __future__ import annotations

import json
import os
import sys


def engine_args(request: dict) -> dict:
    args = dict(enforce_eager=True, dtype="float32", max_model_len=512, max_num_seqs=1, seed=0,
                limit_mm_per_prompt={"image": 1} if request["image"] else None)
    args.update(request.get("engine") or {})
    return args


def main() -> int:
    model_dir, request_file, result_file = sys.argv[1:]
    request = json.loads(open(request_file).read())
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams

    llm = LLM(model=model_dir, **engine_args(request))
    prompt: dict = {"prompt": request["prompt"]}
    if request["image"]:
        from PIL import Image
        prompt["multi_modal_data"] = {"image": Image.open(request["image"]).convert("RGB")}
    params = SamplingParams(max_tokens=1, temperature=0.0, logprobs=request["logprobs"])
    out = llm.generate([prompt], params)[0]
    gen = out.outputs[0]
    first = gen.logprobs[0]
    json.dump({"prompt_token_ids": list(out.prompt_token_ids), "token": gen.token_ids[0],
               "logprobs": {str(t): lp.logprob for t, lp in first.items()}}, open(result_file, "w"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
