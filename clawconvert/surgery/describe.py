"""What an LLM or VLM directory is, from its config and tensor headers, through its architecture table.

``clawconvert inspect`` on a model no family owns (a causal LM, Qwen2.5-VL, Gemma 3, a LLaVA)
lands here: the architecture and class, the key layout the files are in and which
transformers versions load it, each part's tensors and whether a standalone class holds it,
the tie state, and which of the table's side files are present or missing.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from ..architectures import model_architecture, part_of
from ..errors import ClawError
from ..io.readers import open_tensors

SUMMARY_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "intermediate_size", "vocab_size", "depth", "num_heads", "embed_dim", "out_hidden_size",
                "image_size", "patch_size", "hidden_act")


def describe(path: Path, unsafe_pickle: bool = False) -> dict[str, Any]:
    found = model_architecture(path)
    if found is None:
        raise ClawError(f"{path}: no architecture table knows this model")
    arch, config = found
    model_type = str(config["model_type"])
    store = open_tensors(path, unsafe_pickle=unsafe_pickle)
    layout = arch.detect_layout(store.keys(), path)
    infos = store.infos()
    parts: dict[str, dict[str, Any]] = {p: {"tensors": 0, "parameters": 0} for p in arch.parts}
    for key, info in infos.items():
        c = layout.to_canonical(key)
        if c is None:
            continue
        entry = parts.setdefault(part_of(c), {"tensors": 0, "parameters": 0})
        entry["tensors"] += 1
        entry["parameters"] += info.numel
    for name, entry in parts.items():
        entry["file_prefixes"] = sorted({f for c, f in layout.prefixes if c.startswith(name + "/")})
        try:
            entry["standalone"] = arch.standalone(name, config)[0]
        except ClawError:
            entry["standalone"] = None
            entry["why_not"] = arch.parts[name].why or "no standalone model class"
    tie = config.get("tie_word_embeddings", arch.tie_default(model_type))
    pair = arch.tied_pair(model_type)
    tied = {}
    if pair:
        names = [layout.to_file(c) for c in pair]
        tied = {"pair": names, "head_on_disk": names[1] in infos}
    present, missing = [], []
    for entry in arch.side_files:
        options = entry.split("|")
        have = [o for o in options if (Path(path) / o).is_file()]
        (present if have else missing).extend(have or [entry.replace("|", " or ")])
    dtypes = Counter(str(i.dtype) for i in infos.values())
    summary = {k: config[k] for k in SUMMARY_KEYS if k in config}
    for sub in ("text_config", "vision_config"):
        if isinstance(config.get(sub), dict):
            summary[sub] = {k: config[sub][k] for k in SUMMARY_KEYS if k in config[sub]}
    return {
        "path": str(path), "format": "hf", "family": arch.name,
        "tensors": len(infos), "parameters": sum(i.numel for i in infos.values()),
        "bytes": sum(i.nbytes for i in infos.values()), "dtypes": dict(dtypes), "config": summary,
        "architecture": {
            "table": arch.table_name, "class": arch.row(model_type).get("class") or model_type,
            "model_type": model_type,
            "layout": {"name": layout.name, "loaded_by": layout.loaded_by, "note": layout.note},
            "layouts": [lay.name for lay in arch.layouts], "write_layout": arch.write,
            "parts": parts,
            "tie_word_embeddings": bool(tie) if tie is not None else None, "tied": tied,
            "side_files": {"present": present, "missing": missing},
        },
    }
