"""The model card (``README.md``) that ``clawconvert push`` writes for a converted model.

The card is built only from the output directory's ``clawconvert_manifest.json`` (see
:mod:`clawconvert.provenance`) and its file list, so it says exactly what made the files:

* YAML front matter the Hub indexes: ``library_name`` (transformers, open_clip or big_vision),
  ``base_model`` (when the source came from the Hub), ``tags`` (clawconvert, the family, the
  source format), ``pipeline_tag`` and ``license`` (when the source declared one);
* a provenance section: source path or Hub repo with its resolved revision, source format,
  mapping tables with their sha256, clawconvert version, command, dtype, verification figures
  when ``--verify`` ran, and the sha256 of every file;
* how to load the model with the library it is meant for.

The manifest is still growing, so every key is optional: a missing key drops its line, never
the card.  :func:`build_card` is a pure function (no I/O), which keeps it easy to test.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import yaml

from . import __version__

# target/source format as the manifest spells it -> Hub library_name
LIBRARY_OF_FORMAT = {
    "hf": "transformers",
    "transformers": "transformers",
    "huggingface": "transformers",
    "openclip": "open_clip",
    "open_clip": "open_clip",
    "big_vision": "big_vision",
    "bigvision": "big_vision",
    "timm": "timm",
}

# human names for formats and families, used in prose only
_FORMAT_NAME = {"transformers": "Hugging Face transformers", "open_clip": "OpenCLIP",
                "big_vision": "big_vision", "timm": "timm"}
_FAMILY_NAME = {"clip": "CLIP", "siglip": "SigLIP", "siglip2": "SigLIP 2", "llava": "LLaVA"}

# Hub pipeline tags
ZERO_SHOT = "zero-shot-image-classification"
IMAGE_FEATURES = "image-feature-extraction"
TEXT_FEATURES = "feature-extraction"
IMAGE_TEXT_TO_TEXT = "image-text-to-text"
TEXT_GENERATION = "text-generation"

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _get(mapping: Any, key: str) -> Any:
    """``mapping[key]`` when ``mapping`` is a dict holding a non-empty value, else None."""
    if isinstance(mapping, Mapping):
        value = mapping.get(key)
        if value not in (None, "", [], {}):
            return value
    return None


def library_name(manifest: Mapping[str, Any] | None, files: Iterable[str] = ()) -> str | None:
    """The Hub ``library_name``: from the target format, else guessed from the files."""
    fmt = _get(_get(manifest, "target"), "format")
    if isinstance(fmt, str) and fmt.lower() in LIBRARY_OF_FORMAT:
        return LIBRARY_OF_FORMAT[fmt.lower()]
    names = {f.rsplit("/", 1)[-1] for f in files}
    if "open_clip_config.json" in names:
        return "open_clip"
    if "config.json" in names:
        return "transformers"
    if any(n.endswith(".npz") for n in names):
        return "big_vision"
    return None


def _classes(manifest: Mapping[str, Any] | None) -> list[str]:
    """Model classes of the output: ``target.classes`` (convert) or ``target.architecture`` (merge-lora)."""
    target = _get(manifest, "target")
    found = _get(target, "classes") or []
    found = [found] if isinstance(found, str) else list(found) if isinstance(found, (list, tuple)) else []
    arch = _get(target, "architecture")
    if isinstance(arch, str):
        found.append(arch)
    return [c for c in found if isinstance(c, str)]


def _inputs(manifest: Mapping[str, Any] | None) -> dict[str, Mapping[str, Any]]:
    """The sources by role: ``{"": source}`` for one source, ``{"base": ..., "adapter": ...}`` for
    commands with several inputs (merge-lora records each under ``source``)."""
    source = _get(manifest, "source")
    if not isinstance(source, Mapping):
        return {}
    nested = {role: sub for role, sub in source.items() if isinstance(sub, Mapping)}
    return nested if nested and not _get(source, "format") else {"": source}


def _hub_base(manifest: Mapping[str, Any] | None) -> str | None:
    """The Hub repo this output derives from: the source's, or the base model's for a merge."""
    explicit = _get(manifest, "base_model")
    if isinstance(explicit, str):
        return explicit
    inputs = _inputs(manifest)
    for role in ("", "base"):
        repo = _get(inputs.get(role), "hub_repo")
        if isinstance(repo, str):
            return repo
    return None


def _subcommand(manifest: Mapping[str, Any] | None) -> str | None:
    """``extract-visual`` from a recorded command line such as ``clawconvert extract-visual ...``.

    ``write_manifest`` records ``basename(argv[0])`` and the arguments, so the program is
    ``clawconvert`` or, under ``python -m clawconvert``, ``__main__.py``.
    """
    command = _get(manifest, "command")
    words = command.split() if isinstance(command, str) else []
    for i, word in enumerate(words):
        if word.rsplit("/", 1)[-1] in ("clawconvert", "__main__.py"):
            rest = [w for w in words[i + 1:] if not w.startswith("-")]
            return rest[0] if rest else None
    return None


def _command_text(manifest: Mapping[str, Any] | None) -> str | None:
    """The recorded command line, with ``python -m``'s ``__main__.py`` shown as ``clawconvert``."""
    command = _get(manifest, "command")
    if not isinstance(command, str):
        return None
    words = command.split(" ")
    if words and words[0].rsplit("/", 1)[-1] == "__main__.py":
        words[0] = "clawconvert"
    return " ".join(words)


