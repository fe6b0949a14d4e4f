"""``export --to onnx``: one CLIP / SigLIP / DINOv2 / DINOv3 tower as an ONNX model, checked with onnxruntime.

The tower is an HF tower directory (``CLIPVisionModel[WithProjection]``, ``SiglipVisionModel``,
``CLIPTextModel[WithProjection]``, ``SiglipTextModel``, ``Dinov2[WithRegisters]Model``,
``DINOv3ViTModel``) read in place, or the tower of any source ``extract-visual`` /
``extract-text`` reads (a full HF model, OpenCLIP, big_vision, timm, a torch-hub DINO file),
extracted into the output's temporary directory first.

Output (the layout optimum and transformers.js load)::

    DST/model.onnx                 input pixel_values (vision) or input_ids (text), batch axis dynamic
                                   (text: the sequence axis too); outputs last_hidden_state,
                                   pooler_output and, when the tower has a projection,
                                   image_embeds / text_embeds
    DST/model_quantized.onnx       --quantize int8: onnxruntime dynamic quantisation (int8 weights)
    DST/onnx/model*.onnx           the same files (hard links): transformers.js reads onnx/
    DST/config.json, preprocessor_config.json, tokenizer files   the tower's own

Before the output gets its name, onnxruntime runs every written model on a batch size other
than the one exported, and its outputs are compared with the PyTorch tower's: fp32 must agree
within the tolerance (1e-4), the int8 deviation is measured and reported.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ClawError, VerificationFailed
from ..io.atomic import atomic_output_dir
from ..provenance import MANIFEST, source_fingerprint, write_manifest
from . import ExportResult

TARGET = "onnx"
OPTIONS = ("quantize", "tower", "tolerance", "opset", "src_format", "model_name", "model_config", "unsafe_pickle")
QUANTIZE = ("int8",)
OPSET = 18
ONE_FILE_LIMIT = 1_800_000_000      # protobuf's 2 GB cap on one file, with headroom: larger weights go to model.onnx.data
SIDE_FILE_SUFFIXES = (".json", ".txt", ".model", ".jinja")   # configs, tokenizer (vocab, merges, spiece.model)


def export(src: str | Path, dst: str | Path, *, quantize: str | None = None, tower: str | None = None,
           tolerance: float = 1e-4, opset: int = OPSET, src_format: str | None = None,
           model_name: str | None = None, model_config: str | Path | None = None, unsafe_pickle: bool = False,
           overwrite: bool = False, progress: bool = False) -> ExportResult:
    """Write ``dst/model.onnx`` (and ``model_quantized.onnx``) for one tower of ``src``; see the module docstring."""
    from ..api import resolve
    from ..deps import need
    need("torch", "transformers", "onnx", "onnxruntime", "onnxscript", to="export --to onnx")

    if quantize is not None and quantize not in QUANTIZE:
        raise ClawError(f"--quantize {quantize}: choose from {', '.join(QUANTIZE)}")
    if tower is not None and tower not in ("visual", "text"):
        raise ClawError(f"--tower {tower}: choose visual or text")
    src_path, hub_info = resolve(src)
    lone = lone_tower(src_path)
    if lone is not None and tower is not None and lone[1] != tower:
        raise ClawError(f"{src_path}: holds the {lone[1]} tower only ({lone[2].__name__}); it has no {tower} tower")
    with atomic_output_dir(dst, overwrite=overwrite, sources=(src_path,)) as tmp:
        notes: list[str] = []
        if lone is None:
            from ..surgery.extract import extract
            tower = tower or "visual"
            extracted = extract(src_path, tmp.parent / "tower", tower, "hf", with_projection=True, src_format=src_format,
                                model_name=model_name, model_config=model_config, unsafe_pickle=unsafe_pickle)
            notes += extracted.notes
            tower_dir = extracted.destination
            family, cls = lone_tower(tower_dir)[0::2]
        else:
            family, tower, cls = lone
            tower_dir = src_path
        model = _load(cls, tower_dir)
        module = TowerOutputs(model, tower)
        sizes = input_sizes(model.config, tower)
        files = _write_onnx(module, tower, sizes, tmp / "model.onnx", opset)
        figures = {"fp32": compare(tmp / "model.onnx", module, tower, sizes)}
        if figures["fp32"]["max_abs_diff"] > tolerance:
            raise VerificationFailed(f"ONNX fp32 vs PyTorch {cls.__name__}: {format_deviation(figures['fp32'])} "
                                     f"(tolerance {tolerance:g}); output not written")
        figures["fp32"]["tolerance"] = tolerance
        if quantize == "int8":
            files += _quantize_int8(tmp / "model.onnx", tmp / "model_quantized.onnx")
            figures["int8"] = compare(tmp / "model_quantized.onnx", module, tower, sizes)
        files += _link_into_onnx_folder(tmp, files)
        files += _copy_side_files(tower_dir, tmp)
        write_manifest(tmp, {
            "source": {"path": str(src), "fingerprint": source_fingerprint(src_path), **hub_info},
            "target": {"format": "onnx", "tower": tower, "class": cls.__name__, "family": family.name,
                       "opset": opset, "quantize": quantize},
            "outputs": list(module.output_names),
            "verify": figures,
            "notes": notes,
        })
        dest = Path(dst).absolute()
    load = ["import onnxruntime",
            f"session = onnxruntime.InferenceSession({str(dest / 'model.onnx')!r})",
            f"last_hidden_state, *pooled = session.run(None, {{{_input_name(tower)!r}: ...}})"]
    import onnxruntime
    runtime = f"onnxruntime {onnxruntime.__version__}"
    summary = [f"verify OK: model.onnx (fp32) on {runtime} vs PyTorch {cls.__name__}: "
               f"{format_deviation(figures['fp32'])} (tolerance {tolerance:g})"]
    if "int8" in figures:
        summary.append(f"int8: model_quantized.onnx on {runtime} vs PyTorch {cls.__name__} (fp32): "
                       f"{format_deviation(figures['int8'])}")
    return ExportResult(dest, TARGET, cls.__name__, sorted(files), figures, notes, summary, load)


# ------------------------------------------------------------------------------------
# which tower, and how it runs
# ------------------------------------------------------------------------------------
def lone_tower(path: Path) -> tuple[Any, str, type] | None:
    """(family, tower, transformers class) when ``path`` is an HF directory holding one tower; else None."""
    from ..io.readers import read_json_file
    from ..families import all_families

    if not (Path(path) / "config.json").is_file():
        return None
    config = read_json_file(Path(path) / "config.json", "model config")
    model_type = config.get("model_type") if isinstance(config, dict) else None
    architectures = (config.get("architectures") or []) if isinstance(config, dict) else []
    for family in all_families().values():
        if family.whole_model_tower and model_type in family.hf_model_types:   # DINOv2 (with registers), DINOv3
            import transformers
            arch = family.hf_architecture(family.config_from_dict(config))
            return family, family.whole_model_tower, getattr(transformers, arch)
        for tower in family.towers:
            plain = family.tower_model_class(tower, False)
            if getattr(plain.config_class, "model_type", None) != model_type:
                continue
            projected = family.tower_model_class(tower, True) if len(family.towers[tower]) > 1 else plain
            cls = projected if projected.__name__ in architectures else plain
            return family, tower, cls
    return None


def _load(cls: type, path: Path):
    import torch

    from ..verify import quiet
    with quiet():
        model, info = cls.from_pretrained(str(path), output_loading_info=True, dtype=torch.float32,
                                          attn_implementation="eager")
    bad = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if bad:
        raise ClawError(f"{path}: transformers {cls.__name__} reports "
                        + "; ".join(f"{k}: {', '.join(map(str, v))[:200]}" for k, v in bad.items()))
    return model.eval()


def _input_name(tower: str) -> str:
    return "pixel_values" if tower == "visual" else "input_ids"


def _torch_module():
    import torch

    class _TowerOutputs(torch.nn.Module):
        """The tower with a flat tuple of outputs: last_hidden_state, pooler_output[, *_embeds]."""

        def __init__(self, model, tower: str):
            super().__init__()
            prefix = "vision" if tower == "visual" else "text"
            self.body = getattr(model, f"{prefix}_model", model)   # transformers 5 flattens the plain towers
            self.projection = getattr(model, "visual_projection" if tower == "visual" else "text_projection", None)
            self.output_names = ("last_hidden_state", "pooler_output") + (
                (("image_embeds",) if tower == "visual" else ("text_embeds",)) if self.projection is not None else ())
            self.input_name = _input_name(tower)

        def forward(self, x):
            out = self.body(**{self.input_name: x})
            pooled = out.pooler_output
            if self.projection is None:
                return out.last_hidden_state, pooled
            return out.last_hidden_state, pooled, self.projection(pooled)
    return _TowerOutputs


def TowerOutputs(model, tower: str):
    return _torch_module()(model, tower)


def input_sizes(config, tower: str) -> dict[str, Any]:
    if tower == "visual":
        return {"channels": int(getattr(config, "num_channels", 3)), "image_size": int(config.image_size)}
    return {"vocab_size": int(config.vocab_size), "length": int(config.max_position_embeddings)}


def sample_input(tower: str, sizes: dict[str, Any], batch: int, seed: int, length: int | None = None):
    """Seeded pixels (standard normal, as after normalisation) or token ids."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    if tower == "visual":
        s = sizes["image_size"]
        return torch.randn(batch, sizes["channels"], s, s, generator=gen)
    return torch.randint(0, sizes["vocab_size"], (batch, length or sizes["length"]), generator=gen)


