"""llama.cpp's tools as the slow tests run them (built by tools/build_llama_cpp.sh), shared by
tests/test_runtime_llama_cpp.py (LLaVA) and tests/test_runtime_llama_cpp_vlm.py (native VLMs).

* ``llama_embeddings`` runs ``llama-mtmd-debug -p encode --image rainbow`` and reads the image
  embeddings it dumps (MTMD_DEBUG_EMBEDDINGS=<file>); ``rainbow`` is that image as raw pixels;
* ``probe`` runs ``clawconvert-llama-probe`` (tools/llama_probe.cpp) and parses its prompt chunks
  and greedy tokens; ``prompt_ids`` turns the chunks into the ids transformers runs;
* ``mtmd_cli`` runs the user-facing ``llama-mtmd-cli`` on a pair and checks it encoded the image.
"""
from __future__ import annotations

import math
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

VERSION = os.environ.get("LLAMA_CPP_PYTHON_VERSION", "0.3.36")
RUNTIMES = Path(os.environ.get("CLAWCONVERT_RUNTIMES", Path.home() / ".cache/clawconvert-runtimes"))
ROOT = RUNTIMES / f"llama.cpp-{VERSION}"
N_GREEDY = 8
# on CPUs with AMX, llama.cpp 0.3.36's AMX q8_0 matmul crashes (ggml-org/llama.cpp#20824): q8_0 runs turn
# weight repacking off there, as llama.cpp's own tools do with -nr / LLAMA_ARG_REPACK=0
AMX = "amx_int8" in Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else False
Chunks = list[tuple[str, list[int]]]


def tool(build: str, name: str) -> str:
    path = ROOT / build / "bin" / name
    if not path.is_file():
        pytest.fail(f"{path} missing: run tools/build_llama_cpp.sh first (about 15 minutes)")
    return str(path)


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
    return read_embeddings(dump)


def hf_image_features(model, **inputs: torch.Tensor) -> np.ndarray:
    """``model.get_image_features(**inputs)`` as one (tokens, width) array, whatever container it comes in.

    Qwen3-VL's deepstack features (one per deepstack merger, in vision-layer order) go beside the merger's
    along the width, as clip.cpp's qwen3vl graph concatenates them and its embedding dump holds them."""
    with torch.no_grad():
        out = model.get_image_features(**inputs)
    parts = [getattr(out, "pooler_output", out)] + list(getattr(out, "deepstack_features", None) or [])
    return np.concatenate([_rows(p) for p in parts], axis=-1)


def _rows(features) -> np.ndarray:
    """One (tokens, width) array from a tensor or a per-image list of them."""
    out = torch.cat([t.reshape(-1, t.shape[-1]) for t in features]) if isinstance(features, (list, tuple)) else features
    return out.reshape(-1, out.shape[-1]).numpy()


def probe(build: str, out: Path, rgb: Path, size: int, prompt: str, logits: Path,
          outtype: str = "f32", height: int | None = None, dump: Path | None = None) -> tuple[Chunks, list[int]]:
    """Run the probe on the ``outtype`` pair and an RGB file ``size`` wide (and high, unless ``height``); return
    its chunks ("text", ids) / ("image", [n_tokens]) and greedy ids.  q8_0 runs with weight repacking off on AMX
    CPUs (see AMX).  ``dump``: clip.cpp writes each encoded image's embeddings there, the last one remains."""
    env = {**os.environ, **({"LLAMA_ARG_REPACK": "0"} if AMX and outtype == "q8_0" else {}),
           **({"MTMD_DEBUG_EMBEDDINGS": str(dump)} if dump else {})}
    r = subprocess.run([tool(build, "clawconvert-llama-probe"), str(out / f"model-{outtype}.gguf"),
                        str(out / f"mmproj-{outtype}.gguf"), str(rgb), str(size), str(height or size), prompt,
                        str(N_GREEDY), str(logits)], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    chunks, greedy = [], []
    for line in r.stdout.splitlines():
        kind, *rest = line.split()
        if kind == "greedy":
            greedy = [int(x) for x in rest]
        else:
            chunks.append((kind, [int(x) for x in rest]))
    return chunks, greedy


def prompt_ids(chunks: Chunks, image_token: int) -> list[int]:
    """The probe's prompt as transformers takes it: each image chunk becomes its number of image tokens."""
    ids: list[int] = []
    for what, values in chunks:
        ids += values if what == "text" else [image_token] * values[0]
    return ids


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))))


def read_embeddings(dump: Path) -> np.ndarray:
    """clip.cpp's MTMD_DEBUG_EMBEDDINGS file: int32 n_tokens, int32 n_embd, then float32 rows."""
    n_tokens, n_embd = np.fromfile(dump, dtype=np.int32, count=2)
    return np.fromfile(dump, dtype=np.float32, offset=8).reshape(n_tokens, n_embd)


def mtmd_cli(build: str, out: Path, image: Path) -> None:
    """``llama-mtmd-cli`` on the f32 pair and a random 32x32 PNG (written to ``image``), with the chat template
    matched to a llama.cpp built-in and with ``--jinja``: each run exits 0 (an unsupported template, a file it
    cannot load or a crash do not) and encodes the image.  The encoding is read from the embeddings clip.cpp
    dumps (MTMD_DEBUG_EMBEDDINGS), not from the log: the CLI's logger is a worker thread it never joins, which
    loses the last lines at exit (common/log.cpp, ggml-org/llama.cpp#22142) when a tiny model finishes within
    milliseconds."""
    from PIL import Image

    Image.fromarray((np.random.RandomState(1).rand(32, 32, 3) * 255).astype(np.uint8)).save(image)
    dump = image.with_suffix(".emb")
    for jinja in ([], ["--jinja"]):
        dump.unlink(missing_ok=True)
        r = subprocess.run([tool(build, "llama-mtmd-cli"), "-m", str(out / "model-f32.gguf"), "--mmproj",
                            str(out / "mmproj-f32.gguf"), "--image", str(image), "-p", "describe the image",
                            "-n", "4", "--temp", "0", *jinja], env={**os.environ, "MTMD_DEBUG_EMBEDDINGS": str(dump)},
                           capture_output=True, encoding="utf-8", errors="replace", stdin=subprocess.DEVNULL,
                           timeout=120)
        assert r.returncode == 0, (jinja, r.stderr[-2000:])
        assert dump.is_file(), (jinja, f"llama-mtmd-cli encoded no image: {r.stderr[-2000:]}")
        emb = read_embeddings(dump)
        assert emb.size and np.isfinite(emb).all() and np.abs(emb).max() > 0
