"""Mapping tables: YAML data files in ``mappings/<family>/<format>.yaml``.

A table maps one format's tensor names onto the family's *canonical* names (the
transformers model's own state-dict keys).  The same table is read in both directions:
format -> canonical when the format is the source, canonical -> format when it is the target.

Schema (validated on load; every problem is reported with the table's name and entry)::

    format: openclip               # the format this table describes
    family: clip                   # the family whose canonical keys it targets
    placeholders:                  # named placeholders usable in keys
      vlayer: {range: vision_layers}   # 0 .. params["vision_layers"] - 1 (a list param: its positions)
      p: [weight, bias]                # a fixed list of values
      t: {value: text_prefix}          # one string from the family's params
      ds: {range: deepstack_layers}    # positions in a list param ...
      dslayer: {item: deepstack_layers, at: ds}   # ... and its element there, in the same rule
    identity: false                # true: format keys ARE the canonical keys (HF tables)
    tensors:                       # canonical key: format key  |  {from, op, optional}
      logit_scale: logit_scale
      visual_projection.weight: {from: visual.proj, op: transpose}
      vision_model.encoder.layers.{vlayer}.self_attn.{q,k,v}_proj.{p}:
        from: visual.transformer.resblocks.{vlayer}.attn.in_proj_{p}
        op: split                  # one format tensor -> the three canonical ones
    drop: [attn_mask]              # format tensors that are not weights (buffers); ignored
    derived:                       # format tensors computed from the config, nothing canonical beside them
      rope_embed.periods: {op: {rope_periods: {theta: rope_theta, head_dim: head_dim}}}

``{a,b,c}`` (with commas) in a canonical key lists several canonical tensors, in order;
``from`` may be a list for several format tensors (an empty list with a ``constant`` op:
the format stores nothing).  ``optional: true`` entries are mapped when present and skipped
silently when absent.  Placeholders not listed under ``placeholders`` are an error, so a typo
cannot silently match nothing.

An entry may also be a list of variants chosen by a family param, each with ``when: NAME`` or
``when: not NAME``; the variants whose condition holds are used::

    text_model.head.weight:
      - {from: txt/head/kernel, op: transpose, when: text_head}
      - {from: [], op: {constant: {eye: T}}, when: not text_head}   # no head: identity
"""
from __future__ import annotations

import hashlib
import itertools
import re
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from .errors import ClawError
from .ops import Chain, build_chain

_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
_ALTERNATION = re.compile(r"\{([^{}]*,[^{}]*)\}")
_TOP_KEYS = {"format", "family", "placeholders", "identity", "tensors", "drop", "derived", "description"}
_ENTRY_KEYS = {"from", "op", "optional", "note", "when"}


def mappings_root() -> Path:
    """The installed ``mappings/`` folder (package data ``clawconvert.mappings``)."""
    return Path(str(resources.files("clawconvert.mappings")))


@dataclass(frozen=True)
class Rule:
    """One expanded table entry: format tensors <-> canonical tensors through ``chain``."""

    canonical: tuple[str, ...]
    format: tuple[str, ...]
    chain: Chain
    optional: bool
    origin: str  # "table.yaml: <entry key>" for messages


