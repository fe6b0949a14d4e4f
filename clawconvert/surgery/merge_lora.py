"""merge-lora orchestration: PEFT LoRA adapter (+ connector + vision tower) -> merged HF checkpoint.

:func:`merge_lora` is what ``clawconvert merge-lora`` and ``clawconvert.merge_lora`` run.  The
pieces: :mod:`.lora` (adapter config and merge arithmetic), :mod:`.merge` (plan and stream),
:mod:`.llava` (connector, vision tower, LLaVA config and processor).
"""
from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path


from ..architectures import (Architecture, Layout, Resolver, architecture_for, known_model_types,
                             load_architecture, part_of)
from ..deps import need
from ..errors import ClawError, VerificationFailed
from ..hub import resolve_source
from ..io.atomic import TMP_PREFIX, atomic_output_dir
from ..io.dtypes import CLI_DTYPES, DType
from ..io.readers import TensorStore, open_tensors
from ..io.writers import SafetensorsWriter, parse_size
from ..provenance import MANIFEST, source_fingerprint, write_manifest
from ..tables import load_table
from . import llava
from .assembly import LlavaAssembly, ResearchFolder, grid_pinpoints, vision_source
from .lora import Adapter
from .merge import plan_merge
from .relayout import CANONICAL, part_rules, plan_relayout
from .tokenizer import TOKENIZER_FILES, base_tokenizer, special_token_id

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".npz", ".gguf", ".h5", ".msgpack", ".onnx")
CONFIG_DTYPE_KEYS = ("dtype", "torch_dtype")


@dataclass
class MergeResult:
    destination: Path
    architecture: str
    tensors: int
    bytes: int
    files: list[str]
    tie: dict
    notes: list[str] = field(default_factory=list)
    merge: dict = field(default_factory=dict)
    verification: dict | None = None


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        assert isinstance(data, dict)
        return data
    except FileNotFoundError:
        raise ClawError(f"{path.parent}: no {path.name} (expected a Hugging Face model directory)") from None
    except Exception as e:
        raise ClawError(f"{path}: not valid JSON ({e.__class__.__name__})") from e


def _architecture(base: Path, config: dict) -> tuple[Architecture, str, list[str]]:
    """The architecture table of BASE, its model_type, and notes.  An LM model_type that no table
    lists is merged as a plain causal LM (its tie default then comes from transformers)."""
    model_type = str(config.get("model_type", ""))
    arch = architecture_for(model_type)
    if arch is not None:
        return arch, model_type, []
    if "vision_config" in config or not model_type:
        raise ClawError(f"{base}: unsupported model_type '{model_type}': no table in mappings/architectures/ "
                        f"knows it (known: {', '.join(known_model_types())})")
    return load_architecture("causal_lm"), model_type, [
        f"model_type '{model_type}' is not in mappings/architectures/causal_lm.yaml: merged as a plain causal LM"]


def _effective_tie(base: Path, config: dict, arch: Architecture, model_type: str) -> bool:
    """tie_word_embeddings as transformers applies it (the top-level config's), class defaults
    from the architecture table so a merge does not import transformers (4 s and ~700 MiB with
    torch); tests/test_architectures.py checks the table against transformers' classes."""
    default = arch.tie_default(model_type)
    if default is not None:
        value = config.get("tie_word_embeddings", default)
        if isinstance(value, bool):
            return value
    need("transformers", to=f"reading the tie_word_embeddings default of model type '{config.get('model_type')}'")
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(base))
    except Exception as e:
        first = (str(e).strip().splitlines() or [e.__class__.__name__])[0][:200]
        raise ClawError(f"{base}: transformers cannot read its config.json ({first})") from e
    return bool(getattr(config, "tie_word_embeddings", False))


def _set_dtype(config: dict, name: str | None) -> None:
    if name is None:
        return
    keys = [k for k in CONFIG_DTYPE_KEYS if k in config] or ["dtype"]
    for k in keys:
        config[k] = name


