"""OpenCLIP layout: ``open_clip_config.json`` + ``open_clip_model.safetensors``.

Sources: a hub-style directory (``open_clip_config.json`` with ``model_cfg`` and
``preprocess_cfg``, weights ``open_clip_model.safetensors`` or
``open_clip_pytorch_model.bin``), or a bare checkpoint file (``epoch_N.pt`` training
checkpoints included) with ``--model-name`` (a built-in open_clip config) or
``--model-config`` (a model config JSON).  Outputs are directories that
``open_clip.create_model_and_transforms("local-dir:DIR")`` loads.
"""
from __future__ import annotations

import copy
import difflib
import json
import re
from functools import lru_cache
from pathlib import Path
from typing import Any

from ..deps import need
from ..errors import ClawError
from ..families import Extras, Family, family_claiming
from ..io.readers import READERS, open_tensors, read_json_file
from . import Checkpoint, Format, SourceOptions, flatten, unflatten

CONFIG_NAME = "open_clip_config.json"
WEIGHT_NAMES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
# tensor names only an OpenCLIP state dict has (after module. stripping)
SENTINELS = ("visual.conv1.weight", "visual.class_embedding", "visual.trunk.pos_embed", "visual.proj",
             "text.token_embedding.weight", "token_embedding.weight", "ln_final.weight")
PREPROCESS_KEYS = ("mean", "std", "interpolation", "resize_mode", "fill_color")


def _read_json(path: Path) -> dict:
    data = read_json_file(Path(path), "JSON config")  # one-line errors: empty, a directory, bad or deep JSON
    if not isinstance(data, dict):
        raise ClawError(f"{path}: not a JSON object")
    return data


def _natural_key(name: str) -> list:
    return [int(s) if s.isdigit() else s for s in re.split(r"(\d+)", name.lower())]


@lru_cache(maxsize=1)
def builtin_model_configs() -> dict[str, dict]:
    """open_clip's built-in model configs (``open_clip/model_configs/*.json``), read by path the way
    ``open_clip.factory`` scans them, without importing open_clip (torch)."""
    from ..families.clip import open_clip_dir
    found = {}
    for f in (open_clip_dir() / "model_configs").glob("*.json"):
        cfg = json.loads(f.read_text(encoding="utf-8"))
        if all(a in cfg for a in ("embed_dim", "vision_cfg", "text_cfg")):
            found[f.stem] = cfg
    return {k: found[k] for k in sorted(found, key=_natural_key)}


