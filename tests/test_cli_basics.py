"""Issue 2's bad-input list and packaging: one clear line, exit != 0, nothing written."""
from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import ROOT, assert_one_line_error, tree_hash

FIX = ROOT / "fixtures" / "openclip_tiny"


@pytest.fixture
def src(tmp_path):
    d = tmp_path / "src"
    shutil.copytree(FIX, d)
    return d


def _edit(src: Path, fn) -> None:
    w = load_file(str(src / "open_clip_model.safetensors"))
    fn(w)
    save_file(w, str(src / "open_clip_model.safetensors"))


@pytest.mark.parametrize("case,needles", [
    ("extra", ["unconsumed source tensor", "visual.extra_adapter"]),
    ("missing", ["missing source tensor", "visual.ln_post.bias"]),
    ("shape", ["shape contradicts the config", "visual.proj"]),
    ("truncated", ["truncated"]),
    ("garbage", ["not a safetensors file"]),
])
def test_bad_source_gives_one_line_and_writes_nothing(case, needles, src, tmp_path, cli):
    weights = src / "open_clip_model.safetensors"
    if case == "extra":
        _edit(src, lambda w: w.__setitem__("visual.extra_adapter", torch.zeros(3)))
    elif case == "missing":
        _edit(src, lambda w: w.pop("visual.ln_post.bias"))
    elif case == "shape":
        _edit(src, lambda w: w.__setitem__("visual.proj", torch.zeros(32, 25)))
    elif case == "truncated":
        weights.write_bytes(weights.read_bytes()[:-1000])
    elif case == "garbage":
        weights.write_bytes(b"\x00" * 64)
    before = tree_hash(src)
    r = cli("convert", src, tmp_path / "out", "--to", "hf")
    assert_one_line_error(r, *needles)
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".clawconvert-tmp-*"))
    assert tree_hash(src) == before


def test_missing_path_unknown_format_and_existing_destination(tmp_path, cli):
    assert_one_line_error(cli("convert", tmp_path / "nope", tmp_path / "o", "--to", "hf"), "no such file")
    (tmp_path / "weird.txt").write_text("hello")
    assert_one_line_error(cli("convert", tmp_path / "weird.txt", tmp_path / "o", "--to", "hf"), "cannot tell its format")
    assert_one_line_error(cli("convert", FIX, tmp_path / "o", "--to", "onnx"), "unknown format 'onnx'")
    (tmp_path / "exists").mkdir()
    (tmp_path / "exists" / "keep.txt").write_text("precious")
    assert_one_line_error(cli("convert", FIX, tmp_path / "exists", "--to", "hf"), "already exists", "--overwrite")
    assert (tmp_path / "exists" / "keep.txt").read_text() == "precious"
    assert_one_line_error(cli("convert", FIX, FIX / "inside", "--to", "hf"), "inside")


def test_unsupported_family_is_refused_before_reading(tmp_path, cli):
    save_file({"visual.conv1.weight": torch.zeros(1)}, str(tmp_path / "rn50.safetensors"))
    r = cli("convert", tmp_path / "rn50.safetensors", tmp_path / "o", "--to", "hf", "--model-name", "RN50")
    assert_one_line_error(r, "vision_cfg.layers", "ModifiedResNet")
    r = cli("convert", tmp_path / "rn50.safetensors", tmp_path / "o", "--to", "hf", "--model-name", "ViT-B-33")
    assert_one_line_error(r, "unknown open_clip model name", "ViT-B-32")
    r = cli("convert", tmp_path / "rn50.safetensors", tmp_path / "o", "--to", "hf")
    assert_one_line_error(r, "--model-name")
    assert not (tmp_path / "o").exists()


def test_console_script_and_module_entry_points(tmp_path):
    exe = Path(sys.executable).parent / "clawconvert"
    for cmd in ([str(exe)], [sys.executable, "-m", "clawconvert"]):
        r = subprocess.run(cmd + ["--help"], capture_output=True, text=True)
        assert r.returncode == 0 and "convert" in r.stdout and "inspect" in r.stdout
    r = subprocess.run([str(exe), "convert", str(tmp_path / "missing"), str(tmp_path / "o"), "--to", "hf"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr


def test_wheel_ships_the_mapping_tables(tmp_path):
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                        "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    (wheel,) = tmp_path.glob("clawconvert-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tables = sorted((ROOT / "mappings").rglob("*.yaml"))
    assert any(t.parent.name == "mappings" for t in tables)          # top-level tables too (gguf_*.yaml)
    for table in tables:
        assert f"clawconvert/mappings/{table.relative_to(ROOT / 'mappings').as_posix()}" in names


def test_missing_parent_directories_are_created_and_removed_again_on_failure(tmp_path, cli):
    r = cli("convert", FIX, tmp_path / "out" / "deep" / "hf", "--to", "hf")
    assert r.code == 0, r.err
    assert (tmp_path / "out" / "deep" / "hf" / "model.safetensors").is_file()
    # a failure while writing (here: --verify against a broken tolerance) leaves no new parents behind
    r = cli("convert", FIX, tmp_path / "new" / "deeper" / "hf", "--to", "hf", "--verify", "--tolerance", "-1")
    assert r.code == 1
    assert not (tmp_path / "new").exists()