def _copy_side_files(base: Path, out: Path, keep: tuple[str, ...] | None = None) -> list[str]:
    """BASE's non-weight top-level files (tokenizer, generation config, license...), or only ``keep``."""
    copied = []
    for f in sorted(base.iterdir()):
        if not f.is_file() or f.name == "config.json" or f.name.endswith(WEIGHT_SUFFIXES + (".index.json",)):
            continue
        if f.name in ("README.md", MANIFEST) or (keep is not None and f.name not in keep
                                                       and not f.name.upper().startswith(("LICENSE", "NOTICE"))):
            continue
        shutil.copyfile(f, out / f.name)
        copied.append(f.name)
    return copied


def _dtype_name(dtype: DType | None) -> str | None:
    return None if dtype is None else str(dtype).replace("torch.", "")


@dataclass
class _Base:
    """BASE opened: its config and architecture table, its tensors and the layout they are in."""

    path: Path
    hub: dict
    config: dict
    arch: Architecture
    model_type: str
    store: TensorStore
    layout: Layout
    known: set[str]                  # canonical names BASE has (a tied head it does not store included)
    pair: tuple[str, str] | None     # the tied (input embedding, output head), canonical
    tied: bool
    notes: list[str]

    @classmethod
    def open(cls, base: str | Path, unsafe_pickle: bool) -> "_Base":
        path, hub = resolve_source(str(base))
        if not path.is_dir():
            raise ClawError(f"{path}: BASE must be a Hugging Face model directory")
        config = _read_json(path / "config.json")
        arch, model_type, notes = _architecture(path, config)
        tied = _effective_tie(path, config, arch, model_type)
        store = open_tensors(path, unsafe_pickle=unsafe_pickle)
        layout = arch.detect_layout(store.keys(), path)
        known = {c for k in store.keys() if not arch.dropped(k) and (c := layout.to_canonical(k))}
        _require_parts(arch, layout, known, path)
        pair = arch.tied_pair(model_type)
        if pair and pair[0] in known:
            known.add(pair[1])        # a tied head the base does not store is still a module adapters target
        return cls(path, hub, config, arch, model_type, store, layout, known, pair, tied, notes)

    @property
    def is_vlm(self) -> bool:
        return "vision" in self.arch.parts

    @property
    def converts_lm(self) -> bool:
        """Qwen-1: its language model is written as its standalone class (Qwen2)."""
        return self.arch.parts["lm"].format != "hf"

    @property
    def research_llava(self) -> bool:
        """A whole original-LLaVA checkpoint: always becomes a llava-hf model."""
        return self.arch.name == "llava_original"

    def resolver(self) -> Resolver:
        standalone = load_architecture("causal_lm").layouts if self.is_vlm else ()   # text-only adapters
        return Resolver(self.arch, self.layout, self.known, standalone)

    def lm_config(self) -> tuple[dict, list[str]]:
        """The output's language-model config: BASE's own, or its standalone translation."""
        if self.converts_lm or self.research_llava:
            _, config, notes = self.arch.standalone("lm", self.config)
            return config, notes
        return (self.arch.part_config("lm", self.config) if self.is_vlm else dict(self.config)), []

    def entries(self, store: TensorStore, part: str | None = None) -> dict[str, tuple[TensorStore, str]]:
        """``store``'s tensors (BASE's keys) under their canonical names, of one part or all."""
        return {c: (store, k) for k in store.keys()
                if (c := self.layout.to_canonical(k)) is not None and (part is None or part_of(c) == part)}