def pipeline_tag(manifest: Mapping[str, Any] | None, architectures: Sequence[str] = ()) -> str | None:
    """The Hub ``pipeline_tag``: what the pushed model does, judged from what was made.

    ``architectures`` (from the output's config.json) stand in for classes the manifest lacks.
    """
    target = _get(manifest, "target") or {}
    family = str(_get(target, "family") or _get(_get(manifest, "source"), "family") or "").lower()
    tower = str(_get(target, "tower") or "").lower()
    classes = " ".join(_classes(manifest) or [str(a) for a in architectures])
    command = _subcommand(manifest) or ""
    if "llava" in family or "Llava" in classes:
        return IMAGE_TEXT_TO_TEXT
    if "ForCausalLM" in classes:
        return TEXT_GENERATION
    if command == "extract-visual" or tower in ("visual", "vision", "image") or "VisionModel" in classes:
        return IMAGE_FEATURES
    if command == "extract-text" or tower == "text" or "TextModel" in classes:
        return TEXT_FEATURES
    if family.startswith(("clip", "siglip")):
        return ZERO_SHOT
    return None


def card_metadata(manifest: Mapping[str, Any] | None, files: Iterable[str] = (),
                  architectures: Sequence[str] = ()) -> dict[str, Any]:
    """The YAML front matter of the card, keys in the order the Hub shows them."""
    files = list(files)
    source = _get(manifest, "source") or {}
    target = _get(manifest, "target") or {}
    meta: dict[str, Any] = {}
    lib = library_name(manifest, files)
    if lib:
        meta["library_name"] = lib
    base = _hub_base(manifest)
    if base:
        meta["base_model"] = base
    tags = ["clawconvert"]
    for value in (_get(target, "family") or _get(source, "family"), _get(source, "format"),
                  "lora" if "adapter" in _inputs(manifest) else None):
        if isinstance(value, str) and value.lower() not in tags:
            tags.append(value.lower())
    meta["tags"] = tags
    tag = pipeline_tag(manifest, architectures)
    if tag:
        meta["pipeline_tag"] = tag
    license_ = _get(manifest, "license") or _get(source, "license")
    if isinstance(license_, str):
        meta["license"] = license_
    return meta


