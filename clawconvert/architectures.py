"""Architecture tables: ``mappings/architectures/*.yaml``, one file per model architecture.

Where a family table (``mappings/<family>/<format>.yaml``) says how one *tensor* is spelled
and reshaped in a format, an architecture table says how a whole *model* is cut into parts
and how each part is prefixed in the files and module trees found in the wild:

.. code-block:: yaml

    architecture: qwen2_5_vl
    model_types:                            # config.json model_type -> class and config defaults
      qwen2_5_vl: {class: Qwen2_5_VLForConditionalGeneration, tie_word_embeddings: false}
    parts:                                  # lm / vision / connector: where each part's config lives
      lm:     {config: text_config, standalone: {class: Qwen2ForCausalLM, model_type: qwen2}}
      vision: {config: vision_config, standalone: null, why: "no standalone transformers class"}
      connector: {}
    layouts:                                # spellings in the wild, most widely loaded first
      transformers-4:
        loaded_by: transformers 4.x and 5.x, vLLM
        prefixes: {lm/model.: model., lm/lm_head.: lm_head., vision/: visual., connector/merger.: visual.merger.}
    write: transformers-4                   # the layout outputs use unless told otherwise
    tied: [lm/model.embed_tokens.weight, lm/lm_head.weight]
    side_files: [tokenizer.json, preprocessor_config.json]

A *canonical* name is ``<part>/<name inside the part>``, where the name inside the part is
how the part's own standalone model spells it (``lm/model.layers.0.mlp.up_proj.weight`` is
``Qwen2ForCausalLM``'s ``model.layers.0.mlp.up_proj.weight``).  A layout is a list of prefix
pairs, canonical prefix -> file prefix; a name is translated through its longest matching
prefix, so ``visual.merger.ln_q.weight`` is ``connector/merger.ln_q.weight`` while
``visual.blocks.0.attn.qkv.weight`` is ``vision/blocks.0.attn.qkv.weight``.

Plain causal LMs share ``causal_lm.yaml``; each row of its ``model_types`` carries the
config class's ``tie_word_embeddings`` default and, where it differs, the tied pair.  Every
row is checked against the installed transformers by ``tests/test_architectures.py``.

Files that hold one part alone (a connector saved by research code, a CLIP model used as a
LLaVA tower) are described by ``part_sources`` layouts in the table of the architecture that
assembles them (``llava.yaml``).
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable

from .errors import ClawError
from .ops import Chain
from .tables import ExpandedTable, Rule, Table, mappings_root, read_yaml

PARTS = ("lm", "vision", "connector")
PART_NAMES = {"lm": "language model", "vision": "vision tower", "connector": "connector"}
_TOP_KEYS = {"architecture", "description", "model_types", "parts", "layouts", "write", "tied", "side_files",
             "part_sources", "drop", "vision_towers", "tokenizer"}
_PART_KEYS = {"config", "standalone", "why", "format", "params", "optional"}
_ROW_KEYS = {"class", "tie_word_embeddings", "tied", "conv1d", "note", "remote_code"}
_STANDALONE_KEYS = {"class", "model_type", "from_config", "by_model_type", "drop", "set", "config", "require", "notes"}


def part_of(canonical: str) -> str:
    return canonical.split("/", 1)[0]


@dataclass(frozen=True)
class Layout:
    """One spelling of a model's tensor names: canonical prefix -> file prefix, longest match wins."""

    name: str
    loaded_by: str
    prefixes: tuple[tuple[str, str], ...]     # (canonical prefix, file prefix)
    note: str = ""
    files: tuple[str, ...] = ()               # part_sources: the file names this layout is found in

    def to_canonical(self, key: str) -> str | None:
        best = None
        for canon, file in self.prefixes:
            if key.startswith(file) and (best is None or len(file) > len(best[1])):
                best = (canon, file)
        return None if best is None else best[0] + key[len(best[1]):]

    def to_file(self, canonical: str) -> str | None:
        best = None
        for canon, file in self.prefixes:
            if canonical.startswith(canon) and (best is None or len(canon) > len(best[0])):
                best = (canon, file)
        return None if best is None else best[1] + canonical[len(best[0]):]

    def specificity(self, key: str) -> int:
        """Length of the file prefix that explains ``key`` (-1: none)."""
        return max((len(f) for _, f in self.prefixes if key.startswith(f)), default=-1)

    def parts(self) -> set[str]:
        return {part_of(c) for c, _ in self.prefixes}


