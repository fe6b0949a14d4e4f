"""Discovery registries: every module of a package that defines ``ATTR`` registers it by name.

Families (``families/*.py`` defining ``FAMILY``) and formats (``formats/*.py`` defining
``FORMAT``) are found this way, so adding one is adding a module, never an if/elif branch.
"""
from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType
from typing import Any

from .errors import ClawError


def discover(package: ModuleType, attr: str, kind: type) -> dict[str, Any]:
    """``{obj.name: obj}`` for each module of ``package`` whose ``attr`` is a ``kind``."""
    found: dict[str, Any] = {}
    for mod in pkgutil.iter_modules(package.__path__):
        obj = getattr(importlib.import_module(f"{package.__name__}.{mod.name}"), attr, None)
        if isinstance(obj, kind):
            found[obj.name] = obj
    return found


def lookup(registry: dict[str, Any], name: str, what: str) -> Any:
    if name not in registry:
        raise ClawError(f"unknown {what} '{name}' (known: {', '.join(sorted(registry))})")
    return registry[name]
