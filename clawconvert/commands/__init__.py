"""One module per subcommand; :func:`clawconvert.cli.build_parser` discovers them.

A module defines ``register(subparsers)`` and optionally ``ORDER`` (its place in ``--help``).
Shared option groups live in :mod:`.common`.
"""