@dataclass(frozen=True)
class Part:
    name: str
    config: str | None                 # where its config lives in config.json (None: the top level)
    standalone: dict | None            # {class, model_type, ...}: the transformers model that holds it alone
    why: str = ""                      # why there is no standalone model
    format: str = "hf"                 # hf, or "family/format": the family table its tensors go through
    params: dict = field(default_factory=dict)   # that table's params: name -> expression over the config
    optional: bool = False                       # checkpoints may lack it (original LLaVA's frozen tower)


@dataclass(frozen=True)
class Architecture:
    name: str
    description: str
    model_types: dict[str, dict]
    parts: dict[str, Part]
    layouts: tuple[Layout, ...]
    write: str
    tied: tuple[str, str] | None
    side_files: tuple[str, ...]
    part_sources: dict[str, tuple[Layout, ...]]
    drop: tuple[str, ...]
    sha256: str
    vision_towers: dict[str, dict] = field(default_factory=dict)
    tokenizer: dict = field(default_factory=dict)

    @property
    def table_name(self) -> str:
        return f"architectures/{self.name}"

    def layout(self, name: str) -> Layout:
        for lay in self.layouts:
            if lay.name == name:
                return lay
        raise ClawError(f"{self.table_name}: no layout '{name}' (it has: {', '.join(l.name for l in self.layouts)})")

    @property
    def write_layout(self) -> Layout:
        return self.layout(self.write)

    def row(self, model_type: str) -> dict:
        return self.model_types.get(model_type, {})

    def tie_default(self, model_type: str) -> bool | None:
        return self.row(model_type).get("tie_word_embeddings")

    def tied_pair(self, model_type: str) -> tuple[str, str] | None:
        pair = self.row(model_type).get("tied", self.tied)
        return tuple(pair) if pair else None

    def part_source(self, part: str, name: str) -> Layout:
        for lay in self.part_sources.get(part, ()):
            if lay.name == name:
                return lay
        raise ClawError(f"{self.table_name}: no part_sources.{part}.{name}")

    def dropped(self, key: str) -> bool:
        return any(key.endswith(suffix) for suffix in self.drop)

    def detect_layout(self, keys: Iterable[str], origin: Any) -> Layout:
        """The layout that explains every key, the most specific one when several do."""
        keys = [k for k in keys if not self.dropped(k)]
        scored = []
        for lay in self.layouts:
            spec = [lay.specificity(k) for k in keys]
            if all(s >= 0 for s in spec):
                scored.append((sum(spec), -self.layouts.index(lay), lay))
        if not scored:
            best = max(self.layouts, key=lambda lay: sum(lay.specificity(k) >= 0 for k in keys))
            stray = [k for k in keys if best.specificity(k) < 0]
            raise ClawError(f"{origin}: {len(stray)} tensor(s) fit no known {self.name} layout, e.g. '{stray[0]}' "
                            f"(known prefixes: {', '.join(sorted({f for l in self.layouts for _, f in l.prefixes}))})",
                            details=[f"no layout explains '{k}'" for k in stray[1:20]])
        return max(scored, key=lambda s: s[:2])[2]

    def part_config(self, part: str, config: dict) -> dict:
        """The part's own config dict inside ``config.json`` (a legacy flat config: the top level)."""
        spec = self.parts[part]
        sub = config.get(spec.config) if spec.config else None
        if sub is None:     # Qwen2-VL in transformers < 4.52, Qwen-1: the LM's fields at the top level
            sub = {k: v for k, v in config.items() if not k.endswith("_config")}
        return json.loads(json.dumps(sub))

    def standalone(self, part: str, config: dict) -> tuple[str, dict, list[str]]:
        """(transformers class, config.json, notes) of ``part`` as a model of its own, translated
        from this model's ``config`` by the part's ``standalone`` row.

        ``config`` (field: expression over the part's config, ``{value: V}`` a literal) builds
        the config afresh; otherwise the part's config is copied, ``drop`` (dotted keys) removed,
        ``set`` applied.  ``require`` (expression: reason) refuses what would change the
        function, ``notes`` (expression: text) says what acts only on some inputs.
        ``from_config: model_type`` takes the class from the part config's own model_type
        (causal_lm.yaml's rows, llava.yaml's vision_towers)."""
        spec = self.parts.get(part)
        if spec is None:
            raise ClawError(f"{self.description or self.name} has no {PART_NAMES.get(part, part)}")
        if not spec.standalone:
            raise ClawError(f"{self.description or self.name}: cannot write its {PART_NAMES.get(part, part)} alone: "
                            f"{spec.why or 'no standalone model class'}")
        sub = self.part_config(part, config)
        row = dict(spec.standalone)
        if "by_model_type" in row:      # original LLaVA: llava_llama holds a llama
            mt = row["by_model_type"].get(str(config.get("model_type")))
            if mt is None:
                raise ClawError(f"{self.name}: no language model known for model_type '{config.get('model_type')}'")
            sub["model_type"] = mt
            row["from_config"] = "model_type"
        if row.get("from_config") == "model_type":
            mt = sub.get("model_type", "")
            if part == "lm":
                cls = load_architecture("causal_lm").row(mt).get("class")
            else:
                cls = load_architecture("llava").vision_towers.get(mt, {}).get("class")
            if not cls:
                raise ClawError(f"{self.name}: no standalone class known for its {part} model_type '{mt}'")
            row.update({"class": cls, "model_type": mt})
        for expr, why in (row.get("require") or {}).items():
            if not evaluate_config(expr, sub, self.table_name):
                raise ClawError(f"{self.description or self.name} has {why}; it has no lossless "
                                f"{row['class']} form ({expr} does not hold)")
        notes = [str(text).format(**sub) for expr, text in (row.get("notes") or {}).items()
                 if evaluate_config(expr, sub, self.table_name)]
        if "config" in row:
            fresh = {}
            for key, expr in row["config"].items():
                value = expr["value"] if isinstance(expr, dict) else evaluate_config(str(expr), sub, self.table_name)
                fresh[key] = value
            for key in ("torch_dtype", "dtype"):
                if key in sub:
                    fresh[key] = sub[key]
            sub = fresh
        for dotted in row.get("drop", ()):
            if dotted.endswith("*"):          # a prefix: every top-level key that starts with it
                for key in [k for k in sub if k.startswith(dotted[:-1])]:
                    del sub[key]
                continue
            *path, last = dotted.split(".")
            node = sub
            for k in path:
                node = node.get(k) if isinstance(node, dict) else None
            if isinstance(node, dict):
                node.pop(last, None)
        sub.update(row.get("set", {}))
        for key in ("architectures", "transformers_version", "_name_or_path", "auto_map"):
            sub.pop(key, None)
        sub["model_type"] = row["model_type"]
        sub["architectures"] = [row["class"]]
        return row["class"], sub, notes

    def table(self, layout: Layout) -> Table:
        """A :class:`Table` record (name and hash) for manifests."""
        return Table(name=f"{self.table_name}#{layout.name}", format=layout.name, family=self.name,
                     sha256=self.sha256, identity=True, placeholders={}, tensors={}, drop=list(self.drop))


