"""Streaming merge of a PEFT LoRA adapter into a base checkpoint.

:func:`plan_merge` decides, from file headers alone, how every output tensor is made: which
tensor it starts from (the base's, or a full tensor the adapter stores), which LoRA module is
merged into it, and what happens to tied input/output embeddings.  :func:`write_merged` then
reads one base tensor at a time, merges in float32, and hands it to the streaming writer,
which casts once.  The adapter's factors are read only when their tensor comes up.

Adapters and bases may spell the same parameter differently (LLaVA under transformers 4 and
5); both sides are compared through :func:`canonical`.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np

from ..errors import ClawError
from ..io.dtypes import DType, output_dtype
from ..io.pipeline import write_pipelined
from ..io.readers import TensorStore
from .lora import Adapter, LoraModule, bias_delta, layer_fan_in_fan_out, merge_into, merged_linear, same_factors

# Other spellings of the same parameter -> the one clawconvert compares by (a causal LM's own).
KEY_ALIASES = (
    (re.compile(r"^model\.language_model\."), "model."),                  # LLaVA, transformers 5 modules
    (re.compile(r"^language_model\.model\."), "model."),                  # LLaVA, transformers 4 / llava-hf files
    (re.compile(r"^language_model\.lm_head\."), "lm_head."),              # LLaVA, transformers 4 / llava-hf files
    (re.compile(r"^model\.vision_tower\.(?:vision_model\.)?"), "vision_tower."),  # LLaVA, transformers 5 modules
    (re.compile(r"^vision_tower\.vision_model\."), "vision_tower."),      # LLaVA, transformers 4 / vLLM files
    (re.compile(r"^model\.multi_modal_projector\."), "multi_modal_projector."),  # LLaVA, transformers 5
)

# Input embedding and output head (what tie_word_embeddings shares, what new tokens grow), canonical names.
EMBEDDING_PAIRS = (
    ("model.embed_tokens.weight", "lm_head.weight"),   # llama qwen2 mistral gemma, LLaVA language models
    ("transformer.wte.weight", "lm_head.weight"),      # gpt2
)


def canonical(name: str) -> str:
    for pattern, repl in KEY_ALIASES:
        new = pattern.sub(repl, name, count=1)
        if new != name:
            return new
    return name


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


@dataclass
class OutTensor:
    name: str              # output name, in the base's spelling
    canonical: str
    shape: tuple[int, ...]
    dtype: DType
    recipe: Recipe


@dataclass
class MergePlan:
    tensors: list[OutTensor]
    tie: dict                       # what was done with tied embeddings, for the user and the manifest
    untied: bool                    # the output config must say tie_word_embeddings: false
    leftovers: dict[str, str]       # adapter full tensors with no base counterpart: path -> adapter key
    embeddings: tuple[str, str] | None   # canonical (input embedding, output head) when BASE has them
    vocab_rows: int | None               # rows of the input embedding
    summary: dict = field(default_factory=dict)

    def grow_vocab(self, rows: int) -> None:
        """Append ``rows`` new tokens, each at the mean row, to the input embedding and the output head."""
        if self.embeddings is None:
            raise ClawError("BASE has no embed_tokens.weight; new tokens need a llama-style language model "
                            "(llama, qwen2, mistral, gemma)")
        for t in self.tensors:
            if t.canonical in self.embeddings:
                t.recipe.extra_rows = rows
                t.shape = (self.vocab_rows + rows, *t.shape[1:])


def _store_order(store: TensorStore) -> list[str]:
    """Keys shard by shard, in each file's own order, so reads walk the files front to back."""
    files: dict = {}
    for name in store.keys():
        files.setdefault(store.info(name).file, []).append(name)
    return [n for f in sorted(files, key=str) for n in files[f]]