@dataclass
class Table:
    name: str            # "clip/openclip"
    format: str
    family: str
    sha256: str
    identity: bool
    placeholders: dict[str, Any]
    tensors: dict[str, Any]
    drop: list[str]
    derived: dict[str, Any] = field(default_factory=dict)

    def expand(self, params: dict[str, Any], canonical_keys: list[str] | None = None) -> "ExpandedTable":
        """Resolve placeholders against a model's params into concrete rules."""
        if self.identity:
            if canonical_keys is None:
                raise ClawError(f"{self.name}: identity table needs the canonical key list")
            rules = [Rule((k,), (k,), Chain([]), False, f"{self.name}: identity") for k in canonical_keys]
            return ExpandedTable(self, rules, self._drop_patterns(params))
        values: dict[str, list] = {}
        items: dict[str, tuple[list, str]] = {}
        for name, spec in self.placeholders.items():
            if isinstance(spec, dict) and set(spec) == {"item", "at"}:
                items[name] = (_item_values(self.name, name, spec, params, self.placeholders), spec["at"])
            else:
                values[name] = _placeholder_values(self.name, name, spec, params)
        rules: list[Rule] = []
        for key, entry in self.tensors.items():
            for variant in entry if isinstance(entry, list) else [entry]:
                if isinstance(variant, dict) and "when" in variant and not _holds(self.name, key, variant["when"], params):
                    continue
                rules.extend(self._expand_entry(key, variant, values, items, params))
        for key, entry in self.derived.items():
            if "when" in entry and not _holds(self.name, key, entry["when"], params):
                continue
            try:
                chain = build_chain(entry.get("op"), params, 1, 0)
            except ClawError as e:
                raise ClawError(f"{self.name}: derived '{key}': {e}") from e
            rules.append(Rule((), (key,), chain, False, f"{self.name}: {key}"))
        return ExpandedTable(self, rules, self._drop_patterns(params))

    def _drop_patterns(self, params: dict[str, Any]) -> list[re.Pattern]:
        out = []
        for pat in self.drop:
            rx = re.escape(pat).replace(r"\*", ".*")
            rx = re.sub(r"\\\{([A-Za-z_][A-Za-z0-9_]*)\\\}", r"[^.]+", rx)
            out.append(re.compile(rx + "$"))
        return out

    def _expand_entry(self, key: str, entry: Any, values: dict[str, list], items: dict[str, tuple[list, str]],
                      params: dict) -> list[Rule]:
        """One rule per combination of the entry's placeholders; an ``item`` placeholder follows its ``at``."""
        if isinstance(entry, str):
            entry = {"from": entry}
        sources = entry["from"] if isinstance(entry["from"], list) else [entry["from"]]
        named = set(_PLACEHOLDER.findall(key)) | {n for s in sources for n in _PLACEHOLDER.findall(s)}
        dependent = sorted(named & set(items))
        used = sorted((named - set(items)) | {items[n][1] for n in dependent})
        combos = itertools.product(*(values[n] for n in used))
        rules = []
        for combo in combos:
            env = dict(zip(used, combo))
            env.update({n: items[n][0][env[items[n][1]]] for n in dependent})
            fill = lambda s: _PLACEHOLDER.sub(lambda m: str(env[m.group(1)]), s)  # noqa: E731
            canonical = tuple(_alternatives(fill(key)))
            fmt = tuple(fill(s) for s in sources)
            try:
                chain = build_chain(entry.get("op"), {**params, **{k: v for k, v in env.items() if isinstance(v, int)}},
                                    len(fmt), len(canonical))
            except ClawError as e:
                raise ClawError(f"{self.name}: entry '{key}': {e}") from e
            rules.append(Rule(canonical, fmt, chain, bool(entry.get("optional", False)), f"{self.name}: {key}"))
        return rules


def _holds(table: str, key: str, condition: str, params: dict) -> bool:
    """``when: NAME`` / ``when: not NAME`` against the family's params."""
    words = str(condition).split()
    negate = len(words) == 2 and words[0] == "not"
    name = words[-1]
    if name not in params:
        raise ClawError(f"{table}: entry '{key}': condition '{condition}' names unknown param '{name}'")
    return bool(params[name]) != negate


def _alternatives(key: str) -> list[str]:
    m = _ALTERNATION.search(key)
    if not m:
        return [key]
    out = []
    for alt in m.group(1).split(","):
        out.extend(_alternatives(key[:m.start()] + alt.strip() + key[m.end():]))
    return out


def _placeholder_values(table: str, name: str, spec: Any, params: dict) -> list:
    if isinstance(spec, list):
        return spec
    if isinstance(spec, dict) and set(spec) == {"range"}:
        n = params.get(spec["range"])
        if isinstance(n, list):
            n = len(n)
        if not isinstance(n, int):
            raise ClawError(f"{table}: placeholder '{name}' ranges over unknown count '{spec['range']}'")
        return list(range(n))
    if isinstance(spec, dict) and set(spec) == {"value"}:
        if spec["value"] not in params:
            raise ClawError(f"{table}: placeholder '{name}' takes unknown value '{spec['value']}'")
        return [params[spec["value"]]]
    raise ClawError(f"{table}: placeholder '{name}': write a list, {{range: COUNT}}, {{value: NAME}} "
                    f"or {{item: LIST, at: PLACEHOLDER}}")


def _item_values(table: str, name: str, spec: dict, params: dict, placeholders: dict) -> list:
    """The list param an ``{item: LIST, at: PLACEHOLDER}`` placeholder indexes; ``at`` ranges over its positions."""
    values, at = params.get(spec["item"]), placeholders.get(spec["at"])
    if not isinstance(values, list):
        raise ClawError(f"{table}: placeholder '{name}' takes items of unknown list '{spec['item']}'")
    if at != {"range": spec["item"]}:
        raise ClawError(f"{table}: placeholder '{name}': 'at: {spec['at']}' must be declared "
                        f"{{range: {spec['item']}}}")
    return values


