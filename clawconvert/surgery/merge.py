"""A LoRA merge as a tensor store: the base checkpoint as the unmerged PEFT model sees it.

:func:`plan_merge` decides, from file headers alone, how every tensor of the base is made:
which tensor it starts from (the base's, or a full tensor the adapter stores), which LoRA
module is merged into it, and what happens to tied input/output embeddings.  It returns a
:class:`MergedStore`, an ordinary :class:`~clawconvert.io.readers.TensorStore` in the base's
own key space: reading a tensor reads its start, adds ``B @ A * scale`` in float32 and casts
once.  The conversion engine then plans and streams it like any other source, through the
architecture's layout tables, so a merge, an assembly and a conversion are one mechanism: a
LoRA delta is one more step, applied in the key space the adapter was trained in, before the
tables' renames and ops run.

Adapter names are matched to base tensors through the architecture's layouts
(:class:`~clawconvert.architectures.Resolver`): an adapter trained under transformers 5
module names fits a base file in the transformers 4 spelling, and a text-only adapter trained
on the standalone LLM fits the VLM that holds it.
"""
from __future__ import annotations

import contextlib
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from ..architectures import Resolver, part_of
from ..errors import ClawError
from ..io.dtypes import DType, output_dtype
from ..io.readers import MappedRows, TensorInfo, TensorStore
from .lora import (Adapter, LinearMerge, LoraModule, bias_delta, layer_fan_in_fan_out, merge_into, merged_linear,
                   same_factors)


@dataclass
class Recipe:
    """How one merged tensor is made: a start tensor, then at most one LoRA module and one bias delta."""

    start: tuple[str, str]                 # ("base" | "adapter", key)
    lora: LoraModule | None = None
    fan_in_fan_out: bool = False
    bias_of: LoraModule | None = None      # this is a bias that gains lora_B.bias * scale
    extra_rows: int = 0                    # rows appended at the mean row (new tokens)

    @property
    def changes(self) -> bool:
        return self.start[0] == "adapter" or self.lora is not None or self.bias_of is not None

    @property
    def computes(self) -> bool:
        return self.lora is not None or self.bias_of is not None or self.extra_rows > 0


class MergedStore(TensorStore):
    """The base's tensors with the adapter merged in, read one at a time.

    Keys are the base's own, plus the output head when a tie is undone and the base stores no
    head.  ``info`` gives the base's dtype (the output dtype follows it, as for any source);
    ``read`` returns a merged tensor already cast to the output dtype where the banded merge
    makes it, float32 otherwise (the engine casts once).  Untouched tensors keep their
    ``byte_range``, so the engine copies their bytes without decoding them."""

    def __init__(self, base: TensorStore, adapter: Adapter, recipes: dict[str, Recipe], twins: dict[str, str],
                 dtype: DType | None):
        """``recipes`` in writing order; ``twins`` names, for a key the base does not store (an
        untied head), the base tensor whose shape and dtype it takes (the input embedding)."""
        super().__init__(base.path)
        self.base, self.adapter, self.recipes, self.dtype = base, adapter, recipes, dtype
        for key, recipe in recipes.items():
            info = base.info(twins.get(key, key))
            self._infos[key] = TensorInfo(key, info.shape, info.dtype, info.file)

    def _read(self, name: str, info: TensorInfo) -> np.ndarray:
        return build_tensor(self.recipes[name], self.base, self.adapter, output_dtype(info.dtype, self.dtype))

    def filler(self, name: str, out: DType):
        """A :class:`~.lora.LinearMerge` that writes the merged rows straight into the writer's
        buffers, reading the base weight's rows from its file as it goes; None when this tensor
        is not a plain Linear LoRA merge of a tensor stored as plain bytes."""
        r = self.recipes[name]
        kind, key = r.start
        if (not r.lora or r.lora.kind != "linear" or r.lora.magnitude or r.fan_in_fan_out or r.bias_of
                or r.extra_rows or kind != "base" or not hasattr(self.base, "byte_range")):
            return None
        where, info = self.base.byte_range(key), self.base.info(key)
        if where is None or len(info.shape) != 2:
            return None
        return _MappedMerge(where, info, self.adapter, r.lora)

    def byte_range(self, name: str):
        r = self.recipes[name]
        if r.start[0] != "base" or r.computes or not hasattr(self.base, "byte_range"):
            return None
        return self.base.byte_range(r.start[1])

    @contextlib.contextmanager
    def checks_deferred(self):
        with self.base.checks_deferred():
            yield


