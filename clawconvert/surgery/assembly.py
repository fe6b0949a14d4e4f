"""Assembling an HF LLaVA from parts: a language model, a vision tower, a connector, a tokenizer.

:class:`LlavaAssembly` is what ``merge-lora --vision`` and the conversion of research-code
checkpoints (the VLM-learning tutorial's folder, original LLaVA) share: it finds the connector,
adds the image token, gathers every tensor under its canonical name for the engine, and writes
the LLaVA config and processor.  Which files may hold a connector, and in which layouts, is
llava.yaml's ``part_sources``; which tokens a tokenizer-less Qwen-1 base has, qwen.yaml's
``tokenizer``.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Iterable

from ..architectures import load_architecture
from ..errors import ClawError
from ..io.readers import GatheredStore, TensorStore, open_tensors, read_json_file
from . import llava
from .tokenizer import portable_tokenizer_config

# the files of a PEFT checkpoint folder that are trainer state: never opened, named in a note
TRAINER_FILES = ("optimizer.pt", "scheduler.pt", "training_args.bin", "trainer_state.json", "scaler.pt",
                 "rng_state.pth")


def trainer_files(folder: Path) -> list[str]:
    return sorted(f.name for f in Path(folder).iterdir()
                  if f.is_file() and (f.name in TRAINER_FILES or f.name.startswith("rng_state")))


class LlavaAssembly:
    """The LLaVA side of a merge or conversion: vision tower, connector, tokenizer, processor."""

    def __init__(self, vision: TensorStore, vision_config: dict, *, tokenizer, image_token: str,
                 image_token_id: int | None, feature_layer: int, strategy: str | None,
                 chat_template: str | Path | None, unsafe_pickle: bool, vision_dir: Path | None = None,
                 grid_pinpoints: list | None = None, llava_conventions: bool = False, lm_type: str = ""):
        """``grid_pinpoints`` makes it a LLaVA-NeXT (1.6 anyres); ``llava_conventions`` follows
        transformers' conversion of the original LLaVA checkpoints: a ``<pad>`` pad token added
        (except for Qwen language models, which have one), the vocabulary padded to a multiple of 64."""
        self.vision, self.vision_config = vision, vision_config
        self.vision_dir = vision_dir or vision.path.parent
        self.grid_pinpoints = grid_pinpoints
        self.pad_token_id: int | None = None
        self.unsafe_pickle = unsafe_pickle
        family_default = "default" if llava.num_additional_tokens(vision_config) else "full"
        self.strategy = strategy or family_default
        self.feature_layer = feature_layer
        self.image_token = image_token
        self.tokenizer = tokenizer
        if tokenizer is not None:
            self.image_token_index, self.token_added = llava.add_image_token(tokenizer, image_token)
            if llava_conventions and not lm_type.startswith("qwen"):
                tokenizer.add_special_tokens({"pad_token": "<pad>"})
                self.pad_token_id = tokenizer.pad_token_id
            self.chat_template, self.template_origin = llava.choose_chat_template(
                tokenizer, Path(chat_template) if chat_template is not None else None, image_token)
        else:
            if image_token_id is None:
                raise ClawError(f"BASE has no tokenizer, so the id of the image token {image_token!r} is unknown")
            self.image_token_index, self.token_added = image_token_id, False
            self.chat_template, self.template_origin = None, "none (no tokenizer)"
        self.image_seq_length = llava.image_token_count(vision_config, self.strategy)
        rows = max(self.image_token_index + 1, len(tokenizer) if tokenizer is not None else 0)
        self.vocab_rows = -(-rows // 64) * 64 if llava_conventions else rows
        self.connector: llava.Connector | None = None
        self.projector_bias = True
        self.image_processor_origin: str | None = None

    def take_connector(self, path: str | Path | None, stores: Iterable[tuple[TensorStore, Iterable[str], str]],
                       leftovers: dict[str, str], notes: list[str]) -> dict[str, str]:
        """The connector from ``path``, else the first of ``stores`` (store, candidate keys, origin) that
        holds one; the adapter's modules_to_save leftovers it uses are taken off ``leftovers``."""
        given = llava.open_connector(path, self.unsafe_pickle) if path is not None else None
        found = None
        for store, names, origin in stores:
            conn = llava.detect_connector(store, names, origin)
            if conn is not None:
                found = conn
                break
        if found is not None:
            used = {found.key(role) for role in found.tensors}
            leftovers = {p: k for p, k in leftovers.items() if k not in used}
            if given is not None:
                notes.append(f"{found.origin} also holds a connector ({found.key('linear_1.weight')}, ...); "
                             f"used --connector {path} instead")
        self.connector = given or found
        if self.connector is None:
            raise ClawError("--vision needs a connector: pass --connector FILE (the adapter holds none in its "
                            "modules_to_save, and its folder no connector file)")
        return leftovers

    def gather(self, lm: dict[str, tuple[TensorStore, str]], text_config: dict, path: Path) -> GatheredStore:
        """One store of the LLaVA's tensors under their canonical names: the language model's
        (``lm``), the vision tower's and the connector's (read lazily, each from its own file)."""
        llava.check_connector(self.connector, int(self.vision_config["hidden_size"]), int(text_config["hidden_size"]))
        self.projector_bias = self.connector.bias
        has_newline = "image_newline" in self.connector.tensors
        if self.grid_pinpoints and not has_newline:
            raise ClawError(f"{self.connector.origin}: a LLaVA-NeXT (anyres) connector needs its image_newline row, "
                            f"which it does not hold")
        entries = dict(lm)
        for key in self.vision.keys():
            entries[key] = (self.vision, key)
        for role, (store, key) in self.connector.tensors.items():
            if role != "image_newline" or self.grid_pinpoints:
                entries[f"connector/{role}"] = (store, key)
        return GatheredStore(path, entries)

    def config(self, text_config: dict, dtype_name: str | None):
        # text_config keeps its architectures: llama.cpp's converter picks the language model's from it
        text = {k: v for k, v in text_config.items() if k not in ("transformers_version", "_name_or_path")}
        return llava.llava_config(text, self.vision_config, image_token_index=self.image_token_index,
                                  image_seq_length=self.image_seq_length, vision_feature_layer=self.feature_layer,
                                  strategy=self.strategy, projector_bias=self.projector_bias, dtype=dtype_name,
                                  grid_pinpoints=self.grid_pinpoints, pad_token_id=self.pad_token_id)

    @property
    def architecture(self) -> str:
        return "LlavaNextForConditionalGeneration" if self.grid_pinpoints else "LlavaForConditionalGeneration"

    @property
    def table(self) -> str:
        return "llava_next" if self.grid_pinpoints else "llava"

    def write_processor(self, out: Path, tokenizer_dir: Path | None = None) -> list[str]:
        """The processor (image processor, tokenizer with the image token, chat template), in files
        transformers 4.x and 5.x both read, with the base's ``tokenizer.model`` beside them
        (llama.cpp's converter reads the SentencePiece vocabulary from it)."""
        if self.tokenizer is None:
            return ["no processor written: BASE has no tokenizer (see the note above)"]
        image_processor, origin = llava.image_processor_for(self.vision_dir, self.vision_config)
        if self.grid_pinpoints:
            image_processor = llava.next_image_processor(image_processor, self.grid_pinpoints)
            origin += f", as LLaVA-NeXT's with image_grid_pinpoints {self.grid_pinpoints}"
        self.image_processor_origin = origin
        self.tokenizer.chat_template = self.chat_template
        processor = llava.processor_class(self.grid_pinpoints)(
            image_processor=image_processor, tokenizer=self.tokenizer,
            patch_size=int(self.vision_config.get("patch_size", 16)),
            vision_feature_select_strategy=self.strategy, chat_template=self.chat_template,
            image_token=self.image_token,
            num_additional_image_tokens=llava.num_additional_tokens(self.vision_config))
        processor.save_pretrained(str(out))
        portable_tokenizer_config(out)
        spm = Path(tokenizer_dir) / "tokenizer.model" if tokenizer_dir is not None else None
        if spm is not None and spm.is_file() and not (Path(out) / "tokenizer.model").exists():
            shutil.copyfile(spm, Path(out) / "tokenizer.model")
        return [f"image processor: {origin}", f"chat template: {self.template_origin}"]

    def record(self) -> dict:
        return {"image_token": self.image_token, "image_token_index": self.image_token_index,
                "image_token_added": self.token_added, "image_seq_length": self.image_seq_length,
                "vision_feature_layer": self.feature_layer, "vision_feature_select_strategy": self.strategy,
                "connector": {"origin": self.connector.origin, "layout": self.connector.layout},
                "vision_config_model_type": self.vision_config["model_type"],
                "chat_template": self.template_origin,
                "image_processor": self.image_processor_origin,
                **({"image_grid_pinpoints": self.grid_pinpoints} if self.grid_pinpoints else {})}


