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
    if "architecture" in info:
        _print_architecture(info["architecture"])
    return 0


def _print_architecture(a: dict) -> None:
    lay = a["layout"]
    print(f"  class       {a['class']} ({a['table']})")
    print(f"  layout      {lay['name']}: loaded by {lay['loaded_by']}" + (f" ({lay['note']})" if lay["note"] else ""))
    others = [n for n in a["layouts"] if n != lay["name"]]
    if others:
        print(f"              other layouts: {', '.join(others)}; outputs use {a['write_layout']} unless --layout")
    for name, p in a["parts"].items():
        alone = p["standalone"] or f"none ({p.get('why_not', '')})"
        print(f"  {name:<11} {p['tensors']} tensors, {p['parameters']:,} parameters under "
              f"{', '.join(repr(x) for x in p['file_prefixes'])}; standalone: {alone}")
    tied = a["tied"]
    if a["tie_word_embeddings"] is not None:
        state = "tied" if a["tie_word_embeddings"] else "untied"
        head = "" if not tied else (f" ({tied['pair'][0]} <-> {tied['pair'][1]}, head "
                                    f"{'stored' if tied['head_on_disk'] else 'not stored'})")
        print(f"  embeddings  {state}{head}")
    sides = a["side_files"]
    print(f"  side files  present: {', '.join(sides['present']) or 'none'}")
    if sides["missing"]:
        print(f"              missing: {', '.join(sides['missing'])}")


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
