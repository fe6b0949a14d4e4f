"""Shared test helpers: tiny real models with seeded weights, and an in-process CLI runner."""
from __future__ import annotations

import copy
import hashlib
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "fixtures"
sys.path.insert(0, str(FIXTURES))  # make_fixtures helpers

from make_fixtures import seeded_openclip, write_openclip_dir  # noqa: E402


def shallow(model_cfg: dict, depth: int = 1) -> dict:
    """A built-in config with both towers cut to ``depth`` layers; everything else as is."""
    cfg = copy.deepcopy(model_cfg)
    cfg["vision_cfg"]["layers"] = depth
    cfg["text_cfg"]["layers"] = depth
    return cfg


@pytest.fixture
def make_openclip_dir(tmp_path):
    def make(model_cfg: dict, name: str = "src", seed: int = 0) -> Path:
        out = tmp_path / name
        write_openclip_dir(seeded_openclip(model_cfg, seed), model_cfg, out)
        return out
    return make


class CliResult:
    def __init__(self, code: int, out: str, err: str):
        self.code, self.out, self.err = code, out, err


@pytest.fixture
def cli(capsys):
    """Run ``clawconvert ARGS`` in-process; returns exit code and captured output."""
    from clawconvert.cli import main

    def run(*args: str) -> CliResult:
        code = main([str(a) for a in args])
        cap = capsys.readouterr()
        return CliResult(code, cap.out, cap.err)
    return run


def tree_hash(path: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(Path(path).rglob("*")) if Path(path).is_dir() else [Path(path)]:
        if p.is_file():
            h.update(str(p.relative_to(path) if Path(path).is_dir() else p.name).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def assert_one_line_error(result: CliResult, *needles: str) -> None:
    assert result.code == 2, (result.code, result.err)
    assert "Traceback" not in result.err
    first = result.err.strip().splitlines()[0]
    assert first.startswith("clawconvert: error: "), result.err
    for n in needles:
        assert n in result.err, (n, result.err)


def load_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    """clawconvert's user cache (the CLIP BPE tokenizer files) in a temporary folder, not ~/.cache;
    subprocesses inherit it."""
    import os
    os.environ["CLAWCONVERT_CACHE"] = str(tmp_path_factory.mktemp("clawconvert-cache"))


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
