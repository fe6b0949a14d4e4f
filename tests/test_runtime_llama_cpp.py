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

import math
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.skipif(os.environ.get("CLAWCONVERT_SLOW") != "1", reason="slow: set CLAWCONVERT_SLOW=1")

transformers = pytest.importorskip("transformers")
import runtime_models as rm  # noqa: E402

import clawconvert  # noqa: E402

VERSION = os.environ.get("LLAMA_CPP_PYTHON_VERSION", "0.3.36")
ROOT = Path(os.environ.get("CLAWCONVERT_RUNTIMES", Path.home() / ".cache/clawconvert-runtimes")) / f"llama.cpp-{VERSION}"
EMBED_TOL = 1e-3          # image embeddings, f32 GGUF (llama.cpp's GELU is the tanh form; HF's projector uses erf)
LOGIT_TOL = 5e-3          # first-token logits after 16 image tokens and a prompt
N_GREEDY = 8
# on CPUs with AMX, llama.cpp 0.3.36's AMX q8_0 matmul crashes (ggml-org/llama.cpp#20824): the q8_0 run turns
# weight repacking off there, as llama.cpp's own tools do with -nr / LLAMA_ARG_REPACK=0
AMX = "amx_int8" in Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else False
PROMPTS = {"llama": "USER: <__media__>\ndescribe the image\nASSISTANT:",            # the built-in templates' forms
           "qwen2": "<|im_start|>user\n<__media__>describe the image<|im_end|>\n<|im_start|>assistant\n"}


def tool(build: str, name: str) -> str:
    path = ROOT / build / "bin" / name
    if not path.is_file():
        pytest.fail(f"{path} missing: run tools/build_llama_cpp.sh first (about 15 minutes)")
    return str(path)


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


def rainbow(n: int) -> torch.Tensor:
    """llama-mtmd-debug's "rainbow" image (tools/mtmd/debug/mtmd-debug.md), as raw pixel values."""
    img = torch.zeros(1, 3, n, n)
    c = n / 2.0
    far = math.sqrt(2 * c * c)
    for y in range(n):
        for x in range(n):
            dx, dy = x - c, y - c
            hue = math.atan2(dy, dx) / (2 * math.pi) % 1.0
            sat = min(math.sqrt(dx * dx + dy * dy) / far, 1.0)
            i6, f = int(hue * 6), hue * 6 - int(hue * 6)
            p, q, t = 1 - sat, 1 - sat * f, 1 - sat * (1 - f)
            img[0, :, y, x] = torch.tensor([(1, t, p), (q, 1, p), (p, 1, t), (p, q, 1), (t, p, 1), (1, p, q)][i6 % 6])
    return img


def llama_embeddings(build: str, out: Path, size: int, dump: Path) -> np.ndarray:
    r = subprocess.run([tool(build, "llama-mtmd-debug"), "-m", str(out / "model-f32.gguf"), "--mmproj",
                        str(out / "mmproj-f32.gguf"), "-p", "encode", "-n", str(size), "--image", "rainbow"],
                       env={**os.environ, "MTMD_DEBUG_EMBEDDINGS": str(dump)}, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    n_tokens, n_embd = np.fromfile(dump, dtype=np.int32, count=2)
    return np.fromfile(dump, dtype=np.float32, offset=8).reshape(n_tokens, n_embd)


def hf_image_features(model, pixels: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        out = model.get_image_features(pixel_values=pixels)
    out = getattr(out, "pooler_output", out)
    out = torch.cat(list(out)) if isinstance(out, (list, tuple)) else out
    return out.reshape(-1, out.shape[-1]).numpy()


def probe(build: str, out: Path, rgb: Path, size: int, prompt: str, logits: Path) -> tuple[list, list[int]]:
    r = subprocess.run([tool(build, "clawconvert-llama-probe"), str(out / "model-f32.gguf"), str(out / "mmproj-f32.gguf"),
                        str(rgb), str(size), str(size), prompt, str(N_GREEDY), str(logits)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    chunks, greedy = [], []
    for line in r.stdout.splitlines():
        kind, *rest = line.split()
        if kind == "greedy":
            greedy = [int(x) for x in rest]
        else:
            chunks.append((kind, [int(x) for x in rest]))
    return chunks, greedy


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))))


def test_image_embeddings_match_transformers(llava, work):
    kind, lm, src, out = llava
    model = transformers.LlavaForConditionalGeneration.from_pretrained(src).eval()
    size = model.config.vision_config.image_size
    ref = hf_image_features(model, rainbow(size))
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
        ids: list[int] = []
        for what, values in chunks:
            ids += values if what == "text" else [model.config.image_token_index] * values[0]
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
    from PIL import Image
    kind, lm, src, out = llava
    image = work / f"image-{kind}-{lm}.png"
    Image.fromarray((np.random.RandomState(1).rand(32, 32, 3) * 255).astype(np.uint8)).save(image)
    for jinja in ([], ["--jinja"]):
        r = subprocess.run([tool("cls-fix", "llama-mtmd-cli"), "-m", str(out / "model-f32.gguf"), "--mmproj",
                            str(out / "mmproj-f32.gguf"), "--image", str(image), "-p", "describe the image",
                            "-n", "4", "--temp", "0", *jinja], capture_output=True, encoding="utf-8",
                           errors="replace", stdin=subprocess.DEVNULL, timeout=120)
        # exit 0 is the check (an unsupported chat template, a file it cannot load or a crash exit non-zero);
        # not the printed text: llama.cpp's logger is a worker thread it never joins, so its last lines can be
        # lost at exit (common/log.cpp, ggml-org/llama.cpp#22142; seen here under load). Tokens and
        # embeddings: the tests above
        assert r.returncode == 0, (jinja, r.stderr[-2000:])


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
    r = subprocess.run([tool("cls-fix", "clawconvert-llama-probe"), str(out / f"model-{outtype}.gguf"),
                        str(out / f"mmproj-{outtype}.gguf"), str(rgb), "32", "32", PROMPTS["llama"], str(N_GREEDY),
                        str(work / f"logits-{outtype}.bin")], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "LLAMA_ARG_REPACK": "0"} if AMX else None)
    assert r.returncode == 0, r.stderr[-2000:]
    ids, greedy = [], []
    for line in r.stdout.splitlines():
        kind, *rest = line.split()
        values = [int(x) for x in rest]
        if kind == "greedy":
            greedy = values
        else:
            ids += values if kind == "text" else [model.config.image_token_index] * values[0]
    pixel_values = processor.image_processor(images=Image.fromarray(pixels), return_tensors="pt").pixel_values
    with torch.no_grad():
        ref = model(input_ids=torch.tensor([ids]), pixel_values=pixel_values).logits[0, -1].numpy()
        ref_greedy = model.generate(input_ids=torch.tensor([ids]), pixel_values=pixel_values, max_new_tokens=N_GREEDY,
                                    do_sample=False)[0, len(ids):].tolist()
    diff = float(np.abs(np.fromfile(work / f"logits-{outtype}.bin", dtype=np.float32) - ref).max())
    print(f"clip-llama LLaVA {outtype}, llama.cpp {VERSION} cls-fix{' (AMX CPU: repacking off)' if AMX else ''}: "
          f"first-token logits max |diff| {diff:.3g} "
          f"(max |logit| {np.abs(ref).max():.3g}); greedy {greedy} vs transformers {ref_greedy}")
    assert diff <= tol and greedy == ref_greedy
