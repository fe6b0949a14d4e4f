"""Numerical proof: run both checkpoints in their own frameworks and compare.

A *runner* loads a checkpoint with the framework that owns its format (open_clip for
OpenCLIP, transformers for HF) and exposes image features, text features and logits.
:func:`compare` feeds both runners the same deterministic inputs (seeded pixels, token ids
built the way the family's tokenizer would: BOS, tokens, EOS, padding) and reports the
max absolute differences.  Runners are registered per format in :data:`RUNNERS`.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:  # torch is imported where a framework runs, not by the conversion path
    import torch

from .deps import need
from .errors import ClawError, VerificationFailed
from .formats import Checkpoint
from .io.dtypes import as_torch

# format name -> the frameworks its runner imports (the `verify` extra installs them)
RUNNER_FRAMEWORKS = {"hf": ("torch", "transformers"), "openclip": ("torch", "open_clip"), "big_vision": ("torch",)}


def need_runners(*formats: str) -> None:
    """Fail with one line before any work when a ``--verify`` runner's framework is not installed."""
    need(*dict.fromkeys(m for f in formats for m in RUNNER_FRAMEWORKS.get(f, ())), to="--verify")


@dataclass
class Runner:
    """Framework-native forward passes of one checkpoint (fp32, eval mode, no grad)."""

    name: str
    image: Callable[[torch.Tensor], torch.Tensor] | None
    text: Callable[[torch.Tensor], torch.Tensor] | None
    logits: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None
    # image-only families (DINOv2): named outputs of the pixels, compared under these names
    outputs: dict[str, Callable[[torch.Tensor], torch.Tensor]] = field(default_factory=dict)


def _features(out: Any) -> torch.Tensor:
    """transformers 5 returns a model output from get_*_features; 4.x a tensor."""
    import torch

    return out if isinstance(out, torch.Tensor) else out.pooler_output


@contextlib.contextmanager
def quiet():
    """Silence framework chatter (logging, warnings, prints) while loading models."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(previous)


def load_strict(cls, path: Path):
    """``cls.from_pretrained(path)`` in float32, eval mode, refusing missing, unexpected or
    mismatched keys (a model that loads with any of those is not the model that was written)."""
    import torch

    with quiet():
        model, info = cls.from_pretrained(str(path), output_loading_info=True, dtype=torch.float32)
    bad = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if bad:
        raise VerificationFailed(f"{path}: transformers {cls.__name__} reports "
                                 + "; ".join(f"{k}: {', '.join(map(str, v))[:200]}" for k, v in bad.items()))
    return model.eval()


def hf_runner(ckpt: Checkpoint) -> Runner:
    cls = ckpt.family.hf_model_class(ckpt.config)
    model = load_strict(cls, ckpt.path)
    return Runner(f"transformers {cls.__name__}",
                  image=lambda x: _features(model.get_image_features(**_pixels(x))),
                  text=lambda ids: _features(model.get_text_features(input_ids=ids)),
                  logits=lambda x, ids: model(input_ids=ids, **_pixels(x)).logits_per_image)


def _pixels(x: Any) -> dict[str, Any]:
    """Image inputs: a pixel tensor, or a dict of them (NaFlex: patches, mask, grid shapes)."""
    return dict(x) if isinstance(x, dict) else {"pixel_values": x}


def openclip_runner(ckpt: Checkpoint) -> Runner:
    import torch

    import open_clip

    path = Path(ckpt.path)
    with quiet():
        try:
            if path.is_dir():
                model = open_clip.create_model(f"local-dir:{path}")
            else:
                model_cfg = ckpt.family.codec("openclip").write(ckpt.config)
                model = _openclip_from_cfg(model_cfg, ckpt)
        except ClawError:
            raise
        except Exception as e:
            raise VerificationFailed(f"{path}: open_clip cannot load it: {str(e).splitlines()[0][:300]}") from e
    model.eval().float()

    def logits(x, ids):
        img = torch.nn.functional.normalize(model.encode_image(x), dim=-1)
        txt = torch.nn.functional.normalize(model.encode_text(ids), dim=-1)
        out = model.logit_scale.exp() * img @ txt.T
        if getattr(model, "logit_bias", None) is not None:
            out = out + model.logit_bias
        return out

    return Runner("open_clip", image=model.encode_image, text=model.encode_text, logits=logits)


def _openclip_from_cfg(model_cfg: dict, ckpt: Checkpoint):
    """Build an open_clip model from a config dict and load the checkpoint's own tensors."""
    import open_clip
    from open_clip.model import CLIP, CustomTextCLIP

    cfg = json.loads(json.dumps(model_cfg))
    cls = CustomTextCLIP if cfg.pop("custom_text", False) else CLIP
    model = cls(**cfg)
    state = {k: as_torch(ckpt.store.read(k)) for k in ckpt.store.keys()}
    state = open_clip.factory.convert_state_dict(model, state) if hasattr(open_clip.factory, "convert_state_dict") else state
    state.pop("attn_mask", None)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise VerificationFailed(f"{ckpt.path}: open_clip reports missing {missing[:5]} unexpected {unexpected[:5]}")
    return model