def vision_source(vision: Path | None, own: dict, llava_cfg: dict, base: Path, scratch, unsafe_pickle: bool,
                   notes: list[str]) -> tuple:
    """(tower tensors under canonical names, vision_config, directory of its preprocessing).

    An original LLaVA checkpoint that saved its (trained) tower brings the weights; its config
    and preprocessing still come from ``--vision``, the model ``mm_vision_tower`` names."""
    named = llava_cfg.get("mm_vision_tower") if llava_cfg else None
    if vision is None:
        hint = f" (it names {named!r}: pass that model's directory or hf-hub:{named})" if named else ""
        what = "holds its tower's weights but not its config" if own else "holds no vision tower"
        raise ClawError(f"{base}: the checkpoint {what}; --vision gives it{hint}")
    vdir = vision if (vision / "config.json").is_file() else None
    store, config = llava.vision_tower_source(vision, None if vdir else scratch(), unsafe_pickle)
    if not own:
        return store, config, store.path.parent
    theirs = {k: tuple(store.info(k).shape) for k in store.keys()}
    mine = {c: tuple(s.info(k).shape) for c, (s, k) in own.items()}
    if theirs != mine:
        diff = sorted(set(theirs) ^ set(mine)) or [k for k in mine if mine[k] != theirs[k]]
        raise ClawError(f"{base}: the checkpoint's vision tower does not match --vision {vision} (e.g. '{diff[0]}')")
    notes.append(f"vision tower weights from {base} (trained with the model); config and preprocessing from {vision}")
    return GatheredStore(base, own), config, store.path.parent


