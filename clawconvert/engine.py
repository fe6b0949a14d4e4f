"""Plan a conversion from headers, check it completely, then stream it tensor by tensor.

``plan_conversion`` reads no tensor data.  It matches every source tensor against the
source table, computes canonical shapes through the ops and compares them with the shapes
the family's framework model expects (built on the ``meta`` device from the config), then
derives every target tensor through the target table.  It refuses to go on while any source
tensor is unconsumed, any expected canonical tensor missing, any shape contradicting the
config or any target tensor unproducible, and reports *all* such problems at once.  Shapes
that contradict the config are diagnosed rather than listed: the sizes the weights give are
inferred per config field (:mod:`clawconvert.diagnosis`), and the first line names the fields
that disagree.

``Plan.execute`` then reads each source tensor once, applies the source ops (load) and the
target ops (save), casts, and hands each result to the writer.  Canonical tensors are kept
only until their last consumer has run, so peak memory is a handful of tensors.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Protocol

import numpy as np

from .diagnosis import Explain, diagnose_shapes
from .errors import ClawError
from .io.dtypes import DType, cast, float32, output_dtype
from .io.pipeline import write_pipelined
from .io.readers import TensorStore, finite_checks_active
from .ops import Shape
from .tables import ExpandedTable, Rule


class TensorSink(Protocol):
    def write(self, name: str, tensor: np.ndarray) -> None: ...


@dataclass
class TargetTensor:
    name: str
    shape: Shape
    dtype: DType


@dataclass
class Plan:
    source: TensorStore
    src_rules: list[Rule]                 # source rules whose tensors are read
    dst_rules: list[Rule]                 # target rules that are produced
    canonical_shapes: dict[str, Shape]
    canonical_dtypes: dict[str, DType]
    targets: list[TargetTensor]
    dtype: DType | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def writer_plan(self) -> list[tuple[str, Shape, DType]]:
        return [(t.name, t.shape, t.dtype) for t in self.targets]

    @property
    def total_bytes(self) -> int:
        return sum(t.dtype.itemsize * _numel(t.shape) for t in self.targets)

    def execute(self, sink: TensorSink, progress: Callable[[Iterable], Iterable] | None = None) -> int:
        """Stream every target tensor into ``sink``; returns the number written.

        The next tensors are read and transformed on a second thread while this one writes
        (see :mod:`clawconvert.io.pipeline`)."""
        return write_pipelined(self._items(sink, progress), sink)

    def _items(self, sink: TensorSink, progress: Callable[[Iterable], Iterable] | None) -> Iterator[tuple]:
        """("copy", name, (file, offset, nbytes)) or ("write", name, array), in writing order."""
        producer = {c: r for r in self.src_rules for c in r.canonical}
        uses = Counter(c for r in self.dst_rules for c in r.canonical)
        cache: dict[str, np.ndarray] = {}
        out_dtypes = {t.name: t.dtype for t in self.targets}
        rules = self.dst_rules if progress is None else progress(self.dst_rules)
        with self.source.checks_deferred():   # CRC-32s run beside the transforms; the output is temporary until they pass
            for rule in rules:
                copy = self._byte_copy(rule, producer, out_dtypes, sink)
                fill = None if copy is not None else self._filler(rule, producer, out_dtypes, sink)
                if copy is not None:
                    yield ("copy", rule.format[0], copy)
                elif fill is not None:
                    yield ("fill", rule.format[0], fill)
                else:
                    self._load_canonical(rule.canonical, producer, uses, cache)
                    try:
                        outs = rule.chain.save([cache[c] for c in rule.canonical])
                    except ClawError as e:
                        raise ClawError(f"{rule.origin}: {e}") from e
                    for name, t in zip(rule.format, outs):
                        yield ("write", name, cast(t, out_dtypes[name]))   # a view stays a view: the writer lays it out
                    del outs
                for c in rule.canonical:   # drop canonical tensors no later rule needs
                    uses[c] -= 1
                    if uses[c] == 0:
                        cache.pop(c, None)

    def _load_canonical(self, names: Iterable[str], producer: dict[str, Rule], uses: Counter,
                        cache: dict[str, np.ndarray]) -> None:
        """Read and transform (source table) every canonical tensor in ``names`` not yet in
        ``cache``; a source rule's other outputs are kept too while later rules need them."""
        for c in names:
            if c in cache:
                continue
            src = producer[c]
            xs = [self.source.read(k) for k in src.format]
            try:
                ys = src.chain.load(xs)
            except ClawError as e:
                raise ClawError(f"{src.origin}: {e}") from e
            del xs
            for name, y in zip(src.canonical, ys):
                if uses[name]:
                    cache[name] = y

    def _filler(self, rule: Rule, producer: dict[str, Rule], out_dtypes: dict[str, DType], sink: TensorSink):
        """A filler when the source computes this tensor a band at a time (a merged LoRA weight) and
        both tables only rename it: the sink then fills its buffers with the rows directly."""
        if (len(rule.canonical) != 1 or len(rule.format) != 1 or rule.chain.ops or not hasattr(sink, "fill")
                or not hasattr(self.source, "filler") or finite_checks_active()):
            return None
        src = producer[rule.canonical[0]]
        if len(src.format) != 1 or src.chain.ops:
            return None
        return self.source.filler(src.format[0], out_dtypes[rule.format[0]])

    def _byte_copy(self, rule: Rule, producer: dict[str, Rule], out_dtypes: dict[str, DType],
                   sink: TensorSink) -> tuple | None:
        """(file, offset, nbytes) when a target is a run of a source tensor's bytes, unchanged:
        a rename or reshape in both tables, or one part of a split along the first axis (q, k, v
        of ``in_proj``), in the same dtype.  The sink then copies it in chunks instead of
        materialising it."""
        if (len(rule.canonical) != 1 or len(rule.format) != 1 or not rule.chain.keeps_bytes
                or not hasattr(sink, "copy_range") or not hasattr(self.source, "byte_range")
                or finite_checks_active()):
            return None
        c = rule.canonical[0]
        src = producer[c]
        if len(src.format) != 1:
            return None
        key = src.format[0]
        info = self.source.info(key)
        if info.dtype != out_dtypes[rule.format[0]]:
            return None
        span = src.chain.load_span(info.shape, src.canonical.index(c))
        if span is None:
            return None
        where = self.source.byte_range(key)
        if where is None:      # a computed tensor (a merged LoRA delta): nothing to copy
            return None
        file, offset, _ = where
        return file, offset + span[0] * info.dtype.itemsize, span[1] * info.dtype.itemsize


