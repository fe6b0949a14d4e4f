"""Image towers as timm checkpoints: choosing the architecture, its config.json, loading it back.

timm builds a model from a registered architecture name whose width, depth, heads, MLP size,
patch and image size are fixed by the name.  :func:`match_architecture` therefore compares
a tower with every architecture the family names (``Family.timm_architectures``, a
``timm.list_models`` glob), each built on the ``meta`` device, on two things:

* every tensor the mapping table writes must have the name and shape of the timm model's
  own state dict (with ``num_classes`` = the projection width, or 0 without projection);
* the numerics the shapes do not show: the MLP activation (evaluated, not compared by name)
  and every LayerNorm's eps.

No match is refused with the closest architecture named and what differs from it.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from ..deps import need
from ..errors import ClawError
from ..ops import Shape

need("torch", "timm", to="--to timm")   # imported only when a timm tower is written or loaded
import torch  # noqa: E402

WEIGHTS = "model.safetensors"


@dataclass(frozen=True)
class ArchFeatures:
    """What a timm ViT architecture fixes, read off the model built on ``meta``."""

    name: str
    width: int
    layers: int
    heads: int
    mlp: int
    patch: int
    image: int
    eps: tuple[float, ...]


@lru_cache(maxsize=None)
def _build(arch: str, num_classes: int):
    import timm

    from ..verify import quiet
    with quiet(), torch.device("meta"):
        try:
            return timm.create_model(arch, pretrained=False, num_classes=num_classes, weight_init="skip")
        except TypeError:  # an architecture without the weight_init argument
            return timm.create_model(arch, pretrained=False, num_classes=num_classes)


@lru_cache(maxsize=None)
def _features(arch: str) -> ArchFeatures | None:
    m = _build(arch, 0)
    blocks = getattr(m, "blocks", None)
    pe = getattr(getattr(m, "patch_embed", None), "proj", None)
    if not blocks or pe is None:
        return None
    b = blocks[0]
    eps = tuple(sorted({float(mod.eps) for mod in m.modules() if isinstance(mod, torch.nn.LayerNorm)}))
    img = m.patch_embed.img_size
    return ArchFeatures(arch, int(m.embed_dim), len(blocks), int(b.attn.num_heads), int(b.mlp.fc1.out_features),
                        int(pe.kernel_size[0]), int(img[0] if isinstance(img, (tuple, list)) else img), eps)


@lru_cache(maxsize=None)
def _state_shapes(arch: str, num_classes: int) -> dict[str, Shape]:
    return {k: tuple(v.shape) for k, v in _build(arch, num_classes).state_dict().items()}


def _activation_matches(arch: str, hidden_act: str) -> bool:
    """Evaluate timm's MLP activation and transformers' ``hidden_act`` on the same points."""
    from transformers.activations import ACT2FN

    act = getattr(getattr(_build(arch, 0).blocks[0], "mlp", None), "act", None)
    if act is None or hidden_act not in ACT2FN:
        return False
    x = torch.linspace(-6, 6, 241, dtype=torch.float32)
    with torch.no_grad():
        return torch.equal(act(x), ACT2FN[hidden_act](x))


def tower_features(vision_config: Any) -> ArchFeatures:
    c = vision_config
    img = c.image_size if isinstance(c.image_size, int) else c.image_size[0]
    patch = c.patch_size if isinstance(c.patch_size, int) else c.patch_size[0]
    return ArchFeatures("this tower", c.hidden_size, c.num_hidden_layers, c.num_attention_heads,
                        c.intermediate_size, patch, img, (float(c.layer_norm_eps),))


_LABELS = {"width": "width", "layers": "layers", "heads": "heads", "mlp": "mlp", "patch": "patch",
           "image": "image size", "eps": "LayerNorm eps"}


def _differences(want: ArchFeatures, have: ArchFeatures) -> list[str]:
    out = []
    for f, label in _LABELS.items():
        a, b = getattr(want, f), getattr(have, f)
        if a != b:
            show = (lambda v: ", ".join(f"{e:g}" for e in v)) if f == "eps" else str
            out.append(f"{label} {show(b)} (tower: {show(a)})")
    return out


def _describe(f: ArchFeatures, act: str) -> str:
    return (f"width {f.width}, {f.layers} layers, {f.heads} heads, mlp {f.mlp}, patch {f.patch}, "
            f"image {f.image}, {act}, LayerNorm eps {f.eps[0]:g}")


def candidates(pattern: str) -> list[str]:
    import timm
    return sorted(timm.list_models(pattern))


def _likely(names: list[str], want: ArchFeatures) -> list[str]:
    """timm names spell patch and image size (``..._patch16_clip_224``): try those first."""
    rx = re.compile(rf"patch{want.patch}(?!\d).*_{want.image}$")
    return [n for n in names if rx.search(n)]


def match_architecture(family: Any, config: Any, targets: dict[str, Shape], num_classes: int) -> str:
    """The timm architecture whose state dict is exactly ``targets``, or a ClawError naming the closest."""
    if not family.timm_architectures:
        raise ClawError(f"the {family.name} family has no timm form (no timm architectures hold its image tower)")
    vcfg = family.tower_config(config, "visual")
    want = tower_features(vcfg)
    names = candidates(family.timm_architectures)
    if not names:
        raise ClawError(f"this timm installation lists no architectures matching '{family.timm_architectures}'")

    def exact(arch: str) -> bool:
        f = _features(arch)
        return (f is not None and not _differences(want, f) and _state_shapes(arch, num_classes) == targets
                and _activation_matches(arch, vcfg.hidden_act))

    likely = _likely(names, want)
    # the names that spell this patch and image size first; the rest only when none fits
    for arch in likely + [n for n in names if n not in likely]:
        if exact(arch):
            return arch
    scored = []
    for arch in names:
        f = _features(arch)
        if f is None:
            continue
        diffs = _differences(want, f)
        if not _activation_matches(arch, vcfg.hidden_act):
            diffs.append(f"activation (tower: {vcfg.hidden_act})")
        if not diffs:
            diffs.append("tensor layout (" + _layout_difference(_state_shapes(arch, num_classes), targets) + ")")
        rel = abs(f.width - want.width) / want.width + abs(f.layers - want.layers) / want.layers
        scored.append((len(diffs), rel, arch, diffs))
    scored.sort()
    _, _, best, diffs = scored[0]
    raise ClawError(f"no timm architecture holds this {family.name} image tower ({_describe(want, vcfg.hidden_act)}); "
                    f"closest: {best}, which differs in {'; '.join(diffs)}")


def _layout_difference(have: dict[str, Shape], want: dict[str, Shape]) -> str:
    extra = sorted(set(have) - set(want))
    missing = sorted(set(want) - set(have))
    wrong = sorted(k for k in set(have) & set(want) if have[k] != want[k])
    parts = []
    if missing:
        parts.append(f"timm has no {missing[0]}" + (f" (+{len(missing) - 1})" if len(missing) > 1 else ""))
    if extra:
        parts.append(f"timm also needs {extra[0]}" + (f" (+{len(extra) - 1})" if len(extra) > 1 else ""))
    if wrong:
        parts.append(f"{wrong[0]} is {have[wrong[0]]} in timm, {want[wrong[0]]} here")
    return "; ".join(parts) or "same"


def write_config(out_dir: Path, arch: str, num_classes: int, vision_config: Any, preprocess: dict) -> None:
    """timm's own ``config.json``, so that ``timm.create_model("local-dir:DIR", pretrained=True)`` loads too."""
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    size = vision_config.image_size if isinstance(vision_config.image_size, int) else vision_config.image_size[0]
    cfg = {
        "architecture": arch,
        "num_classes": num_classes,
        "num_features": vision_config.hidden_size,
        "pretrained_cfg": {
            "input_size": [3, size, size],
            "fixed_input_size": True,
            "interpolation": preprocess.get("interpolation", "bicubic"),
            "crop_pct": 1.0,
            "crop_mode": "squash" if preprocess.get("resize_mode") == "squash" else "center",
            "mean": list(preprocess.get("mean", OPENAI_DATASET_MEAN)),
            "std": list(preprocess.get("std", OPENAI_DATASET_STD)),
            "num_classes": num_classes,
            "first_conv": "patch_embed.proj",
            "classifier": "head",
        },
    }
    (Path(out_dir) / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")


def load_lines(arch: str, out_dir: Path, num_classes: int) -> list[str]:
    weights = str(Path(out_dir) / WEIGHTS)
    return ["import timm",
            f"model = timm.create_model({arch!r}, pretrained=True, "
            f"pretrained_cfg_overlay=dict(file={weights!r}, num_classes={num_classes}))",
            f"# or: timm.create_model('local-dir:{Path(out_dir)}', pretrained=True)"]


def load_model(arch: str, out_dir: Path, num_classes: int):
    """Load the written checkpoint exactly the way :func:`load_lines` tells users to (strict)."""
    import timm

    from ..verify import quiet
    with quiet():
        model = timm.create_model(arch, pretrained=True,
                                  pretrained_cfg_overlay=dict(file=str(Path(out_dir) / WEIGHTS), num_classes=num_classes))
    return model.eval()
