"""Peak memory of DINOv2 / DINOv3 conversions on a full-depth ViT-L with 4 registers (1.2 GB fp32).

Writes the model in the HF layout (seeded, streamed tensor by tensor), then runs each
conversion in a child process that imports every framework first, resets the kernel's
peak-RSS counter (``/proc/self/clear_refs`` = 5) and reports the peak resident memory the
conversion added (``VmHWM``), as ``tests/test_streaming_memory.py`` measures it.

    python tools/dinov2_memory.py [WORKDIR]            # ViT-L/14 reg4, 518 px; figures in docs/dinov2.md
    python tools/dinov2_memory.py --dinov3 [WORKDIR]   # DINOv3 ViT-L/16, 224 px; figures in docs/dinov3.md
"""
from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from clawconvert.families import dinov2, dinov3
from clawconvert.io.writers import SafetensorsWriter
from clawconvert.tables import load_table

CHILD = r"""
import re, sys
import clawconvert.api, timm, torch, transformers
def status(field):
    return int(re.search(field + r":\s+(\d+) kB", open("/proc/self/status").read()).group(1)) / 1024
base = status("VmRSS")
open("/proc/self/clear_refs", "w").write("5")
src, dst, to, fmt = sys.argv[1:5]
clawconvert.api.convert(src, dst, to=to, src_format=fmt, overwrite=True)
print(status("VmHWM") - base)
"""


def write_hf(out: Path, family) -> int:
    if family is dinov3.FAMILY:
        config = dinov3.make_config(1024, 24, 16, 4096, False, 4)
    else:
        config = dinov2.make_config(1024, 24, 16, 4096, False, 4, 518, 14)
    shapes = family.canonical_shapes(config)
    table = load_table(family.name, "hf").expand(family.params(config), list(shapes))
    plan = []
    for rule in (r for r in table.rules if all(c in shapes for c in r.canonical)):
        plan += zip(rule.format, rule.chain.save_shapes([shapes[c] for c in rule.canonical]))
    out.mkdir(parents=True, exist_ok=True)
    writer = SafetensorsWriter(out, [(n, s, torch.float32) for n, s in plan])
    g = torch.Generator().manual_seed(0)
    for name, shape in plan:
        writer.write(name, torch.randn(shape, generator=g) * 0.02)
    writer.close()
    config.architectures = [family.hf_architecture(config)]
    config.save_pretrained(out)
    return writer.total_size


def main() -> None:
    args = [a for a in sys.argv[1:] if a != "--dinov3"]
    family = dinov3.FAMILY if "--dinov3" in sys.argv[1:] else dinov2.FAMILY
    root = Path(args[0]) if args else Path(tempfile.mkdtemp(prefix=f"{family.name}-mem-"))
    size = write_hf(root / "hf", family)
    what = "DINOv3 ViT-L/16, 224 px" if family is dinov3.FAMILY else "DINOv2 ViT-L/14 reg4, 518 px"
    print(f"{what}, 24 layers: {size / 1e9:.2f} GB fp32 in {root / 'hf'}")
    for src, dst, to, fmt in (("hf", "timm", "timm", "hf"), ("timm", "hf2", "hf", "timm"),
                              ("hf", "L.pth", "original", "hf"), ("L.pth", "hf3", "hf", "original")):
        r = subprocess.run([sys.executable, "-c", CHILD, str(root / src), str(root / dst), to, fmt],
                           capture_output=True, text=True, check=True)
        print(f"{src} -> {to}: +{float(r.stdout.strip().splitlines()[-1]):.0f} MB peak RSS")


if __name__ == "__main__":
    main()