class _MappedMerge:
    """A LinearMerge over the base weight's rows mapped from its file, unmapped when filled."""

    def __init__(self, where: tuple, info, adapter: Adapter, module: LoraModule):
        self.where, self.info, self.adapter, self.module = where, info, adapter, module
        self.shape = tuple(info.shape)

    def fill(self, dest: np.ndarray, first: int, last: int) -> None:
        file, offset, _ = self.where
        rows = MappedRows(file, offset, self.shape, self.info.dtype.np)
        try:
            LinearMerge(rows.rows, self.shape, self.adapter.read(self.module.a), self.adapter.read(self.module.b),
                        self.module.scale, rows.done).fill(dest, first, last)
        finally:
            rows.close()


@dataclass
class MergePlan:
    store: MergedStore
    resolver: Resolver
    tie: dict                       # what was done with tied embeddings, for the user and the manifest
    untied: bool                    # the output config must say tie_word_embeddings: false
    leftovers: dict[str, str]       # adapter full tensors with no base counterpart: path -> adapter key
    embeddings: tuple[str, str] | None   # base keys of (input embedding, output head) when BASE has them
    vocab_rows: int | None               # rows of the input embedding
    summary: dict = field(default_factory=dict)

    def grow_vocab(self, rows: int) -> None:
        """Append ``rows`` new tokens, each at the mean row, to the input embedding and the output head."""
        if self.embeddings is None:
            raise ClawError("BASE has no input embedding the architecture table names; new tokens need one")
        for key in dict.fromkeys(self.embeddings):
            if key in self.store:
                self.store.recipes[key].extra_rows = rows
                info = self.store.info(key)
                self.store._infos[key] = TensorInfo(key, (self.vocab_rows + rows, *info.shape[1:]), info.dtype,
                                                    info.file)


def _store_order(store: TensorStore) -> list[str]:
    """Keys shard by shard, in each file's own order, so reads walk the files front to back."""
    files: dict = {}
    for name in store.keys():
        files.setdefault(store.info(name).file, []).append(name)
    return [n for f in sorted(files, key=str) for n in files[f]]