EXAMPLES = 3   # example lines under a diagnosis; --debug shows them all


class Problems:
    """Every problem found while planning, grouped by kind for a one-line summary.

    A *diagnosis* (:meth:`diagnose`) says in one phrase what many problems have in common; it
    leads the summary, and only a few of the problems it explains follow it unless ``--debug``."""

    def __init__(self) -> None:
        self.items: list[tuple[str, str]] = []
        self.diagnoses: list[tuple[str, list[str]]] = []

    def append(self, kind: str, message: str) -> None:
        self.items.append((kind, message))

    def diagnose(self, message: str, explained: list[str]) -> None:
        self.diagnoses.append((message, explained))

    @property
    def messages(self) -> list[str]:
        return [m for _, m in self.items]

    def raise_if_any(self, what: str) -> None:
        if not self.items and not self.diagnoses:
            return
        kinds = Counter(k for k, _ in self.items)
        first = {}
        for k, m in self.items:
            first.setdefault(k, m)
        summary = "; ".join([m for m, _ in self.diagnoses] + [
            f"{n} {k}{'s' if n > 1 and not k.endswith('config') else ''}" + (f" (e.g. {first[k]})" if n > 1 else f": {first[k]}")
            for k, n in kinds.items()])
        explained = [line for _, lines in self.diagnoses for line in lines]
        details = self.messages if len(self.items) > 1 or self.diagnoses else []
        if len(explained) > EXAMPLES:
            shown = explained[:EXAMPLES] + [f"... and {len(explained) - EXAMPLES} more tensors like these "
                                            f"(--debug lists them all)"]
        else:
            shown = explained
        raise ClawError(f"{what}: {summary}", details=shown + details,
                        debug_details=explained + details if len(explained) > EXAMPLES else None)


def _float_dtype(source: TensorStore) -> DType:
    return next((i.dtype for i in source.infos().values() if i.dtype.is_floating_point), float32)