@dataclass
class ExpandedTable:
    table: Table
    rules: list[Rule]
    drop: list[re.Pattern] = field(default_factory=list)

    def __post_init__(self):
        self.by_format: dict[str, Rule] = {}
        self.by_canonical: dict[str, Rule] = {}
        for rule in self.rules:
            for k in rule.format:
                if k in self.by_format:
                    raise ClawError(f"{rule.origin}: format tensor '{k}' is also mapped by {self.by_format[k].origin}")
                self.by_format[k] = rule
            for k in rule.canonical:
                if k in self.by_canonical:
                    raise ClawError(f"{rule.origin}: canonical tensor '{k}' is also mapped by {self.by_canonical[k].origin}")
                self.by_canonical[k] = rule

    def dropped(self, key: str) -> bool:
        return any(p.match(key) for p in self.drop)


def _validate(name: str, data: Any) -> None:
    if not isinstance(data, dict):
        raise ClawError(f"mapping table {name}: not a YAML mapping")
    unknown = set(data) - _TOP_KEYS
    if unknown:
        raise ClawError(f"mapping table {name}: unknown keys {sorted(unknown)}")
    for req in ("format", "family"):
        if not isinstance(data.get(req), str):
            raise ClawError(f"mapping table {name}: '{req}' must be a string")
    placeholders = data.get("placeholders") or {}
    if not isinstance(placeholders, dict):
        raise ClawError(f"mapping table {name}: 'placeholders' must be a mapping")
    tensors = data.get("tensors") or {}
    if not isinstance(tensors, dict):
        raise ClawError(f"mapping table {name}: 'tensors' must be a mapping")
    if not tensors and not data.get("identity"):
        raise ClawError(f"mapping table {name}: no tensors and not an identity table")
    for key, entry in tensors.items():
        variants = entry if isinstance(entry, list) else [entry]
        if isinstance(entry, list) and not all(isinstance(v, dict) and "when" in v for v in entry):
            raise ClawError(f"mapping table {name}: entry '{key}' lists variants: each needs 'when: NAME' or 'when: not NAME'")
        for variant in variants:
            if isinstance(variant, dict):
                extra = set(variant) - _ENTRY_KEYS
                if extra or "from" not in variant:
                    raise ClawError(f"mapping table {name}: entry '{key}' needs 'from' and may have op/optional/note/when (got {sorted(variant)})")
                when = variant.get("when")
                if when is not None and (not isinstance(when, str) or len(when.split()) not in (1, 2)
                                         or (len(when.split()) == 2 and when.split()[0] != "not")):
                    raise ClawError(f"mapping table {name}: entry '{key}': write 'when: NAME' or 'when: not NAME' (got {when!r})")
                srcs = variant["from"] if isinstance(variant["from"], list) else [variant["from"]]
            elif isinstance(variant, str):
                srcs = [variant]
            else:
                raise ClawError(f"mapping table {name}: entry '{key}' must be a key, a mapping or a list of variants")
            for n in _PLACEHOLDER.findall(key) + [n for s in srcs for n in _PLACEHOLDER.findall(str(s))]:
                if n not in placeholders:
                    raise ClawError(f"mapping table {name}: entry '{key}' uses undeclared placeholder '{{{n}}}'")
    if not isinstance(data.get("drop", []) or [], list):
        raise ClawError(f"mapping table {name}: 'drop' must be a list")
    derived = data.get("derived") or {}
    if not isinstance(derived, dict) or not all(isinstance(v, dict) and "op" in v and not set(v) - {"op", "when", "note"}
                                                for v in derived.values()):
        raise ClawError(f"mapping table {name}: 'derived' maps format tensors to {{op: ..., when: ...}}")


def read_yaml(path: Path, what: str, missing: str) -> tuple[Any, bytes]:
    """(data, raw bytes) of a table file; ``missing`` is the message when there is none."""
    if not path.is_file():
        raise ClawError(missing)
    raw = path.read_bytes()
    try:
        return yaml.safe_load(raw), raw
    except yaml.YAMLError as e:
        raise ClawError(f"{what}: invalid YAML ({e})") from e


@lru_cache(maxsize=None)
def load_table(family: str, fmt: str) -> Table:
    """Load and validate ``mappings/<family>/<fmt>.yaml``."""
    path = mappings_root() / family / f"{fmt}.yaml"
    name = f"{family}/{fmt}"
    data, raw = read_yaml(path, f"mapping table {name}", f"no mapping table for {fmt} in family {family} ({path} missing)")
    _validate(name, data)
    if data["format"] != fmt or data["family"] != family:
        raise ClawError(f"mapping table {name}: declares format/family {data['format']}/{data['family']}")
    return Table(name=name, format=fmt, family=family, sha256=hashlib.sha256(raw).hexdigest(),
                 identity=bool(data.get("identity", False)), placeholders=data.get("placeholders") or {},
                 tensors=data.get("tensors") or {}, drop=list(data.get("drop") or []),
                 derived=data.get("derived") or {})
