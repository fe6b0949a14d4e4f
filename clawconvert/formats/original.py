"""A model's original training-code layout as one file: facebookresearch torch-hub state dicts.

``dinov2_vits14_pretrain.pth`` and its kin: a bare ``state_dict`` of the research code's module
names, no config.  Sources are read from a ``.pth`` / ``.pt`` (a plain ``torch.save`` zip without
torch, from its pickle and zip directory, tensors read on demand: :func:`clawconvert.io.torchzip.
open_state_dict`; anything else through ``torch.load(weights_only=True)`` as every pickle here) or
a ``.safetensors`` with the same keys; the
family reads the architecture from the shapes and checks ``--model-name`` (a torch-hub entry
point such as ``dinov2_vits14``) or ``--model-config`` (the model's keyword arguments as JSON)
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
# keys that say "the research code's ViT": DINOv2's
SENTINELS = ("pos_embed", "patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "mask_token")
FOREIGN = {"visual.conv1.weight": "an OpenCLIP CLIP", "visual.trunk.pos_embed": "an OpenCLIP SigLIP",
           "vision_model.embeddings.patch_embedding.weight": "a transformers CLIP/SigLIP",
           "embeddings.patch_embeddings.projection.weight": "a transformers DINOv2", "reg_token": "a timm"}


def _families() -> list[Family]:
    return [f for f in all_families().values() if "original" in f.codecs]


class OriginalFormat(Format):
    name = "original"
    description = "the research code's own state dict file, e.g. facebookresearch dinov2_vits14_pretrain.pth"
    writes_file = True
    file_hint = "a DINOv2 torch-hub state dict takes --model-name dinov2_vits14 (or another hub name) or --from original"

    def detect(self, path: Path) -> bool:
        if not path.is_file() or path.suffix.lower() != ".safetensors":
            return False
        with open_tensors(path) as store:
            return all(k in store for k in SENTINELS)

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
        family = next((f for f in _families() if all(k in store for k in SENTINELS)), None)
        if family is None:
            foreign = next((what for key, what in FOREIGN.items() if key in store), None)
            named = f" (given {options.model_name!r})" if options.model_name else ""
            raise ClawError(f"{path}: not a DINOv2 torch-hub state dict{named}: "
                            + (f"it holds {foreign} checkpoint" if foreign else
                               f"it has none of {', '.join(SENTINELS)}"))
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
