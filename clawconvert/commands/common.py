"""Option groups several commands share, so flags read the same everywhere."""
from __future__ import annotations

import argparse

ORDER = -1  # not a command


def register(sub) -> None:  # common.py adds no command
    return None


def add_output_options(p: argparse.ArgumentParser, dtype: bool = True) -> None:
    g = p.add_argument_group("output")
    if dtype:
        g.add_argument("--dtype", choices=["keep", "fp32", "fp16", "bf16"], default="keep",
                       help="cast floating-point tensors (default: keep the source dtype)")
    g.add_argument("--max-shard-size", default="5GB", metavar="SIZE",
                   help="split weights into shards of at most SIZE with an HF index (default: 5GB)")
    g.add_argument("--overwrite", action="store_true",
                   help="replace an existing destination (the old one survives until the new one is complete)")
    g.add_argument("--quiet", "-q", action="store_true", help="no progress bars")


def add_source_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("source")
    g.add_argument("--from", dest="src_format", metavar="FMT",
                   help="source format, when auto-detection is not wanted: openclip, hf, big_vision, timm, original")
    g.add_argument("--model-name", metavar="NAME",
                   help="OpenCLIP checkpoint file: a built-in open_clip model config (e.g. ViT-B-32); "
                        "DINOv2 / DINOv3 torch-hub file: its hub name (e.g. dinov2_vits14, dinov2_vitg14_reg, "
                        "dinov3_vitb16, dinov3_vit7b16)")
    g.add_argument("--model-config", metavar="FILE",
                   help="OpenCLIP checkpoint file: a model config JSON (bare or with 'model_cfg'); DINOv2 / "
                        "DINOv3 torch-hub file: DinoVisionTransformer's keyword arguments as JSON (e.g. "
                        "num_heads, norm_layer)")
    g.add_argument("--unsafe-pickle", action="store_true",
                   help="load pickle checkpoints without weights_only (runs code from the file: trusted files only)")
    g.add_argument("--check-finite", action="store_true",
                   help="refuse source tensors holding NaN or Inf (reads every tensor; on by default in verify)")
