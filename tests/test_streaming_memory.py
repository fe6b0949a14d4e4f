"""Streaming is real: converting a full-depth ViT-B/16 (600 MB fp32) costs far less memory than its size.

Peak resident memory is measured by the operating system for a child process
(``os.wait4`` rusage), for the real checkpoint and for the 3 MB fixture; the difference is
what the conversion itself needs beyond importing torch/transformers/open_clip.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import open_clip
import torch

from clawconvert.io.writers import SafetensorsWriter
from conftest import ROOT


def _write_synthetic_openclip(name: str, out: Path) -> int:
    """Stream seeded random tensors of a real open_clip architecture to disk, one at a time."""
    cfg = open_clip.get_model_config(name)
    with torch.device("meta"):
        model = open_clip.model.CLIP(**cfg)
    plan = [(k, tuple(v.shape), torch.float32) for k, v in model.state_dict().items()]
    out.mkdir(parents=True)
    writer = SafetensorsWriter(out, plan, basename="open_clip_model")
    g = torch.Generator().manual_seed(0)
    for k, shape, _ in plan:
        writer.write(k, torch.randn(shape, generator=g) * 0.02)
    writer.close()
    (out / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {}}))
    return writer.total_size


def _peak_rss_mb(args: list[str]) -> float:
    cmd = [sys.executable, *args] if args[0] == "-c" else [sys.executable, "-m", "clawconvert", *args, "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, proc.stderr.read().decode()[-2000:]
    return usage.ru_maxrss / 1024  # kilobytes on Linux


def test_peak_memory_does_not_grow_with_checkpoint_size(tmp_path):
    size = _write_synthetic_openclip("ViT-B-16", tmp_path / "b16")
    assert size > 500e6
    tiny = _peak_rss_mb(["convert", str(ROOT / "fixtures" / "openclip_tiny"), str(tmp_path / "tiny_hf"), "--to", "hf"])
    big = _peak_rss_mb(["convert", str(tmp_path / "b16"), str(tmp_path / "b16_hf"), "--to", "hf"])
    # the instrument must see a whole-model load: read every tensor and keep them all
    opened = ("import clawconvert.api; from clawconvert.io import open_tensors; "
              f"s = open_tensors({str(tmp_path / 'b16')!r})")
    whole = _peak_rss_mb(["-c", opened + "; kept = [s.read(k) for k in s.keys()]"])
    assert whole - _peak_rss_mb(["-c", opened]) > 0.8 * size / 1e6
    extra = big - tiny
    print(f"checkpoint {size / 1e6:.0f} MB: peak RSS {big:.0f} MB vs {tiny:.0f} MB for the fixture (+{extra:.0f} MB)")
    # the largest tensors are the 101 MB token embedding and a 7 MB in_proj: a whole-model
    # load would add >= 600 MB; streaming must stay under a quarter of the checkpoint
    assert extra < 0.25 * size / 1e6
