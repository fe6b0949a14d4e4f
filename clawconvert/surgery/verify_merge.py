"""``merge-lora --verify``: the merged output against the unmerged model, each run by its framework.

The reference is what the user had before the merge, run the way they ran it:

* a causal LM or native VLM: BASE with the adapter loaded by peft (``PeftModel``, unmerged), on
  the same token ids, text only;
* a LLaVA assembled from parts: the classic research pipeline, built from the parts' own
  frameworks: the vision tower (transformers) -> its hidden state ``vision_feature_layer``, CLS
  dropped under the ``default`` strategy -> the connector as ``nn.Sequential(Linear, GELU,
  Linear)`` -> spliced at the image tokens into the unmerged peft language model.

A source whose framework cannot be run here (Qwen-1 and original LLaVA are remote code, which
clawconvert never runs) is not compared, and the figures say why.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any



def _load(cls, path: Path):
    from ..verify import load_strict
    return load_strict(cls, path)


def _peft(model, adapter: Path | None):
    if adapter is None:
        return model
    from peft import PeftModel

    from ..verify import quiet
    with quiet(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PeftModel.from_pretrained(model, str(adapter)).eval()


def skipped(why: str) -> dict[str, Any]:
    return {"passed": True, "skipped": why}


def verify_merge(out: Path, *, base: Path, adapter: Path | None, kind: str, tolerance: float | None,
                 assembly=None, vision_dir: Path | None = None) -> dict[str, Any]:
    """``kind``: "causal_lm", "vlm" (native) or "llava" (assembled); figures with ``passed``."""
    import torch
    import transformers

    tol = 1e-4 if tolerance is None else tolerance
    gen = torch.Generator().manual_seed(0)
    if kind == "llava":
        return _verify_llava(out, base, adapter, assembly, vision_dir, tol)
    auto = transformers.AutoModelForCausalLM if kind == "causal_lm" else transformers.AutoModelForImageTextToText
    ref = _peft(_load(auto, base), adapter)
    merged = _load(auto, out)
    vocab = int(merged.config.get_text_config().vocab_size)
    ids = torch.randint(0, vocab, (1, 24), generator=gen)
    with torch.no_grad():
        want, got = ref(input_ids=ids).logits, merged(input_ids=ids).logits
    diff = float((want - got).abs().max())
    return {"reference": "BASE + ADAPTER (peft, unmerged)", "compared": "logits, 24 token ids",
            "max_abs_diff": diff, "tolerance": tol, "passed": diff <= tol}


def _verify_llava(out: Path, base: Path, adapter: Path | None, assembly, vision_dir: Path | None,
                  tol: float) -> dict[str, Any]:
    import torch
    import transformers

    if vision_dir is None or not (vision_dir / "config.json").is_file():
        return skipped("the vision tower is not an HF directory to run")
    llava_cls = getattr(transformers, assembly.architecture)
    if assembly.grid_pinpoints:
        return skipped("the reference pipeline covers LLaVA 1.5 (one view), not anyres tiling")
    merged = _load(llava_cls, out)
    lm = _peft(_load(transformers.AutoModelForCausalLM, base), adapter)
    vcfg = assembly.vision_config
    from . import llava
    tower_cls = getattr(transformers, llava.vision_towers()[vcfg["model_type"]]["class"])
    tower = _load(tower_cls, vision_dir)
    conn = assembly.connector
    first, second = conn.shape("linear_1.weight"), conn.shape("linear_2.weight")
    proj = torch.nn.Sequential(torch.nn.Linear(first[1], first[0], bias=conn.bias), torch.nn.GELU(),
                               torch.nn.Linear(second[1], second[0], bias=conn.bias))
    state = {}
    for role, (store, key) in conn.tensors.items():
        if role.startswith("linear_"):
            index = "0" if role.startswith("linear_1") else "2"
            state[f"{index}.{role.split('.', 1)[1]}"] = torch.from_numpy(store.read(key).astype("float32"))
    proj.load_state_dict(state)
    gen = torch.Generator().manual_seed(0)
    size = int(vcfg.get("image_size", 224))
    pixels = torch.randn(1, 3, size, size, generator=gen)
    n = assembly.image_seq_length
    vocab = int(lm.config.vocab_size) if hasattr(lm.config, "vocab_size") else int(lm.base_model.config.vocab_size)
    text = torch.randint(0, min(vocab, assembly.image_token_index), (1, 12), generator=gen)
    ids = torch.cat([text[:, :5], torch.full((1, n), assembly.image_token_index), text[:, 5:]], dim=1)
    with torch.no_grad():
        hidden = tower(pixel_values=pixels, output_hidden_states=True).hidden_states[assembly.feature_layer]
        if assembly.strategy == "default":
            hidden = hidden[:, 1:]
        feats = proj(hidden)
        embeds = lm.get_input_embeddings()(ids.clamp(max=vocab - 1)).clone()
        embeds[ids == assembly.image_token_index] = feats.reshape(-1, feats.shape[-1])
        want = lm(inputs_embeds=embeds).logits[..., :vocab]
        got = merged(input_ids=ids, pixel_values=pixels).logits[..., :vocab]
    diff = float((want - got).abs().max())
    return {"reference": "the classic pipeline: vision tower -> connector -> spliced into BASE + ADAPTER (peft)",
            "compared": f"logits, one image ({n} image tokens) + 12 text tokens", "max_abs_diff": diff,
            "tolerance": tol, "passed": diff <= tol}


def format_figures(f: dict[str, Any]) -> str:
    if "skipped" in f:
        return f"verify: not compared ({f['skipped']})"
    verdict = "OK" if f["passed"] else "FAILED"
    return (f"verify {verdict}: merged output vs {f['reference']}: {f['compared']}, max |diff| "
            f"{f['max_abs_diff']:.3g} (tolerance {f['tolerance']:g})")
