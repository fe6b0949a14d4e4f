"""Typed Python API: each function does exactly what the command of the same name does.

>>> import clawconvert
>>> result = clawconvert.convert("openclip_dir", "hf_dir", to="hf", verify=True)
>>> result.verification["max_abs_diff"]
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from .diagnosis import config_diagnosis
from .engine import Plan, plan_conversion
from .errors import ClawError, VerificationFailed
from .families import all_families
from .formats import Checkpoint, Format, SourceOptions, all_formats, get_format, open_checkpoint
from .hfconfig import labelled
from .io.atomic import atomic_output_dir, atomic_output_file
from .io.dtypes import CLI_DTYPES, DType, dtype_of
from .io.pipeline import Background
from .io.writers import parse_size
from .provenance import source_fingerprint, write_manifest
from .tables import load_table


@dataclass
class ConvertResult:
    destination: Path
    source_format: str
    target_format: str
    family: str
    tensors: int
    bytes: int
    files: list[str]
    notes: list[str] = field(default_factory=list)
    verification: dict[str, Any] | None = None


def _dtype(name: Any) -> DType | None:
    """``--dtype`` (keep, fp32, fp16, bf16), a :class:`DType` or a torch dtype -> DType / None."""
    if name is None:
        return None
    if isinstance(name, str):
        if name not in CLI_DTYPES:
            raise ClawError(f"unknown dtype '{name}' (choose from {', '.join(CLI_DTYPES)})")
        return CLI_DTYPES[name]
    try:
        return dtype_of(name)
    except TypeError as e:
        raise ClawError(f"unknown dtype {name!r} (choose from {', '.join(CLI_DTYPES)})") from e


def _progress(enabled: bool, total_bytes: int, desc: str) -> Callable[[Iterable], Iterable] | None:
    if not enabled:
        return None
    from tqdm import tqdm
    return lambda it: tqdm(it, desc=desc, unit="tensor", leave=False, dynamic_ncols=True)


def resolve(src: str | Path) -> tuple[Path, dict[str, Any]]:
    """A local path, or an ``hf-hub:org/name[@rev]`` id downloaded into the HF cache."""
    text = str(src)
    if text.startswith("hf-hub:"):
        from .hub import resolve_source
        return resolve_source(text)
    return Path(text), {}


def plan_for(ckpt: Checkpoint, target: Format, dtype: DType | None,
             ignore_canonical: Iterable[str] = (), target_table: str | None = None) -> tuple[Plan, list]:
    """Expand both tables for this checkpoint and plan the conversion (headers only)."""
    family, config = ckpt.family, ckpt.config
    expected = family.canonical_shapes(labelled(config))   # sizes name the config fields they come from
    keys = list(expected)
    src_table = load_table(family.name, ckpt.format)
    try:  # the target format refuses configs it cannot represent, before anything is read
        dst_params = {**family.params(config), **target.table_params(family, config)}
    except ClawError as e:
        raise ClawError(f"{ckpt.path}: cannot be written as {target.name}: {e}", e.details) from e
    dst_table = load_table(family.name, target_table or target.name)
    src_exp = src_table.expand(ckpt.table_params(), keys)
    dst_exp = dst_table.expand(dst_params, keys)
    plan = plan_conversion(ckpt.store, src_exp, dst_exp, expected, dtype, ignore_canonical,
                           explain=config_diagnosis(get_format(ckpt.format), family, config))
    return plan, [src_table, dst_table]


def convert(src: str | Path, dst: str | Path, to: str, *, src_format: str | None = None,
            model_name: str | None = None, model_config: str | Path | None = None,
            dtype: str | DType | None = "keep", max_shard_size: str | int = "5GB",
            verify: bool = False, tolerance: float | None = None, overwrite: bool = False,
            unsafe_pickle: bool = False, progress: bool = False,
            write_options: dict[str, Any] | None = None, vision: str | Path | None = None) -> ConvertResult:
    """Convert a checkpoint to another format (``to``: hf, openclip, big_vision).

    Plans from headers, refuses before writing if anything is unmapped, missing or
    contradicts the config, streams tensor by tensor into a temporary directory, optionally
    verifies against both frameworks, then renames into ``dst``.  A format whose output is
    one file (big_vision: ``dst`` is ``model.npz``) is written beside ``dst`` and renamed the
    same way; it carries no manifest.  ``write_options`` go to the target's writer
    (big_vision: ``{"stacked": True}`` for the scan layout, ``"txt"`` for the text tower only).
    """
    src_path, hub_info = resolve(src)
    target = get_format(to)
    write_options = {k: v for k, v in (write_options or {}).items() if v not in (None, False)}
    unknown = sorted(set(write_options) - set(target.write_options))
    if unknown:
        raise ClawError(f"--{unknown[0]} does not apply to --to {to}"
                        + (f" (only to: {', '.join(f.name for f in all_formats().values() if unknown[0] in f.write_options)})"
                           if any(unknown[0] in f.write_options for f in all_formats().values()) else ""))
    options = SourceOptions(format=src_format, model_name=model_name,
                            model_config=Path(model_config) if model_config else None, unsafe_pickle=unsafe_pickle)
    from .surgery.extract_part import extract_part, standalone_source, vlm_architecture
    research = vlm_architecture(src_path) if src_format in (None, "hf") else None
    if research is not None and research.name == "llava_original":    # an original LLaVA: llava-hf
        if to != "hf":
            raise ClawError(f"{src_path}: an original LLaVA checkpoint converts to hf only")
        from .surgery.merge_lora import merge_lora
        m = merge_lora(src_path, None, dst, vision=vision, dtype=dtype if isinstance(dtype, str) else "keep",
                       max_shard_size=max_shard_size, overwrite=overwrite, unsafe_pickle=unsafe_pickle,
                       progress=progress)
        return ConvertResult(m.destination, "llava_original", "hf", m.architecture, m.tensors, m.bytes, m.files,
                             m.notes)
    if vision is not None:
        raise ClawError("--vision applies to original LLaVA sources only")
    if src_format in (None, "hf") and standalone_source(src_path) is not None:
        # an LLM whose files are in another framework's spelling (Qwen-1): its standalone HF class
        if to != "hf":
            raise ClawError(f"{src_path}: a {standalone_source(src_path).description} converts to hf only")
        r = extract_part(src_path, dst, "text", source_name=str(src), hub_info=hub_info, dtype=_dtype(dtype),
                         dtype_name=str(dtype), max_shard_size=max_shard_size, verify=verify, tolerance=tolerance,
                         overwrite=overwrite, unsafe_pickle=unsafe_pickle, progress=None)
        return ConvertResult(r.destination, standalone_source(src_path).name, "hf", r.family, r.tensors, r.bytes,
                             r.files, r.notes, r.verification)
    ckpt = open_checkpoint(src_path, options)
    if verify:  # a missing framework fails here, in one line, before anything is converted
        from .verify import need_runners
        need_runners(ckpt.format, to)
    out_dtype = _dtype(dtype)
    plan, tables = plan_for(ckpt, target, out_dtype)
    shard = parse_size(max_shard_size)
    output = atomic_output_file if target.writes_file else atomic_output_dir
    with output(dst, overwrite=overwrite, sources=(src_path,)) as tmp:
        writer = target.writer(tmp, plan.writer_plan, shard, **write_options)
        # config, tokenizer and preprocessing files are made while the tensors stream
        side = Background(target.write_side_files, tmp, ckpt.family, ckpt.config, ckpt.extras)
        try:
            n = plan.execute(writer, _progress(progress, plan.total_bytes, f"{ckpt.format} -> {to}"))
            files = writer.close()
        except BaseException:
            writer.abort()
            side.wait()
            raise
        notes = side.result()
        notes += ckpt.family.target_notes(ckpt, to)
        figures = None
        if verify:
            from .verify import default_tolerance
            if tolerance is None and ckpt.family.expected_drift(ckpt, to):
                tolerance = max(default_tolerance(out_dtype), ckpt.family.expected_drift(ckpt, to))
                notes.append(f"--verify tolerance {tolerance:g}: the {to} model computes slightly differently "
                             f"by construction (see the note above); a mis-mapped tensor differs by far more")
            figures = _verify_pair(ckpt, tmp, to, tolerance, out_dtype)
        if not target.writes_file:
            write_manifest(tmp, {
                "source": {"path": str(src), "format": ckpt.format, "family": ckpt.family.name,
                           "fingerprint": source_fingerprint(src_path), **hub_info},
                "target": {"format": to, "family": ckpt.family.name},
                "tables": [{"name": t.name, "sha256": t.sha256} for t in tables],
                "dtype": str(dtype if isinstance(dtype, str) else dtype),
                **({"verify": figures} if figures else {}),
                **({"license": ckpt.extras.license} if ckpt.extras.license else {}),
                "notes": notes,
            })
        if figures and not figures["passed"]:
            from .verify import format_figures
            raise VerificationFailed(format_figures(figures) + "; output not written")
        dest = Path(dst).absolute()
    return ConvertResult(dest, ckpt.format, to, ckpt.family.name, n, plan.total_bytes,
                         [f.name for f in files], notes, figures)


def _verify_pair(ckpt: Checkpoint, out_dir: Path, fmt: str, tolerance: float | None,
                 dtype: DType | None) -> dict[str, Any]:
    from .verify import compare, default_tolerance
    out = get_format(fmt).open(out_dir, get_format(fmt).output_options(ckpt))
    return compare(ckpt, out, tolerance=tolerance if tolerance is not None else default_tolerance(dtype))


def verify(a: str | Path, b: str | Path, *, tolerance: float = 1e-4, a_options: SourceOptions | None = None,
           b_options: SourceOptions | None = None, seed: int = 0) -> dict[str, Any]:
    """Load both checkpoints in their own frameworks, compare forward passes; returns figures.

    Raises :class:`VerificationFailed` (exit code 1 in the CLI) above ``tolerance``.
    """
    from .verify import compare, format_figures
    ca = open_checkpoint(resolve(a)[0], a_options)
    cb = open_checkpoint(resolve(b)[0], b_options)
    if ca.family.name != cb.family.name:
        raise ClawError(f"cannot compare a {ca.family.name} model with a {cb.family.name} model")
    figures = compare(ca, cb, tolerance=tolerance, seed=seed)
    if not figures["passed"]:
        raise VerificationFailed(format_figures(figures))
    return figures


def inspect(path: str | Path, *, src_format: str | None = None, model_name: str | None = None,
            model_config: str | Path | None = None, unsafe_pickle: bool = False) -> dict[str, Any]:
    """Detected format, family, config summary, tensor/parameter counts and dtypes; for an LLM or
    VLM (a model of mappings/architectures/), also its key layout, parts, tie state and side files."""
    src_path, _ = resolve(path)
    if src_format in (None, "hf"):
        from .architectures import model_architecture
        from .surgery.describe import describe
        found = model_architecture(src_path)
        if found is not None and not any(found[1].get("model_type") in f.hf_model_types
                                          for f in all_families().values()):
            return describe(src_path, unsafe_pickle=unsafe_pickle)
    ckpt = open_checkpoint(src_path, SourceOptions(format=src_format, model_name=model_name,
                                                   model_config=Path(model_config) if model_config else None,
                                                   unsafe_pickle=unsafe_pickle))
    infos = ckpt.store.infos()
    dtypes: dict[str, int] = {}
    for i in infos.values():
        name = str(i.dtype).replace("torch.", "")
        dtypes[name] = dtypes.get(name, 0) + 1
    cfg = ckpt.config.to_dict()
    summary = {k: cfg.get(k) for k in ("model_type", "projection_dim") if k in cfg}
    keys = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "mlp_ratio",
            "use_swiglu_ffn", "num_register_tokens", "hidden_act", "layer_norm_eps", "image_size", "patch_size",
            "vocab_size", "max_position_embeddings", "eos_token_id", "pad_token_id")
    towers = [t for t in ("vision_config", "text_config") if isinstance(cfg.get(t), dict)]
    for tower in towers:
        summary[tower] = {k: cfg[tower][k] for k in keys if k in cfg[tower]}
    if not towers:   # a one-tower model (DINOv2): its config is flat
        summary.update({k: cfg[k] for k in keys if k in cfg})
    return {
        "path": str(src_path), "format": ckpt.format, "family": ckpt.family.name,
        "tensors": len(infos), "parameters": sum(i.numel for i in infos.values()),
        "bytes": sum(i.nbytes for i in infos.values()), "dtypes": dtypes, "config": summary,
    }



def push(*args: Any, **kwargs: Any):
    """Upload an output directory to the Hugging Face Hub (see :func:`clawconvert.hub.push`)."""
    from .hub import push as _push
    return _push(*args, **kwargs)


def extract_visual(src: str | Path, dst: str | Path, *, to: str = "hf", with_projection: bool = False,
                   src_format: str | None = None, model_name: str | None = None,
                   model_config: str | Path | None = None, dtype: str | DType | None = "keep",
                   max_shard_size: str | int = "5GB", verify: bool = False, tolerance: float | None = None,
                   overwrite: bool = False, unsafe_pickle: bool = False, progress: bool = False):
    """Cut the image tower out of ``src`` (``to``: hf, timm, openclip), reading only its tensors.

    Returns an :class:`~clawconvert.surgery.extract.ExtractResult`; ``verify`` requires the
    tower's outputs to equal the full model's bit for bit (timm: within ``tolerance``).
    """
    from .surgery.extract import extract
    return extract(src, dst, "visual", to, with_projection=with_projection, src_format=src_format,
                   model_name=model_name, model_config=model_config, dtype=dtype, max_shard_size=max_shard_size,
                   verify=verify, tolerance=tolerance, overwrite=overwrite, unsafe_pickle=unsafe_pickle,
                   progress=progress)


def extract_text(src: str | Path, dst: str | Path, *, to: str = "hf", with_projection: bool = False,
                 src_format: str | None = None, model_name: str | None = None,
                 model_config: str | Path | None = None, dtype: str | DType | None = "keep",
                 max_shard_size: str | int = "5GB", verify: bool = False, overwrite: bool = False,
                 unsafe_pickle: bool = False, progress: bool = False):
    """Cut the text tower out of ``src`` (``to``: hf, openclip), reading only its tensors.

    Returns an :class:`~clawconvert.surgery.extract.ExtractResult`; ``verify`` requires the
    tower's outputs to equal the full model's bit for bit.
    """
    from .surgery.extract import extract
    return extract(src, dst, "text", to, with_projection=with_projection, src_format=src_format,
                   model_name=model_name, model_config=model_config, dtype=dtype, max_shard_size=max_shard_size,
                   verify=verify, overwrite=overwrite, unsafe_pickle=unsafe_pickle, progress=progress)


def merge_lora(*args: Any, **kwargs: Any):
    """Fold a PEFT LoRA adapter into its base (and optionally assemble a LLaVA): see ``merge-lora --help``."""
    from .surgery.merge_lora import merge_lora as _merge_lora
    return _merge_lora(*args, **kwargs)


def export(src: str | Path, dst: str | Path, to: str, *, quantize: str | None = None, tower: str | None = None,
           tolerance: float | None = None, opset: int | None = None, outtype: str | None = None,
           src_format: str | None = None, model_name: str | None = None, model_config: str | Path | None = None,
           unsafe_pickle: bool = False, overwrite: bool = False, progress: bool = False):
    """Export for a runtime (``to``: onnx, gguf); see ``clawconvert export --help``.

    ``onnx``: one tower (``tower``, ``quantize="int8"``, ``tolerance``, ``opset``, source options);
    ``gguf``: an HF causal LM, LLaVA or native VLM (``outtype``: f32, f16, bf16, q8_0).  Options of the other
    target are refused.  Returns an :class:`~clawconvert.exporters.ExportResult`.
    """
    from .exporters import export as _export
    return _export(src, dst, to, quantize=quantize, tower=tower, tolerance=tolerance, opset=opset, outtype=outtype,
                   src_format=src_format, model_name=model_name, model_config=model_config,
                   unsafe_pickle=unsafe_pickle, overwrite=overwrite, progress=progress)


def verify_manifest(directory: str | Path):
    """Re-hash every file of an output against its ``clawconvert_manifest.json`` (``verify --manifest``)."""
    from .integrity import check_manifest
    return check_manifest(directory)
