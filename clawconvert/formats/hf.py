"""Hugging Face transformers layout: ``config.json`` + ``model.safetensors`` (or shards).

Detected by a ``config.json`` whose ``model_type`` a family owns.  Written with the
family's config (:class:`~clawconvert.hfconfig.HFConfig`, no transformers import), sharded safetensors with an HF index, and the family's
preprocessor/tokenizer files.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import ClawError
from ..families import Extras, Family, family_for_hf_model_type
from ..io.readers import open_tensors, read_json_file
from . import Checkpoint, Format, SourceOptions

HF_WEIGHTS = ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json", "pytorch_model.bin")


def read_config_json(path: Path) -> dict:
    cfg = path / "config.json" if path.is_dir() else path
    if not cfg.exists():
        raise ClawError(f"{path}: no config.json")
    data = read_json_file(cfg, "config.json")  # one-line errors: empty, a directory, not UTF-8, bad or deep JSON
    if not isinstance(data, dict):
        raise ClawError(f"{cfg}: not a JSON object")
    return data


class HFFormat(Format):
    name = "hf"
    description = "Hugging Face transformers directory (config.json + safetensors)"
    weights_name = "model"

    def detect(self, path: Path) -> bool:
        if not path.is_dir() or not ((path / "config.json").exists() or (path / "config.json").is_symlink()):
            return False
        try:
            data = read_json_file(path / "config.json", "config.json")
        except ClawError:
            return True  # unreadable: open() says what is wrong with it, rather than "cannot tell its format"
        return not isinstance(data, dict) or "model_type" in data  # not an object: open() says so

    def open(self, path: Path, options: SourceOptions) -> Checkpoint:
        if not path.is_dir():
            raise ClawError(f"{path}: an HF model is a directory with config.json and weights")
        data = read_config_json(path)
        cfg_path = path / "config.json"
        try:
            family = family_for_hf_model_type(str(data.get("model_type")))
        except ClawError as e:
            raise ClawError(f"{cfg_path}: {e}") from e
        try:
            config = family.config_from_dict(data)
        except Exception as e:  # wrong types, heads that do not divide the width ...: one line
            first = (str(e).strip().splitlines() or [e.__class__.__name__])[0][:200]
            raise ClawError(f"{cfg_path}: not a valid {str(data.get('model_type'))[:40]} config ({first})") from e
        store = open_tensors(path, unsafe_pickle=options.unsafe_pickle, prefer=HF_WEIGHTS)
        from ..integrity import check_config
        check_config(family, config, store, cfg_path)
        from ..families.clip import read_hf_preprocess  # shared by every image family
        extras = Extras(preprocess=read_hf_preprocess(path), license=data.get("license"),
                        tokenizer_dir=path if any((path / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json",
                                                                                  "vocab.json", "spiece.model")) else None)
        return Checkpoint(path, self.name, family, config, store, extras)

    def write_side_files(self, out_dir: Path, family: Family, config: Any, extras: Extras) -> list[str]:
        config.architectures = [family.hf_architecture(config)]
        config.save_pretrained(str(out_dir))
        return family.write_hf_extras(out_dir, config, extras)


FORMAT = HFFormat()