# ------------------------------------------------------------------------------------
# rename tables for the engine
# ------------------------------------------------------------------------------------
def rename_table(name: Table, pairs: Iterable[tuple[str, str]], drop: Iterable[str] = ()) -> ExpandedTable:
    """An :class:`ExpandedTable` of plain renames, (canonical, file) per tensor, in order;
    ``drop``: suffixes of file tensors that are not weights (buffers), ignored when reading."""
    rules = [Rule((c,), (f,), Chain([]), False, f"{name.name}: {f}") for c, f in pairs]
    return ExpandedTable(name, rules, [re.compile(".*" + re.escape(s) + "$") for s in drop])


# ------------------------------------------------------------------------------------
# loading and validation
# ------------------------------------------------------------------------------------
def _fail(name: str, message: str) -> ClawError:
    return ClawError(f"architecture table {name}: {message}")


def _layouts(name: str, data: Any, where: str) -> tuple[Layout, ...]:
    if not isinstance(data, dict) or not data:
        raise _fail(name, f"'{where}' must map layout names to {{loaded_by, prefixes}}")
    out = []
    for lname, spec in data.items():
        if not isinstance(spec, dict) or not isinstance(spec.get("prefixes"), dict) or not spec["prefixes"]:
            raise _fail(name, f"{where}.{lname}: needs 'prefixes' (canonical prefix: file prefix)")
        extra = set(spec) - {"loaded_by", "prefixes", "note", "files"}
        if extra:
            raise _fail(name, f"{where}.{lname}: unknown keys {sorted(extra)}")
        pairs = []
        for canon, file in spec["prefixes"].items():
            file = "" if file is None else file
            if not isinstance(canon, str) or not isinstance(file, str) or "/" not in canon:
                raise _fail(name, f"{where}.{lname}: '{canon}: {file}' must be 'part/prefix: file prefix'")
            if part_of(canon) not in PARTS:
                raise _fail(name, f"{where}.{lname}: unknown part '{part_of(canon)}' (parts: {', '.join(PARTS)})")
            pairs.append((canon, file))
        files = [f for _, f in pairs]
        if len(set(files)) != len(files):
            raise _fail(name, f"{where}.{lname}: two canonical prefixes share one file prefix")
        lay = Layout(str(lname), str(spec.get("loaded_by", "")), tuple(pairs), str(spec.get("note", "")),
                     tuple(spec.get("files") or ()))
        for canon, file in pairs:   # every pair must survive the round trip through the longest-match rule
            probe = canon + "x"
            if lay.to_canonical(lay.to_file(probe) or "") != probe:
                raise _fail(name, f"{where}.{lname}: prefix '{canon}' does not translate back from '{file}'")
        out.append(lay)
    return tuple(out)


