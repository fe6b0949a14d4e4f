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


from ..deps import need
from ..errors import ClawError
from ..hub import resolve_source
from ..io.atomic import TMP_PREFIX, atomic_output_dir
from ..io.dtypes import CLI_DTYPES, DType, output_dtype
from ..io.readers import open_tensors
from ..io.writers import SafetensorsWriter, parse_size
from ..provenance import MANIFEST, source_fingerprint, write_manifest
from . import llava
from .lora import Adapter
from .merge import MergePlan, plan_merge, write_merged

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt", "chat_template.jinja",
                   "chat_template.json")
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


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        assert isinstance(data, dict)
        return data
    except FileNotFoundError:
        raise ClawError(f"{path.parent}: no {path.name} (expected a Hugging Face model directory)") from None
    except Exception as e:
        raise ClawError(f"{path}: not valid JSON ({e.__class__.__name__})") from e


# tie_word_embeddings of a config.json that leaves it out: its config class's default.  Read
# from this table for common causal LMs, so a merge does not import transformers (4 s and
# ~700 MiB with torch); tests/test_merge_lora.py checks it against transformers' classes.
TIE_DEFAULTS = {
    "llama": False, "mistral": False, "mixtral": False, "qwen2": False, "qwen2_moe": False, "qwen3": False,
    "phi": False, "phi3": False, "stablelm": False, "gpt_neox": False, "granite": False, "olmo": False,
    "olmo2": False, "gemma": True, "gemma2": True, "gemma3_text": True, "gpt2": True, "starcoder2": True,
    "opt": True, "smollm3": True,
}


def _effective_tie(base: Path, config: dict) -> bool:
    """tie_word_embeddings as transformers applies it, class defaults included."""
    if config.get("model_type") in TIE_DEFAULTS and "text_config" not in config:
        value = config.get("tie_word_embeddings", TIE_DEFAULTS[config["model_type"]])
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


