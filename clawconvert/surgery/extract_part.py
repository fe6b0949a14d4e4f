"""Cut the language model or the vision tower out of a VLM, as a model of its own.

The VLM is any model an architecture table knows (Qwen2-VL, Gemma 3, Idefics3, LLaVA...).  Its
layout is read from the tensor names, the kept part is planned and streamed by the conversion
engine (``plan_relayout``: only that part's tensors are read), and written under the part's
own canonical names, which are those of its standalone transformers class: the language model
as its family's causal LM (``Qwen2ForCausalLM``, ``Gemma3ForCausalLM``, ``LlamaForCausalLM``),
the vision tower as ``CLIPVisionModel`` / ``SiglipVisionModel`` where one holds it.  The config
comes from the table's ``standalone`` row; a part with no standalone class is refused with the
table's reason.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..architectures import Architecture, Layout, model_architecture
from ..errors import VerificationFailed
from ..io.atomic import atomic_output_dir
from ..io.dtypes import DType
from ..io.readers import open_tensors, read_json_file
from ..io.writers import SafetensorsWriter, parse_size
from ..provenance import source_fingerprint, write_manifest
from .relayout import part_rules, plan_relayout
from .tokenizer import TOKENIZER_FILES, base_tokenizer

if TYPE_CHECKING:
    from .extract import ExtractResult

PARTS = {"text": "lm", "visual": "vision"}
# the image processors that belong to each standalone vision class (a VLM's own, e.g.
# Qwen2VLImageProcessor or Idefics3ImageProcessor, does not preprocess for the bare tower)
TOWER_PROCESSORS = {"CLIPVisionModel": "CLIPImageProcessor", "SiglipVisionModel": "SiglipImageProcessor"}


def vlm_architecture(path: Path) -> Architecture | None:
    """The architecture table of an HF directory that holds a VLM or a research-code LLM, else
    None (CLIP/SigLIP, plain causal LMs)."""
    found = model_architecture(path)
    return found[0] if found is not None and found[0].name != "causal_lm" else None


def standalone_source(path: Path) -> Architecture | None:
    """The table of a model whose language model is spelled in another framework's names
    (Qwen-1: ``transformer.h.*``), which ``convert --to hf`` writes as its standalone HF class."""
    arch = vlm_architecture(path)
    return arch if arch is not None and arch.parts["lm"].format != "hf" and "vision" not in arch.parts else None


def standalone_layout(part: str) -> Layout:
    return Layout(f"standalone-{part}", "", ((f"{part}/", ""),))


def extract_part(src: Path, dst: str | Path, tower: str, *, source_name: str, hub_info: dict[str, Any],
                 dtype: DType | None, dtype_name: str, max_shard_size: str | int, verify: bool,
                 tolerance: float | None, overwrite: bool, unsafe_pickle: bool, progress) -> "ExtractResult":
    from .extract import ExtractResult

    part = PARTS[tower]
    arch = vlm_architecture(src)
    config = read_json_file(src / "config.json", "config.json")
    cls, part_config, notes = arch.standalone(part, config)
    if part == "lm":
        part_config["tie_word_embeddings"] = bool(config.get("tie_word_embeddings",
                                                             arch.tie_default(config["model_type"])))
    if dtype is not None:
        part_config["dtype"] = dtype_name
    store = open_tensors(src, unsafe_pickle=unsafe_pickle)
    layout = arch.detect_layout(store.keys(), src)
    plan = plan_relayout(store, arch, layout, standalone_layout(part), dtype=dtype, parts=[part],
                         src_rules=part_rules(arch, layout, config))
    dest = Path(dst).absolute()
    with atomic_output_dir(dst, overwrite=overwrite, sources=(src,)) as tmp:
        writer = SafetensorsWriter(tmp, plan.writer_plan, max_shard_size=parse_size(max_shard_size))
        try:
            n = plan.execute(writer, progress(len(plan.targets)) if progress else None)
            files = writer.close()
        except BaseException:
            writer.abort()
            raise
        (tmp / "config.json").write_text(json.dumps(part_config, indent=2) + "\n")
        copied = _side_files(src, tmp, part, cls, notes)
        if part == "lm" and not any(c in TOKENIZER_FILES for c in copied):    # a tokenizer built from the table
            built, said = base_tokenizer(src, arch, config, lambda: tmp)
            notes += said
            if built is not None:
                copied += [f for f in TOKENIZER_FILES if (tmp / f).is_file()]
        figures = verify_part(arch, src, tmp, part, cls, tolerance) if verify else None
        load = [f"from transformers import {cls}", f"model = {cls}.from_pretrained({str(dest)!r})"]
        write_manifest(tmp, {
            "source": {"path": source_name, "format": "hf", "architecture": arch.name,
                       "fingerprint": source_fingerprint(src), **hub_info},
            "target": {"format": "hf", "part": part, "classes": [cls]},
            "tables": [{"name": arch.table(layout).name, "sha256": arch.sha256}],
            "dtype": dtype_name, "load": load, "copied_from_source": copied,
            **({"verify": figures} if figures else {}), "notes": notes,
        })
        if figures and not figures["passed"]:
            raise VerificationFailed(f"verify FAILED: {figures['tower']} vs {figures['reference']}: max |diff| "
                                     f"{figures['max_abs_diff']:.3g} (tolerance {figures['tolerance']:g}); "
                                     f"output not written")
    return ExtractResult(dest, tower, "hf", arch.name, cls, n, plan.total_bytes, [f.name for f in files], load,
                         notes, figures)


def _side_files(src: Path, out: Path, part: str, cls: str, notes: list[str]) -> list[str]:
    copied = []
    keep = (TOKENIZER_FILES + ("generation_config.json",)) if part == "lm" else ()
    for f in sorted(src.iterdir()):
        if f.is_file() and (f.name in keep or f.name.upper().startswith(("LICENSE", "NOTICE"))):
            shutil.copyfile(f, out / f.name)
            copied.append(f.name)
    if part == "vision":
        pre = src / "preprocessor_config.json"
        kind = _processor_type(pre)
        if kind and kind.removesuffix("Fast") == TOWER_PROCESSORS.get(cls):
            shutil.copyfile(pre, out / pre.name)
            copied.append(pre.name)
        elif pre.is_file():
            notes.append(f"the VLM's image processor ({kind or 'unknown type'}) prepares images for the whole "
                         f"model, not for a bare {cls}: no preprocessor_config.json written")
    elif not any(c in TOKENIZER_FILES for c in copied) and not arch_builds_tokenizer(src):
        notes.append(f"{src} has no tokenizer files; none copied")
    return copied


def arch_builds_tokenizer(src: Path) -> bool:
    arch = vlm_architecture(src)
    return bool(arch and arch.tokenizer)


def _processor_type(path: Path) -> str | None:
    try:
        return str(json.loads(path.read_text()).get("image_processor_type") or "") or None
    except (OSError, ValueError, AttributeError, RecursionError):
        return None


def verify_part(arch: Architecture, src: Path, out: Path, part: str, cls: str,
                tolerance: float | None) -> dict[str, Any]:
    """The extracted part against the same part inside the VLM, both run by transformers."""
    import torch
    import transformers

    from ..verify import load_strict
    vlm = load_strict(transformers.AutoModelForImageTextToText, src)
    alone = load_strict(getattr(transformers, cls), out)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        if part == "lm":
            vocab = int(alone.config.vocab_size)
            x = torch.randint(0, vocab, (1, 16), generator=gen)
            want, got = vlm(input_ids=x).logits, alone(input_ids=x).logits
        else:
            modules = arch.detect_layout([k for k in vlm.state_dict()], "the loaded VLM")
            inner = vlm.get_submodule(modules.to_file("vision/vision_model.").rstrip("."))
            size = int(alone.config.image_size)
            x = torch.randn(1, 3, size, size, generator=gen)
            want, got = inner(pixel_values=x).last_hidden_state, alone(pixel_values=x).last_hidden_state
    diff = float((want - got).abs().max())
    tol = 1e-5 if tolerance is None else tolerance
    return {"tower": f"transformers {cls}", "reference": f"transformers {type(vlm).__name__} ({part} part)",
            "max_abs_diff": diff, "tolerance": tol, "passed": diff <= tol}