def merge_lora(base: str | Path, adapter: str | Path | None, out: str | Path, *,
               connector: str | Path | None = None, vision: str | Path | None = None, dtype: str = "keep",
               image_token: str | None = None, vision_feature_layer: int | None = None,
               vision_feature_select_strategy: str | None = None, chat_template: str | Path | None = None,
               layout: str | None = None, max_shard_size: str | int = "5GB", overwrite: bool = False,
               unsafe_pickle: bool = False, progress: bool = False, verify: bool = False,
               tolerance: float | None = None) -> MergeResult:
    """Merge ``adapter`` into ``base`` (and assemble a LLaVA with ``vision``); see ``merge-lora --help``.

    ``adapter`` None converts BASE without merging (an original LLaVA checkpoint to llava-hf).
    ``layout`` names the output's key layout from its architecture table (default: the table's
    ``write`` layout, the one the most readers load).  ``vision_feature_layer`` defaults to the
    original-LLaVA config's ``mm_vision_select_layer``, else -1; ``image_token`` to the
    architecture table's (Qwen-1: ``<|extra_0|>``), else ``<image>``.  ``verify`` compares the
    output with the unmerged model before it is put in place (:mod:`.verify_merge`)."""
    with contextlib.ExitStack() as stack:    # holds scratch copies (a converted vision tower, a built tokenizer)
        if dtype not in CLI_DTYPES:
            raise ClawError(f"unknown dtype '{dtype}' (choose from {', '.join(CLI_DTYPES)})")
        out_dtype = CLI_DTYPES[dtype]
        b = _Base.open(base, unsafe_pickle)
        adapter_path, adapter_hub = resolve_source(str(adapter)) if adapter is not None else (None, {})
        vision_path, vision_hub = resolve_source(str(vision)) if vision is not None else (None, {})
        if b.is_vlm and not b.arch.parts["vision"].optional and (vision is not None or connector is not None):
            raise ClawError(f"{b.path}: BASE is already a vision-language model ({b.model_type}); --vision and "
                            f"--connector build a LLaVA from a causal LM")
        if connector is not None and vision is None and not b.research_llava:
            raise ClawError("--connector needs --vision (the vision tower the connector reads from)")
        adapter_obj = Adapter(adapter_path, unsafe_pickle=unsafe_pickle) if adapter is not None else Adapter.none(b.path)
        research = ResearchFolder(adapter_path if adapter is not None else b.path)
        notes = b.notes + research.notes()

        plan = plan_merge(b.store, adapter_obj, b.resolver(), tied_pair=b.pair, tied=b.tied,
                          conv1d=bool(b.arch.row(b.model_type).get("conv1d")), dtype=out_dtype)
        notes += _part_notes(plan.summary)
        _check_tokenizer(b.path, plan.vocab_rows)
        text_config, lm_notes = b.lm_config()
        tokenizer_dir, tokenizer_notes = base_tokenizer(b.path, b.arch, b.config,
                                                         lambda: _scratch_beside(Path(out), stack, "tokenizer"))
        notes += lm_notes + tokenizer_notes

        assembly = None
        if vision is not None or b.research_llava:
            assembly = _assemble(b, plan, research, vision_path, tokenizer_dir, text_config, notes,
                                 scratch=lambda: _scratch_beside(Path(out), stack, "vision"), image_token=image_token,
                                 feature_layer=vision_feature_layer, strategy=vision_feature_select_strategy,
                                 chat_template=chat_template, unsafe_pickle=unsafe_pickle)
            own = [k for _, k in b.entries(plan.store, "connector").values()]
            candidates = [(plan.store, own, str(b.path))] if b.research_llava else []
            candidates += [(adapter_obj.store, plan.leftovers.values(), f"{adapter_obj.path} (modules_to_save)")]
            candidates += research.connector_stores(unsafe_pickle)
            leftovers = assembly.take_connector(connector, candidates, dict(plan.leftovers), notes)
        else:
            leftovers = dict(plan.leftovers)
        _refuse_leftovers(leftovers, b.path)
        target_arch = (load_architecture(assembly.table) if assembly is not None else
                       load_architecture("causal_lm") if b.converts_lm else b.arch)
        out_layout = target_arch.layout(layout or (assembly and llava.tower_layout(assembly.vision_config))
                                         or target_arch.write)

        source, config, architecture = _output(b, plan, assembly, text_config, out_dtype)
        src_layout = CANONICAL if assembly else b.layout
        engine_plan = plan_relayout(source, b.arch, src_layout, out_layout, dst_arch=target_arch, dtype=out_dtype,
                                    src_rules=part_rules(b.arch, src_layout, b.config))

        sources = tuple(p for p in (b.path, adapter_path, vision_path,
                                    Path(connector) if connector is not None else None) if p is not None)
        with atomic_output_dir(out, overwrite=overwrite, sources=sources) as tmp:
            writer = SafetensorsWriter(tmp, engine_plan.writer_plan, max_shard_size=parse_size(max_shard_size))
            try:
                # One BLAS thread: the merge runs many small (band x r) @ (r x in) products, between
                # which OpenBLAS's own threads spin -- measured on a 1B model, 10 s of CPU instead of 5 s.
                # Large weights are split over two threads of ours instead (lora.merged_linear).
                from threadpoolctl import threadpool_limits
                with threadpool_limits(limits=1, user_api="blas"):
                    engine_plan.execute(writer, _progress(progress, len(engine_plan.targets)))
                files = writer.close()
            except BaseException:
                writer.abort()
                raise
            copied = _side_files(tmp, b, assembly, config, tokenizer_dir, notes)
            figures = _verify(tmp, b.path, adapter_path, b.arch, assembly, tolerance) if verify else None
            merge_record = {**plan.summary, "tie": plan.tie,
                            "extra_embedding_rows": (assembly.vocab_rows - plan.vocab_rows
                                                     if assembly is not None and plan.vocab_rows else 0),
                            "copied_from_base": copied, "layout": {"base": b.layout.name, "output": out_layout.name,
                                                                   "loaded_by": out_layout.loaded_by}}
            if assembly is not None:
                merge_record["llava"] = assembly.record()
            write_manifest(tmp, {
                "source": {
                    "base": {"path": str(base), "fingerprint": source_fingerprint(b.path), **b.hub},
                    **({"adapter": {"path": str(adapter), "fingerprint": source_fingerprint(adapter_path),
                                    **adapter_hub, "config": adapter_obj.raw_config}} if adapter is not None else {}),
                    **({"vision": {"path": str(vision), "fingerprint": source_fingerprint(vision_path), **vision_hub}}
                       if vision_path else {}),
                    **({"connector": {"path": str(connector), "fingerprint": source_fingerprint(Path(connector))}}
                       if connector is not None else {}),
                },
                "target": {"format": "hf", "architecture": architecture},
                "tables": _tables(b.arch, b.layout, target_arch, out_layout),
                "dtype": dtype,
                "merge": merge_record,
                **({"verify": figures} if figures else {}),
                "notes": notes,
            })
            if figures and not figures["passed"]:
                from .verify_merge import format_figures
                raise VerificationFailed(format_figures(figures) + "; output not written")
            dest = Path(out).absolute()
        return MergeResult(dest, architecture, len(engine_plan.targets), writer.total_size, [f.name for f in files],
                           plan.tie, notes, merge_record, figures)


