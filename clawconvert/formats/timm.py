"""timm layout: a directory as timm's ``save_for_hf`` writes it.

``config.json`` names the registered ``architecture`` and the ``model_args`` it was built with
(plus ``pretrained_cfg``: preprocessing), beside ``model.safetensors`` (or ``pytorch_model.bin``).
Detected by a ``config.json`` with ``architecture`` and no ``model_type`` (that is transformers');
the family whose timm codec claims the architecture reads it.  Outputs load with
``timm.create_model("local-dir:DIR", pretrained=True)`` (or ``hf-hub:`` once pushed).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import ClawError
from ..families import Extras, Family, family_claiming
from ..io.readers import open_tensors, read_json_file
from . import Checkpoint, Format, SourceOptions

CONFIG = "config.json"
WEIGHTS = ("model.safetensors", "pytorch_model.bin", "pytorch_model.pth", "model.pth")   # timm's own preference
PREPROCESS = ("mean", "std", "interpolation", "crop_pct")


def _config(path: Path) -> dict:
    data = read_json_file(path / CONFIG, "timm config.json")
    if not isinstance(data, dict):
        raise ClawError(f"{path / CONFIG}: not a JSON object")
    return data


class TimmFormat(Format):
    name = "timm"
    description = "timm directory (config.json with architecture + model.safetensors), as save_for_hf writes it"
    weights_name = "model"

    def detect(self, path: Path) -> bool:
        if not path.is_dir() or not (path / CONFIG).is_file():
            return False
        try:
            data = _config(path)
        except ClawError:
            return False   # the HF format claims unreadable config.json files and says what is wrong
        return "architecture" in data and "model_type" not in data

    def open(self, path: Path, options: SourceOptions) -> Checkpoint:
        if not path.is_dir():
            raise ClawError(f"{path}: a timm model is a directory with config.json and model.safetensors")
        data = _config(path)
        cfg_path = path / CONFIG
        family = family_claiming(self.name, data)
        if family is None:
            raise ClawError(f"{cfg_path}: no model family reads timm architecture {str(data.get('architecture'))[:80]!r}")
        codec = family.codec(self.name)
        try:
            config, params = codec.read(data), codec.params(data)
        except ClawError as e:
            raise ClawError(f"{cfg_path}: {e}", e.details) from e
        store = open_tensors(path, unsafe_pickle=options.unsafe_pickle, prefer=WEIGHTS)
        from ..integrity import check_config
        check_config(family, config, store, cfg_path)
        pre = data.get("pretrained_cfg") or {}
        extras = Extras(preprocess={k: tuple(pre[k]) if isinstance(pre[k], list) else pre[k]
                                    for k in PREPROCESS if k in pre}, license=pre.get("license"))
        return Checkpoint(path, self.name, family, config, store, extras, params)

    def table_params(self, family: Family, config: Any) -> dict[str, Any]:
        codec = family.codec(self.name)
        return codec.params(codec.write(config))

    def write_side_files(self, out_dir: Path, family: Family, config: Any, extras: Extras) -> list[str]:
        cfg = family.codec(self.name).write(config, extras.preprocess)
        (out_dir / CONFIG).write_text(json.dumps(cfg, indent=2) + "\n")
        return []

    def writer(self, out_dir: Path, plan: list, max_shard_size: int, metadata: dict | None = None):
        # timm loads one weights file: never shard
        return super().writer(out_dir, plan, max_shard_size=1 << 62, metadata=metadata)


FORMAT = TimmFormat()
