"""``clawconvert verify``: prove two checkpoints compute the same thing."""
from __future__ import annotations

import argparse

ORDER = 20

DESCRIPTION = """\
Load A and B, each with its own framework (open_clip for OpenCLIP, transformers for HF),
run image and text forward passes on the same deterministic inputs, and print the max
absolute difference of image embeddings, text embeddings and logits.
Exits 1 when any difference is above --tolerance."""


def register(sub) -> None:
    p = sub.add_parser("verify", help="compare two checkpoints' forward passes numerically",
                       description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="example:\n  clawconvert verify fixtures/openclip_tiny out/hf")
    p.add_argument("a", metavar="A", nargs="?", help="first checkpoint")
    p.add_argument("b", metavar="B", nargs="?", help="second checkpoint")
    p.add_argument("--tolerance", type=float, default=1e-4, help="max abs difference allowed (default 1e-4)")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated inputs")
    p.set_defaults(func=run, parser=p)


def run(args) -> int:
    from .. import api
    from ..errors import ClawError
    from ..verify import format_figures
    if not args.a or not args.b:
        raise ClawError("verify needs two checkpoints: clawconvert verify A B")
    figures = api.verify(args.a, args.b, tolerance=args.tolerance, seed=args.seed)
    print(format_figures(figures))
    return 0
