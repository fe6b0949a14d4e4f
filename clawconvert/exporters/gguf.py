"""``export --to gguf``: an HF causal LM or LLaVA as GGUF files for llama.cpp.

* A causal LM (llama, mistral, qwen2: ``mappings/gguf_architectures.yaml``) becomes
  ``DST/model-<type>.gguf``: the tensors through ``mappings/causal_lm/gguf.yaml`` (with the
  q/k row order llama.cpp's llama graph needs), the hyperparameters through the architecture
  table, and the tokenizer as llama.cpp's converter writes it (:mod:`.gguf_vocab`).
* An HF LLaVA (CLIP or SigLIP tower) becomes that file for its language model plus
  ``DST/mmproj-<type>.gguf``: the vision tower through ``mappings/<clip|siglip>/gguf.yaml``
  (only the layers up to the feature layer; no post-layernorm, which LLaVA's features skip),
  the projector through ``mappings/llava/gguf.yaml``, and the ``clip.*`` metadata clip.cpp
  reads (projector type ``mlp``, feature layer, image mean / std, patch and image size,
  activation).

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
        if config.get("model_type") == "llava":
            lm_store, vision_store, projector_store = llava_parts(src_path)
            for s in (lm_store, vision_store, projector_store):
                stack.callback(s.close)
            text = config["text_config"]
            mm = MmprojPlan(src_path, config, vision_store, projector_store, outtype, notes)
        else:
            lm_store, text, mm = open_tensors(src_path), config, None
            stack.callback(lm_store.close)
        lm = LanguageModelPlan(src_path, text, lm_store, outtype)
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
    what = f"{config.get('model_type')} -> {lm.arch}" + (" + clip mmproj" if mm else "")
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

    def text(config: dict) -> dict:
        return {**defaults.get(config.get("model_type"), {}), **config}
    if raw.get("model_type") != "llava":
        return text(raw)
    vision = dict(raw.get("vision_config") or {})
    vision.setdefault("model_type", "clip_vision_model")
    if vision["model_type"] in VISION_FAMILIES:
        try:
            vision = from_dict(vision["model_type"], vision).to_dict()
        except ValueError as e:
            raise ClawError(f"{path / 'config.json'}: vision_config: {e}") from e
    return {**defaults["llava"], **raw, "vision_config": vision,
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


def _qtype(name: str, shape: tuple[int, ...], outtype: str):
    """llama.cpp's converter's type choice for one tensor (convert_hf_to_gguf.py prepare_tensors)."""
    import gguf
    Q = gguf.GGMLQuantizationType
    if len(shape) <= 1 or name.endswith("_norm.weight") or name in ("v.position_embd.weight", "v.class_embd"):
        return Q.F32
    if name == "v.patch_embd.weight":
        return Q.F16 if outtype == "f16" else Q.F32
    if outtype == "q8_0" and shape[-1] % 32:
        return Q.F16              # the converter's fallback when rows do not divide into Q8_0 blocks
    return {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}[outtype]


def _plan_table(store: TensorStore, table_family: str, params: dict, keep: Callable[[str], bool],
                outtype: str, origin: str) -> tuple[list[Planned], Any]:
    """Every tensor of ``store`` that ``keep`` selects, through ``mappings/<table_family>/gguf.yaml``."""
    table = load_table(table_family, "gguf")
    expanded = table.expand(params)
    planned, missing, unmapped = [], [], []
    for key in store.keys():
        if keep(key) and key not in expanded.by_canonical and not expanded.dropped(key):
            unmapped.append(key)
    for rule in expanded.rules:
        (canonical,), (gguf_name,) = rule.canonical, rule.format
        if canonical not in store or not keep(canonical):
            if not rule.optional and keep(canonical):
                missing.append(canonical)
            continue
        (shape,) = rule.chain.save_shapes([tuple(store.info(canonical).shape)])
        read = (lambda s=store, k=canonical, c=rule.chain: c.save([np.asarray(s.read(k), dtype=np.float32)])[0])
        planned.append(Planned(gguf_name, tuple(shape), _qtype(gguf_name, tuple(shape), outtype), read))
    if unmapped or missing:
        problems = [f"no GGUF name for '{k}' in {table.name}" for k in unmapped] + \
                   [f"missing tensor '{k}'" for k in missing]
        raise ClawError(f"{origin}: cannot be written as GGUF: {problems[0]}"
                        + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""), details=problems[1:])
    return planned, table


class LanguageModelPlan:
    """The language model's tensors, hyperparameters and vocabulary."""

    def __init__(self, directory: Path, text: dict, store: TensorStore, outtype: str):
        archs = _architectures()
        model_type = text.get("model_type")
        if model_type not in archs["architectures"]:
            raise ClawError(f"{directory}: --to gguf does not know the language model type '{model_type}' "
                            f"(supported: {', '.join(archs['architectures'])})")
        info = archs["architectures"][model_type]
        rope = text.get("rope_scaling") or text.get("rope_parameters") or {}
        if (rope.get("rope_type") or rope.get("type") or "default") != "default":
            raise ClawError(f"{directory}: RoPE scaling '{rope.get('rope_type') or rope.get('type')}' is not "
                            f"supported by this export yet")
        self.arch = info["arch"]
        heads, hidden = int(text["num_attention_heads"]), int(text["hidden_size"])
        head_dim = int(text.get("head_dim") or hidden // heads)
        params = {"layers": int(text["num_hidden_layers"]), "rope_permute": bool(info["rope_permute"]),
                  "H": heads, "KV": int(text.get("num_key_value_heads") or heads), "hd": head_dim, "D": hidden}
        self.tensors, table = _plan_table(store, "causal_lm", params, lambda k: True, outtype, str(directory))
        self.tables = [table]
        self.metadata: dict[str, tuple[str, Any]] = {}
        for key, spec in archs["hyperparameters"].items():
            value = next((v for v in (_field(text, f) for f in spec["from"]) if v is not None), None)
            if value is None and "default" in spec:
                value = evaluate(spec["default"], {k: v for k, v in text.items() if isinstance(v, int)}) \
                    if isinstance(spec["default"], str) else spec["default"]
            if value is None:
                raise ClawError(f"{directory}: the text config has none of {', '.join(spec['from'])} "
                                f"({self.arch}.{key} needs it)")
            self.metadata[f"{self.arch}.{key}"] = (spec["type"], value)
        rows = store.info("model.embed_tokens.weight").shape[0]
        self.metadata[f"{self.arch}.vocab_size"] = ("u32", rows)
        self.vocab = read_vocab(directory, rows, info["bpe_pre"])

    def required_keys(self) -> list[str]:
        return list(self.metadata) + ["tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.scores",
                                      "tokenizer.ggml.token_type", "general.architecture", "general.file_type"]


class MmprojPlan:
    """The vision tower and projector of an HF LLaVA, as clip.cpp's LLaVA graph reads them."""

    def __init__(self, directory: Path, config: dict, vision: TensorStore, projector: TensorStore, outtype: str,
                 notes: list[str]):
        vc = config["vision_config"]
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
        ptensors, ptable = _plan_table(projector, "llava", {}, lambda k: True, outtype, f"{directory} (projector)")
        self.tensors += ptensors
        self.tables = [vtable, ptable]
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
        }
        if hidden_act not in GELU + ("quick_gelu",):
            raise ClawError(f"{directory}: vision hidden_act '{hidden_act}' has no clip.cpp equivalent")
        if family == "clip":
            notes.append("CLIP tower: stock llama.cpp puts the class token after the patches (ggml-org/llama.cpp#25814) "
                         "and gets every CLIP LLaVA wrong; run a build with the fix (PR #25844)")
        if family == "clip" and feature != layers:
            notes.append(f"mmproj holds the tower's first {feature} of {layers} layers (vision_feature_layer "
                         f"{config['vision_feature_layer']})")

    def required_keys(self) -> list[str]:
        return list(self.metadata) + ["general.architecture", "general.file_type"]


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
         "str": writer.add_string, "f32[]": writer.add_array, "i32[]": writer.add_array}[kind](key, value)
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
