"""Cut one tower (image or text) out of a CLIP/SigLIP checkpoint, reading only that tower.

Extraction is a conversion planned with the other tower's canonical keys (and
``logit_scale``) ignored: the engine then reads, from file headers, the shapes of everything
but the *data* of the kept tower only.  From a sharded source only the shards that hold the
tower are read; resident memory stays at a few tensors, as in ``convert``.

Targets (``to``):

* ``hf``: the family's tower class (``CLIPVisionModel``, ``CLIPTextModelWithProjection``,
  ``SiglipVisionModel``...), weights under ``vision_model.*`` / ``text_model.*`` (+ the
  projection), the key layout transformers 4.x, 5.x, vLLM and LLaVA's ``vision_tower`` read;
  ``config.json`` from :meth:`Family.tower_config`; image processor or tokenizer files.
* ``timm`` (image towers): a timm ViT state dict through ``mappings/<family>/timm.yaml``, with
  the registered architecture that holds it exactly (:mod:`.timm_towers`).
* ``openclip``: the tower's OpenCLIP tensors under their OpenCLIP names, with the model's
  ``open_clip_config.json``; open_clip's own tower builders load it (:func:`openclip_load_lines`).

``verify`` runs the extracted tower and the full model, in the same framework, on the same
inputs and requires bit-identical outputs (timm, a different implementation, within
tolerance against transformers).  When the source is in another framework, the full model is
first converted into it (in a scratch directory) and also compared with the source.
"""
from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..errors import ClawError, VerificationFailed
from ..formats import Checkpoint, SourceOptions, get_format, open_checkpoint
from ..io.atomic import atomic_output_dir
from ..io.dtypes import DType, dtype_of
from ..io.writers import SafetensorsWriter, parse_size
from ..provenance import source_fingerprint, write_manifest
from ..tables import load_table

TOWERS = ("visual", "text")
TARGETS = {"visual": ("hf", "timm", "openclip"), "text": ("hf", "openclip")}
NEVER_SHARD = 1 << 62


@dataclass
class ExtractResult:
    destination: Path
    tower: str                      # visual | text
    target_format: str              # hf | timm | openclip
    family: str
    model_class: str                # transformers class, timm architecture, or open_clip module
    tensors: int
    bytes: int
    files: list[str]
    load: list[str]                 # Python lines that load the output
    notes: list[str] = field(default_factory=list)
    verification: dict[str, Any] | None = None


