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

from ..errors import ClawError
from ..io.readers import GatheredStore, TensorStore
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
