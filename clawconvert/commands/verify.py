"""``clawconvert verify``: prove two checkpoints compute the same thing, or that an output is intact."""
from __future__ import annotations

import argparse

ORDER = 20

DESCRIPTION = """\
Load A and B, each with its own framework (open_clip for OpenCLIP, transformers for HF),
run image and text forward passes on the same deterministic inputs, and print the max
absolute difference of image embeddings, text embeddings and logits.
Exits 1 when any difference is above --tolerance.

With --manifest DIR, re-check an output directory against the clawconvert_manifest.json
written into it: every file's sha256 is computed again and files that were changed, added
or removed since are listed.  Exits 1 on any mismatch, 0 when the output is intact.

Both forms first read every weight tensor and refuse NaN or Inf values (exit 2, one line
per tensor); --no-check-finite skips that scan."""


def register(sub) -> None:
    p = sub.add_parser("verify", help="compare two checkpoints' forward passes, or re-check an output's manifest",
                       description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="examples:\n  clawconvert verify fixtures/openclip_tiny out/hf\n"
                              "  clawconvert verify --manifest out/hf")
    p.add_argument("a", metavar="A", nargs="?", help="first checkpoint")
    p.add_argument("b", metavar="B", nargs="?", help="second checkpoint")
    p.add_argument("--manifest", metavar="DIR",
                   help="re-check DIR's files against its clawconvert_manifest.json (sha256 of every file)")
    p.add_argument("--tolerance", type=float, default=1e-4, help="max abs difference allowed (default 1e-4)")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated inputs")
    p.add_argument("--check-finite", action=argparse.BooleanOptionalAction, default=True,
                   help="read every weight tensor first and refuse NaN/Inf values (default: on)")
    p.add_argument("--unsafe-pickle", action="store_true",
                   help="load pickle checkpoints without weights_only (runs code from the file: trusted files only)")
    p.set_defaults(func=run, parser=p)


def run(args) -> int:
    from ..errors import ClawError
    if args.manifest:
        if args.a or args.b:
            raise ClawError("verify takes either two checkpoints (verify A B) or --manifest DIR, not both")
        return run_manifest(args)
    if not args.a or not args.b:
        raise ClawError("verify needs two checkpoints (clawconvert verify A B) or --manifest DIR")
    from .. import api
    from ..formats import SourceOptions, open_checkpoint
    from ..verify import format_figures
    options = SourceOptions(unsafe_pickle=args.unsafe_pickle)
    if args.check_finite:
        from ..io.readers import scan_nonfinite
        problems = []
        for src in (args.a, args.b):
            ckpt = open_checkpoint(api.resolve(src)[0], options)
            try:
                problems += scan_nonfinite(ckpt.store)
            finally:
                ckpt.store.close()
        if problems:
            raise ClawError(problems[0] + (f" (and {len(problems) - 1} more tensors)" if len(problems) > 1 else ""),
                            details=problems[1:])
    figures = api.verify(args.a, args.b, tolerance=args.tolerance, seed=args.seed,
                         a_options=options, b_options=options)
    print(format_figures(figures))
    return 0


def run_manifest(args) -> int:
    from ..errors import ClawError, VerificationFailed
    from ..integrity import check_manifest, nonfinite_in_dir
    report = check_manifest(args.manifest)
    if not report.ok:
        raise VerificationFailed(report.summary(), details=report.problems())
    if args.check_finite:
        problems = nonfinite_in_dir(report.directory, report.intact)
        if problems:
            raise ClawError(problems[0] + (f" (and {len(problems) - 1} more tensors)" if len(problems) > 1 else ""),
                            details=problems[1:])
    print(report.summary())
    return 0
