"""Surgery plans through the conversion engine: a source in one layout, a target in another.

A merge (:class:`~clawconvert.surgery.merge.MergedStore`), an assembly
(:class:`~clawconvert.io.readers.GatheredStore`) and an extraction are all the same thing to
the engine: a tensor store whose keys one layout of an architecture table explains, written
out under another layout, possibly keeping only some parts.  :func:`plan_relayout` builds the
two rename tables from the layouts and hands them to :func:`clawconvert.engine.plan_conversion`,
which checks coverage and shapes from headers and reports every problem at once.
"""
from __future__ import annotations

from typing import Iterable

from ..architectures import Architecture, Layout, evaluate_config, part_of, rename_table
from ..engine import Plan, plan_conversion
from ..errors import ClawError
from ..io.dtypes import DType
from ..io.readers import TensorStore
from ..tables import ExpandedTable, Rule, load_table

# the canonical names themselves, as a layout: a store whose keys are already canonical
CANONICAL = Layout("canonical", "", (("lm/", "lm/"), ("vision/", "vision/"), ("connector/", "connector/")))


def plan_relayout(store: TensorStore, arch: Architecture, src: Layout, dst: Layout, *,
                  dst_arch: Architecture | None = None, dtype: DType | None = None,
                  parts: Iterable[str] | None = None, src_rules: list[Rule] = ()) -> Plan:
    """Plan ``store`` (explained by ``arch``'s layout ``src``) written in ``dst`` (a layout of
    ``dst_arch``, by default the same architecture), keeping ``parts`` (all by default).

    ``src_rules`` are extra source rules, e.g. a family table's ops for a part whose tensors are
    not in the canonical spelling (Qwen-1's fused ``c_attn``); the keys they read are not renamed."""
    keep = set(parts) if parts is not None else None
    taken = {f for r in src_rules for f in r.format}
    pairs = []
    for key in store.keys():
        if key in taken or arch.dropped(key):
            continue
        c = src.to_canonical(key)
        if c is not None:
            pairs.append((c, key))
    renames = rename_table(arch.table(src), pairs, drop=arch.drop)
    source = ExpandedTable(renames.table, renames.rules + list(src_rules), renames.drop)
    canonical = [c for r in source.rules for c in r.canonical]
    wanted = [c for c in canonical if keep is None or part_of(c) in keep]
    targets = []
    for c in wanted:
        name = dst.to_file(c)
        if name is None:
            raise ClawError(f"{(dst_arch or arch).table_name}: layout {dst.name} has no place for '{c}'")
        targets.append((c, name))
    target = rename_table((dst_arch or arch).table(dst), targets)
    expected = {}
    for r in source.rules:
        if all(f in store for f in r.format):
            for c, shape in zip(r.canonical, r.chain.load_shapes([store.info(f).shape for f in r.format])):
                expected[c] = shape
    ignore = [c for c in canonical if c not in set(wanted)]
    return plan_conversion(store, source, target, expected, dtype, ignore)


def part_rules(arch: Architecture, layout: Layout, config: dict) -> list[Rule]:
    """Source rules for the parts whose tensors are not in the canonical spelling: each such part's
    family table (``format: qwen2/qwen1``) expanded with its params, canonical names under
    ``part/``, format names through ``layout`` (where that part sits in the files)."""
    rules: list[Rule] = []
    for name, part in arch.parts.items():
        if part.format == "hf":
            continue
        family, fmt = part.format.split("/")
        sub = arch.part_config(name, config)
        params = {k: evaluate_config(str(v), sub, arch.table_name) for k, v in part.params.items()}
        expanded = load_table(family, fmt).expand(params)
        for r in expanded.rules:
            files = tuple(layout.to_file(f"{name}/{f}") for f in r.format)
            rules.append(Rule(tuple(f"{name}/{c}" for c in r.canonical), files, r.chain, r.optional, r.origin))
    return rules