def plan_merge(base: TensorStore, adapter: Adapter, *, tied: bool, model_type: str,
               dtype: DType | None = None) -> MergePlan:
    """Plan every output tensor from headers; raise one ClawError listing all misfits."""
    index: dict[str, str] = {}
    for key in _store_order(base):
        c = canonical(key)
        if c in index:
            raise ClawError(f"{base.path}: '{index[c]}' and '{key}' are the same parameter spelled twice")
        index[c] = key
    recipes = {c: Recipe(("base", k)) for c, k in index.items()}
    errors: list[str] = []

    embeddings = next(((e, h) for e, h in EMBEDDING_PAIRS if e in index), None)
    pair = embeddings if tied else None
    if tied and pair is None:
        known = ", ".join(e for e, _ in EMBEDDING_PAIRS)
        raise ClawError(f"{base.path}: config ties input and output embeddings, but none of {known} is in the "
                        f"weights; clawconvert cannot tell which tensors the tie joins")
    embed, head = pair or (None, None)
    head_on_disk = head in index
    if pair:
        recipes[head] = Recipe(recipes[embed].start)

    def base_shape(c: str) -> tuple[int, ...]:
        return base.info(index[embed if c == head else c]).shape

    # full tensors the adapter stores: a base layer's own (shared by a tie) first, modules_to_save after
    leftovers, group_start, module_copies = {}, [], set()
    for path, key in sorted(adapter.full.items(), key=lambda kv: kv[0] not in adapter.shared):
        c = canonical(path)
        if c not in recipes:
            leftovers[path] = key
            continue
        have = adapter.store.info(key).shape
        if have != base_shape(c):
            errors.append(f"adapter tensor '{key}' has shape {have}, but base '{index.get(c, index.get(embed))}' "
                          f"is {base_shape(c)}")
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

    for path, module in adapter.modules.items():
        c = canonical(path + ".weight")
        if c not in recipes:
            errors.append(f"adapter tensor '{module.a}' targets '{path}', which BASE does not have "
                          f"(no '{path}.weight')")
            continue
        recipe, shape, where = recipes[c], base_shape(c), index.get(c, f"{head} (tied to {index.get(embed)})")
        if c in module_copies:
            errors.append(f"adapter module '{path}' has LoRA factors and a modules_to_save copy")
            continue
        fifo = layer_fan_in_fan_out(adapter, module, shape, model_type)
        try:
            adapter.check_fits(module, shape, fifo, where)
        except ClawError as e:
            errors.append(str(e))
            continue
        recipe.lora, recipe.fan_in_fan_out = module, fifo
        if module.b_bias:
            cb = canonical(path + ".bias")
            if cb not in recipes:
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
        untied, tie = _decide_tie(recipes[embed], recipes[head], adapter, index[embed], head)
        if not untied and recipes[head] is not recipes[embed]:
            recipes[head] = recipes[embed]    # one recipe: the delta lands once, never W + 2 delta

    order = list(index)
    if pair and not head_on_disk and untied:
        order.insert(order.index(embed) + 1, head)
    tensors = []
    for c in order:
        recipe, shape = recipes[c], base_shape(c)
        src_dtype = base.info(index[embed if c == head else c]).dtype
        tensors.append(OutTensor(index.get(c) or _head_name(index[embed], embed, head), c, shape,
                                 output_dtype(src_dtype, dtype), recipe))
    summary = {
        "lora_modules": len(adapter.modules),
        "embedding_modules": sum(m.kind == "embedding" for m in adapter.modules.values()),
        "dora_modules": sum(bool(m.magnitude) for m in adapter.modules.values()),
        "lora_bias_modules": sum(bool(m.b_bias) for m in adapter.modules.values()),
        "fan_in_fan_out_modules": sum(t.recipe.fan_in_fan_out for t in tensors if t.recipe.lora),
        "scales": {f"{s:g}": n for s, n in sorted(Counter(m.scale for m in adapter.modules.values()).items())},
        "replaced_from_adapter": sorted(t.name for t in tensors if t.recipe.start[0] == "adapter"),
    }
    vocab_rows = base_shape(embeddings[0])[0] if embeddings else None
    return MergePlan(tensors, tie, untied, leftovers, embeddings, vocab_rows, summary)


def _head_name(embed_key: str, embed: str, head: str) -> str:
    """The output head's name in the base's spelling (``language_model.lm_head.weight`` in llava-hf files)."""
    prefix = embed_key[: len(embed_key) - len(embed)] if embed_key.endswith(embed) else ""
    return (prefix if prefix == "" or prefix.endswith(".") else "") + head


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


def build_tensor(t: OutTensor, base: TensorStore, adapter: Adapter) -> np.ndarray:
    """One output tensor: read its start, merge in float32, append new rows. The writer casts once."""
    r = t.recipe
    kind, key = r.start
    x = adapter.store.read(key) if kind == "adapter" else base.read(key)
    if not (r.lora or r.bias_of or r.extra_rows):
        return x
    if (r.lora and r.lora.kind == "linear" and not r.lora.magnitude and not r.fan_in_fan_out
            and not r.bias_of and not r.extra_rows):
        return merged_linear(x, adapter, r.lora, t.dtype.np)   # the common case, in cache-sized bands
    x = x.astype(np.float32)  # a fresh float32 copy, merged in place
    if r.lora:
        x = merge_into(x, adapter, r.lora, r.fan_in_fan_out)
    if r.bias_of:
        x += bias_delta(adapter, r.bias_of)
    if r.extra_rows:
        mean = x.mean(axis=0, keepdims=True, dtype=np.float64).astype(np.float32)
        x = np.concatenate([x, np.broadcast_to(mean, (r.extra_rows, *x.shape[1:]))])
    return x


def _unchanged_bytes(t: OutTensor, base: TensorStore, adapter: Adapter, writer) -> tuple | None:
    """(file, offset, nbytes) when ``t`` is a source tensor's bytes as they are: copied in chunks."""
    r = t.recipe
    kind, key = r.start
    store = adapter.store if kind == "adapter" else base
    if (r.lora or r.bias_of or r.extra_rows or not hasattr(writer, "copy_range")
            or not hasattr(store, "byte_range") or store.info(key).dtype != t.dtype):
        return None
    return store.byte_range(key)


def write_merged(tensors: Iterable[OutTensor], base: TensorStore, adapter: Adapter, writer,
                 progress: Callable[[Iterable], Iterable] | None = None) -> None:
    """Write every output tensor: unchanged ones copied as bytes, merged ones built on a
    second thread while the previous one is written."""
    items = list(tensors)

    def produce():
        for t in (progress(items) if progress else items):
            span = _unchanged_bytes(t, base, adapter, writer)
            yield ("copy", t.name, span) if span is not None else ("write", t.name, build_tensor(t, base, adapter))
    # One BLAS thread: the merge runs many small (band x r) @ (r x in) products, between
    # which OpenBLAS's own threads spin -- measured on a 1B model, 10 s of CPU instead of 5 s.
    # Large weights are split over two threads of ours instead (lora.merged_linear).
    from threadpoolctl import threadpool_limits
    with threadpool_limits(limits=1, user_api="blas"):
        write_pipelined(produce(), writer)
