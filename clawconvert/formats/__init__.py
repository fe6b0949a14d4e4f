"""Checkpoint formats: file layout, detection, and writing a converted model.

Each module here defines ``FORMAT``, a :class:`Format`; they are found by discovery.  A
format knows which files make up a model in its layout and how to detect one; what the
config *means* is the family's job (:mod:`clawconvert.families`).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from ..errors import ClawError
from ..registry import discover, lookup
from ..families import Extras, Family
from ..io.readers import TensorStore


@dataclass
class SourceOptions:
    """Everything a user can say about a source besides its path."""

    format: str | None = None            # --from
    model_name: str | None = None        # --model-name (OpenCLIP built-in config)
    model_config: Path | dict | None = None   # --model-config (a model config JSON; a dict from the API)
    unsafe_pickle: bool = False


@dataclass
class Checkpoint:
    """An opened source: its tensors (lazy), family, canonical config and side files."""

    path: Path
    format: str
    family: Family
    config: Any                          # the family's transformers config
    store: TensorStore
    extras: Extras = field(default_factory=Extras)
    params: dict[str, Any] = field(default_factory=dict)   # format-specific table params

    def table_params(self) -> dict[str, Any]:
        return {**self.family.params(self.config), **self.params}


class Format:
    name: str = ""
    description: str = ""
    weights_name: str = "model"          # basename of the weights file(s) it writes
    writes_file: bool = False            # the output is one file (big_vision .npz), not a directory
    write_options: tuple[str, ...] = ()  # extra keyword arguments its writer() takes (e.g. "stacked")
    file_hint: str = ""                  # how to name this format for a pickle file detection cannot open

    def detect(self, path: Path) -> bool:
        """True when ``path`` is a model of this format (files or sentinel keys)."""
        raise NotImplementedError

    def named_by(self, options: SourceOptions) -> bool:
        """True when the user's options alone say the source is in this format (``--model-name
        dinov2_vits14``: a pickle that detection never opens); checked before detection."""
        return False

    def open(self, path: Path, options: SourceOptions) -> Checkpoint:
        raise NotImplementedError

    def table_params(self, family: Family, config: Any) -> dict[str, Any]:
        """Extra table params this format needs when it is the target."""
        return {}

    def output_options(self, source: Checkpoint) -> SourceOptions:
        """How to open what this format wrote from ``source`` (a file with no config says it here)."""
        return SourceOptions(format=self.name)

    def write_side_files(self, out_dir: Path, family: Family, config: Any, extras: Extras) -> list[str]:
        """Write config/preprocessing/tokenizer files; return notes for the user."""
        raise NotImplementedError

    def config_fields(self, family: Family, config: Any) -> dict[str, Any]:
        """The config as this format spells it, flat (``vision_config.hidden_size``): the fields a
        diagnosis names (default: transformers' ``config.json``)."""
        return flatten(config.to_dict())

    def config_from_fields(self, family: Family, fields: dict[str, Any]) -> Any:
        """The canonical config back from :meth:`config_fields`' form."""
        return family.config_from_dict(unflatten(fields))

    def writer(self, out_dir: Path, plan: list, max_shard_size: int, metadata: dict | None = None):
        from ..io.writers import SafetensorsWriter
        return SafetensorsWriter(out_dir, plan, max_shard_size=max_shard_size, basename=self.weights_name,
                                 metadata=metadata)


def flatten(data: dict, prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> ``{"a.b.c": value}``."""
    out: dict[str, Any] = {}
    for k, v in data.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def unflatten(flat: dict[str, Any]) -> dict:
    """``{"a.b.c": value}`` -> nested dicts (the inverse of :func:`flatten`)."""
    out: dict = {}
    for key, value in flat.items():
        *path, leaf = key.split(".")
        node = out
        for part in path:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


@lru_cache(maxsize=None)
def all_formats() -> dict[str, Format]:
    return discover(sys.modules[__name__], "FORMAT", Format)


def get_format(name: str) -> Format:
    return lookup(all_formats(), name, "format")


def detect_format(path: Path) -> Format:
    path = Path(path)
    if not path.exists():
        raise ClawError(f"{path}: no such file or directory")
    hits = [f for f in all_formats().values() if f.detect(path)]
    if not hits:
        raise ClawError(f"{path}: cannot tell its format (known: {', '.join(sorted(all_formats()))}); "
                        f"pass --from FORMAT")
    if len(hits) > 1:
        raise ClawError(f"{path}: looks like several formats ({', '.join(h.name for h in hits)}); pass --from FORMAT")
    return hits[0]


def open_checkpoint(path: str | Path, options: SourceOptions | None = None) -> Checkpoint:
    """Detect (or take ``--from``) the format of ``path`` and open it lazily."""
    options = options or SourceOptions()
    path = Path(path)
    if not path.exists():
        raise ClawError(f"{path}: no such file or directory")
    named = [f for f in all_formats().values() if f.named_by(options)] if not options.format else []
    fmt = get_format(options.format) if options.format else named[0] if len(named) == 1 else detect_format(path)
    ckpt = fmt.open(path, options)
    ckpt.family.refine(ckpt)
    return ckpt