# ------------------------------------------------------------------------------------
# export, quantisation, comparison
# ------------------------------------------------------------------------------------
def _write_onnx(module, tower: str, sizes: dict, path: Path, opset: int) -> list[str]:
    import warnings

    import torch

    from ..verify import quiet
    batch = torch.export.Dim("batch_size", min=1, max=4096)
    axes = {0: batch}
    if tower == "text":
        axes[1] = torch.export.Dim("sequence_length", min=1, max=sizes["length"])
    example = sample_input(tower, sizes, 2, seed=1)
    weights = sum(p.numel() * p.element_size() for p in module.parameters())
    try:
        with quiet(), warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(module, (example,), dynamo=True, opset_version=opset,
                                        input_names=[module.input_name], output_names=list(module.output_names),
                                        dynamic_shapes={"x": axes}, verbose=False)
            program.save(str(path), external_data=weights > ONE_FILE_LIMIT)
    except Exception as e:
        first = (str(e).strip().splitlines() or [e.__class__.__name__])[0][:300]
        raise ClawError(f"torch.onnx.export failed for the {tower} tower: {first}") from e
    return sorted(p.name for p in path.parent.iterdir() if p.name.startswith(path.name))


def _quantize_int8(src: Path, dst: Path) -> list[str]:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from ..verify import quiet
    with quiet():
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8,
                         use_external_data_format=(src.parent / f"{src.name}.data").exists())
    return sorted(p.name for p in dst.parent.iterdir() if p.name.startswith(dst.name))


