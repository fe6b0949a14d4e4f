"""A model's original training-code layout as one file: facebookresearch torch-hub state dicts.

``dinov2_vits14_pretrain.pth``, ``dinov3_vits16_pretrain_lvd1689m-08c60483.pth`` and their kin: a
bare ``state_dict`` of the research code's module names, no config.  Which family's it is, is
told by the keys every state dict of that family holds (``original_sentinels``).  Sources are read from a ``.pth`` / ``.pt`` (a plain ``torch.save`` zip without
torch, from its pickle and zip directory, tensors read on demand: :func:`clawconvert.io.torchzip.
open_state_dict`; anything else through ``torch.load(weights_only=True)`` as every pickle here) or
a ``.safetensors`` with the same keys; the
family reads the architecture from the shapes and checks ``--model-name`` (a torch-hub entry
point such as ``dinov2_vits14`` or ``dinov3_vitb16``) or ``--model-config`` (the model's keyword arguments as JSON)
against them.  A ``.safetensors`` file is recognised by its keys; a pickle is never opened to
find out what it is, so it needs ``--from original``, ``--model-name`` or ``--model-config``.

Outputs are one file: ``DST.pth`` is written in ``torch.save``'s zip format without torch
(:mod:`clawconvert.io.torchzip`), ``DST.safetensors`` as safetensors.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import ClawError
from ..families import Extras, Family, all_families
from ..io.readers import open_tensors, read_json_file
from ..io.writers import SafetensorsWriter
from . import Checkpoint, Format, SourceOptions

PICKLES = (".pth", ".pt", ".bin")
# keys that say "some other layout", for the refusal's message (each family adds its own)
FOREIGN = {"visual.conv1.weight": "an OpenCLIP CLIP", "visual.trunk.pos_embed": "an OpenCLIP SigLIP",
           "vision_model.embeddings.patch_embedding.weight": "a transformers CLIP/SigLIP"}


def _families() -> list[Family]:
    return [f for f in all_families().values() if "original" in f.codecs]


def _claiming(store) -> Family | None:
    """The family all of whose sentinel keys the state dict holds."""
    return next((f for f in _families() if all(k in store for k in f.original_sentinels)), None)


def _display(family: Family) -> str:
    return getattr(family, "display_name", "") or family.name


class OriginalFormat(Format):
    name = "original"
    description = "the research code's own state dict file, e.g. facebookresearch dinov2_vits14_pretrain.pth"
    writes_file = True
    file_hint = ("a DINOv2 / DINOv3 torch-hub state dict takes --model-name with its hub name (dinov2_vits14, "
                 "dinov3_vitb16 ...) or --from original")

    def detect(self, path: Path) -> bool:
        if not path.is_file() or path.suffix.lower() != ".safetensors":
            return False
        with open_tensors(path) as store:
            return _claiming(store) is not None

    def named_by(self, options: SourceOptions) -> bool:
        """``--model-name dinov2_vits14`` or a ``--model-config`` that a family's original codec reads."""
        if options.model_name:
            return any(getattr(f, "owns_model_name", lambda n: False)(options.model_name) for f in _families())
        if isinstance(options.model_config, dict):
            return any(getattr(f, "owns_model_config", lambda d: False)(options.model_config) for f in _families())
        if options.model_config and Path(options.model_config).is_file():
            try:
                data = read_json_file(Path(options.model_config), "model config")
            except ClawError:
                return False
            return isinstance(data, dict) and any(getattr(f, "owns_model_config", lambda d: False)(data)
                                                  for f in _families())
        return False

    def open(self, path: Path, options: SourceOptions) -> Checkpoint:
        if not path.is_file():
            raise ClawError(f"{path}: an original-layout checkpoint is one file (.pth, .pt or .safetensors)")
        if path.suffix.lower() in PICKLES:   # a plain torch.save zip is read without torch, headers first
            from ..io.torchzip import open_state_dict
            store = open_state_dict(path, unsafe_pickle=options.unsafe_pickle)
        else:
            store = open_tensors(path, unsafe_pickle=options.unsafe_pickle)
        family = _claiming(store)
        owner = next((f for f in _families() if options.model_name and f.owns_model_name(options.model_name)), None)
        if family is None:
            foreign = {**FOREIGN, **{k: v for f in _families() for k, v in getattr(f, "foreign_keys", {}).items()}}
            what = next((w for key, w in foreign.items() if key in store), None)
            named = f" (given {options.model_name!r})" if options.model_name else ""
            kinds = [owner] if owner else _families()
            raise ClawError(f"{path}: not a {' or '.join(_display(f) for f in kinds)} torch-hub state dict{named}: "
                            + (f"it holds {what} checkpoint" if what else
                               "it lacks " + "; ".join(f"{_display(f)}'s {', '.join(k for k in f.original_sentinels if k not in store)}"
                                                       for f in kinds)))
        if owner is not None and owner is not family:
            raise ClawError(f"{path}: given --model-name {options.model_name} ({_display(owner)}), but it holds a "
                            f"{_display(family)} torch-hub state dict")
        declared, origin = {}, "the weights"
        if isinstance(options.model_config, dict):
            declared, origin = dict(options.model_config), "the source's config"
        elif options.model_config:
            origin = str(options.model_config)
            declared = read_json_file(Path(options.model_config), "model config")
            if not isinstance(declared, dict):
                raise ClawError(f"{origin}: not a JSON object")
        elif options.model_name:
            origin = f"--model-name {options.model_name}"
            declared = family.model_kwargs(options.model_name)
        config = family.codec(self.name).read(store, declared, origin)
        from ..integrity import check_config
        check_config(family, config, store, origin)
        return Checkpoint(path, self.name, family, config, store, Extras())

    def table_params(self, family: Family, config: Any) -> dict[str, Any]:
        """The family's codec refuses a config the research code cannot build, before anything is read."""
        codec = family.codec(self.name)
        return codec.params(codec.write(config))

    def output_options(self, source: Checkpoint) -> SourceOptions:
        """The file holds no config: reopen it with the source's (the head count is not in the shapes)."""
        return SourceOptions(format=self.name, model_config=source.family.codec(self.name).write(source.config))

    def write_side_files(self, out: Path, family: Family, config: Any, extras: Extras) -> list[str]:
        return []   # the state dict is the whole checkpoint

    def writer(self, out: Path, plan: list, max_shard_size: int, metadata: dict | None = None):
        out = Path(out)
        suffix = out.suffix.lower()
        if suffix == ".safetensors":
            return SafetensorsWriter(out.parent, plan, max_shard_size=1 << 62, basename=out.stem, metadata=metadata)
        if suffix in PICKLES:
            from ..io.torchzip import TorchZipWriter
            return TorchZipWriter(out, plan)
        raise ClawError(f"{out.name}: an original-layout checkpoint is one file: give DST a .pth or .safetensors name")


FORMAT = OriginalFormat()
