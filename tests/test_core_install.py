"""The plain install (no torch, transformers, open_clip or timm) converts, extracts and merges, and
every command that needs a framework says in one line which extra installs it.

CI cannot pip install, so the missing frameworks are simulated: each command runs in a fresh
interpreter whose ``sys.meta_path`` starts with a finder that refuses the frameworks the way an
absent package does (``ModuleNotFoundError`` with ``name`` set, ``find_spec`` finding nothing).
The same check on a real fresh venv is in the README's Development section.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "fixtures"
BLOCKED = ("torch", "transformers", "open_clip", "timm")
EXTRA = "pip install 'clawconvert[verify]'"

BLOCKER = """
import importlib.abc, json, sys

class NotInstalled(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in %r:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, NotInstalled())
argv = json.loads(sys.argv[1])
if argv[0] == "--bare-import":   # the safety net: an import site without its need() line
    import clawconvert.commands.inspect as inspect_cmd
    def run(args):
        import torch  # noqa: F401
    inspect_cmd.run = run
    argv = argv[1:]
from clawconvert.cli import main
code = main(argv)
leaked = sorted({m.split(".")[0] for m in sys.modules} & set(%r))
print(json.dumps([code, leaked]))
""" % (BLOCKED, BLOCKED)


def without_frameworks(*argv) -> tuple[int, str, str]:
    """Run ``clawconvert ARGV`` where the frameworks cannot be imported: (exit code, stdout, stderr)."""
    res = subprocess.run([sys.executable, "-c", BLOCKER, json.dumps([str(a) for a in argv])],
                         capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    *out, last = res.stdout.strip().splitlines()
    code, leaked = json.loads(last)
    assert leaked == [], f"imported {leaked} although they are not installed"
    return code, "\n".join(out), res.stderr


def assert_names_the_extra(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("clawconvert: error: ") and lines[0].endswith(EXTRA), lines[0]
    for n in needles:
        assert n in lines[0], (n, lines[0])


def tensors(path: Path) -> dict[str, np.ndarray]:
    with safe_open(str(path), framework="numpy") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def test_fixture_converts_both_ways_bit_exact(tmp_path):
    code, out, err = without_frameworks("convert", FIX / "openclip_tiny", tmp_path / "hf", "--to", "hf")
    assert code == 0, err
    assert "no tokenizer files written" in out and EXTRA in out   # the BPE vocabulary ships with open_clip
    code, _, err = without_frameworks("convert", tmp_path / "hf", tmp_path / "oc", "--to", "openclip")
    assert code == 0, err
    src = tensors(FIX / "openclip_tiny" / "open_clip_model.safetensors")
    back = tensors(tmp_path / "oc" / "open_clip_model.safetensors")
    assert sorted(src) == sorted(back)
    for k, v in src.items():
        assert back[k].dtype == v.dtype and back[k].tobytes() == v.tobytes(), k


@pytest.mark.parametrize("argv, needles", [
    (["convert", FIX / "openclip_tiny", "{out}/hf", "--to", "hf", "--verify"],
     ["--verify needs torch, open_clip_torch and transformers"]),
    (["verify", FIX / "openclip_tiny", FIX / "openclip_tiny"], ["--verify needs torch and open_clip_torch"]),
    (["extract-visual", FIX / "openclip_tiny", "{out}/timm", "--to", "timm"], ["--to timm needs torch and timm"]),
    (["extract-visual", FIX / "openclip_tiny", "{out}/v", "--verify"], ["--verify needs"]),
    (["convert", FIX / "openclip_tiny" / "open_clip_model.safetensors", "{out}/hf", "--to", "hf",
      "--model-name", "ViT-B-32"], ["open_clip's built-in model configs", "open_clip_torch"]),
    (["--bare-import", "inspect", FIX / "openclip_tiny"], ["clawconvert inspect needs torch"]),
], ids=["convert-verify", "verify", "extract-timm", "extract-verify", "model-name", "safety-net"])
def test_a_missing_framework_is_one_line_naming_the_extra(argv, needles, tmp_path):
    code, _, err = without_frameworks(*[str(a).replace("{out}", str(tmp_path)) for a in argv])
    assert_names_the_extra(code, err, *needles)
    assert not any(p.name != "model.bin" for p in tmp_path.iterdir()), "nothing may be written"


def test_pickle_source_names_the_extra(tmp_path):
    import torch
    torch.save({"visual.proj": torch.zeros(2, 2)}, tmp_path / "model.bin")
    code, _, err = without_frameworks("inspect", tmp_path / "model.bin", "--model-config",
                                      FIX / "openclip_tiny" / "open_clip_config.json")
    assert_names_the_extra(code, err, "reading the torch pickle model.bin needs torch")


@pytest.fixture(scope="module")
def lora(tmp_path_factory):
    sys.path.insert(0, str(Path(__file__).parent))
    from test_merge_lora import make_adapter, make_base
    work = tmp_path_factory.mktemp("core-merge")
    base = make_base(work / "base", "llama")
    return base, make_adapter(base, work / "adapter", target_modules=["q_proj", "v_proj"])


def test_merge_lora_runs_without_frameworks(lora, tmp_path):
    base, adapter = lora
    code, out, err = without_frameworks("merge-lora", base, adapter, tmp_path / "merged")
    assert code == 0, err
    assert (tmp_path / "merged" / "model.safetensors").is_file()


def test_merge_lora_paths_that_need_transformers_name_the_extra(lora, tmp_path):
    base, adapter = lora
    code, _, err = without_frameworks("merge-lora", base, adapter, tmp_path / "llava", "--vision", FIX / "openclip_tiny")
    assert_names_the_extra(code, err, "--vision (LLaVA assembly")
    odd = tmp_path / "odd-base"   # a model type outside merge-lora's table of tie defaults
    odd.mkdir()
    for f in base.iterdir():
        (odd / f.name).write_bytes(f.read_bytes())
    config = json.loads((odd / "config.json").read_text())
    config.pop("tie_word_embeddings", None)
    (odd / "config.json").write_text(json.dumps({**config, "model_type": "cohere"}))
    code, _, err = without_frameworks("merge-lora", odd, adapter, tmp_path / "merged")
    assert_names_the_extra(code, err, "model type 'cohere' needs transformers")
