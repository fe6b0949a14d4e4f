"""llama.cpp runs what export --to gguf writes, and matches transformers (CLAWCONVERT_SLOW=1).

Needs the tools tools/build_llama_cpp.sh builds (about 15 minutes on 2 cores, cached in
$CLAWCONVERT_RUNTIMES, default ~/.cache/clawconvert-runtimes):

* ``llama-mtmd-debug`` encodes llama.cpp's built-in "rainbow" test image (raw pixel values)
  and dumps the image embeddings (MTMD_DEBUG_EMBEDDINGS=<file>); they are compared with
  ``LlavaForConditionalGeneration.get_image_features`` on the same pixel values;
* ``clawconvert-llama-probe`` (tools/llama_probe.cpp, llama.cpp's own libraries) tokenizes a
  prompt with one image as llama-mtmd-cli does, prints the token ids, the first-token logits
  and greedy tokens; transformers runs the same ids and pixels;
* ``llama-mtmd-cli`` runs the pair end to end, with and without ``--jinja``.

Which build: stock llama.cpp puts CLIP's class token after the patches in its LLaVA graph
(ggml-org/llama.cpp#25814), so CLIP LLaVAs are wrong on the stock build (asserted below: if
that assertion fails, a new llama.cpp has the fix) and right on the build with the upstream
fix (PR #25844); SigLIP towers have no class token and match on the stock build.
"""
from __future__ import annotations

import os
import subprocess

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.skipif(os.environ.get("CLAWCONVERT_SLOW") != "1", reason="slow: set CLAWCONVERT_SLOW=1")

transformers = pytest.importorskip("transformers")
import runtime_models as rm  # noqa: E402
from llama_cpp_tools import (AMX, N_GREEDY, VERSION, cosine, hf_image_features, llama_embeddings,  # noqa: E402
                             mtmd_cli, probe, prompt_ids, rainbow, tool)

import clawconvert  # noqa: E402

EMBED_TOL = 1e-3          # image embeddings, f32 GGUF (llama.cpp's GELU is the tanh form; HF's projector uses erf)
LOGIT_TOL = 5e-3          # first-token logits after 16 image tokens and a prompt
PROMPTS = {"llama": "USER: <__media__>\ndescribe the image\nASSISTANT:",            # the built-in templates' forms
           "qwen2": "<|im_start|>user\n<__media__>describe the image<|im_end|>\n<|im_start|>assistant\n"}


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("llama-cpp")


@pytest.fixture(scope="module")
def base(work):
    return rm.llama_base(work / "llama-base")


@pytest.fixture(scope="module", params=[("clip", "llama"), ("siglip", "llama"), ("clip", "qwen2")],
                ids=["clip-llama", "siglip-llama", "clip-qwen2"])
def llava(request, work, base):
    kind, lm = request.param
    src = rm.llava(work / lm, kind, base if lm == "llama" else rm.qwen2_base(work / lm / "qwen2-base"))
    out = work / f"gguf-{kind}-{lm}"
    clawconvert.export(src, out, to="gguf", outtype="f32")
    return kind, lm, src, out


def test_image_embeddings_match_transformers(llava, work):
    kind, lm, src, out = llava
    model = transformers.LlavaForConditionalGeneration.from_pretrained(src).eval()
    size = model.config.vision_config.image_size
    ref = hf_image_features(model, pixel_values=rainbow(size))
    for build in ("stock", "cls-fix"):
        emb = llama_embeddings(build, out, size, work / f"emb-{kind}-{lm}-{build}.bin")
        assert emb.shape == ref.shape
        diff, cos = float(np.abs(emb - ref).max()), cosine(emb, ref)
        print(f"{kind}-{lm} LLaVA, llama.cpp {VERSION} {build}: image embeddings max |diff| {diff:.3g}, "
              f"mean cosine {cos:.6f} vs transformers get_image_features ({emb.shape[0]} tokens x {emb.shape[1]})")
        if kind == "clip" and build == "stock":
            assert cos < 0.99, "stock llama.cpp now orders the CLIP class token right: the patched build is not needed"
        else:
            assert diff <= EMBED_TOL


