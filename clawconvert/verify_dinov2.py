"""DINOv2 and DINOv3 forward passes in each layout's own framework, for ``--verify`` and ``clawconvert verify``.

* ``hf``: transformers ``Dinov2Model`` / ``Dinov2WithRegistersModel`` / ``DINOv3ViTModel``
  (``from_pretrained``, no missing or unexpected keys): ``last_hidden_state`` and ``pooler_output``;
* ``timm``: ``timm.create_model("local-dir:DIR", pretrained=True)`` (timm's strict load):
  ``forward_features`` (the same tokens, normed: class, registers, patches) and its class token
  (what transformers' ``pooler_output`` is, whatever pooling timm's config names);
* ``original``: facebookresearch's state dict loaded into timm's model of the family through
  timm's own reader of the torch-hub checkpoints (``checkpoint_filter_fn`` of the family's
  ``timm_reader`` module: DINOv2 ``vision_transformer``: fused qkv kept, w12/w3 renamed, the class
  position folded for register models; DINOv3 ``eva``: storage tokens, q / v biases, w1/w2/w3),
  strictly.  facebookresearch's code is not a dependency; timm's reader is the framework path
  the original files are loaded through.

No mapping table is involved in any of them: each runs the file as its framework reads it.
"""
from __future__ import annotations

from pathlib import Path

from .errors import VerificationFailed
from .verify import Runner, load_strict, quiet


def _hf(ckpt) -> Runner:
    cls = ckpt.family.hf_model_class(ckpt.config)
    model = load_strict(cls, ckpt.path)
    return Runner(f"transformers {cls.__name__}", None, None, None,
                  outputs={"last_hidden_state": lambda x: model(pixel_values=x).last_hidden_state,
                           "pooler_output": lambda x: model(pixel_values=x).pooler_output})


def _timm_outputs(model) -> dict:
    return {"last_hidden_state": model.forward_features,
            "pooler_output": lambda x: model.forward_features(x)[:, 0]}


def _timm(ckpt) -> Runner:
    import timm
    try:
        with quiet():
            model = timm.create_model(f"local-dir:{Path(ckpt.path).absolute()}", pretrained=True)
    except Exception as e:   # timm raises RuntimeError on a strict-load mismatch
        raise VerificationFailed(f"{ckpt.path}: timm cannot load it: {str(e).splitlines()[0][:300]}") from e
    model.eval().float()
    return Runner(f"timm {model.default_cfg.get('architecture', type(model).__name__)}", None, None, None,
                  outputs=_timm_outputs(model))


def _original(ckpt) -> Runner:
    import importlib

    import timm

    from .io.dtypes import as_torch
    reader = ckpt.family.timm_reader
    lacking = [k for k in ckpt.family.timm_reader_needs if k not in ckpt.store]
    if lacking:
        raise VerificationFailed(f"{ckpt.path}: timm's reader of {ckpt.family.display_name} torch-hub checkpoints "
                                 f"({reader}.checkpoint_filter_fn) tells them by {', '.join(lacking)}, which this "
                                 f"model (no registers) lacks, so no framework here runs it; verify its hf or timm "
                                 f"form instead")
    checkpoint_filter_fn = importlib.import_module(reader).checkpoint_filter_fn
    cfg = ckpt.family.codec("timm").write(ckpt.config)
    with quiet():
        model = timm.create_model(cfg["architecture"], pretrained=False, num_classes=0, **cfg.get("model_args", {}))
    state = {k: as_torch(ckpt.store.read(k)).clone() for k in ckpt.store.keys()}
    try:
        with quiet():   # timm's reader prints what it skips
            model.load_state_dict(checkpoint_filter_fn(state, model), strict=True)
    except Exception as e:
        raise VerificationFailed(f"{ckpt.path}: timm's reader of the original checkpoints cannot load it: "
                                 f"{str(e).splitlines()[0][:300]}") from e
    model.eval().float()
    return Runner(f"timm {cfg['architecture']} via its reader of torch-hub checkpoints", None, None, None,
                  outputs=_timm_outputs(model))


RUNNERS = {"hf": _hf, "timm": _timm, "original": _original}


def runner(ckpt) -> Runner:
    if ckpt.format not in RUNNERS:
        from .errors import ClawError
        raise ClawError(f"{ckpt.path}: no framework runner for {ckpt.family.display_name} {ckpt.format} checkpoints")
    return RUNNERS[ckpt.format](ckpt)