def _numel(shape: Shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def plan_conversion(source: TensorStore, src: ExpandedTable, dst: ExpandedTable,
                    expected: dict[str, Shape], dtype: DType | None = None,
                    ignore_canonical: Iterable[str] = (), explain: Explain | None = None) -> Plan:
    """Check coverage and shapes from headers only; raise one ClawError listing every problem.

    ``expected`` maps each canonical key the target needs to its shape (from the family's
    framework model; computed from a labelled config, its sizes name their config fields);
    ``ignore_canonical`` names canonical keys the caller deliberately leaves out (tower
    extraction keeps one tower); ``explain`` spells a diagnosis in the source's own config
    fields (default: the canonical config's).
    """
    problems = Problems()
    ignore = set(ignore_canonical)
    keys = set(source.keys())

    # 1. every source tensor is mapped or explicitly dropped
    for k in source.keys():
        if k not in src.by_format and not src.dropped(k):
            problems.append("unconsumed source tensor", f"unconsumed source tensor '{k}' {source.info(k).shape}: no entry in {src.table.name}")

    # 2. source rules: present, optional-and-absent, or missing
    src_rules: list[Rule] = []
    for rule in src.rules:
        present = [k in keys for k in rule.format]
        if all(present):
            src_rules.append(rule)
        elif not any(present) and rule.optional:
            continue
        elif not all(c in ignore for c in rule.canonical):
            missing = [k for k, p in zip(rule.format, present) if not p]
            problems.append("missing source tensor", f"missing source tensor {', '.join(repr(m) for m in missing)} (for {', '.join(rule.canonical)})")

    # 3. canonical shapes from headers, checked against the framework's expectation
    canonical_shapes: dict[str, Shape] = {}
    canonical_dtypes: dict[str, DType] = {}
    for rule in src_rules:
        shapes = [source.info(k).shape for k in rule.format]
        try:
            out = rule.chain.load_shapes(shapes)
        except ClawError as e:
            problems.append("shape error", f"{rule.origin}: source {', '.join(rule.format)} {shapes}: {e}")
            continue
        except RuntimeError as e:
            problems.append("shape error", f"{rule.origin}: source {', '.join(rule.format)} has shapes {shapes} that the table's ops cannot take ({str(e).splitlines()[0]})")
            continue
        for name, shape in zip(rule.canonical, out):
            canonical_shapes[name] = shape
            # a constant (no format tensor) takes the checkpoint's floating dtype
            canonical_dtypes[name] = source.info(rule.format[0]).dtype if rule.format else _float_dtype(source)
    checked: list[tuple[str, Shape, Shape]] = []
    contradictions: list[tuple[str, Shape, Shape, str]] = []
    for name, shape in canonical_shapes.items():
        if name in ignore:
            continue
        if name not in expected:
            problems.append("unexpected tensor", f"'{name}' is produced by {src.by_canonical[name].origin} but the model config has no such tensor")
            continue
        checked.append((name, tuple(shape), tuple(expected[name])))
        if tuple(expected[name]) != tuple(shape):
            origin = src.by_canonical[name]
            contradictions.append((name, tuple(shape), tuple(expected[name]),
                                   f"shape contradicts the config: {', '.join(origin.format)} gives '{name}' {shape}, "
                                   f"the config expects {tuple(expected[name])}"))
    if contradictions:
        message, explained, rest = diagnose_shapes(checked, contradictions, explain)
        if message:
            problems.diagnose(message, explained)
        for line in rest:
            problems.append("shape contradicts the config", line)
    for name in expected:
        if name not in canonical_shapes and name not in ignore:
            rule = src.by_canonical.get(name)
            where = f" (source table maps it from {', '.join(repr(f) for f in rule.format)})" if rule else \
                f" (no entry for it in {src.table.name})"
            if rule is None or not rule.optional:
                problems.append("missing tensor", f"missing tensor '{name}'{where}")

    # 4. target rules: every canonical input available
    dst_rules: list[Rule] = []
    targets: list[TargetTensor] = []
    used: set[str] = set()
    for rule in dst.rules:
        if rule.canonical and all(c in ignore for c in rule.canonical):
            continue
        have = [c in canonical_shapes for c in rule.canonical]
        if not all(have):
            if rule.optional and not any(have):
                continue
            lacking = [c for c, h in zip(rule.canonical, have) if not h]
            if not any(f"'{c}'" in p for p in problems.messages for c in lacking):
                problems.append("unproducible target", f"cannot produce target {', '.join(rule.format)}: no source for {', '.join(lacking)}")
            continue
        try:
            shapes = rule.chain.save_shapes([canonical_shapes[c] for c in rule.canonical])
        except (ClawError, RuntimeError) as e:
            problems.append("unproducible target", f"{rule.origin}: cannot produce {', '.join(rule.format)}: {str(e).splitlines()[0]}")
            continue
        used.update(rule.canonical)
        dst_rules.append(rule)
        # a derived tensor (no canonical input: DINOv3's RoPE periods) takes the checkpoint's floating dtype
        like = canonical_dtypes[rule.canonical[0]] if rule.canonical else _float_dtype(source)
        for name, shape in zip(rule.format, shapes):
            targets.append(TargetTensor(name, tuple(shape), output_dtype(like, dtype)))

    # 5. nothing canonical may be silently lost on the way out
    for name in canonical_shapes:
        if name not in used and name not in ignore:
            problems.append("lost in target", f"'{name}' has no place in the target format ({dst.table.name}): converting would lose it")

    problems.raise_if_any(f"cannot convert {source.path}")
    return Plan(source, src_rules, dst_rules, canonical_shapes, canonical_dtypes, targets, dtype)