def merge_lora(base: str | Path, adapter: str | Path, out: str | Path, *, connector: str | Path | None = None,
               vision: str | Path | None = None, dtype: str = "keep", image_token: str = "<image>",
               vision_feature_layer: int = -1, vision_feature_select_strategy: str | None = None,
               chat_template: str | Path | None = None, max_shard_size: str | int = "5GB",
               overwrite: bool = False, unsafe_pickle: bool = False, progress: bool = False) -> MergeResult:
    """Merge ``adapter`` into ``base`` (and assemble a LLaVA with ``vision``); see ``merge-lora --help``."""
    with contextlib.ExitStack() as stack:    # holds the scratch copy of a converted vision tower
        if dtype not in CLI_DTYPES:
            raise ClawError(f"unknown dtype '{dtype}' (choose from {', '.join(CLI_DTYPES)})")
        out_dtype = CLI_DTYPES[dtype]
        base_path, base_hub = resolve_source(str(base))
        adapter_path, adapter_hub = resolve_source(str(adapter))
        vision_path, vision_hub = resolve_source(str(vision)) if vision is not None else (None, {})
        if not base_path.is_dir():
            raise ClawError(f"{base_path}: BASE must be a Hugging Face model directory")
        base_config = _read_json(base_path / "config.json")
        is_llava = base_config.get("model_type") == "llava"
        if is_llava and (vision is not None or connector is not None):
            raise ClawError(f"{base_path}: BASE is already a LLaVA model; --vision and --connector build one from a "
                            f"causal LM")
        if connector is not None and vision is None:
            raise ClawError("--connector needs --vision (the vision tower the connector reads from)")
        text_config = dict((base_config.get("text_config") or {}) if is_llava else base_config)
        tied = _effective_tie(base_path, base_config)
        adapter_obj = Adapter(adapter_path, unsafe_pickle=unsafe_pickle)
        base_store = open_tensors(base_path, unsafe_pickle=unsafe_pickle)
        notes: list[str] = []

        plan = plan_merge(base_store, adapter_obj, tied=tied, model_type=str(text_config.get("model_type", "")),
                          dtype=out_dtype)
        assembly, extra_rows = None, 0
        if vision is not None:
            scratch = _scratch_beside(Path(out), stack) if not (vision_path / "config.json").is_file() else None
            assembly = _Assembly(base_path, vision_path, scratch, image_token, vision_feature_layer,
                                 vision_feature_select_strategy, chat_template, unsafe_pickle)
            extra_rows = max(0, assembly.image_token_index + 1 - (plan.vocab_rows or 0))
            if extra_rows:
                plan.grow_vocab(extra_rows)

        leftovers = dict(plan.leftovers)
        if assembly is not None:
            leftovers = assembly.take_connector(connector, adapter_obj, leftovers, notes)
        _refuse_leftovers(leftovers, base_path)

        # output config
        if plan.untied:
            text_config["tie_word_embeddings"] = False
        elif tied:
            text_config["tie_word_embeddings"] = True
        if extra_rows:
            text_config["vocab_size"] = plan.vocab_rows + extra_rows
        lm_dtype = _dtype_name(out_dtype) or next((text_config[k] for k in CONFIG_DTYPE_KEYS if k in text_config), None)
        _set_dtype(text_config, _dtype_name(out_dtype))

        if assembly is not None:
            tensors, extra = assembly.plan(plan, text_config, out_dtype)
            config = assembly.config(text_config, lm_dtype)
            architecture = "LlavaForConditionalGeneration"
        else:
            tensors, extra = plan.tensors, []
            config = text_config
            if is_llava:
                config = {**base_config, "text_config": text_config}
                if plan.untied:
                    config["tie_word_embeddings"] = False
                _set_dtype(config, _dtype_name(out_dtype))
            architecture = (config.get("architectures") or [config.get("model_type", "?")])[0]

        writer_plan = [(t.name, t.shape, t.dtype) for t in tensors] + [(n, s, d) for n, s, d, _ in extra]
        sources = tuple(p for p in (base_path, adapter_path, vision_path,
                                    Path(connector) if connector is not None else None) if p is not None)
        with atomic_output_dir(out, overwrite=overwrite, sources=sources) as tmp:
            writer = SafetensorsWriter(tmp, writer_plan, max_shard_size=parse_size(max_shard_size))
            try:
                write_merged(tensors, base_store, adapter_obj, writer, _progress(progress, len(writer_plan)))
                for name, _, _, read in extra:
                    writer.write(name, read())
                files = writer.close()
            except BaseException:
                writer.abort()
                raise
            if assembly is not None:
                config.save_pretrained(str(tmp))
                notes += assembly.write_processor(tmp)
                copied = _copy_side_files(base_path, tmp, keep=("generation_config.json",))
            else:
                (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
                copied = _copy_side_files(base_path, tmp)
                if not any(f in copied for f in TOKENIZER_FILES):
                    notes.append(f"{base_path} has no tokenizer files; none copied")
            merge_record = {**plan.summary, "tie": plan.tie, "extra_embedding_rows": extra_rows,
                            "copied_from_base": copied}
            if assembly is not None:
                merge_record["llava"] = assembly.record()
            write_manifest(tmp, {
                "source": {
                    "base": {"path": str(base), "fingerprint": source_fingerprint(base_path), **base_hub},
                    "adapter": {"path": str(adapter), "fingerprint": source_fingerprint(adapter_path), **adapter_hub,
                                "config": adapter_obj.raw_config},
                    **({"vision": {"path": str(vision), "fingerprint": source_fingerprint(vision_path), **vision_hub}}
                       if vision_path else {}),
                    **({"connector": {"path": str(connector), "fingerprint": source_fingerprint(Path(connector))}}
                       if connector is not None else {}),
                },
                "target": {"format": "hf", "architecture": architecture},
                "dtype": dtype,
                "merge": merge_record,
                "notes": notes,
            })
            dest = Path(out).absolute()
        return MergeResult(dest, architecture, len(writer_plan), writer.total_size, [f.name for f in files],
                           plan.tie, notes, merge_record)


def _refuse_leftovers(leftovers: dict[str, str], base: Path) -> None:
    """Adapter tensors that fit nothing in BASE (nor the connector) stop the merge, all named."""
    if not leftovers:
        return
    path, key = next(iter(leftovers.items()))
    hint = ("; it looks like a connector: pass --vision to assemble a LLaVA model"
            if any(llava.looks_like_connector(p) for p in leftovers) else "")
    raise ClawError(f"adapter tensor '{key}' has no counterpart '{path}' in BASE {base}{hint}",
                    details=[f"adapter tensor '{k}' has no counterpart '{p}'" for p, k in list(leftovers.items())[1:]])


def _scratch_beside(out: Path, stack: contextlib.ExitStack) -> Path:
    """A temporary directory beside OUT (same disk), removed when the merge ends."""
    parent = out.absolute().parent
    if not parent.is_dir():
        raise ClawError(f"{parent}: parent directory does not exist")
    return Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=f"{TMP_PREFIX}vision-", dir=parent)))


def _progress(enabled: bool, total: int):
    if not enabled:
        return None
    from tqdm import tqdm
    return lambda it: tqdm(it, total=total, desc="merge-lora", unit="tensor", leave=False, dynamic_ncols=True)