def _fmt(value: Any) -> str:
    """One table cell: floats to 8 significant digits (a cosine of 0.9999998 must not read 1)."""
    if isinstance(value, bool):
        text = "yes" if value else "no"
    elif isinstance(value, float):
        text = f"{value:.8g}"
    elif isinstance(value, (list, tuple)):
        text = ", ".join(_fmt(v) for v in value)
    else:
        text = str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def _flatten(figures: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    rows: list[tuple[str, Any]] = []
    for key, value in figures.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            rows.extend(_flatten(value, f"{name}."))
        else:
            rows.append((name, value))
    return rows


def _source_text(source: Mapping[str, Any]) -> str | None:
    repo, rev, path = _get(source, "hub_repo"), _get(source, "hub_revision"), _get(source, "path")
    if repo:
        return f"`hf-hub:{repo}` at revision `{rev}`" if rev else f"`hf-hub:{repo}` (revision not recorded)"
    return f"`{path}`" if path else None


def _summary(manifest: Mapping[str, Any] | None, lib: str | None, tag: str | None) -> str:
    source = _get(manifest, "source") or {}
    target = _get(manifest, "target") or {}
    family = str(_get(target, "family") or _get(source, "family") or "")
    what = _FAMILY_NAME.get(family.lower(), family or "Model")
    if tag == IMAGE_FEATURES and what != "Model":
        what += " image tower"
    elif tag == TEXT_FEATURES and what != "Model":
        what += " text tower"
    src_fmt = _get(source, "format")
    src_name = _FORMAT_NAME.get(LIBRARY_OF_FORMAT.get(str(src_fmt).lower(), ""), src_fmt)
    dst_name = _FORMAT_NAME.get(lib or "", lib)
    version = _get(manifest, "version") or __version__
    if manifest is None:
        return ("Uploaded with clawconvert. The directory carried no `clawconvert_manifest.json`, "
                "so its provenance is not recorded.")
    inputs = _inputs(manifest)
    if "adapter" in inputs:
        arch = next(iter(_classes(manifest)), "Model")
        base, adapter = _source_text(inputs.get("base") or {}), _source_text(inputs["adapter"])
        return (f"{arch} with the LoRA adapter {adapter or '(not recorded)'} merged into "
                f"{base or '(not recorded)'} by clawconvert {version}.")
    parts = [what]
    if src_name:
        parts.append(f"converted from {src_name}")
    if dst_name:
        parts.append(f"to {dst_name}" if src_name else f"in {dst_name} format")
    return f"{' '.join(parts)} by clawconvert {version}."


def _how_to_load(lib: str | None, repo_id: str, manifest: Mapping[str, Any] | None,
                 files: Sequence[str], architectures: Sequence[str]) -> list[str]:
    names = {f.rsplit("/", 1)[-1] for f in files}
    classes = _classes(manifest) or [str(a) for a in architectures]
    cls = next((c for c in classes if _IDENTIFIER.fullmatch(c)), "AutoModel")
    lines: list[str] = []
    if lib == "transformers":
        lines += ["```python", f"from transformers import {cls}"
                  + (", AutoProcessor" if "preprocessor_config.json" in names else ""),
                  "", f'model = {cls}.from_pretrained("{repo_id}")']
        if "preprocessor_config.json" in names:
            lines.append(f'processor = AutoProcessor.from_pretrained("{repo_id}")')
        lines.append("```")
    elif lib == "open_clip":
        lines += ["```python", "import open_clip", "",
                  f'model, _, preprocess = open_clip.create_model_and_transforms("hf-hub:{repo_id}")',
                  f'tokenizer = open_clip.get_tokenizer("hf-hub:{repo_id}")', "```"]
    elif lib == "big_vision":
        npz = sorted(f for f in files if f.endswith(".npz"))
        lines += ["```python", "import numpy as np", "from huggingface_hub import hf_hub_download", "",
                  f'params = np.load(hf_hub_download("{repo_id}", "{npz[0] if npz else "params.npz"}"))',
                  "```"]
    lines += ["", f"clawconvert reads it straight from the Hub: give `hf-hub:{repo_id}` wherever a "
              "command takes a source."]
    return lines


def build_card(manifest: Mapping[str, Any] | None, repo_id: str, files: Sequence[str] = (),
               architectures: Sequence[str] = ()) -> str:
    """The full ``README.md`` text for ``repo_id`` from a manifest (or None) and the file list.

    ``files`` are the repo-relative paths being uploaded; they decide the loading snippet and,
    without a manifest, the library.  ``architectures`` (config.json's) name the class to load
    with when the manifest does not.  Missing manifest keys leave their lines out.
    """
    files = list(files)
    meta = card_metadata(manifest, files, architectures)
    lib = meta.get("library_name")
    source = _get(manifest, "source") or {}
    target = _get(manifest, "target") or {}
    out = ["---", yaml.safe_dump(meta, sort_keys=False, allow_unicode=True).rstrip("\n"), "---", "",
           f"# {repo_id.rsplit('/', 1)[-1]}", "", _summary(manifest, lib, meta.get("pipeline_tag")), "",
           "## How to load", ""]
    out += _how_to_load(lib, repo_id, manifest, files, architectures)
    if manifest is None:
        return "\n".join(out) + "\n"

    out += ["", "## Provenance", "", "| | |", "|---|---|"]
    rows: list[tuple[str, Any]] = []
    for role, sub in _inputs(manifest).items():
        label = f"Source ({role})" if role else "Source"
        fingerprint = _get(sub, "fingerprint")
        rows += [(label, _source_text(sub)),
                 (f"{label} format", _get(sub, "format")),
                 (f"{label} family", _get(sub, "family")),
                 (f"{label} fingerprint", f"`{fingerprint}`" if fingerprint else None)]
    rows += [
        ("Target format", _get(target, "format")),
        ("Target classes", _classes(manifest) or None),
        ("dtype", _get(manifest, "dtype")),
        ("License (from the source)", _get(manifest, "license") or _get(source, "license")),
        ("clawconvert version", _get(manifest, "version")),
        ("Command", f"`{_command_text(manifest)}`" if _command_text(manifest) else None),
    ]
    out += [f"| {name} | {_fmt(value)} |" for name, value in rows if value is not None]

    tables = [t for t in (_get(manifest, "tables") or []) if isinstance(t, Mapping)]
    if tables:
        out += ["", "### Mapping tables", "", "| Table | sha256 |", "|---|---|"]
        out += [f"| `{_fmt(t.get('name', '?'))}` | `{_fmt(t.get('sha256', '?'))}` |" for t in tables]
    elif _get(manifest, "merge") is None:  # a conversion without its tables recorded
        out += ["", "### Mapping tables", "", "No mapping table recorded."]

    out += ["", "### Verification", ""]
    verify = _get(manifest, "verify")
    if isinstance(verify, Mapping):
        out += ["Figures from clawconvert's numerical check of this output against the source, "
                "run in the frameworks' own forward passes:", "", "| Figure | Value |", "|---|---|"]
        out += [f"| {_fmt(k)} | {_fmt(v)} |" for k, v in _flatten(verify)]
    else:
        out.append("Not verified: the command ran without `--verify`.")

    merge = _get(manifest, "merge")
    if isinstance(merge, Mapping):
        out += ["", "### Merge", "", "| | |", "|---|---|"]
        out += [f"| {_fmt(k)} | {_fmt(v)} |" for k, v in _flatten(merge)]

    notes = _get(manifest, "notes")
    if isinstance(notes, (list, tuple)):
        out += ["", "### Notes", ""] + [f"- {_fmt(n)}" for n in notes]

    hashes = _get(manifest, "files")
    if isinstance(hashes, Mapping):
        out += ["", "### Files", "", "sha256 of each file as clawconvert wrote it:", "",
                "| File | sha256 |", "|---|---|"]
        out += [f"| `{_fmt(p)}` | `{_fmt(h)}` |" for p, h in sorted(hashes.items())]
    return "\n".join(out) + "\n"
