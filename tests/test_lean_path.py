"""The conversion path runs on numpy: no torch, transformers, open_clip or timm import.

Importing torch alone costs ~3 s and ~650 MiB; a conversion that only moves bytes must not
pay it (issue 5's start-up floor).  Each command runs in a fresh interpreter and reports
which frameworks ended up in ``sys.modules``.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "fixtures"
FRAMEWORKS = ("torch", "transformers", "open_clip", "timm", "jax", "peft")

RUN = """
import json, sys
from clawconvert.cli import main
code = main(json.loads(sys.argv[1]))
print(json.dumps([code, sorted({m.split('.')[0] for m in sys.modules if m.split('.')[0] in %r and sys.modules[m] is not None})]))
""" % (FRAMEWORKS,)


@pytest.fixture(scope="module")
def b16_npz(tmp_path_factory) -> Path:
    """A big_vision SigLIP B/16 .npz (fp16, seeded), the smallest shape timm names."""
    sys.path.insert(0, str(Path(__file__).parent))
    import big_vision_synth as synth
    path = tmp_path_factory.mktemp("bv") / "b16.npz"
    synth.write(path, synth.B16)
    return path


@pytest.fixture(scope="module")
def dinov2_dirs(tmp_path_factory) -> dict[str, Path]:
    """A tiny timm DINOv2 (registers, SwiGLU) saved by timm, and its HF and original forms."""
    sys.path.insert(0, str(Path(__file__).parent))
    import dinov2_synth as synth
    import clawconvert
    root = tmp_path_factory.mktemp("dinov2")
    timm_dir = synth.timm_dir("g-reg4", root / "timm", embed_dim=64, num_heads=1, mlp_ratio=5.5)
    clawconvert.convert(timm_dir, root / "hf", to="hf")
    clawconvert.convert(root / "hf", root / "orig.safetensors", to="original")
    pth = synth.original_file("S", root / "dinov2_vits14.pth")     # torch.save's own file
    return {"{timm}": timm_dir, "{dhf}": root / "hf", "{orig}": root / "orig.safetensors", "{pth}": pth}


@pytest.fixture(scope="module")
def dinov3_dirs(tmp_path_factory) -> dict[str, Path]:
    """A tiny timm DINOv3 (SwiGLU, q/v bias, registers) saved by timm, its HF form, and a torch-hub .pth."""
    sys.path.insert(0, str(Path(__file__).parent))
    import dinov3_synth as synth
    import clawconvert
    root = tmp_path_factory.mktemp("dinov3")
    timm_dir = synth.timm_dir("vit_small_plus_patch16_dinov3_qkvb", root / "timm")
    clawconvert.convert(timm_dir, root / "hf", to="hf")
    pth = synth.original_file("dinov3_vits16", root / "dinov3_vits16.pth")     # torch.save's own file
    (root / "kw.json").write_text(json.dumps({**synth.hub_kwargs("dinov3_vits16"), "depth": 1}))
    return {"{d3timm}": timm_dir, "{d3hf}": root / "hf", "{d3pth}": pth, "{d3kw}": root / "kw.json"}


def run_clean(argv: list[str]) -> tuple[int, list[str]]:
    res = subprocess.run([sys.executable, "-c", RUN, json.dumps([str(a) for a in argv])],
                         capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    code, imported = json.loads(res.stdout.strip().splitlines()[-1])
    return code, imported


@pytest.mark.parametrize("argv", [
    ["convert", FIX / "openclip_tiny", "{out}/hf", "--to", "hf"],
    ["convert", FIX / "openclip_tiny", "{out}/hf16", "--to", "hf", "--dtype", "bf16"],
    ["convert", FIX / "big_vision" / "siglip_tiny.npz", "{out}/hf", "--to", "hf"],
    ["convert", "{b16}", "{out}/oc", "--to", "openclip"],
    ["convert", FIX / "big_vision" / "siglip2_naflex_tiny.npz", "{out}/hf", "--to", "hf"],
    ["extract-visual", FIX / "openclip_tiny", "{out}/v", "--to", "hf"],
    ["extract-text", FIX / "openclip_tiny", "{out}/t", "--to", "openclip"],
    ["inspect", FIX / "openclip_tiny"],
    ["convert", "{timm}", "{out}/hf", "--to", "hf"],
    ["convert", "{dhf}", "{out}/timm", "--to", "timm"],
    ["convert", "{dhf}", "{out}/dinov2.pth", "--to", "original"],
    ["convert", "{orig}", "{out}/hf", "--to", "hf"],
    ["convert", "{pth}", "{out}/hf", "--to", "hf", "--from", "original"],
    ["extract-visual", "{timm}", "{out}/v", "--to", "hf"],
    ["convert", "{d3timm}", "{out}/hf", "--to", "hf"],
    ["convert", "{d3hf}", "{out}/dinov3.pth", "--to", "original"],
    ["convert", "{d3pth}", "{out}/hf", "--to", "timm", "--model-config", "{d3kw}"],
], ids=["openclip-hf", "openclip-hf-bf16", "bigvision-hf", "bigvision-openclip", "naflex-hf",
        "extract-visual", "extract-text", "inspect", "dinov2-timm-hf", "dinov2-hf-timm", "dinov2-hf-pth",
        "dinov2-original-hf", "dinov2-pth-hf", "dinov2-extract-visual", "dinov3-timm-hf", "dinov3-hf-pth",
        "dinov3-pth-timm"])
def test_command_imports_no_framework(argv, tmp_path, request):
    if "{b16}" in argv:  # open_clip builds SigLIP towers from timm names: a real shape is needed
        argv = [request.getfixturevalue("b16_npz") if a == "{b16}" else a for a in argv]
    if any(str(a).startswith(("{timm}", "{dhf}", "{orig}", "{pth}")) for a in argv):
        dirs = request.getfixturevalue("dinov2_dirs")
        argv = [dirs.get(str(a), a) for a in argv]
    if any(str(a).startswith("{d3") for a in argv):
        dirs = request.getfixturevalue("dinov3_dirs")
        argv = [dirs.get(str(a), a) for a in argv]
    code, imported = run_clean([str(a).replace("{out}", str(tmp_path)) for a in argv])
    assert code == 0
    assert imported == [], f"the conversion path imported {imported}"


def test_converted_output_is_what_the_frameworks_load(tmp_path):
    """The lean path's output, loaded by transformers: equal to open_clip's model in fp32."""
    code, _ = run_clean(["convert", FIX / "openclip_tiny", tmp_path / "hf", "--to", "hf"])
    assert code == 0
    from clawconvert.cli import main
    assert main(["verify", str(FIX / "openclip_tiny"), str(tmp_path / "hf")]) == 0