class _Assembly:
    """The LLaVA side of a merge: vision tower, connector, tokenizer with the image token, processor."""

    def __init__(self, base: Path, vision: Path, scratch: Path | None, image_token: str, feature_layer: int,
                 strategy: str | None, chat_template: str | Path | None, unsafe_pickle: bool):
        need("transformers", to="--vision (LLaVA assembly: tokenizer, processor, config)")
        self.vision, self.vision_config = llava.vision_tower_source(vision, scratch, unsafe_pickle)
        self.vision_dir = self.vision.path.parent
        self.unsafe_pickle = unsafe_pickle
        family_default = "default" if llava.num_additional_tokens(self.vision_config) else "full"
        self.strategy = strategy or family_default
        self.feature_layer = feature_layer
        self.image_token = image_token
        self.tokenizer = llava.load_tokenizer(base)
        self.image_token_index, self.token_added = llava.add_image_token(self.tokenizer, image_token)
        self.chat_template, self.template_origin = llava.choose_chat_template(
            self.tokenizer, Path(chat_template) if chat_template is not None else None)
        self.image_seq_length = llava.image_token_count(self.vision_config, self.strategy)
        self.connector: llava.Connector | None = None
        self.projector_bias = True

    def take_connector(self, path: str | Path | None, adapter: Adapter, leftovers: dict[str, str],
                       notes: list[str]) -> dict[str, str]:
        """The connector from --connector, else from the adapter's leftovers; returns the leftovers it left."""
        given = llava.open_connector(path, self.unsafe_pickle) if path is not None else None
        stored = llava.detect_connector(adapter.store, leftovers.values(), f"{adapter.path} (modules_to_save)")
        if stored is not None:
            used = {stored.key(role) for role in stored.tensors}
            leftovers = {p: k for p, k in leftovers.items() if k not in used}
            if given is not None:
                notes.append(f"the adapter also stores a connector ({stored.key('linear_1.weight')}, ...); "
                             f"used --connector {path} instead")
        self.connector = given or stored
        if self.connector is None:
            raise ClawError("--vision needs a connector: pass --connector FILE (the adapter's modules_to_save "
                            "holds none)")
        return leftovers

    def plan(self, plan: MergePlan, text_config: dict, dtype: DType | None):
        """LM tensors renamed to the llava-hf layout, plus vision and connector tensors (read lazily)."""
        for t in plan.tensors:
            t.name = llava.llava_name(t.canonical)
        llava.check_connector(self.connector, int(self.vision_config["hidden_size"]), int(text_config["hidden_size"]))
        self.projector_bias = self.connector.bias
        extra = []
        for key in self.vision.keys():
            info = self.vision.info(key)
            extra.append((f"vision_tower.{key}", info.shape, output_dtype(info.dtype, dtype),
                          lambda s=self.vision, k=key: s.read(k)))
        for role, (store, key) in self.connector.tensors.items():
            info = store.info(key)
            extra.append((f"multi_modal_projector.{role}", info.shape, output_dtype(info.dtype, dtype),
                          lambda s=store, k=key: s.read(k)))
        return plan.tensors, extra

    def config(self, text_config: dict, dtype_name: str | None):
        text = {k: v for k, v in text_config.items()
                if k not in ("architectures", "transformers_version", "_name_or_path")}
        return llava.llava_config(text, self.vision_config, image_token_index=self.image_token_index,
                                  image_seq_length=self.image_seq_length, vision_feature_layer=self.feature_layer,
                                  strategy=self.strategy, projector_bias=self.projector_bias, dtype=dtype_name)

    def write_processor(self, out: Path) -> list[str]:
        from transformers import LlavaProcessor

        image_processor, origin = llava.image_processor_for(self.vision_dir, self.vision_config)
        self.image_processor_origin = origin
        self.tokenizer.chat_template = self.chat_template
        processor = LlavaProcessor(
            image_processor=image_processor, tokenizer=self.tokenizer,
            patch_size=int(self.vision_config.get("patch_size", 16)),
            vision_feature_select_strategy=self.strategy, chat_template=self.chat_template,
            image_token=self.image_token,
            num_additional_image_tokens=llava.num_additional_tokens(self.vision_config))
        processor.save_pretrained(str(out))
        return [f"image processor: {origin}", f"chat template: {self.template_origin}"]

    def record(self) -> dict:
        return {"image_token": self.image_token, "image_token_index": self.image_token_index,
                "image_token_added": self.token_added, "image_seq_length": self.image_seq_length,
                "vision_feature_layer": self.feature_layer, "vision_feature_select_strategy": self.strategy,
                "connector": {"origin": self.connector.origin, "layout": self.connector.layout},
                "vision_config_model_type": self.vision_config["model_type"],
                "chat_template": self.template_origin,
                "image_processor": getattr(self, "image_processor_origin", None)}