def extract(src: str | Path, dst: str | Path, tower: str = "visual", to: str = "hf", *,
            with_projection: bool = False, src_format: str | None = None, model_name: str | None = None,
            model_config: str | Path | None = None, dtype: str | DType | None = "keep",
            max_shard_size: str | int = "5GB", verify: bool = False, tolerance: float | None = None,
            overwrite: bool = False, unsafe_pickle: bool = False, progress: bool = False) -> ExtractResult:
    """Write one tower of ``src`` to ``dst`` in the format ``to``; see the module docstring."""
    from ..api import _dtype, _progress, plan_for, resolve

    if tower not in TOWERS:
        raise ClawError(f"unknown tower '{tower}' (choose from {', '.join(TOWERS)})")
    if to not in TARGETS[tower]:
        why = " (timm holds image models only)" if to == "timm" else ""
        raise ClawError(f"cannot write the {tower} tower as '{to}'{why}: choose from {', '.join(TARGETS[tower])}")
    src_path, hub_info = resolve(src)
    from .extract_part import extract_part, vlm_architecture
    if vlm_architecture(src_path) is not None:       # a VLM: its language model or vision tower, alone
        if to != "hf" or with_projection:
            raise ClawError(f"{src_path}: from a vision-language model, {'extract-text' if tower == 'text' else 'extract-visual'} "
                            f"writes the transformers model of the part (--to hf, no --with-projection)")
        return extract_part(src_path, dst, tower, source_name=str(src), hub_info=hub_info, dtype=_dtype(dtype),
                            dtype_name=str(dtype), max_shard_size=max_shard_size, verify=verify, tolerance=tolerance,
                            overwrite=overwrite, unsafe_pickle=unsafe_pickle,
                            progress=(lambda n: _progress(True, 0, f"{tower} part")) if progress else None)
    refuse_lone_tower(src_path, tower)
    options = SourceOptions(format=src_format, model_name=model_name,
                            model_config=Path(model_config) if model_config else None, unsafe_pickle=unsafe_pickle)
    ckpt = open_checkpoint(src_path, options)
    family, config = ckpt.family, ckpt.config
    if family.whole_model_tower == tower:   # the model is this one tower (DINOv2): extracting it is converting it
        return _extract_whole(ckpt, src, dst, tower, to, with_projection=with_projection, model_name=model_name,
                              model_config=model_config, dtype=dtype, max_shard_size=max_shard_size, verify=verify,
                              tolerance=tolerance, overwrite=overwrite, unsafe_pickle=unsafe_pickle, progress=progress)
    notes: list[str] = []
    if to == "openclip" and not with_projection and len(family.towers.get(tower, ())) > 1:
        with_projection = True
        notes.append("open_clip's tower modules own their projection: it is included (--with-projection)")
    elif with_projection and len(family.towers.get(tower, ())) == 1:
        notes.append(f"the {family.name} {tower} tower carries its own head; --with-projection changes nothing")
    keep = family.tower_prefixes(tower, with_projection)
    expected = family.canonical_shapes(config)
    require_tower(ckpt, tower, expected)
    ignore = [k for k in expected if not k.startswith(keep)]
    out_dtype = _dtype(dtype)

    fmt = get_format("hf" if to == "timm" else to)
    plan, tables = plan_for(ckpt, fmt, out_dtype, ignore_canonical=ignore, target_table="timm" if to == "timm" else None)
    writer_plan = plan.writer_plan
    arch, num_classes = None, 0
    if to == "timm":
        from . import timm_towers
        num_classes = family.tower_config(config, tower).projection_dim if with_projection else 0
        if with_projection:  # timm's head is a Linear with bias; CLIP's projection has none: zeros
            writer_plan = writer_plan + [("head.bias", (num_classes,), writer_plan[-1][2])]
        arch = timm_towers.match_architecture(family, config, {n: tuple(s) for n, s, _ in writer_plan}, num_classes)
    cls_name = _class_name(family, tower, to, with_projection, arch)

    shard = parse_size(max_shard_size) if to == "hf" else NEVER_SHARD
    dest = Path(dst).absolute()
    with atomic_output_dir(dst, overwrite=overwrite, sources=(src_path,)) as tmp:
        writer = (fmt.writer(tmp, writer_plan, shard) if to != "timm"
                  else SafetensorsWriter(tmp, writer_plan, max_shard_size=NEVER_SHARD, basename="model"))
        try:
            n = plan.execute(writer, _progress(progress, plan.total_bytes, f"{tower} tower -> {to}"))
            if to == "timm" and with_projection:
                writer.write("head.bias", np.zeros(num_classes, dtype=writer_plan[-1][2].np))
                n += 1
            files = writer.close()
        except BaseException:
            writer.abort()
            raise
        notes += _write_side_files(tmp, ckpt, tower, to, with_projection, arch, num_classes)
        load = _load_lines(family, tower, to, with_projection, arch, num_classes, dest)
        figures = None
        if verify:
            figures = verify_tower(ckpt, options, tmp, tower, to, with_projection, arch, num_classes,
                                   dtype, tolerance, scratch=tmp.parent)
        write_manifest(tmp, {
            "source": {"path": str(src), "format": ckpt.format, "family": family.name,
                       "fingerprint": source_fingerprint(src_path), **hub_info},
            "target": {"format": to, "family": family.name, "tower": tower, "with_projection": with_projection,
                       **({"architecture": arch} if arch else {"classes": [cls_name]})},
            "tables": [{"name": t.name, "sha256": t.sha256} for t in tables],
            "dtype": str(dtype if isinstance(dtype, str) else dtype),
            "load": load,
            **({"verify": figures} if figures else {}),
            **({"license": ckpt.extras.license} if ckpt.extras.license else {}),
            "notes": notes,
        })
        if figures and not figures["passed"]:
            raise VerificationFailed(format_figures(figures) + "; output not written")
    return ExtractResult(dest, tower, to, family.name, cls_name, n, sum(_nbytes(s, d) for _, s, d in writer_plan),
                         [f.name for f in files], load, notes, figures)