def _assemble(b: _Base, plan, research: ResearchFolder, vision_path: Path | None, tokenizer_dir: Path | None,
              text_config: dict, notes: list[str], *, scratch, image_token: str | None, feature_layer: int | None,
              strategy: str | None, chat_template, unsafe_pickle: bool) -> LlavaAssembly:
    """The LLaVA side: the tower (BASE's own when an original LLaVA saved it), the feature
    selection, the tokenizer with its image token, the vocabulary rows it needs."""
    need("transformers", to="--vision (LLaVA assembly: tokenizer, processor, config)")
    llava_cfg = b.config if b.research_llava else research.llava_config
    vision_store, vision_config, vision_dir = vision_source(vision_path, b.entries(plan.store, "vision"), llava_cfg,
                                                             b.path, scratch, unsafe_pickle, notes)
    layer, strategy = research.feature_selection(feature_layer, strategy)
    if b.research_llava and feature_layer is None:
        layer = int(b.config.get("mm_vision_select_layer", -2))
    image_token = image_token or b.arch.tokenizer.get("image_token") or "<image>"
    assembly = LlavaAssembly(
        vision_store, vision_config, tokenizer=llava.load_tokenizer(tokenizer_dir) if tokenizer_dir else None,
        image_token=image_token, image_token_id=special_token_id(b.arch, image_token), feature_layer=layer,
        strategy=strategy, chat_template=chat_template, unsafe_pickle=unsafe_pickle, vision_dir=vision_dir,
        grid_pinpoints=grid_pinpoints(llava_cfg, b.path), llava_conventions=bool(llava_cfg),
        lm_type=str(text_config.get("model_type", "")))
    extra_rows = max(0, assembly.vocab_rows - (plan.vocab_rows or 0))
    if extra_rows:
        plan.grow_vocab(extra_rows)
    assembly.vocab_rows = max(assembly.vocab_rows, plan.vocab_rows or 0)
    return assembly