def _validate(name: str, data: Any, raw: bytes) -> Architecture:
    if not isinstance(data, dict):
        raise _fail(name, "not a YAML mapping")
    unknown = set(data) - _TOP_KEYS
    if unknown:
        raise _fail(name, f"unknown keys {sorted(unknown)}")
    if data.get("architecture") != name:
        raise _fail(name, f"declares architecture {data.get('architecture')!r}")
    rows = data.get("model_types")
    if not isinstance(rows, dict) or not rows:
        raise _fail(name, "'model_types' must map model_type -> {class, tie_word_embeddings}")
    for mt, row in rows.items():
        row = row or {}
        if not isinstance(row, dict) or set(row) - _ROW_KEYS:
            raise _fail(name, f"model_types.{mt}: keys must be among {sorted(_ROW_KEYS)}")
        rows[mt] = row
    parts = {}
    for pname, spec in (data.get("parts") or {}).items():
        spec = spec or {}
        if pname not in PARTS or not isinstance(spec, dict) or set(spec) - _PART_KEYS:
            raise _fail(name, f"parts.{pname}: a part is one of {PARTS} with keys among {sorted(_PART_KEYS)}")
        alone = spec.get("standalone")
        if alone is not None and (not isinstance(alone, dict) or set(alone) - _STANDALONE_KEYS):
            raise _fail(name, f"parts.{pname}.standalone: keys must be among {sorted(_STANDALONE_KEYS)}")
        fmt = str(spec.get("format", "hf"))
        if fmt != "hf" and fmt.count("/") != 1:
            raise _fail(name, f"parts.{pname}.format: write hf or FAMILY/FORMAT (a table in mappings/)")
        parts[pname] = Part(pname, spec.get("config"), alone, str(spec.get("why", "")), fmt,
                            dict(spec.get("params") or {}), bool(spec.get("optional", False)))
    layouts = _layouts(name, data.get("layouts"), "layouts")
    for lay in layouts:
        missing = lay.parts() - set(parts)
        if missing:
            raise _fail(name, f"layout {lay.name} prefixes undeclared parts {sorted(missing)}")
    write = data.get("write", layouts[0].name)
    if write not in {lay.name for lay in layouts}:
        raise _fail(name, f"'write: {write}' names no layout")
    tied = data.get("tied")
    if tied is not None and (not isinstance(tied, list) or len(tied) != 2):
        raise _fail(name, "'tied' must be [input embedding, output head] canonical names")
    sources = {p: _layouts(name, spec, f"part_sources.{p}") for p, spec in (data.get("part_sources") or {}).items()}
    towers = data.get("vision_towers") or {}
    for mt, row in towers.items():
        if not isinstance(row, dict) or not {"tower", "class", "prefix_tokens"} <= set(row) <= \
                {"tower", "class", "prefix_tokens", "write"}:
            raise _fail(name, f"vision_towers.{mt}: needs {{tower: MODEL_TYPE, class: NAME, prefix_tokens: N}} "
                              f"(and optionally write: LAYOUT)")
    return Architecture(vision_towers=towers, tokenizer=dict(data.get("tokenizer") or {}), name=name, description=str(data.get("description", "")), model_types=rows, parts=parts,
                        layouts=layouts, write=write, tied=tuple(tied) if tied else None,
                        side_files=tuple(data.get("side_files") or ()), part_sources=sources,
                        drop=tuple(data.get("drop") or ()), sha256=hashlib.sha256(raw).hexdigest())


