"""``export --to gguf``: an HF causal LM, LLaVA or native VLM as GGUF files for llama.cpp.

* A causal LM (llama, mistral, qwen2, and the language models of the native VLMs:
  ``mappings/gguf_architectures.yaml``) becomes
  ``DST/model-<type>.gguf``: the tensors through ``mappings/causal_lm/gguf.yaml`` (with the
  q/k row order llama.cpp's llama graph needs), the hyperparameters through the architecture
  table, and the tokenizer as llama.cpp's converter writes it (:mod:`.gguf_vocab`).
* An HF LLaVA (CLIP or SigLIP tower) becomes that file for its language model plus
  ``DST/mmproj-<type>.gguf``: the vision tower through ``mappings/<clip|siglip>/gguf.yaml``
  (only the layers up to the feature layer; no post-layernorm, which LLaVA's features skip),
  the projector through ``mappings/llava/gguf.yaml``, and the ``clip.*`` metadata clip.cpp
  reads (projector type ``mlp``, feature layer, image mean / std, patch and image size,
  activation).
* A native VLM (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Gemma 3, Idefics3 / SmolVLM, LLaVA-NeXT,
  LLaVA-OneVision) becomes ``model-<type>.gguf`` for its language model, with the architecture
  llama.cpp's converter gives it (qwen2vl, qwen3vl, gemma3, llama, qwen2), and, where
  llama.cpp's mtmd has a projector for it, ``mmproj-<type>.gguf``
  (``mappings/gguf_projectors.yaml``: projector type, tables, metadata, checks).  LLaVA-NeXT's
  row is a ``plan: llava`` one: the LLaVA mmproj above, with the row's tables and metadata on top
  (``model.image_newline``, grid pinpoints, merge type, as llama.cpp's legacy scripts write them).
  Which file prefix is which part is the VLM's architecture table's to say (``mappings/architectures/``).

Tensors are planned from the safetensors headers, then read, transformed and written one at
a time with gguf-py's writer (tensor infos first, then each tensor's data), so memory stays
at a few tensors.  Types follow llama.cpp's converter: 1-D tensors, norms and position
embeddings f32, the patch embedding f16 (f16 files) or f32, every other matrix ``--outtype``
(q8_0 falls back to f16 for rows that do not divide into blocks of 32).  Each file is read
back with gguf-py's reader (every tensor, shape, type and the metadata llama.cpp requires)
before the output is put in place.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

import numpy as np
import yaml

from ..errors import ClawError
from ..io.atomic import atomic_output_dir
from ..io.readers import TensorStore, open_tensors, read_json_file
from ..ops import evaluate
from ..provenance import source_fingerprint, write_manifest
from ..tables import load_table, mappings_root
from . import ExportResult
from .gguf_vocab import add_to_writer, read_vocab

TARGET = "gguf"
OPTIONS = ("outtype",)
OUTTYPES = ("f32", "f16", "bf16", "q8_0")
VISION_FAMILIES = {"clip_vision_model": "clip", "siglip_vision_model": "siglip"}
# image mean / std when the directory has no preprocessor_config.json: the families' defaults
DEFAULT_NORMALIZATION = {"clip": ([0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]),
                         "siglip": ([0.5, 0.5, 0.5], [0.5, 0.5, 0.5])}
GELU = ("gelu", "gelu_pytorch_tanh", "gelu_new", "gelu_fast")   # clip.use_gelu; quick_gelu is clip.cpp's default


@dataclass
class Planned:
    name: str                                   # GGUF tensor name
    shape: tuple[int, ...]                      # numpy (row-major) shape; the writer reverses it for ggml
    qtype: Any                                  # gguf.GGMLQuantizationType
    read: Callable[[], np.ndarray]              # float32 data in the GGUF layout


def export(src: str | Path, dst: str | Path, *, outtype: str = "f16", overwrite: bool = False,
           progress: bool = False) -> ExportResult:
    """Write ``dst/model-<outtype>.gguf`` (and ``mmproj-<outtype>.gguf`` for a LLaVA); see the module docstring."""
    from ..api import resolve
    from ..deps import need
    need("gguf", to="export --to gguf")

    if outtype not in OUTTYPES:
        raise ClawError(f"--outtype {outtype}: choose from {', '.join(OUTTYPES)}")
    src_path, hub_info = resolve(src)
    if not (src_path / "config.json").is_file():
        raise ClawError(f"{src_path}: not an HF model directory (no config.json); --to gguf reads HF causal LMs "
                        f"and LLaVA models")
    config = _full_config(src_path)
    notes: list[str] = []
    files: dict[str, dict] = {}
    with contextlib.ExitStack() as stack, atomic_output_dir(dst, overwrite=overwrite, sources=(src_path,)) as tmp:
        native = _native_vlm(config)
        if config.get("model_type") == "llava":
            lm_store, vision_store, projector_store = llava_parts(src_path)
            for s in (lm_store, vision_store, projector_store):
                stack.callback(s.close)
            text = config["text_config"]
            mm: MmprojPlan | NativeMmprojPlan | None = MmprojPlan(src_path, config, vision_store, projector_store,
                                                                  outtype, notes)
        elif native is not None:
            arch, row = native
            lm_store = vlm_part_store(src_path, arch, {"lm": ""})
            stack.callback(lm_store.close)
            text = _text_config(arch, config)
            mm = None
            if row is not None and row.get("plan") == "llava":
                vision_store = vlm_part_store(src_path, arch, {"vision": ""})
                projector_store = vlm_part_store(src_path, arch, {"connector": row["connector_prefix"]})
                for s in (vision_store, projector_store):
                    stack.callback(s.close)
                mm = MmprojPlan(src_path, config, vision_store, projector_store, outtype, notes, row)
            elif row is not None:
                mm_store = vlm_part_store(src_path, arch, {"vision": "", "connector": row["connector_prefix"]})
                stack.callback(mm_store.close)
                mm = NativeMmprojPlan(src_path, config, text, row, mm_store, outtype)
            else:
                notes.append(f"no mmproj: {_projectors()['refuse'].get(config['model_type'], 'llama.cpp has no projector for it')}")
        else:
            lm_store, text, mm = open_tensors(src_path), config, None
            stack.callback(lm_store.close)
        lm = LanguageModelPlan(src_path, text, lm_store, outtype, vlm=config if native else None)
        name = f"model-{outtype}.gguf"
        files[name] = _write(tmp / name, lm.arch, lm.tensors, lm.metadata, outtype, progress,
                             vocab=(lm.vocab, src_path))
        _check(tmp / name, lm.tensors, lm.required_keys())
        if mm is not None:
            name = f"mmproj-{outtype}.gguf"
            files[name] = _write(tmp / name, "clip", mm.tensors, mm.metadata, outtype, progress)
            _check(tmp / name, mm.tensors, mm.required_keys())
        write_manifest(tmp, {
            "source": {"path": str(src), "fingerprint": source_fingerprint(src_path), **hub_info},
            "target": {"format": "gguf", "outtype": outtype, "architecture": lm.arch},
            "tables": [{"name": t.name, "sha256": t.sha256} for t in lm.tables + (mm.tables if mm else [])],
            "files": files,
            "notes": notes,
        })
        dest = Path(dst).absolute()
    what = f"{config.get('model_type')} -> {lm.arch}" + (f" + {mm.kind} mmproj" if mm else "")
    summary = [f"read back OK (gguf {_gguf_version()}): {n}: {f['tensors']} tensors ({f['types']}), "
               f"{f['metadata_keys']} metadata keys" for n, f in files.items()]
    summary.append(f"tokenizer: {lm.vocab.origin}, {len(lm.vocab.tokens)} tokens")
    run = [f"llama-mtmd-cli -m {dest / f'model-{outtype}.gguf'} --mmproj {dest / f'mmproj-{outtype}.gguf'} "
           f"--image IMAGE -p PROMPT --jinja"] if mm else [f"llama-cli -m {dest / f'model-{outtype}.gguf'} -p PROMPT"]
    return ExportResult(dest, TARGET, what, sorted(files), {"files": files}, notes, summary, run)


# ------------------------------------------------------------------------------------
# reading the source
# ------------------------------------------------------------------------------------
def _full_config(path: Path) -> dict:
    """config.json with transformers' defaults filled in for the fields the export reads.

    Files leave out fields at their defaults; the defaults are data (the language models':
    ``mappings/gguf_architectures.yaml``, the vision towers': :mod:`clawconvert.hfconfig`),
    so no framework is imported.
    """
    from ..hfconfig import from_dict

    raw = read_json_file(path / "config.json", "model config")
    if not isinstance(raw, dict):
        raise ClawError(f"{path / 'config.json'}: not a JSON object")
    defaults = _architectures()["defaults"]
    model_type = raw.get("model_type")

    def text(config: dict) -> dict:
        return {**defaults.get(config.get("model_type"), {}), **config}
    if model_type != "llava" and _projectors()["projectors"].get(model_type, {}).get("plan") != "llava":
        return text(raw)
    vision = dict(raw.get("vision_config") or {})
    vision.setdefault("model_type", "clip_vision_model")
    if vision["model_type"] in VISION_FAMILIES:
        try:
            vision = from_dict(vision["model_type"], vision).to_dict()
        except ValueError as e:
            raise ClawError(f"{path / 'config.json'}: vision_config: {e}") from e
    return {**defaults["llava"], **defaults.get(model_type, {}), **raw, "vision_config": vision,
            "text_config": text({"model_type": "llama", **(raw.get("text_config") or {})})}


def llava_parts(path: Path) -> tuple[TensorStore, TensorStore, TensorStore]:
    """An HF LLaVA directory's tensors as three stores, named as their own tables expect: the
    language model as ``model.*`` / ``lm_head.*``, the vision tower as ``vision_model.*``, the
    projector as ``multi_modal_projector.*``.  Which prefixes the files use (llava-hf,
    transformers 5, ...) is the llava architecture table's to say (``mappings/architectures/llava.yaml``)."""
    from ..architectures import load_architecture, part_of

    arch = load_architecture("llava")
    everything = open_tensors(path)
    layout = arch.detect_layout(everything.keys(), path)
    names = {"lm": "", "vision": "", "connector": "multi_modal_projector."}
    stores = []
    for part in ("lm", "vision", "connector"):
        store = open_tensors(path)
        store.rename(lambda k, part=part: (names[part] + c.split("/", 1)[1]
                                           if (c := layout.to_canonical(k)) and part_of(c) == part else None))
        if not len(store):
            raise ClawError(f"{path}: LLaVA weights hold no {part} tensors (layout {layout.name})")
        stores.append(store)
    everything.close()
    return stores[0], stores[1], stores[2]


def _native_vlm(config: dict) -> tuple[Any, dict | None] | None:
    """(architecture table, projector row or None) of a native VLM config; None for anything else.

    A VLM whose tower llama.cpp cannot run gets no projector row: its language model is still
    written, and the note says why there is no mmproj (``gguf_projectors.yaml`` ``refuse``)."""
    from ..architectures import architecture_for

    model_type = str(config.get("model_type"))
    if model_type == "llava":
        return None
    arch = architecture_for(model_type)
    if arch is None or "vision" not in arch.parts:
        return None
    return arch, _projectors()["projectors"].get(model_type)


def _text_config(arch: Any, config: dict) -> dict:
    """The language model's config (transformers' defaults for missing fields, as for a causal LM)."""
    text = arch.part_config("lm", config)
    text.setdefault("model_type", "llama")
    return {**_architectures()["defaults"].get(text["model_type"], {}), **text}


def vlm_part_store(path: Path, arch: Any, parts: dict[str, str]) -> TensorStore:
    """The tensors of ``parts`` of a VLM directory as one store, named ``<prefix><canonical name>``
    (the part's standalone name: ``model.layers.0...`` for the language model, the vision
    tower's and connector's own names); the architecture table says which file prefix is which
    part, in every layout it knows."""
    from ..architectures import part_of

    everything = open_tensors(path)
    layout = arch.detect_layout(everything.keys(), path)
    everything.close()
    store = open_tensors(path)
    seen: dict[str, str] = {}

    def rename(key: str) -> str | None:
        c = layout.to_canonical(key)
        if not c or part_of(c) not in parts:
            return None
        name = parts[part_of(c)] + c.split("/", 1)[1]
        if name in seen:
            raise ClawError(f"{path}: '{key}' and '{seen[name]}' both become '{name}'")
        seen[name] = key
        return name
    store.rename(rename)
    if not len(store):
        raise ClawError(f"{path}: {arch.name} weights hold no {' / '.join(parts)} tensors (layout {layout.name})")
    return store


@lru_cache(maxsize=None)
def _projectors() -> dict:
    return yaml.safe_load((mappings_root() / "gguf_projectors.yaml").read_text())


@lru_cache(maxsize=None)
def _architectures() -> dict:
    return yaml.safe_load((mappings_root() / "gguf_architectures.yaml").read_text())


def _field(config: dict, dotted: str) -> Any:
    value: Any = config
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def _qtype(name: str, shape: tuple[int, ...], outtype: str, f32: tuple[str, ...] = (), keep_float: tuple[str, ...] = ()):
    """llama.cpp's converter's type choice for one tensor (convert_hf_to_gguf.py prepare_tensors);
    ``f32`` and ``keep_float`` are a projector's own rules (its tensor_force_quant)."""
    import gguf
    Q = gguf.GGMLQuantizationType
    if name in f32:
        return Q.F32
    if name in keep_float and len(shape) > 1:
        return Q.F32 if outtype == "f32" else Q.F16
    if len(shape) <= 1 or name.endswith("_norm.weight") or name in ("v.position_embd.weight", "v.class_embd"):
        return Q.F32
    if name in ("v.patch_embd.weight", "v.patch_embd.weight.1"):      # a Conv3D's second frame too
        return Q.F16 if outtype == "f16" else Q.F32
    if outtype == "q8_0" and shape[-1] % 32:
        return Q.F16              # the converter's fallback when rows do not divide into Q8_0 blocks
    return {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}[outtype]


def _plan_table(store: TensorStore, table_family: str | list[str], params: dict, keep: Callable[[str], bool],
                outtype: str, origin: str, f32: tuple[str, ...] = (), keep_float: tuple[str, ...] = ()
                ) -> tuple[list[Planned], Any]:
    """Every tensor of ``store`` that ``keep`` selects, through ``mappings/<table_family>/gguf.yaml``
    (or several tables, each mapping its own tensors).  A rule may turn one source tensor into
    several GGUF tensors (a fused qkv, a Conv3D's two frames) or several into one; each GGUF
    tensor is planned on its own, and the rule's output is computed once per source read."""
    families = [table_family] if isinstance(table_family, str) else list(table_family)
    tables = [load_table(f, "gguf") for f in families]
    expanded = [t.expand(params) for t in tables]
    by_canonical = {k: r for e in expanded for k, r in e.by_canonical.items()}
    planned, missing, unmapped = [], [], []
    for key in store.keys():
        if keep(key) and key not in by_canonical and not any(e.dropped(key) for e in expanded):
            unmapped.append(key)
    for rule in (r for e in expanded for r in e.rules):
        if not all(keep(c) for c in rule.canonical):
            continue
        absent = [c for c in rule.canonical if c not in store]
        if absent:
            if not rule.optional:
                missing.extend(absent)
            continue
        shapes = rule.chain.save_shapes([tuple(store.info(c).shape) for c in rule.canonical])
        outputs = _RuleOutputs(store, rule)
        for i, (gguf_name, shape) in enumerate(zip(rule.format, shapes)):
            planned.append(Planned(gguf_name, tuple(shape), _qtype(gguf_name, tuple(shape), outtype, f32, keep_float),
                                   lambda o=outputs, i=i: o.get(i)))
    if unmapped or missing:
        names = ", ".join(t.name for t in tables)
        problems = [f"no GGUF name for '{k}' in {names}" for k in unmapped] + \
                   [f"missing tensor '{k}'" for k in missing]
        raise ClawError(f"{origin}: cannot be written as GGUF: {problems[0]}"
                        + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""), details=problems[1:])
    return planned, (tables[0] if isinstance(table_family, str) else tables)