def plan_merge(base: TensorStore, adapter: Adapter, resolver: Resolver, *, tied_pair: tuple[str, str] | None,
               tied: bool, conv1d: bool = False, dtype: DType | None = None) -> MergePlan:
    """Plan every merged tensor from headers; raise one ClawError listing all misfits.

    ``tied_pair`` is the architecture's (input embedding, output head) in canonical names and
    ``tied`` whether the config ties them."""
    layout = resolver.base_layout
    index: dict[str, str] = {}
    for key in _store_order(base):
        c = layout.to_canonical(key)
        if c is None:
            continue            # dropped buffers; the engine reports anything else
        if c in index:
            raise ClawError(f"{base.path}: '{index[c]}' and '{key}' are the same parameter spelled twice")
        index[c] = key
    recipes = {c: Recipe(("base", k)) for c, k in index.items()}
    errors: list[str] = []

    embeddings = tied_pair if tied_pair and tied_pair[0] in index else None
    pair = embeddings if tied else None
    if tied and pair is None:
        what = tied_pair[0] if tied_pair else "an input embedding"
        raise ClawError(f"{base.path}: config ties input and output embeddings, but {what} is not in the weights "
                        f"({resolver.arch.table_name}, layout {layout.name}); clawconvert cannot tell which tensors "
                        f"the tie joins")
    embed, head = pair or (None, None)
    head_on_disk = head in index
    if pair:
        recipes[head] = Recipe(recipes[embed].start)

    def base_key(c: str) -> str:
        return index.get(c) or f"{resolver.file(c)} (tied to {index.get(embed)})"

    def base_shape(c: str) -> tuple[int, ...]:
        return base.info(index[embed if c == head else c]).shape

    # full tensors the adapter stores: a base layer's own (shared by a tie) first, modules_to_save after
    leftovers, group_start, module_copies = {}, [], set()
    for path, key in sorted(adapter.full.items(), key=lambda kv: kv[0] not in adapter.shared):
        c = resolver.canonical(path)
        if c is None or c not in recipes:
            leftovers[path] = key
            continue
        have = adapter.store.info(key).shape
        if have != base_shape(c):
            errors.append(f"adapter tensor '{key}' has shape {have}, but base '{base_key(c)}' is {base_shape(c)}")
            continue
        if pair and c in pair and path in adapter.shared:
            group_start.append(key)
            recipes[embed].start = recipes[head].start = ("adapter", key)
        else:
            recipes[c].start = ("adapter", key)
            if path not in adapter.shared:
                module_copies.add(c)
    if len(group_start) > 1 and not _same_tensors(adapter, group_start):
        errors.append(f"adapter tensors {' and '.join(map(repr, group_start))} both fill the tied embedding "
                      f"but differ")

    by_part: Counter = Counter()
    for path, module in adapter.modules.items():
        c = resolver.canonical(path + ".weight")
        if c is None or c not in recipes:
            errors.append(f"adapter tensor '{module.a}' targets '{path}', which BASE does not have "
                          f"(no '{path}.weight' in any {resolver.arch.name} layout)")
            continue
        recipe, shape, where = recipes[c], base_shape(c), base_key(c)
        if c in module_copies:
            errors.append(f"adapter module '{path}' has LoRA factors and a modules_to_save copy")
            continue
        fifo = layer_fan_in_fan_out(adapter, module, shape, conv1d)
        try:
            adapter.check_fits(module, shape, fifo, where)
        except ClawError as e:
            errors.append(str(e))
            continue
        recipe.lora, recipe.fan_in_fan_out = module, fifo
        by_part[part_of(c)] += 1
        if module.b_bias:
            cb = resolver.canonical(path + ".bias")
            if cb is None or cb not in recipes:
                errors.append(f"adapter tensor '{module.b_bias}' (lora_bias) needs a bias in base '{path}', "
                              f"which has none")
            elif adapter.store.info(module.b_bias).shape != base_shape(cb):
                errors.append(f"adapter tensor '{module.b_bias}' has shape {adapter.store.info(module.b_bias).shape}"
                              f", but base '{index[cb]}' is {base_shape(cb)}")
            else:
                recipes[cb].bias_of = module
    if errors:
        raise ClawError(f"adapter {adapter.path} does not fit base {base.path}: {errors[0]}", details=errors[1:])

    untied, tie = False, {"tied": bool(pair)}
    if pair:
        untied, tie = _decide_tie(recipes[embed], recipes[head], adapter, index[embed], resolver.file(head))
        if not untied and recipes[head] is not recipes[embed]:
            recipes[head] = recipes[embed]    # one recipe: the delta lands once, never W + 2 delta

    order = list(index)
    if pair and not head_on_disk:
        if untied:
            order.insert(order.index(embed) + 1, head)
        else:
            del recipes[head]                  # still tied and not on disk: nothing to write
    keyed = {index.get(c) or resolver.file(c): recipes[c] for c in order}
    twins = {resolver.file(head): index[embed]} if pair and not head_on_disk and untied else {}
    store = MergedStore(base, adapter, keyed, twins, dtype)

    modified = [k for k, r in keyed.items() if r.changes]
    summary = {
        "lora_modules": len(adapter.modules),
        "lora_modules_by_part": dict(sorted(by_part.items())),
        "embedding_modules": sum(m.kind == "embedding" for m in adapter.modules.values()),
        "dora_modules": sum(bool(m.magnitude) for m in adapter.modules.values()),
        "lora_bias_modules": sum(bool(m.b_bias) for m in adapter.modules.values()),
        "fan_in_fan_out_modules": sum(r.fan_in_fan_out for r in keyed.values() if r.lora),
        "scales": {f"{s:g}": n for s, n in sorted(Counter(m.scale for m in adapter.modules.values()).items())},
        "replaced_from_adapter": sorted(k for k, r in keyed.items() if r.start[0] == "adapter"),
        "tensors_changed": len(modified),
    }
    embed_keys = (index[tied_pair[0]], index.get(tied_pair[1]) or resolver.file(tied_pair[1])) if embeddings else None
    vocab_rows = base.info(index[tied_pair[0]]).shape[0] if embeddings else None
    return MergePlan(store, resolver, tie, untied, leftovers, embed_keys, vocab_rows, summary)