def compare(onnx_path: Path, module, tower: str, sizes: dict) -> dict[str, Any]:
    """Run the ONNX file with onnxruntime and the PyTorch tower on the same inputs; per-output figures.

    The inputs' batch size (3) differs from the exported example's (2), so a fixed batch axis fails here.
    """
    import onnxruntime
    import torch

    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    shapes = [(3, None)] if tower == "visual" else [(3, None), (1, max(1, sizes["length"] // 2))]
    figures: dict[str, Any] = {"max_abs_diff": 0.0, "outputs": {}, "inputs": []}
    for i, (batch, length) in enumerate(shapes):
        x = sample_input(tower, sizes, batch, seed=10 + i, length=length)
        with torch.no_grad():
            ref = [t.numpy() for t in module(x)]
        got = session.run(list(module.output_names), {module.input_name: x.numpy()})
        figures["inputs"].append(list(x.shape))
        for name, a, b in zip(module.output_names, got, ref):
            if a.shape != b.shape:
                raise VerificationFailed(f"{onnx_path.name}: output {name} has shape {a.shape}, PyTorch {b.shape}")
            diff = float(np.abs(a - b).max())
            cos = float(np.min(np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1) + 1e-30)))
            cur = figures["outputs"].setdefault(name, {"max_abs_diff": 0.0, "min_cosine": 1.0})
            cur["max_abs_diff"] = max(cur["max_abs_diff"], diff)
            cur["min_cosine"] = min(cur["min_cosine"], cos)
            figures["max_abs_diff"] = max(figures["max_abs_diff"], diff)
    if not np.isfinite(figures["max_abs_diff"]):
        raise VerificationFailed(f"{onnx_path.name}: onnxruntime produced NaN or Inf")
    return figures


def format_deviation(f: dict[str, Any]) -> str:
    parts = [f"{name} {v['max_abs_diff']:.3g}" for name, v in f["outputs"].items()]
    last = list(f["outputs"])[-1]
    return f"max |diff| {', '.join(parts)}; min cosine {last} {f['outputs'][last]['min_cosine']:.6f}"


# ------------------------------------------------------------------------------------
# layout
# ------------------------------------------------------------------------------------
def _link_into_onnx_folder(out: Path, files: list[str]) -> list[str]:
    """transformers.js reads ``onnx/model.onnx`` / ``onnx/model_quantized.onnx``: hard links, no second copy."""
    (out / "onnx").mkdir()
    for name in files:
        try:
            os.link(out / name, out / "onnx" / name)
        except OSError:      # a file system without hard links
            shutil.copyfile(out / name, out / "onnx" / name)
    return [f"onnx/{name}" for name in files]


def _copy_side_files(tower_dir: Path, out: Path) -> list[str]:
    """The tower's config, preprocessor and tokenizer files, as they are."""
    copied = []
    for f in sorted(Path(tower_dir).iterdir()):
        if f.is_file() and f.name.endswith(SIDE_FILE_SUFFIXES) and f.name != MANIFEST \
                and not f.name.endswith(".index.json"):
            shutil.copyfile(f, out / f.name)
            copied.append(f.name)
    return copied
