"""``clawconvert`` command line: discovers subcommands in :mod:`clawconvert.commands`.

Every module in ``clawconvert/commands/`` defines ``register(subparsers)``, which adds its
subparser and sets ``func``: a callable taking the parsed args and returning an exit code.
User errors (:class:`ClawError`) print as one line on stderr and exit with their code (2);
with ``--debug`` (or ``CLAWCONVERT_DEBUG=1``) the traceback is shown too.
"""
from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys
import traceback

from . import __version__
from .errors import ClawError

DESCRIPTION = """\
Convert CLIP / SigLIP checkpoints between OpenCLIP, Hugging Face transformers and
big_vision, cut towers out of them, merge LoRA adapters into LLaVA checkpoints, and
prove every result numerically against the frameworks' own forward passes.

Conversions stream tensor by tensor through declarative mapping tables (see the
`mappings/` folder), never modify their sources and write outputs atomically."""

EPILOG = """\
examples:
  clawconvert inspect fixtures/openclip_tiny
  clawconvert convert fixtures/openclip_tiny out/hf --to hf --verify
  clawconvert convert out/hf out/openclip --to openclip
  clawconvert verify fixtures/openclip_tiny out/hf

Run `clawconvert COMMAND --help` for the options of each command."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clawconvert", description=DESCRIPTION, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"clawconvert {__version__}")
    parser.add_argument("--debug", action="store_true", help="show Python tracebacks and the full list of problems")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    from . import commands
    for mod in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: getattr(
            importlib.import_module(f"{commands.__name__}.{m.name}"), "ORDER", 100)):
        importlib.import_module(f"{commands.__name__}.{mod.name}").register(sub)
    for command in sub.choices.values():  # `clawconvert convert ... --debug` works too
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                             help="show Python tracebacks and the full list of problems")
    return parser


def _print_error(err: ClawError, debug: bool = False) -> None:
    print(f"clawconvert: error: {err}", file=sys.stderr)
    details = err.debug_details if debug and err.debug_details else err.details
    limit = len(details) if debug else 40
    for line in details[:limit]:
        print(f"  - {line}", file=sys.stderr)
    if len(details) > limit:
        print(f"  ... and {len(details) - limit} more (--debug lists them all)", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = args.debug or os.environ.get("CLAWCONVERT_DEBUG") == "1"
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    import shlex

    from .provenance import COMMAND_LINE
    token = COMMAND_LINE.set("clawconvert " + shlex.join(sys.argv[1:] if argv is None else [str(a) for a in argv]))
    try:
        return _run(args, debug)
    finally:
        COMMAND_LINE.reset(token)


def _run(args: argparse.Namespace, debug: bool) -> int:
    from .io.readers import finite_checks
    try:
        # --check-finite (source options): every tensor read from a source is checked for NaN/Inf
        with finite_checks(getattr(args, "check_finite", False) is True and args.command != "verify"):
            return int(args.func(args) or 0)
    except ClawError as err:
        if debug:
            traceback.print_exc()
        _print_error(err, debug)
        return err.exit_code
    except KeyboardInterrupt:
        print("clawconvert: interrupted; nothing was written", file=sys.stderr)
        return 130
    except MemoryError:
        print("clawconvert: error: out of memory", file=sys.stderr)
        return 2
    except Exception as err:  # a bug: still one line, with a way to get the traceback
        if debug:
            traceback.print_exc()
        from .deps import framework_missing, missing_message
        missing = framework_missing(err)
        if missing:  # an import site without its need() line: still one line naming the extra
            print(f"clawconvert: error: {missing_message([missing], f'clawconvert {args.command}')}", file=sys.stderr)
            return 2
        msg = str(err).strip().splitlines()[0] if str(err).strip() else ""
        print(f"clawconvert: internal error: {err.__class__.__name__}: {msg} "
              f"(re-run with --debug for the traceback, and please report it)", file=sys.stderr)
        return 3


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