def _same_tensors(adapter: Adapter, keys: list[str]) -> bool:
    first = adapter.store.read(keys[0])
    return all(_equal(first, adapter.store.read(k)) for k in keys[1:])


def _equal(a: np.ndarray, b: np.ndarray) -> bool:
    """Same dtype, shape and values (torch.equal's meaning)."""
    return a.dtype == b.dtype and a.shape == b.shape and bool(np.array_equal(a, b))


def _same_start(a: Recipe, b: Recipe, adapter: Adapter) -> bool:
    if a.start == b.start:
        return True
    if a.start[0] == b.start[0] == "adapter":
        return _equal(adapter.store.read(a.start[1]), adapter.store.read(b.start[1]))
    return False


def _decide_tie(embed: Recipe, head: Recipe, adapter: Adapter, embed_key: str, head_name: str) -> tuple[bool, dict]:
    """Keep the tie only when the unmerged PEFT model gives both sides the same tensor."""
    same_lora = (embed.lora is None and head.lora is None) or (
        embed.lora is not None and head.lora is not None and same_factors(embed.lora, head.lora, adapter))
    same = same_lora and _same_start(embed, head, adapter)
    touched = embed.changes or head.changes
    if same:
        how = ("the adapter does not touch them" if not touched else
               "both sides carry the same change (as peft's ensure_weight_tying makes them); it is applied "
               "once, not twice as peft's merge_and_unload does (W + 2*delta)")
        return False, {"tied": True, "action": "kept", "detail": f"tied embeddings kept: {how}"}
    sides = [n for n, r in ((embed_key, embed), (head_name, head)) if r.changes]
    what = f"only {sides[0]} changes" if len(sides) == 1 else f"{sides[0]} and {sides[1]} change differently"
    return True, {"tied": True, "action": "untied",
                  "detail": (f"tied embeddings untied: in the unmerged PEFT model {what}, so {head_name} is "
                             f"written as its own tensor and tie_word_embeddings is set to false")}


def build_tensor(r: Recipe, base: TensorStore, adapter: Adapter, out: DType) -> np.ndarray:
    """One merged tensor: read its start, merge in float32, append new rows (the writer casts once)."""
    kind, key = r.start
    x = adapter.store.read(key) if kind == "adapter" else base.read(key)
    if not r.computes:
        return x
    if (r.lora and r.lora.kind == "linear" and not r.lora.magnitude and not r.fan_in_fan_out
            and not r.bias_of and not r.extra_rows):
        return merged_linear(x, adapter, r.lora, out.np)   # the common case, in cache-sized bands
    x = x.astype(np.float32)  # a fresh float32 copy, merged in place
    if r.lora:
        x = merge_into(x, adapter, r.lora, r.fan_in_fan_out)
    if r.bias_of:
        x += bias_delta(adapter, r.bias_of)
    if r.extra_rows:
        mean = x.mean(axis=0, keepdims=True, dtype=np.float64).astype(np.float32)
        x = np.concatenate([x, np.broadcast_to(mean, (r.extra_rows, *x.shape[1:]))])
    return x