class _RuleOutputs:
    """The GGUF tensors one table rule makes, computed when the first is written and let go
    after the last (tensors are written in plan order, so at most one rule's outputs are held)."""

    def __init__(self, store: TensorStore, rule: Any):
        self.store, self.rule = store, rule
        self.values: list[np.ndarray] | None = None
        self.left = len(rule.format)

    def get(self, i: int) -> np.ndarray:
        if self.values is None:
            self.values = self.rule.chain.save([np.asarray(self.store.read(c), dtype=np.float32)
                                                for c in self.rule.canonical])
        value = self.values[i]
        self.left -= 1
        if self.left == 0:
            self.values = None
            self.left = len(self.rule.format)
        return value


class LanguageModelPlan:
    """The language model's tensors, hyperparameters and vocabulary (``vlm``: the VLM's config.json
    when the language model is a VLM's, for the hyperparameters read from it)."""

    def __init__(self, directory: Path, text: dict, store: TensorStore, outtype: str, vlm: dict | None = None):
        archs = _architectures()
        model_type = text.get("model_type")
        known = [k for k, v in archs["architectures"].items() if "refuse" not in v]
        if model_type not in archs["architectures"]:
            raise ClawError(f"{directory}: --to gguf does not know the language model type '{model_type}' "
                            f"(supported: {', '.join(known)})")
        info = archs["architectures"][model_type]
        if "refuse" in info:
            raise ClawError(f"{directory}: {info['refuse']}")
        source = {**text, "vlm": vlm or {}}
        for check in info.get("checks", []):
            _check_config(directory, archs["checks"][check], source, f"text_config ({model_type})")
        rope = text.get("rope_scaling") or text.get("rope_parameters") or {}
        rope = rope.get("full_attention", rope)            # Gemma 3: per-attention-kind parameters
        if (rope.get("rope_type") or rope.get("type") or "default") != "default":
            raise ClawError(f"{directory}: RoPE scaling '{rope.get('rope_type') or rope.get('type')}' is not "
                            f"supported by this export yet")
        self.arch = info["arch"]
        heads, hidden = int(text["num_attention_heads"]), int(text["hidden_size"])
        head_dim = int(text.get("head_dim") or hidden // heads)
        flags = info.get("flags", [])
        params = {"layers": int(text["num_hidden_layers"]), "rope_permute": bool(info["rope_permute"]),
                  "qk_norm": "qk_norm" in flags, "gemma_norms": "gemma_norms" in flags,
                  "H": heads, "KV": int(text.get("num_key_value_heads") or heads), "hd": head_dim, "D": hidden}
        self.tensors, table = _plan_table(store, "causal_lm", params, lambda k: True, outtype, str(directory))
        self.tables = [table]
        specs = dict(archs["hyperparameters"])
        for name in info.get("sets", []):
            specs.update(archs["hyperparameter_sets"][name])
        self.metadata: dict[str, tuple[str, Any]] = {}
        for key, spec in specs.items():
            value = _hyperparameter(spec, source)
            if value is None and spec.get("optional"):
                continue
            if value is None:
                raise ClawError(f"{directory}: the text config has none of {', '.join(spec['from'])} "
                                f"({self.arch}.{key} needs it)")
            self.metadata[f"{self.arch}.{key}"] = (spec["type"], value)
        for key, value in (info.get("tokenizer") or {}).items():
            self.metadata[f"tokenizer.ggml.{key}"] = ("bool" if isinstance(value, bool) else "str", value)
        rows = store.info("model.embed_tokens.weight").shape[0]
        self.metadata[f"{self.arch}.vocab_size"] = ("u32", rows)
        self.vocab = read_vocab(directory, rows, info["bpe_pre"])

    def required_keys(self) -> list[str]:
        return list(self.metadata) + ["tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.scores",
                                      "tokenizer.ggml.token_type", "general.architecture", "general.file_type"]


def _hyperparameter(spec: dict, source: dict) -> Any:
    """One hyperparameter from its table spec: the first ``from`` field present, else ``default``
    (a number, or an expression over the config's integers), then ``count`` / ``pad``."""
    value = next((v for v in (_field(source, f) for f in spec["from"]) if v is not None), None)
    if value is None and "default" in spec:
        value = evaluate(spec["default"], {k: v for k, v in source.items() if isinstance(v, int)}) \
            if isinstance(spec["default"], str) else spec["default"]
    if value is not None and spec.get("count"):
        value = len(value) if isinstance(value, list) else value
    if value is not None and "pad" in spec:
        value = list(value)[:spec["pad"]] + [0] * max(0, spec["pad"] - len(value))
    return value


def _check_config(directory: Path, check: dict, config: dict, where: str) -> None:
    """One ``checks:`` entry of the GGUF tables (see mappings/gguf_architectures.yaml)."""
    from ..architectures import evaluate_config

    def get(path: str) -> Any:
        return _field(config, path)
    if "unless" in check and evaluate_config(check["unless"], config, "mappings/gguf_architectures.yaml"):
        return
    if "equal" in check:
        a, b = check["equal"]
        left = get(a)
        right = get(b) if isinstance(b, str) and get(b) is not None else b
        ok, said = left == right, f"{a} is {left!r}, not {right!r}"
    elif "absent" in check:
        ok, said = get(check["absent"]) is None, f"{check['absent']} is {get(check['absent'])!r}"
    elif "fewer" in check:
        a, b = check["fewer"]
        n, limit = len(get(a) or []), int(get(b))
        ok, said = n < limit, f"{a} lists {n}, {b} is {limit}"
    elif "swa_pattern" in check:
        n, types = int(check["swa_pattern"]), get("layer_types")
        want = ["full_attention" if (i + 1) % n == 0 else "sliding_attention"
                for i in range(int(config["num_hidden_layers"]))]
        ok, said = types is None or list(types) == want, "layer_types differs from that pattern"
    else:
        raise ClawError(f"internal: unknown check {check}")
    if not ok:
        raise ClawError(f"{directory}: {where}: {said}: {check['why']}")


class MmprojPlan:
    """The vision tower and projector of an HF LLaVA, as clip.cpp's LLaVA graph reads them; ``row``: a
    ``plan: llava`` row of ``mappings/gguf_projectors.yaml`` (LLaVA-NeXT), whose tables, checks and
    metadata come on top."""

    kind = "mlp"

    def __init__(self, directory: Path, config: dict, vision: TensorStore, projector: TensorStore, outtype: str,
                 notes: list[str], row: dict | None = None):
        vc = config["vision_config"]
        row = row or {}
        extra = _row_metadata(directory, row, config, config["text_config"]) if row else {}
        family = VISION_FAMILIES.get(vc.get("model_type"))
        if family is None:
            raise ClawError(f"{directory}: vision tower '{vc.get('model_type')}' has no llama.cpp LLaVA graph "
                            f"(supported: {', '.join(VISION_FAMILIES)})")
        layers = int(vc["num_hidden_layers"])
        feature = config.get("vision_feature_layer", -2)
        if not isinstance(feature, int):
            raise ClawError(f"{directory}: vision_feature_layer {feature!r}: several feature layers are not supported")
        feature = feature + layers + 1 if feature < 0 else feature     # index into HF hidden_states (0 = embeddings)
        if not 1 <= feature <= layers:
            raise ClawError(f"{directory}: vision_feature_layer {config['vision_feature_layer']} is outside the "
                            f"tower's {layers} layers")
        strategy = config.get("vision_feature_select_strategy", "default")
        drops_cls = family == "clip"          # clip.cpp takes the patch rows after the class token, if there is one
        if (strategy == "default") != drops_cls:
            raise ClawError(f"{directory}: vision_feature_select_strategy '{strategy}' with a {family} tower: "
                            f"llama.cpp's LLaVA graph {'drops the class token' if drops_cls else 'keeps every patch'} "
                            f"('{'default' if drops_cls else 'full'}')")
        act = config.get("projector_hidden_act", "gelu")
        if act != "gelu":
            raise ClawError(f"{directory}: projector_hidden_act '{act}': llama.cpp's mlp projector applies GELU")

        def keep(key: str) -> bool:   # the layers LLaVA reads, no post-layernorm, no pooling head
            if key.startswith(("vision_model.post_layernorm.", "vision_model.head.")):
                return False
            if key.startswith("vision_model.encoder.layers."):
                return int(key.split(".")[3]) < feature
            return True
        self.tensors, vtable = _plan_table(vision, family, {"vision_layers": feature}, keep, outtype,
                                           f"{directory} (vision tower)")
        ptensors, ptables = _plan_table(projector, ["llava", *row.get("tables", [])], {}, lambda k: True, outtype,
                                        f"{directory} (projector)")
        self.tensors += ptensors
        self.tables = [vtable, *ptables]
        if not any(t.name == "mm.0.bias" for t in ptensors):
            raise ClawError(f"{directory}: the projector has no biases; llama.cpp's mlp projector needs them")
        mean, std = _normalization(directory, family, notes)
        text_hidden = int(config["text_config"]["hidden_size"])
        hidden_act = vc.get("hidden_act", "quick_gelu")
        self.metadata = {
            "clip.projector_type": ("str", "mlp"),
            "clip.has_vision_encoder": ("bool", True),
            "clip.has_llava_projector": ("bool", True),
            "clip.use_gelu": ("bool", hidden_act in GELU),
            "clip.vision.image_size": ("u32", int(vc["image_size"])),
            "clip.vision.patch_size": ("u32", int(vc["patch_size"])),
            "clip.vision.embedding_length": ("u32", int(vc["hidden_size"])),
            "clip.vision.feed_forward_length": ("u32", int(vc["intermediate_size"])),
            "clip.vision.block_count": ("u32", feature),
            "clip.vision.projection_dim": ("u32", text_hidden),
            "clip.vision.attention.head_count": ("u32", int(vc["num_attention_heads"])),
            "clip.vision.attention.layer_norm_epsilon": ("f32", float(vc["layer_norm_eps"])),
            "clip.vision.feature_layer": ("i32[]", [feature]),
            "clip.vision.image_mean": ("f32[]", [float(x) for x in mean]),
            "clip.vision.image_std": ("f32[]", [float(x) for x in std]),
            **extra,
        }
        if hidden_act not in GELU + ("quick_gelu",):
            raise ClawError(f"{directory}: vision hidden_act '{hidden_act}' has no clip.cpp equivalent")
        if family == "clip":
            notes.append("CLIP tower: stock llama.cpp puts the class token after the patches (ggml-org/llama.cpp#25814) "
                         "and gets every CLIP LLaVA wrong; run a build with the fix (PR #25844)")
        if "note" in row:
            notes.append(row["note"])
        if family == "clip" and feature != layers:
            notes.append(f"mmproj holds the tower's first {feature} of {layers} layers (vision_feature_layer "
                         f"{config['vision_feature_layer']})")

    def required_keys(self) -> list[str]:
        return list(self.metadata) + ["general.architecture", "general.file_type"]


class NativeMmprojPlan:
    """The vision tower and connector of a native VLM, as its row of ``mappings/gguf_projectors.yaml`` says."""

    def __init__(self, directory: Path, config: dict, text: dict, row: dict, store: TensorStore, outtype: str):
        vision = dict(config.get("vision_config") or {})
        self.kind = row["metadata"]["clip.projector_type"]["value"]
        self.metadata = _row_metadata(directory, row, config, text)   # the config first: its refusals name the reason
        params = {name: _table_param(directory, vision, field) for name, field in row["params"].items()}
        skip = tuple(row.get("skip", []))
        self.tensors, self.tables = _plan_table(store, row["tables"], params, lambda k: not k.startswith(skip),
                                                outtype, f"{directory} (vision tower and connector)",
                                                tuple(row.get("f32", [])), tuple(row.get("float", [])))

    def required_keys(self) -> list[str]:
        return list(self.metadata) + ["general.architecture", "general.file_type"]


def _row_metadata(directory: Path, row: dict, config: dict, text: dict) -> dict[str, tuple[str, Any]]:
    """A ``mappings/gguf_projectors.yaml`` row's checks (refused with their ``why``), then its metadata
    entries that are written: ``{GGUF key: (type, value)}``."""
    sources = {"vision": dict(config.get("vision_config") or {}), "text": text, "top": config,
               "pre": _preprocessor(directory)}
    for check in row.get("checks", []):
        _check_config(directory, check, sources, "config.json")
    return {key: (spec["type"], value) for key, spec in row.get("metadata", {}).items()
            if (value := _projector_value(directory, key, spec, sources)) is not None}


def _table_param(directory: Path, vision: dict, field: str) -> int | list[int]:
    """One ``params:`` entry of a projector row: a vision-config integer, or a list of them."""
    value = _field(vision, field)
    if isinstance(value, (list, tuple)) and all(isinstance(v, int) for v in value):
        return [int(v) for v in value]
    if not isinstance(value, int):
        raise ClawError(f"{directory}: vision_config.{field} is {value!r}, not an integer (the mmproj tables need it)")
    return value


def _projector_value(directory: Path, key: str, spec: dict, sources: dict) -> Any:
    """One ``metadata:`` entry of a projector row; None when the key is not written."""
    if "value" in spec:
        return spec["value"]
    got = [_field(sources, f) for f in spec["from"]]
    if "compute" in spec:
        if any(v is None for v in got):
            raise ClawError(f"{directory}: {key} needs {', '.join(spec['from'])} in the config")
        return _COMPUTE[spec["compute"]](directory, *got)
    value = next((v for v in got if v is not None), spec.get("default"))
    if value is None:
        raise ClawError(f"{directory}: the config has none of {', '.join(spec['from'])} ({key} needs it)")
    return value


def _wa_pattern(directory: Path, full: list) -> int:
    """clip.vision.n_wa_pattern: every n-th block attends to the whole image (Qwen2VLVisionModel)."""
    n = int(full[0]) + 1
    if any(b - a != n for a, b in zip(full, full[1:])):
        raise ClawError(f"{directory}: vision_config.fullatt_block_indexes {full} are not evenly spaced: "
                        f"llama.cpp's qwen2.5vl graph takes one full-attention block every n")
    return n


def _merge_factor(directory: Path, image_size: int, patch_size: int, tokens: int) -> int | None:
    """clip.vision.projector.scale_factor (Gemma3VisionModel): how much the pooling shrinks each
    side, written only when it is not clip.cpp's default of 4."""
    side = math.isqrt(int(tokens))
    if side * side != int(tokens) or (image_size // patch_size) % side:
        raise ClawError(f"{directory}: mm_tokens_per_image {tokens} is not a square that divides the "
                        f"{image_size // patch_size} patches a side")
    factor = (image_size // patch_size) // side
    return None if factor == 4 else factor


def _grid_image_size(directory: Path, positions: int, patch_size: int) -> int:
    """clip.vision.image_size (Qwen3VLVisionModel): the side of the learned position grid, in pixels.  clip.cpp
    takes the grid's side as the square root of the position embedding's rows, as transformers does."""
    side = math.isqrt(int(positions))
    if side * side != int(positions):
        raise ClawError(f"{directory}: vision_config.num_position_embeddings {positions} is not a square: clip.cpp "
                        f"interpolates the position embedding as a square grid")
    return side * int(patch_size)


def _layer_flags(directory: Path, layers: list, count: int) -> list[bool]:
    """One flag per vision layer, true at the listed layers (clip.vision.is_deepstack_layers)."""
    if len(set(layers)) != len(layers) or not all(isinstance(i, int) and 0 <= i < int(count) for i in layers):
        raise ClawError(f"{directory}: vision layers {layers} are not distinct layers of the tower's {count}: "
                        f"clip.cpp names each deepstack merger by the layer it reads")
    return [i in layers for i in range(int(count))]


def _pinpoints(directory: Path, pinpoints: list, image_size: int) -> list[int]:
    """clip.vision.image_grid_pinpoints (convert_image_encoder_to_gguf.py): the pairs flattened as they stand.
    clip.cpp cuts the chosen resolution into image_size tiles, and reads each pair as (width, height) where
    HF reads [height, width], so every side must be a multiple of the image size and the set must hold
    each pair's transpose (as the published ones do) for both to choose the same grid."""
    pairs = [tuple(int(v) for v in p) for p in pinpoints]
    if any(len(p) != 2 or min(p) < 1 or any(v % int(image_size) for v in p) for p in pairs):
        raise ClawError(f"{directory}: image_grid_pinpoints {pinpoints}: clip.cpp cuts the image into "
                        f"{image_size}-pixel tiles, and every side must be a multiple of {image_size}")
    if set(pairs) != {(w, h) for h, w in pairs}:
        raise ClawError(f"{directory}: image_grid_pinpoints {pinpoints} lack the transpose of a pair: clip.cpp "
                        f"reads each pair as (width, height), transformers as [height, width]")
    return [v for p in pairs for v in p]


_COMPUTE = {"wa_pattern": _wa_pattern, "merge_factor": _merge_factor, "grid_image_size": _grid_image_size,
            "layer_flags": _layer_flags, "pinpoints": _pinpoints}


def _preprocessor(directory: Path) -> dict:
    """preprocessor_config.json merged with processor_config.json's image_processor (MmprojModel)."""
    merged: dict = {}
    for name, section in (("preprocessor_config.json", None), ("processor_config.json", "image_processor")):
        if (directory / name).is_file():
            cfg = read_json_file(directory / name, "processor config")
            if isinstance(cfg, dict):
                merged.update(cfg.get(section) or {} if section else cfg)
    return merged


def _normalization(directory: Path, family: str, notes: list[str]) -> tuple[list, list]:
    """image_mean / image_std: preprocessor_config.json (transformers 4 layout) or the image_processor
    section of processor_config.json (transformers 5), else the family's defaults."""
    for name, section in (("preprocessor_config.json", None), ("processor_config.json", "image_processor")):
        if (directory / name).is_file():
            cfg = read_json_file(directory / name, "processor config")
            cfg = cfg.get(section) if section and isinstance(cfg, dict) else cfg
            if isinstance(cfg, dict) and isinstance(cfg.get("image_mean"), list) and isinstance(cfg.get("image_std"), list):
                return cfg["image_mean"], cfg["image_std"]
    notes.append(f"no image_mean / image_std in the processor files: the {family} defaults are written")
    return DEFAULT_NORMALIZATION[family]


# ------------------------------------------------------------------------------------
# writing and reading back
# ------------------------------------------------------------------------------------
def _file_type(outtype: str) -> int:
    import gguf
    T = gguf.LlamaFileType
    return int({"f32": T.ALL_F32, "f16": T.MOSTLY_F16, "bf16": T.MOSTLY_BF16, "q8_0": T.MOSTLY_Q8_0}[outtype])


def _stored(shape: tuple[int, ...], qtype) -> tuple[np.dtype, tuple[int, ...]]:
    """numpy dtype and shape of the bytes gguf-py writes for a tensor of ``shape`` in ``qtype``."""
    import gguf
    Q = gguf.GGMLQuantizationType
    if qtype == Q.F32:
        return np.dtype(np.float32), shape
    if qtype == Q.F16:
        return np.dtype(np.float16), shape
    return np.dtype(np.uint8), tuple(gguf.quants.quant_shape_to_byte_shape(shape, qtype))


def _encode(data: np.ndarray, qtype) -> np.ndarray:
    import gguf
    return gguf.quants.quantize(np.ascontiguousarray(data, dtype=np.float32), qtype)


def _write(path: Path, arch: str, tensors: list[Planned], metadata: dict[str, tuple[str, Any]], outtype: str,
           progress: bool, vocab: tuple | None = None) -> dict:
    import gguf

    writer = gguf.GGUFWriter(str(path), arch, use_temp_file=False)
    writer.add_name(path.stem)
    writer.add_file_type(_file_type(outtype))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for key, (kind, value) in metadata.items():
        {"u32": writer.add_uint32, "i32": writer.add_int32, "f32": writer.add_float32, "bool": writer.add_bool,
         "str": writer.add_string, "f32[]": writer.add_array, "i32[]": writer.add_array,
         "bool[]": writer.add_array}[kind](key, value)
    tokenizer = add_to_writer(writer, vocab[0], vocab[1]) if vocab else None
    for t in tensors:
        dtype, shape = _stored(t.shape, t.qtype)
        writer.add_tensor_info(t.name, shape, dtype, int(np.prod(shape)) * dtype.itemsize, raw_dtype=t.qtype)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        items = tensors
        if progress:
            from tqdm import tqdm
            items = tqdm(tensors, desc=path.name, unit="tensor", leave=False, dynamic_ncols=True)
        for t in items:
            data = _encode(t.read(), t.qtype)
            dtype, shape = _stored(t.shape, t.qtype)
            if data.shape != shape or data.dtype != dtype:
                raise ClawError(f"internal: {t.name} encoded as {data.dtype}{data.shape}, planned {dtype}{shape}")
            writer.write_tensor_data(data)
    finally:
        writer.close()
    types: dict[str, int] = {}
    for t in tensors:
        types[t.qtype.name] = types.get(t.qtype.name, 0) + 1
    record = {"tensors": len(tensors), "types": ", ".join(f"{n} {k}" for k, n in sorted(types.items())),
              "metadata_keys": len(writer.kv_data[0]) if writer.kv_data else 0}
    if tokenizer:
        record["tokenizer"] = tokenizer
    return record


def _check(path: Path, tensors: list[Planned], required: list[str]) -> None:
    """Read the file back with gguf-py's reader: every planned tensor with its shape and type, the keys llama.cpp needs."""
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:
        raise ClawError(f"{path.name}: gguf cannot read the file just written ({str(e).splitlines()[0][:200]})") from e
    found = {t.name: t for t in reader.tensors}
    problems = []
    for t in tensors:
        got = found.pop(t.name, None)
        if got is None:
            problems.append(f"{t.name} missing")
        elif tuple(int(n) for n in reversed(got.shape)) != t.shape or got.tensor_type != t.qtype:
            problems.append(f"{t.name}: {got.tensor_type.name} {tuple(reversed(got.shape.tolist()))}, "
                            f"planned {t.qtype.name} {t.shape}")
    problems += [f"{n}: not planned" for n in found]
    problems += [f"metadata {k} missing" for k in required if k not in reader.fields]
    if problems:
        raise ClawError(f"{path.name}: read back wrong: {problems[0]}", details=problems[1:])


def _gguf_version() -> str:
    from importlib.metadata import version
    return version("gguf")