def _extract_whole(ckpt: Checkpoint, src, dst, tower: str, to: str, *, with_projection: bool, **kw) -> ExtractResult:
    """A single-tower family: ``convert`` to ``to``; ``verify`` compares it with the source, each in its framework."""
    from ..api import convert
    res = convert(src, dst, to, src_format=ckpt.format, **kw)
    notes = res.notes + ([f"the {ckpt.family.name} model has no projection; --with-projection changes nothing"]
                         if with_projection else [])
    dest = res.destination
    if to == "hf":
        cls = ckpt.family.hf_architecture(ckpt.config)
        load = [f"from transformers import {cls}", f"model = {cls}.from_pretrained({str(dest)!r})"]
    else:
        cls = json.loads((dest / "config.json").read_text()).get("architecture", to) if to == "timm" else to
        load = ["import timm", f"model = timm.create_model('local-dir:{dest}', pretrained=True)"] if to == "timm" else []
    return ExtractResult(dest, tower, to, ckpt.family.name, cls, res.tensors, res.bytes, res.files, load, notes,
                         res.verification)


# ------------------------------------------------------------------------------------
# checks before anything is written
# ------------------------------------------------------------------------------------
def refuse_lone_tower(path: Path, tower: str) -> None:
    """An HF directory holding one tower (``clip_vision_model``...) is not a model to cut a tower from."""
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return
    try:
        model_type = json.loads(cfg.read_text()).get("model_type")
    except (ValueError, UnicodeDecodeError, AttributeError):
        return
    from ..families import all_families
    if not model_type or any(model_type in fam.hf_model_types for fam in all_families().values()):
        return  # a full model (or a type no family knows, which opening it reports)
    for fam in all_families().values():
        for t in fam.towers:
            try:
                tower_type = getattr(fam.tower_model_class(t, False).config_class, "model_type", None)
            except ClawError:
                continue
            if model_type == tower_type:
                if t == tower:
                    raise ClawError(f"{path}: is already a lone {fam.name} {t} tower ({model_type}); "
                                    f"extraction reads full {fam.name} models")
                raise ClawError(f"{path}: holds only the {t} tower of a {fam.name} model ({model_type}); "
                                f"it has no {tower} tower")


def require_tower(ckpt: Checkpoint, tower: str, expected: dict) -> None:
    """One clear line when the source holds none of the tower's tensors (e.g. a text-only checkpoint)."""
    family = ckpt.family
    table = load_table(family.name, ckpt.format).expand(ckpt.table_params(), list(expected))
    found: set[str] = set()
    for k in ckpt.store.keys():
        rule = table.by_format.get(k)
        for c in rule.canonical if rule else ():
            found.update(t for t, prefixes in family.towers.items() if c.startswith(prefixes[0]))
    if tower not in found:
        holds = f"it holds the {' and '.join(sorted(found))} tower only" if found else "it holds no tower tensors"
        raise ClawError(f"{ckpt.path}: has no {tower} tower: none of its {len(ckpt.store)} tensors belongs to it "
                        f"({holds})")


def _nbytes(shape, dtype) -> int:
    n = 1
    for s in shape:
        n *= s
    return n * dtype_of(dtype).itemsize


# ------------------------------------------------------------------------------------
# side files and how to load the output
# ------------------------------------------------------------------------------------
def _class_name(family, tower: str, to: str, with_projection: bool, arch: str | None) -> str:
    if to == "hf":
        return family.tower_architecture(tower, with_projection)
    if to == "timm":
        return str(arch)
    return "open_clip " + ("VisionTransformer" if tower == "visual" else "TextTransformer")


def _write_side_files(out: Path, ckpt: Checkpoint, tower: str, to: str, with_projection: bool,
                      arch: str | None, num_classes: int) -> list[str]:
    family, config = ckpt.family, ckpt.config
    if to == "hf":
        tcfg = family.tower_config(config, tower)
        tcfg.architectures = [family.tower_architecture(tower, with_projection)]
        tcfg.save_pretrained(str(out))
        return family.write_hf_tower_extras(out, config, ckpt.extras, tower)
    if to == "timm":
        from . import timm_towers
        timm_towers.write_config(out, str(arch), num_classes, family.tower_config(config, tower), ckpt.extras.preprocess)
        return []
    return get_format("openclip").write_side_files(out, family, config, ckpt.extras)