def _output(b: _Base, plan, assembly: LlavaAssembly | None, text_config: dict, out_dtype: DType | None):
    """(the store the engine writes, the output config, its architecture name)."""
    if plan.untied:
        text_config["tie_word_embeddings"] = False
    elif b.tied:
        text_config["tie_word_embeddings"] = True
    if assembly is not None and assembly.vocab_rows > (plan.vocab_rows or 0):
        text_config["vocab_size"] = assembly.vocab_rows
    lm_dtype = _dtype_name(out_dtype) or next((text_config[k] for k in CONFIG_DTYPE_KEYS if k in text_config), None)
    _set_dtype(text_config, _dtype_name(out_dtype))
    if assembly is not None:
        source = assembly.gather(b.entries(plan.store, "lm"), text_config, plan.store.path)
        return source, assembly.config(text_config, lm_dtype), assembly.architecture
    config = text_config
    if b.is_vlm:
        config = {**b.config, **({"text_config": text_config} if "text_config" in b.config else {})}
        if plan.untied:
            config["tie_word_embeddings"] = False
        _set_dtype(config, _dtype_name(out_dtype))
    return plan.store, config, (config.get("architectures") or [config.get("model_type", "?")])[0]


def _side_files(tmp: Path, b: _Base, assembly: LlavaAssembly | None, config, tokenizer_dir: Path | None,
                notes: list[str]) -> list[str]:
    """config.json and what travels beside the weights; returns the names copied from BASE."""
    if assembly is not None:
        config.save_pretrained(str(tmp))
        notes += assembly.write_processor(tmp, tokenizer_dir)
        return _copy_side_files(b.path, tmp, keep=("generation_config.json",))
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if b.converts_lm:     # a different architecture: its tokenizer and generation config only
        copied = _copy_side_files(b.path, tmp, keep=("generation_config.json",))
        if tokenizer_dir is not None:
            copied += _copy_side_files(tokenizer_dir, tmp, keep=TOKENIZER_FILES)
    else:
        copied = _copy_side_files(b.path, tmp)
    if not any(f in copied for f in TOKENIZER_FILES) and tokenizer_dir is None:
        notes.append(f"{b.path} has no tokenizer files; none copied")
    return copied


def _verify(out: Path, base: Path, adapter: Path | None, arch: Architecture, assembly: LlavaAssembly | None,
            tolerance: float | None) -> dict:
    """The output against the unmerged model in its own framework, where that framework runs here."""
    from .verify_merge import skipped, verify_merge
    need("torch", "transformers", "peft", to="merge-lora --verify")
    if arch.parts["lm"].format != "hf" or arch.name == "llava_original":
        return skipped(f"BASE is a {arch.description}: its framework is remote code, which clawconvert never "
                       f"runs; the conversion is covered by the tests against the original code's outputs")
    kind = "llava" if assembly is not None else ("vlm" if "vision" in arch.parts else "causal_lm")
    return verify_merge(out, base=base, adapter=adapter, kind=kind, tolerance=tolerance, assembly=assembly,
                        vision_dir=assembly.vision_dir if assembly is not None else None)