# format name -> runner factory; formats without a framework runner cannot be --verify'd
def big_vision_runner(ckpt: Checkpoint) -> Runner:
    from .verify_big_vision import big_vision_runner as run  # a torch reference forward: jax is not needed
    return run(ckpt)


RUNNERS: dict[str, Callable[[Checkpoint], Runner]] = {"hf": hf_runner, "openclip": openclip_runner,
                                                      "big_vision": big_vision_runner}


def sample_inputs(config: Any, batch: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic pixels and token rows shaped like a tokenizer's output."""
    import torch

    g = torch.Generator().manual_seed(seed)
    v, t = config.vision_config, config.text_config
    size = v.image_size if isinstance(v.image_size, int) else v.image_size[0]
    pixels = torch.randn(batch + 1, getattr(v, "num_channels", 3), size, size, generator=g)
    L, V = t.max_position_embeddings, t.vocab_size
    eos = t.eos_token_id if t.eos_token_id not in (None, 2) else V - 1
    pad = t.pad_token_id if t.pad_token_id is not None else 0
    bos = getattr(t, "bos_token_id", None)
    low = 3
    ids = torch.full((batch, L), pad, dtype=torch.long)
    for i in range(batch):
        n = int(torch.randint(2, L - 1, (1,), generator=g))
        row = torch.randint(low, max(low + 1, min(V - 2, eos - 1 if eos > low + 1 else V - 2)), (n,), generator=g)
        row = row[row != eos][: L - 2]
        seq = ([bos] if bos is not None and bos != eos and bos < V else []) + row.tolist() + [eos]
        ids[i, : len(seq)] = torch.tensor(seq[:L])
    return pixels, ids


def compare(a: Checkpoint, b: Checkpoint, tolerance: float = 1e-4, seed: int = 0) -> dict[str, Any]:
    """Run both checkpoints on the same inputs; return the figures (raises if above tolerance)."""
    need_runners(a.format, b.format)
    import torch

    runners = []
    for ck in (a, b):
        own = ck.family.runner(ck)   # a family whose forward passes are not CLIP's brings its own
        if own is None and ck.format not in RUNNERS:
            raise ClawError(f"{ck.path}: no framework runner for {ck.format} checkpoints; verify against a converted copy")
        runners.append(own if own is not None else RUNNERS[ck.format](ck))
    ra, rb = runners
    make_inputs = getattr(a.family, "sample_inputs", None) or sample_inputs  # NaFlex: patches, not images
    pixels, ids = make_inputs(a.config, seed=seed)
    figures: dict[str, Any] = {"a": ra.name, "b": rb.name, "tolerance": tolerance}
    with torch.no_grad():
        for what, attr, args in (("image_embeds", "image", (pixels,)), ("text_embeds", "text", (ids,)),
                                 ("logits_per_image", "logits", (pixels, ids))):
            fa, fb = getattr(ra, attr), getattr(rb, attr)
            if fa is None or fb is None:
                continue
            x, y = fa(*args).float(), fb(*args).float()
            if x.shape != y.shape:
                raise VerificationFailed(f"{what}: shapes differ ({tuple(x.shape)} vs {tuple(y.shape)})")
            figures[what] = float((x - y).abs().max())
        for what in [k for k in ra.outputs if k in rb.outputs]:
            x, y = ra.outputs[what](pixels).float(), rb.outputs[what](pixels).float()
            if x.shape != y.shape:
                raise VerificationFailed(f"{what}: shapes differ ({tuple(x.shape)} vs {tuple(y.shape)})")
            figures.setdefault("outputs", []).append(what)
            figures[what] = float((x - y).abs().max())
    worst = max(figures.get(k, 0.0) for k in ("image_embeds", "text_embeds", "logits_per_image",
                                               *figures.get("outputs", [])))
    figures["max_abs_diff"] = worst
    figures["passed"] = worst <= tolerance
    return figures


def format_figures(f: dict[str, Any]) -> str:
    parts = [f"{k} {f[k]:.3g}" for k in ("image_embeds", "text_embeds", "logits_per_image", *f.get("outputs", []))
             if k in f]
    verdict = "OK" if f["passed"] else "FAILED"
    return f"verify {verdict}: max |diff| {', '.join(parts)} (tolerance {f['tolerance']:g}; {f['a']} vs {f['b']})"


def default_tolerance(dtype: Any) -> float:
    """1e-4 in fp32; a half-precision output is compared with its rounding in mind."""
    return {"float16": 5e-2, "bfloat16": 2e-1}.get(str(dtype).replace("torch.", ""), 1e-4)
