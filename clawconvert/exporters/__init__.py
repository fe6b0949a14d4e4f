"""Deployment exporters: one module per target runtime format, found by discovery.

A module in this package that defines ``TARGET`` (the ``--to`` name), ``OPTIONS`` (the
keyword options it takes besides the common ones) and ``export(src, dst, **options)`` is an
exporter; :func:`export` picks it by ``TARGET``.  Exporters write through
:func:`clawconvert.io.atomic.atomic_output_dir` and check their output with the target's own
runtime before it gets its name.
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from types import ModuleType
from typing import Any

from ..errors import ClawError


@dataclass
class ExportResult:
    destination: Path
    target: str                          # onnx | gguf
    source: str                          # what was exported, in words ("CLIPVisionModelWithProjection")
    files: list[str]                     # relative to destination
    figures: dict[str, Any] = field(default_factory=dict)   # measured deviations, per output
    notes: list[str] = field(default_factory=list)
    summary: list[str] = field(default_factory=list)        # the figures, one line each, as the CLI prints them
    load: list[str] = field(default_factory=list)           # how to run the output


@lru_cache(maxsize=None)
def exporters() -> dict[str, ModuleType]:
    found = {}
    for info in pkgutil.iter_modules(__path__):
        mod = importlib.import_module(f"{__name__}.{info.name}")
        if hasattr(mod, "TARGET") and hasattr(mod, "export"):
            found[mod.TARGET] = mod
    return found


def export(src: str | Path, dst: str | Path, to: str, **options: Any) -> ExportResult:
    """Export ``src`` for the runtime format ``to`` (``onnx``, ``gguf``); see ``clawconvert export --help``."""
    targets = exporters()
    if to not in targets:
        raise ClawError(f"unknown export target '{to}' (choose from {', '.join(sorted(targets))})")
    module = targets[to]
    given = {k: v for k, v in options.items() if v is not None and v is not False}
    allowed = set(module.OPTIONS) | {"overwrite", "progress"}
    for name in given:
        if name not in allowed:
            owners = [t for t, m in targets.items() if name in m.OPTIONS]
            flag = "--" + name.replace("_", "-")
            raise ClawError(f"{flag} does not apply to --to {to}" + (f" (only to: {', '.join(owners)})" if owners else ""))
    return module.export(src, dst, **given)