def grid_pinpoints(llava_cfg: dict, base: Path) -> list | None:
    """LLaVA 1.6: ``image_aspect_ratio: anyres`` with ``spatial_unpad`` tiles is LLaVA-NeXT."""
    if not llava_cfg or llava_cfg.get("image_aspect_ratio") != "anyres":
        return None
    merge = llava_cfg.get("mm_patch_merge_type", "spatial_unpad")
    if merge != "spatial_unpad":
        raise ClawError(f"{base}: mm_patch_merge_type '{merge}' has no transformers class "
                        f"(LlavaNextForConditionalGeneration implements spatial_unpad)")
    grid = llava_cfg.get("image_grid_pinpoints")
    if not isinstance(grid, list) or not grid:
        raise ClawError(f"{base}: image_aspect_ratio is anyres but image_grid_pinpoints is missing")
    return grid


class ResearchFolder:
    """What research code leaves beside a PEFT adapter: a connector file (llava.yaml's
    ``part_sources`` name them: ``other_params.bin``, ``non_lora_trainables.bin``), an original
    LLaVA ``config.json`` with ``mm_vision_select_layer``, and trainer state that is never opened."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.connector_files = [self.folder / f for lay in load_architecture("llava").part_sources["connector"]
                                for f in lay.files if (self.folder / f).is_file()]
        cfg = self.folder / "config.json"
        self.llava_config = {}
        if cfg.is_file():
            data = read_json_file(cfg, "config.json")
            if isinstance(data, dict) and "mm_vision_select_layer" in data:
                self.llava_config = data

    def notes(self) -> list[str]:
        ignored = trainer_files(self.folder)
        return [f"ignored in {self.folder}: {', '.join(ignored)} (trainer state, never unpickled)"] if ignored else []

    def connector_stores(self, unsafe_pickle: bool) -> list[tuple]:
        out = []
        for f in self.connector_files:
            store = open_tensors(f, unsafe_pickle=unsafe_pickle)
            out.append((store, store.keys(), str(f)))
        return out

    def feature_selection(self, layer: int | None, strategy: str | None) -> tuple[int, str | None]:
        """--vision-feature-layer / -strategy, else the original LLaVA config's, else -1 and the tower's default."""
        cfg = self.llava_config
        if layer is None:
            layer = int(cfg.get("mm_vision_select_layer", -1))
        if strategy is None and cfg.get("mm_vision_select_feature"):
            strategy = {"patch": "default", "cls_patch": "full"}.get(cfg["mm_vision_select_feature"])
        return layer, strategy