def _tables(arch: Architecture, base_layout, target_arch: Architecture, out_layout) -> list[dict]:
    tables = {t.name: t for t in (arch.table(base_layout), target_arch.table(out_layout))}
    for part in arch.parts.values():
        if part.format != "hf":
            t = load_table(*part.format.split("/"))
            tables[t.name] = t
    return [{"name": t.name, "sha256": t.sha256} for t in tables.values()]


def _require_parts(arch: Architecture, layout, known: set[str], base: Path) -> None:
    """A VLM without its vision tower (or connector) is not the model its config describes."""
    have = {part_of(c) for c in known}
    for part, spec in arch.parts.items():
        if part not in have and not spec.optional:
            where = ", ".join(f"'{f}'" for c, f in layout.prefixes if c.startswith(part + "/"))
            raise ClawError(f"{base}: BASE has no {part} tensors (nothing under {where}, layout {layout.name}); "
                            f"a {arch.description or arch.name} needs them")


def _check_tokenizer(base: Path, rows: int | None) -> None:
    """Token ids past the embedding's rows would index nothing: refuse before merging."""
    file = base / "tokenizer.json"
    if rows is None or not file.is_file():
        return
    try:
        data = json.loads(file.read_text())
        ids = list((data.get("model") or {}).get("vocab", {}).values() if isinstance(
            (data.get("model") or {}).get("vocab"), dict) else [])
        ids += [t["id"] for t in data.get("added_tokens") or []]
    except (ValueError, TypeError, KeyError, AttributeError, UnicodeDecodeError, RecursionError):
        return          # not a tokenizers file clawconvert can read; transformers will say more
    top = max((i for i in ids if isinstance(i, int)), default=-1)
    if top >= rows:
        raise ClawError(f"{file}: the tokenizer has ids up to {top}, but the input embedding has {rows} rows; "
                        f"the tokenizer does not belong to this model")


def _part_notes(summary: dict) -> list[str]:
    """Say so when the adapter's LoRA reaches beyond the language model (often by accident:
    target_modules ['q_proj'] also matches a CLIP or SigLIP tower's attention)."""
    by_part = summary.get("lora_modules_by_part", {})
    others = {p: n for p, n in by_part.items() if p != "lm"}
    if not others:
        return []
    return ["LoRA modules outside the language model were merged too: "
            + ", ".join(f"{n} in the {p}" for p, n in others.items())
            + " (as the unmerged PEFT model applies them)"]


def _refuse_leftovers(leftovers: dict[str, str], base: Path) -> None:
    """Adapter tensors that fit nothing in BASE (nor the connector) stop the merge, all named."""
    if not leftovers:
        return
    path, key = next(iter(leftovers.items()))
    hint = ("; it looks like a connector: pass --vision to assemble a LLaVA model"
            if any(llava.looks_like_connector(p) for p in leftovers) else "")
    raise ClawError(f"adapter tensor '{key}' has no counterpart '{path}' in BASE {base}{hint}",
                    details=[f"adapter tensor '{k}' has no counterpart '{p}'" for p, k in list(leftovers.items())[1:]])


def _scratch_beside(out: Path, stack: contextlib.ExitStack, what: str) -> Path:
    """A temporary directory beside OUT (same disk), removed when the merge ends."""
    parent = out.absolute().parent
    if not parent.is_dir():
        raise ClawError(f"{parent}: parent directory does not exist")
    return Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=f"{TMP_PREFIX}{what}-", dir=parent)))


def _progress(enabled: bool, total: int):
    if not enabled:
        return None
    from tqdm import tqdm
    return lambda it: tqdm(it, total=total, desc="merge-lora", unit="tensor", leave=False, dynamic_ncols=True)
