"""The frameworks clawconvert runs only for some commands, and the one line that says how to get them.

The plain install (``pip install clawconvert``) holds what converting, extracting, merging and
pushing import: numpy, safetensors, ml_dtypes, tokenizers, huggingface_hub, ...  torch,
transformers, open_clip, timm and peft come with the ``verify`` extra, because only ``--verify``,
pickle sources, ``--to timm``, LLaVA assembly and a few rarer paths run a framework; onnx,
onnxruntime and gguf with the ``export`` extra.

Each place that imports one calls :func:`need` first (one line), so a missing framework ends
the command with one line naming the extra instead of a traceback::

    need("torch", "transformers", to="--verify against transformers")
    import torch

:func:`need` only looks the packages up (``importlib.util.find_spec``); it imports nothing.
"""
from __future__ import annotations

import importlib.util

from .errors import ClawError

# import name -> (the distribution pip installs, the clawconvert extra that brings it)
FRAMEWORKS: dict[str, tuple[str, str]] = {
    "torch": ("torch", "verify"),
    "transformers": ("transformers", "verify"),
    "open_clip": ("open_clip_torch", "verify"),
    "timm": ("timm", "verify"),
    "peft": ("peft", "verify"),                 # merge-lora --verify runs the unmerged adapter
    "onnx": ("onnx", "export"),
    "onnxruntime": ("onnxruntime", "export"),
    "onnxscript": ("onnxscript", "export"),
    "gguf": ("gguf", "export"),
    "sentencepiece": ("sentencepiece", "export"),
}


class MissingFramework(ClawError):
    """A command needs a framework that is not installed (exit code 2, one line)."""


def installed(module: str) -> bool:
    """Whether ``module`` can be imported, without importing it."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a blocked name, or a module whose __spec__ is None
        return False


def missing_message(modules: list[str], to: str) -> str:
    """``"{to} needs torch, which is not installed: pip install 'clawconvert[verify]'"``."""
    dists = [FRAMEWORKS.get(m.split(".")[0], (m, "verify"))[0] for m in modules]
    extras = ",".join(sorted({FRAMEWORKS.get(m.split(".")[0], (m, "verify"))[1] for m in modules}))
    what = dists[0] if len(dists) == 1 else ", ".join(dists[:-1]) + " and " + dists[-1]
    which = "which is" if len(dists) == 1 else "which are"
    return f"{to} needs {what}, {which} not installed: pip install 'clawconvert[{extras}]'"


def need(*modules: str, to: str) -> None:
    """Raise :class:`MissingFramework` naming the extra when any of ``modules`` is not installed.

    ``to`` says what needs them, as the user would say it ("--verify", "reading a torch pickle").
    """
    missing = [m for m in modules if not installed(m)]
    if missing:
        raise MissingFramework(missing_message(missing, to))


def framework_missing(err: BaseException) -> str | None:
    """The framework an ``ImportError`` says is absent (``err.name``'s top package), else None.

    The CLI's safety net for an import site without a :func:`need` line: the error still
    becomes one line naming the extra."""
    name = getattr(err, "name", None) or ""
    root = name.split(".")[0]
    return root if isinstance(err, ModuleNotFoundError) and root in FRAMEWORKS else None