def builtin_model_config(name: str) -> dict:
    if ":" in name:  # hf-hub:ORG/REPO, local-dir:PATH: open_clip's own resolution
        need("open_clip", to=f"--model-name {name}")
        import open_clip
        cfg = open_clip.get_model_config(name)
        names = open_clip.list_models()
    else:
        configs = builtin_model_configs()
        cfg, names = copy.deepcopy(configs.get(name)), list(configs)
    if cfg is None:
        close = difflib.get_close_matches(name, names, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ClawError(f"unknown open_clip model name '{name}'{hint}")
    return cfg


def _model_cfg_from(data: dict, where: Path) -> tuple[dict, dict]:
    model_cfg = data.get("model_cfg", data)
    if not isinstance(model_cfg, dict) or not isinstance(model_cfg.get("vision_cfg"), dict) \
            or not isinstance(model_cfg.get("text_cfg"), dict):
        raise ClawError(f"{where}: not an OpenCLIP model config (needs vision_cfg and text_cfg objects)")
    preprocess = data.get("preprocess_cfg") or {}
    if not isinstance(preprocess, dict):
        raise ClawError(f"{where}: preprocess_cfg is not an object")
    return model_cfg, dict(preprocess)


class OpenClipFormat(Format):
    name = "openclip"
    description = "OpenCLIP directory (open_clip_config.json + open_clip_model.safetensors) or checkpoint file"
    weights_name = "open_clip_model"

    def detect(self, path: Path) -> bool:
        if path.is_dir():
            return (path / CONFIG_NAME).is_file()
        suffix = path.suffix.lower()
        if suffix not in READERS or suffix == ".npz":
            return False
        if suffix != ".safetensors":
            # a pickle is unpickled once, in open(), with the user's --unsafe-pickle choice:
            # detection never loads it (and never hides a refusal behind "cannot tell its format")
            return True
        with open_tensors(path) as store:  # a corrupt file says what is wrong with it
            return any(k in store for k in SENTINELS)

    def open(self, path: Path, options: SourceOptions) -> Checkpoint:
        if path.is_dir():
            cfg_path = path / CONFIG_NAME
            if not cfg_path.is_file():
                raise ClawError(f"{path}: no {CONFIG_NAME}")
            model_cfg, preprocess = _model_cfg_from(_read_json(cfg_path), cfg_path)
            store = open_tensors(path, unsafe_pickle=options.unsafe_pickle, prefer=WEIGHT_NAMES)
        else:
            if options.model_config:
                cfg_path = Path(options.model_config)
                model_cfg, preprocess = _model_cfg_from(_read_json(cfg_path), cfg_path)
            elif options.model_name:
                cfg_path = f"open_clip model config '{options.model_name}'"
                model_cfg, preprocess = builtin_model_config(options.model_name), {}
            else:
                from . import all_formats
                hints = "".join(f"; {f.file_hint}" for f in all_formats().values() if f.file_hint)
                raise ClawError(f"{path}: an OpenCLIP checkpoint file carries no config; pass --model-name NAME "
                                f"(a built-in open_clip config such as ViT-B-32) or --model-config FILE{hints}")
            store = open_tensors(path, unsafe_pickle=options.unsafe_pickle)
        try:
            family = family_claiming(self.name, model_cfg)
            if family is None:
                raise ClawError(f"{path}: no model family handles this OpenCLIP config "
                                f"(vision_cfg={json.dumps(model_cfg.get('vision_cfg'), default=str)[:120]})")
            config = family.codec(self.name).read(model_cfg)
        except ClawError as e:  # name the config the problem is in
            raise (e if str(cfg_path) in str(e) or str(path) in str(e) else ClawError(f"{cfg_path}: {e}", e.details)) from e
        except Exception as e:  # nonsense values (a list for a width, a zero head width ...)
            first = (str(e).strip().splitlines() or [""])[0][:200]
            raise ClawError(f"{cfg_path}: not a valid OpenCLIP model config ({e.__class__.__name__}: {first})") from e
        from ..integrity import check_config
        check_config(family, config, store, cfg_path)
        extras = Extras(preprocess={k: v for k, v in preprocess.items() if k in PREPROCESS_KEYS},
                        license=model_cfg.get("license"))
        text_cfg = model_cfg.get("text_cfg", {})
        if text_cfg.get("hf_tokenizer_name"):
            extras.tokenizer_note = (f"no tokenizer files written: this model uses the Hub tokenizer "
                                     f"'{text_cfg['hf_tokenizer_name']}'; copy its files next to the weights")
        params = {"text_prefix": "text." if model_cfg.get("custom_text") else ""}
        return Checkpoint(path, self.name, family, config, store, extras, params)

    def table_params(self, family: Family, config: Any) -> dict[str, Any]:
        model_cfg = family.codec(self.name).write(config)
        return {"text_prefix": "text." if model_cfg.get("custom_text") else ""}

    def config_fields(self, family: Family, config: Any) -> dict[str, Any]:
        return flatten(family.codec(self.name).write(config))   # model_cfg: vision_cfg.width, ...

    def config_from_fields(self, family: Family, fields: dict[str, Any]) -> Any:
        return family.codec(self.name).read(unflatten(fields))

    def write_side_files(self, out_dir: Path, family: Family, config: Any, extras: Extras) -> list[str]:
        from ..families.clip import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

        model_cfg = family.codec(self.name).write(config)
        preprocess = {"mean": list(OPENAI_DATASET_MEAN), "std": list(OPENAI_DATASET_STD),
                      "interpolation": "bicubic", "resize_mode": "shortest"}
        preprocess.update({k: list(v) if isinstance(v, tuple) else v for k, v in extras.preprocess.items()})
        (out_dir / CONFIG_NAME).write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess}, indent=2) + "\n")
        return []

    def writer(self, out_dir: Path, plan: list, max_shard_size: int, metadata: dict | None = None):
        # open_clip loads one weights file: never shard
        return super().writer(out_dir, plan, max_shard_size=1 << 62, metadata=metadata)


FORMAT = OpenClipFormat()