def openclip_load_lines(tower: str, out_dir: Path) -> list[str]:
    """The lines that build an OpenCLIP tower with open_clip's own builder and load the weights."""
    build, prefix, cfg_key = (("_build_vision_tower", "visual.", "vision_cfg") if tower == "visual"
                              else ("_build_text_tower", "text.", "text_cfg"))
    name = "visual" if tower == "visual" else "text"
    return [
        "import json, open_clip",
        "from safetensors.torch import load_file",
        f"cfg = json.load(open({str(Path(out_dir) / 'open_clip_config.json')!r}))['model_cfg']",
        f"{name} = open_clip.model.{build}(cfg['embed_dim'], cfg['{cfg_key}'], cfg.get('quick_gelu', False))",
        f"{name}.load_state_dict({{k.removeprefix({prefix!r}): v for k, v in "
        f"load_file({str(Path(out_dir) / 'open_clip_model.safetensors')!r}).items()}})",
    ]


def _load_lines(family, tower: str, to: str, with_projection: bool, arch: str | None, num_classes: int,
                dest: Path) -> list[str]:
    if to == "hf":
        cls = family.tower_architecture(tower, with_projection)
        return [f"from transformers import {cls}", f"model = {cls}.from_pretrained({str(dest)!r})"]
    if to == "timm":
        from . import timm_towers
        return timm_towers.load_lines(str(arch), dest, num_classes)
    return openclip_load_lines(tower, dest)


# ------------------------------------------------------------------------------------
# verification: the tower against the full model, same framework, same inputs
# ------------------------------------------------------------------------------------
Fn = Callable[[Any], Any]  # torch tensor -> torch tensor


def _hf_load(cls: type, path: Path):
    from ..verify import load_strict
    return load_strict(cls, path)


def _input_name(tower: str) -> str:
    return "pixel_values" if tower == "visual" else "input_ids"


def hf_tower_fn(family, path: Path, tower: str, with_projection: bool) -> tuple[str, Fn]:
    cls = family.tower_model_class(tower, with_projection)
    model = _hf_load(cls, path)
    embeds = "image_embeds" if tower == "visual" else "text_embeds"

    def run(x):
        out = model(**{_input_name(tower): x})
        return getattr(out, embeds) if with_projection and hasattr(out, embeds) else out.pooler_output
    return f"transformers {cls.__name__}", run


def hf_full_fn(full: Checkpoint, tower: str, with_projection: bool) -> tuple[str, Fn]:
    from ..verify import _features
    family = full.family
    cls = family.hf_model_class(full.config)
    model = _hf_load(cls, full.path)
    body = getattr(model, family.towers[tower][0].rstrip("."))
    features = model.get_image_features if tower == "visual" else model.get_text_features

    def run(x):
        if with_projection:
            return _features(features(**{_input_name(tower): x}))
        return body(**{_input_name(tower): x}).pooler_output
    return f"transformers {cls.__name__} (full model)", run


def openclip_tower_fn(path: Path, tower: str) -> tuple[str, Fn]:
    import open_clip
    from safetensors.torch import load_file

    from ..verify import quiet
    cfg = json.loads((path / "open_clip_config.json").read_text())["model_cfg"]
    build, prefix, key = ((open_clip.model._build_vision_tower, "visual.", "vision_cfg") if tower == "visual"
                          else (open_clip.model._build_text_tower, "text.", "text_cfg"))
    with quiet():
        module = build(cfg["embed_dim"], cfg[key], cfg.get("quick_gelu", False))
    state = {k.removeprefix(prefix): v for k, v in load_file(str(path / "open_clip_model.safetensors")).items()}
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise VerificationFailed(f"{path}: open_clip reports missing {missing[:5]} unexpected {unexpected[:5]}")
    module.eval().float()
    return f"open_clip {type(module).__name__}", module


def openclip_full_fn(full: Checkpoint, tower: str) -> tuple[str, Fn]:
    from ..verify import openclip_runner
    runner = openclip_runner(full)
    return "open_clip (full model)", runner.image if tower == "visual" else runner.text


