"""``clawconvert inspect``: what a checkpoint is, from its headers alone."""
from __future__ import annotations

import argparse
import json

from .common import add_source_options

ORDER = 5


def register(sub) -> None:
    p = sub.add_parser("inspect", help="show a checkpoint's format, family, config and tensor counts",
                       description="Detect a checkpoint's format and family and summarise its config, tensor count, "
                                   "parameter count and dtypes. Reads headers only.",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="example:\n  clawconvert inspect fixtures/openclip_tiny --json")
    p.add_argument("path", metavar="PATH", help="checkpoint directory or file, or hf-hub:org/name")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    add_source_options(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from .. import api
    info = api.inspect(args.path, src_format=args.src_format, model_name=args.model_name,
                       model_config=args.model_config, unsafe_pickle=args.unsafe_pickle)
    if getattr(args, "check_finite", False):
        _check_finite(args)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"{info['path']}")
    print(f"  format      {info['format']}")
    print(f"  family      {info['family']}")
    print(f"  tensors     {info['tensors']}")
    print(f"  parameters  {info['parameters']:,}  ({info['bytes'] / 1e6:.1f} MB)")
    print(f"  dtypes      {', '.join(f'{k} x{v}' for k, v in info['dtypes'].items())}")
    for k, v in info["config"].items():
        if isinstance(v, dict):
            print(f"  {k}: " + ", ".join(f"{a}={b}" for a, b in v.items()))
        else:
            print(f"  {k}: {v}")
    return 0


def _check_finite(args) -> None:
    """inspect reads headers only; --check-finite also reads every tensor once and refuses NaN/Inf."""
    from pathlib import Path

    from ..api import resolve
    from ..errors import ClawError
    from ..formats import SourceOptions, open_checkpoint
    from ..io.readers import scan_nonfinite
    ckpt = open_checkpoint(resolve(args.path)[0], SourceOptions(
        format=args.src_format, model_name=args.model_name,
        model_config=Path(args.model_config) if args.model_config else None, unsafe_pickle=args.unsafe_pickle))
    try:
        problems = scan_nonfinite(ckpt.store)
    finally:
        ckpt.store.close()
    if problems:
        raise ClawError(problems[0] + (f" (and {len(problems) - 1} more tensors)" if len(problems) > 1 else ""),
                        details=problems[1:])