def _root() -> Path:
    return mappings_root() / "architectures"


@lru_cache(maxsize=None)
def load_architecture(name: str) -> Architecture:
    path = _root() / f"{name}.yaml"
    data, raw = read_yaml(path, f"architecture table {name}", f"no architecture table '{name}' ({path} missing)")
    return _validate(name, data, raw)


@lru_cache(maxsize=None)
def all_architectures() -> dict[str, Architecture]:
    return {p.stem: load_architecture(p.stem) for p in sorted(_root().glob("*.yaml"))}


def architecture_for(model_type: str) -> Architecture | None:
    """The table that knows ``model_type`` (a VLM's own table before the shared causal-LM one)."""
    hits = [a for a in all_architectures().values() if model_type in a.model_types]
    return hits[0] if hits else None


def model_architecture(path: Path) -> tuple[Architecture, dict] | None:
    """(table, config.json) of an HF directory whose model_type a table knows; None otherwise
    (no config.json, one that does not parse: the caller's own reading reports that)."""
    from .io.readers import read_json_file
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return None
    try:
        config = read_json_file(cfg, "config.json")
    except ClawError:
        return None
    if not isinstance(config, dict):
        return None
    arch = architecture_for(str(config.get("model_type")))
    return (arch, config) if arch is not None else None


def known_model_types() -> list[str]:
    return sorted({mt for a in all_architectures().values() for mt in a.model_types})


def evaluate_config(expr: str, config: dict, origin: str = "architecture table"):
    """A table expression over config fields: names, numbers, + - * / //, comparisons, and/or/not."""
    import ast
    import operator as op
    binops = {ast.Add: op.add, ast.Sub: op.sub, ast.Mult: op.mul, ast.FloorDiv: op.floordiv, ast.Div: op.truediv}
    cmps = {ast.Eq: op.eq, ast.NotEq: op.ne, ast.Lt: op.lt, ast.LtE: op.le, ast.Gt: op.gt, ast.GtE: op.ge}
    try:
        tree = ast.parse(expr, mode="eval").body
    except SyntaxError as e:
        raise ClawError(f"{origin}: cannot read expression {expr!r}") from e

    def ev(n):
        if isinstance(n, ast.Constant) and isinstance(n.value, (int, float, str, bool)):
            return n.value
        if isinstance(n, ast.Name):
            if n.id not in config:
                raise ClawError(f"config.json has no '{n.id}' (needed by {origin}: {expr})")
            return config[n.id]
        if isinstance(n, ast.BinOp) and type(n.op) in binops:
            return binops[type(n.op)](ev(n.left), ev(n.right))
        if isinstance(n, ast.UnaryOp) and isinstance(n.op, ast.Not):
            return not ev(n.operand)
        if isinstance(n, ast.UnaryOp) and isinstance(n.op, ast.USub):
            return -ev(n.operand)
        if isinstance(n, ast.BoolOp):
            vals = [ev(v) for v in n.values]
            return all(vals) if isinstance(n.op, ast.And) else any(vals)
        if isinstance(n, ast.Compare) and len(n.ops) == 1 and type(n.ops[0]) in cmps:
            return cmps[type(n.ops[0])](ev(n.left), ev(n.comparators[0]))
        raise ClawError(f"{origin}: expression {expr!r}: only names, numbers, arithmetic and comparisons")
    return ev(tree)


@dataclass
class Resolver:
    """Names from any layout of an architecture (an adapter's module paths, say) -> the base's files.

    ``canonical`` maps a name to its canonical form through the first layout under which it
    is a tensor of the base (``known``); a standalone LM's names also reach a VLM's ``lm`` part.
    """

    arch: Architecture
    base_layout: Layout
    known: set[str]
    extra_layouts: tuple[Layout, ...] = field(default_factory=tuple)

    def canonical(self, name: str) -> str | None:
        for lay in (self.base_layout, *self.arch.layouts, *self.extra_layouts):
            c = lay.to_canonical(name)
            if c is not None and c in self.known:
                return c
        return None

    def file(self, canonical: str) -> str:
        name = self.base_layout.to_file(canonical)
        if name is None:
            raise ClawError(f"{self.arch.table_name}: layout {self.base_layout.name} has no place for '{canonical}'")
        return name