def verify_tower(ckpt: Checkpoint, options: SourceOptions, out: Path, tower: str, to: str, with_projection: bool,
                 arch: str | None, num_classes: int, dtype, tolerance: float | None, scratch: Path) -> dict[str, Any]:
    """Figures of the tower against the full model (bit-exact when both run in one framework)."""
    from ..api import _dtype, convert
    from ..verify import compare, default_tolerance, need_runners, sample_inputs
    need_runners(ckpt.format, "hf" if to == "timm" else to)

    ref_fmt = "hf" if to == "timm" else to
    figures: dict[str, Any] = {}
    full = ckpt
    if ckpt.format != ref_fmt or _dtype(dtype) is not None:
        # the full model in the tower's framework and dtype: clawconvert's own conversion of the source
        tmpdir = Path(tempfile.mkdtemp(prefix="full-", dir=scratch))
        convert(ckpt.path, tmpdir / "full", to=ref_fmt, src_format=ckpt.format, model_name=options.model_name,
                model_config=options.model_config, dtype=dtype, unsafe_pickle=options.unsafe_pickle)
        full = get_format(ref_fmt).open(tmpdir / "full", SourceOptions(format=ref_fmt))
        try:
            conv = compare(ckpt, full, tolerance=default_tolerance(_dtype(dtype)))
            figures["full_vs_source"] = {k: conv[k] for k in ("a", "b", "max_abs_diff", "tolerance", "passed")}
        except ClawError as e:  # the source's framework cannot run it (no runner): say so, go on
            figures["full_vs_source"] = {"skipped": str(e)}

    if ref_fmt == "hf":
        ref_name, ref = hf_full_fn(full, tower, with_projection)
    else:
        ref_name, ref = openclip_full_fn(full, tower)
    if to == "hf":
        name, fn = hf_tower_fn(ckpt.family, out, tower, with_projection)
    elif to == "openclip":
        name, fn = openclip_tower_fn(out, tower)
    else:
        from . import timm_towers
        try:
            model = timm_towers.load_model(str(arch), out, num_classes)
        except Exception as e:  # timm raises RuntimeError on a strict-load mismatch
            raise VerificationFailed(f"{out}: timm cannot load it: {str(e).splitlines()[0][:300]}") from e
        name, fn = f"timm {arch}", model

    import torch

    pixels, ids = sample_inputs(ckpt.config)
    x = pixels if tower == "visual" else ids
    with torch.no_grad():
        a, b = fn(x), ref(x)
    if a.shape != b.shape:
        raise VerificationFailed(f"{tower} features: shapes differ ({tuple(a.shape)} vs {tuple(b.shape)})")
    exact = to != "timm"
    diff = float((a.float() - b.float()).abs().max())
    tol = 0.0 if exact else (tolerance if tolerance is not None else default_tolerance(None))
    figures.update({"tower": name, "reference": ref_name, "bit_exact_required": exact,
                    "bit_exact": bool(torch.equal(a, b)), "max_abs_diff": diff, "tolerance": tol})
    passed = (figures["bit_exact"] if exact else diff <= tol)
    conv = figures.get("full_vs_source", {})
    figures["passed"] = bool(passed and conv.get("passed", True))
    return figures


def format_figures(f: dict[str, Any]) -> str:
    if "bit_exact" not in f:   # a whole-model tower: the conversion's figures
        from ..verify import format_figures as conversion_figures
        return conversion_figures(f)
    verdict = "OK" if f["passed"] else "FAILED"
    how = "bit-exact" if f["bit_exact"] else f"max |diff| {f['max_abs_diff']:.3g} (tolerance {f['tolerance']:g})"
    line = f"verify {verdict}: {f['tower']} vs {f['reference']}: {how}"
    conv = f.get("full_vs_source") or {}
    if "max_abs_diff" in conv:
        line += (f"; full model {conv['b']} vs source {conv['a']}: max |diff| {conv['max_abs_diff']:.3g} "
                 f"(tolerance {conv['tolerance']:g})")
    elif "skipped" in conv:
        line += f"; source framework not compared ({conv['skipped']})"
    return line
