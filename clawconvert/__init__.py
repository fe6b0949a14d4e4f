"""clawconvert: weight conversion and checkpoint surgery for CLIP/SigLIP encoders and VLMs.

Python API (each function does what the command of the same name does)::

    import clawconvert
    clawconvert.convert("openclip_dir", "hf_dir", to="hf", verify=True)
    clawconvert.inspect("hf_dir")
    clawconvert.verify("openclip_dir", "hf_dir")
"""
from __future__ import annotations

__version__ = "0.1.0"

from .errors import ClawError, VerificationFailed  # noqa: E402


# API functions, imported on first use so that `import clawconvert` stays light
_API = ("convert", "inspect", "verify", "extract_visual", "extract_text", "merge_lora", "push", "verify_manifest",
        "export")


def __getattr__(name: str):
    if name in _API:
        import importlib
        return getattr(importlib.import_module(f"{__name__}.api"), name)
    raise AttributeError(f"module 'clawconvert' has no attribute {name!r}")


__all__ = ["ClawError", "VerificationFailed", "convert", "inspect", "verify", "__version__"]