def test_logits_and_greedy_tokens_match_transformers(llava, work):
    from PIL import Image
    kind, lm, src, out = llava
    model = transformers.LlavaForConditionalGeneration.from_pretrained(src).eval()
    processor = transformers.AutoProcessor.from_pretrained(src)
    size = model.config.vision_config.image_size
    pixels = (np.random.RandomState(0).rand(size, size, 3) * 255).astype(np.uint8)
    rgb = work / f"image-{kind}-{lm}.rgb"
    pixels.tofile(rgb)
    pixel_values = processor.image_processor(images=Image.fromarray(pixels), return_tensors="pt").pixel_values
    for build in ("stock", "cls-fix"):
        logits_file = work / f"logits-{kind}-{lm}-{build}.bin"
        chunks, greedy = probe(build, out, rgb, size, PROMPTS[lm], logits_file)
        assert [c[0] for c in chunks] == ["text", "image", "text"]
        ids = prompt_ids(chunks, model.config.image_token_index)
        assert chunks[1][1] == [model.config.image_seq_length]
        if lm == "llama":   # llama.cpp's SentencePiece tokens of the text before the image are transformers' (+ BOS)
            assert chunks[0][1] == [1] + processor.tokenizer("USER:", add_special_tokens=False).input_ids \
                + processor.tokenizer.convert_tokens_to_ids(["▁"])
        else:               # byte-level BPE, specials parsed
            assert chunks[0][1] == processor.tokenizer("<|im_start|>user\n", add_special_tokens=False).input_ids
        input_ids = torch.tensor([ids])
        with torch.no_grad():
            ref_logits = model(input_ids=input_ids, pixel_values=pixel_values).logits[0, -1].numpy()
            ref_greedy = model.generate(input_ids=input_ids, pixel_values=pixel_values, max_new_tokens=N_GREEDY,
                                        do_sample=False)[0, input_ids.shape[1]:].tolist()
        logits = np.fromfile(logits_file, dtype=np.float32)
        diff = float(np.abs(logits - ref_logits).max())
        print(f"{kind}-{lm} LLaVA, llama.cpp {VERSION} {build}: first-token logits max |diff| {diff:.3g} "
              f"({len(ids)} prompt tokens); greedy {greedy} vs transformers {ref_greedy}")
        if kind == "clip" and build == "stock":
            assert diff > 10 * LOGIT_TOL        # the class-token bug reaches the logits
        else:
            assert diff <= LOGIT_TOL
            assert greedy == ref_greedy


def test_plain_language_model_matches_transformers(work, base):
    merged = rm.merged(work, base, "llama-merged")
    out = work / "gguf-llama"
    clawconvert.export(merged, out, to="gguf", outtype="f32")
    prompt = "describe the image of a cat"
    r = subprocess.run([tool("stock", "clawconvert-llama-probe"), str(out / "model-f32.gguf"), "-", "-", "0", "0",
                        prompt, str(N_GREEDY), str(work / "logits-llama.bin")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = dict(line.split(" ", 1) for line in r.stdout.splitlines())
    ids = [int(x) for x in lines["text"].split()]
    tokenizer = transformers.AutoTokenizer.from_pretrained(merged)
    assert ids == [1] + tokenizer(prompt, add_special_tokens=False).input_ids      # same SentencePiece tokens
    model = transformers.AutoModelForCausalLM.from_pretrained(merged).eval()
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0, -1].numpy()
        ref_greedy = model.generate(torch.tensor([ids]), max_new_tokens=N_GREEDY, do_sample=False)[0, len(ids):].tolist()
    diff = float(np.abs(np.fromfile(work / "logits-llama.bin", dtype=np.float32) - ref).max())
    greedy = [int(x) for x in lines["greedy"].split()]
    print(f"llama (merge-lora), llama.cpp {VERSION}: first-token logits max |diff| {diff:.3g}; greedy {greedy} "
          f"vs transformers {ref_greedy}")
    assert diff <= LOGIT_TOL and greedy == ref_greedy


def test_llama_mtmd_cli_runs_the_pair(llava, work):
    """The user-facing command, with the chat template matched to a llama.cpp built-in and with --jinja."""
    kind, lm, src, out = llava
    mtmd_cli("cls-fix", out, work / f"image-{kind}-{lm}.png")


@pytest.mark.parametrize("outtype, tol", [("f16", 1e-2), ("q8_0", 1e-1)])
def test_f16_and_q8_0_files_run(outtype, tol, work, base):
    """The smaller types on the fixed build: logits within the type's rounding (|logits| ~ 2 here), same greedy tokens."""
    from PIL import Image
    src = rm.llava(work / f"types-{outtype}", "clip", base)
    out = work / f"gguf-{outtype}"
    clawconvert.export(src, out, to="gguf", outtype=outtype)
    model = transformers.LlavaForConditionalGeneration.from_pretrained(src).eval()
    processor = transformers.AutoProcessor.from_pretrained(src)
    pixels = (np.random.RandomState(0).rand(32, 32, 3) * 255).astype(np.uint8)
    rgb = work / f"image-{outtype}.rgb"
    pixels.tofile(rgb)
    chunks, greedy = probe("cls-fix", out, rgb, 32, PROMPTS["llama"], work / f"logits-{outtype}.bin", outtype)
    ids = torch.tensor([prompt_ids(chunks, model.config.image_token_index)])
    pixel_values = processor.image_processor(images=Image.fromarray(pixels), return_tensors="pt").pixel_values
    with torch.no_grad():
        ref = model(input_ids=ids, pixel_values=pixel_values).logits[0, -1].numpy()
        ref_greedy = model.generate(input_ids=ids, pixel_values=pixel_values, max_new_tokens=N_GREEDY,
                                    do_sample=False)[0, ids.shape[1]:].tolist()
    diff = float(np.abs(np.fromfile(work / f"logits-{outtype}.bin", dtype=np.float32) - ref).max())
    repack = " (AMX CPU: repacking off)" if AMX and outtype == "q8_0" else ""
    print(f"clip-llama LLaVA {outtype}, llama.cpp {VERSION} cls-fix{repack}: first-token logits max |diff| {diff:.3g} "
          f"(max |logit| {np.abs(ref).max():.3g}); greedy {greedy} vs transformers {ref_greedy}")
    assert diff <= tol and greedy == ref_greedy
