"""The peer paths: what people run today instead of clawconvert, each as one subprocess.

    python bench/peers.py NAME SRC... DST

Every peer does the whole job the way its reference does it -- instantiate whole models,
copy state between them, ``save_pretrained`` -- and is written to be as kind to itself as
that reference allows (models are built in the checkpoint's dtype where the library lets
one, nothing is kept alive twice on purpose).  Each one checks that every weight landed
(``load_state_dict`` with no missing or unexpected keys), so a peer cannot look fast by
skipping work.

  openclip-to-hf          open_clip.create_model("local-dir:SRC") + transformers CLIPModel
                          + state copy (the community gist / transformers' convert script
                          recipe) + save_pretrained
  bigvision-to-hf         transformers' convert_siglip_to_hf.py: np.load the whole .npz into a
                          dict, rename/reshape into SiglipModel keys, SiglipModel(config),
                          load_state_dict, save_pretrained
  bigvision-to-openclip   open_clip.create_model(SigLIP config) +
                          open_clip.convert.load_big_vision_weights + save the state dict
  merge-peft              AutoModelForCausalLM.from_pretrained + PeftModel.from_pretrained +
                          merge_and_unload + save_pretrained
  merge-peft-vlm          the same with AutoModelForImageTextToText (a Qwen2.5-VL)
  extract-visual-openclip open_clip.create_model("local-dir:SRC") (the full model), then
                          save model.visual's state dict
  extract-visual-hf       CLIPModel.from_pretrained(SRC) (the full model), then a
                          CLIPVisionModelWithProjection filled from it, save_pretrained
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
PRECISION = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def _safetensors_dtype(path: Path) -> torch.dtype:
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return ST_DTYPES[next(iter(header.values()))["dtype"]]


def _check(missing, unexpected, what: str, allowed_missing=("position_ids",)) -> None:
    missing = [k for k in missing if not any(a in k for a in allowed_missing)]
    if missing or unexpected:
        raise SystemExit(f"{what}: missing {missing[:5]} unexpected {list(unexpected)[:5]}")


# -- OpenCLIP -> HF ---------------------------------------------------------------------
def clip_config(model_cfg: dict):
    from transformers import CLIPConfig

    v, t = model_cfg["vision_cfg"], model_cfg["text_cfg"]
    act = "quick_gelu" if model_cfg.get("quick_gelu") else "gelu"
    proj = model_cfg["embed_dim"]
    vision = dict(hidden_size=v["width"], intermediate_size=int(v["width"] * v.get("mlp_ratio", 4.0)),
                  num_attention_heads=v["width"] // v.get("head_width", 64), num_hidden_layers=v["layers"],
                  image_size=v["image_size"], patch_size=v["patch_size"], hidden_act=act, projection_dim=proj)
    text = dict(hidden_size=t["width"], intermediate_size=int(t["width"] * t.get("mlp_ratio", 4.0)),
                num_attention_heads=t["heads"], num_hidden_layers=t["layers"], vocab_size=t["vocab_size"],
                max_position_embeddings=t["context_length"], hidden_act=act, projection_dim=proj,
                bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=proj)


def openclip_to_hf_state(sd: dict, n_vision: int, n_text: int) -> dict:
    """The OpenCLIP -> HF CLIP key copy, as transformers' convert_clip script and the gists do it."""
    out = {}

    def blocks(src, dst, n):
        for i in range(n):
            s, d = f"{src}.{i}.", f"{dst}.{i}."
            q, k, v = sd[s + "attn.in_proj_weight"].chunk(3, dim=0)
            qb, kb, vb = sd[s + "attn.in_proj_bias"].chunk(3, dim=0)
            out.update({d + "self_attn.q_proj.weight": q, d + "self_attn.k_proj.weight": k,
                        d + "self_attn.v_proj.weight": v, d + "self_attn.q_proj.bias": qb,
                        d + "self_attn.k_proj.bias": kb, d + "self_attn.v_proj.bias": vb,
                        d + "self_attn.out_proj.weight": sd[s + "attn.out_proj.weight"],
                        d + "self_attn.out_proj.bias": sd[s + "attn.out_proj.bias"],
                        d + "layer_norm1.weight": sd[s + "ln_1.weight"], d + "layer_norm1.bias": sd[s + "ln_1.bias"],
                        d + "layer_norm2.weight": sd[s + "ln_2.weight"], d + "layer_norm2.bias": sd[s + "ln_2.bias"],
                        d + "mlp.fc1.weight": sd[s + "mlp.c_fc.weight"], d + "mlp.fc1.bias": sd[s + "mlp.c_fc.bias"],
                        d + "mlp.fc2.weight": sd[s + "mlp.c_proj.weight"], d + "mlp.fc2.bias": sd[s + "mlp.c_proj.bias"]})

    out["vision_model.embeddings.class_embedding"] = sd["visual.class_embedding"]
    out["vision_model.embeddings.position_embedding.weight"] = sd["visual.positional_embedding"]
    out["vision_model.embeddings.patch_embedding.weight"] = sd["visual.conv1.weight"]
    out["vision_model.pre_layrnorm.weight"] = sd["visual.ln_pre.weight"]
    out["vision_model.pre_layrnorm.bias"] = sd["visual.ln_pre.bias"]
    blocks("visual.transformer.resblocks", "vision_model.encoder.layers", n_vision)
    out["vision_model.post_layernorm.weight"] = sd["visual.ln_post.weight"]
    out["vision_model.post_layernorm.bias"] = sd["visual.ln_post.bias"]
    out["visual_projection.weight"] = sd["visual.proj"].T
    out["text_model.embeddings.token_embedding.weight"] = sd["token_embedding.weight"]
    out["text_model.embeddings.position_embedding.weight"] = sd["positional_embedding"]
    blocks("transformer.resblocks", "text_model.encoder.layers", n_text)
    out["text_model.final_layer_norm.weight"] = sd["ln_final.weight"]
    out["text_model.final_layer_norm.bias"] = sd["ln_final.bias"]
    out["text_projection.weight"] = sd["text_projection"].T
    out["logit_scale"] = sd["logit_scale"]
    return out


@torch.no_grad()
def openclip_to_hf(src: str, dst: str) -> None:
    import open_clip
    from transformers import CLIPModel

    src_p = Path(src)
    dtype = _safetensors_dtype(src_p / "open_clip_model.safetensors")
    model_cfg = json.loads((src_p / "open_clip_config.json").read_text())["model_cfg"]
    model = open_clip.create_model(f"local-dir:{src}", precision=PRECISION[dtype])
    config = clip_config(model_cfg)
    hf = CLIPModel._from_config(config, dtype=dtype)
    state = openclip_to_hf_state(model.state_dict(), model_cfg["vision_cfg"]["layers"], model_cfg["text_cfg"]["layers"])
    _check(*hf.load_state_dict(state, strict=False), "openclip-to-hf")
    del state, model
    hf.save_pretrained(dst)


# -- big_vision SigLIP -> HF (transformers' convert_siglip_to_hf.py) ------------------------
def siglip_config(a: dict):
    from transformers import SiglipConfig

    return SiglipConfig(
        vision_config=dict(hidden_size=a["width"], intermediate_size=a["mlp"], num_attention_heads=a["heads"],
                           num_hidden_layers=a["depth"], image_size=a["image"], patch_size=a["patch"]),
        text_config=dict(hidden_size=a["text_width"], intermediate_size=a["text_mlp"],
                         num_attention_heads=a["text_heads"], num_hidden_layers=a["text_depth"],
                         vocab_size=a["vocab"], max_position_embeddings=a["ctx"], projection_size=a["width"],
                         bos_token_id=None, eos_token_id=1, pad_token_id=1))


def _bv_rename(state: dict, a: dict) -> dict:
    """big_vision names -> SiglipModel names, reshaping as the transformers script does."""
    import numpy as np

    out = {}

    def put(new, old, kind="plain"):
        val = state.pop(old)
        if kind == "dense":
            val = val.T
        elif kind == "qkv":            # (D, H, hd) -> (H*hd, D)
            val = val.reshape(val.shape[0], -1).T
        elif kind == "out":            # (H, hd, D) -> (D, H*hd)
            val = val.reshape(-1, val.shape[-1]).T
        elif kind == "bias":
            val = val.reshape(-1)
        elif kind == "patch":
            val = val.transpose(3, 2, 0, 1)
        elif kind == "pos":
            val = val.reshape(-1, val.shape[-1])
        out[new] = torch.from_numpy(np.ascontiguousarray(val))

    def block(src, dst):
        put(dst + "layer_norm1.weight", src + "LayerNorm_0/scale")
        put(dst + "layer_norm1.bias", src + "LayerNorm_0/bias")
        put(dst + "layer_norm2.weight", src + "LayerNorm_1/scale")
        put(dst + "layer_norm2.bias", src + "LayerNorm_1/bias")
        for n, m in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
            put(f"{dst}self_attn.{m}.weight", f"{src}MultiHeadDotProductAttention_0/{n}/kernel", "qkv")
            put(f"{dst}self_attn.{m}.bias", f"{src}MultiHeadDotProductAttention_0/{n}/bias", "bias")
        put(dst + "self_attn.out_proj.weight", src + "MultiHeadDotProductAttention_0/out/kernel", "out")
        put(dst + "self_attn.out_proj.bias", src + "MultiHeadDotProductAttention_0/out/bias")
        put(dst + "mlp.fc1.weight", src + "MlpBlock_0/Dense_0/kernel", "dense")
        put(dst + "mlp.fc1.bias", src + "MlpBlock_0/Dense_0/bias")
        put(dst + "mlp.fc2.weight", src + "MlpBlock_0/Dense_1/kernel", "dense")
        put(dst + "mlp.fc2.bias", src + "MlpBlock_0/Dense_1/bias")

    i, t = "params/img/", "params/txt/"
    put("vision_model.embeddings.patch_embedding.weight", i + "embedding/kernel", "patch")
    put("vision_model.embeddings.patch_embedding.bias", i + "embedding/bias")
    put("vision_model.embeddings.position_embedding.weight", i + "pos_embedding", "pos")
    for n in range(a["depth"]):
        block(f"{i}Transformer/encoderblock_{n}/", f"vision_model.encoder.layers.{n}.")
    put("vision_model.post_layernorm.weight", i + "Transformer/encoder_norm/scale")
    put("vision_model.post_layernorm.bias", i + "Transformer/encoder_norm/bias")
    h = i + "MAPHead_0/"
    put("vision_model.head.probe", h + "probe")
    qkv = [state.pop(f"{h}MultiHeadDotProductAttention_0/{n}/kernel") for n in ("query", "key", "value")]
    out["vision_model.head.attention.in_proj_weight"] = torch.from_numpy(
        np.concatenate([w.reshape(w.shape[0], -1).T for w in qkv], axis=0))
    qkv_b = [state.pop(f"{h}MultiHeadDotProductAttention_0/{n}/bias") for n in ("query", "key", "value")]
    out["vision_model.head.attention.in_proj_bias"] = torch.from_numpy(np.concatenate([b.reshape(-1) for b in qkv_b]))
    put("vision_model.head.attention.out_proj.weight", h + "MultiHeadDotProductAttention_0/out/kernel", "out")
    put("vision_model.head.attention.out_proj.bias", h + "MultiHeadDotProductAttention_0/out/bias")
    put("vision_model.head.layernorm.weight", h + "LayerNorm_0/scale")
    put("vision_model.head.layernorm.bias", h + "LayerNorm_0/bias")
    put("vision_model.head.mlp.fc1.weight", h + "MlpBlock_0/Dense_0/kernel", "dense")
    put("vision_model.head.mlp.fc1.bias", h + "MlpBlock_0/Dense_0/bias")
    put("vision_model.head.mlp.fc2.weight", h + "MlpBlock_0/Dense_1/kernel", "dense")
    put("vision_model.head.mlp.fc2.bias", h + "MlpBlock_0/Dense_1/bias")

    put("text_model.embeddings.token_embedding.weight", t + "Embed_0/embedding")
    put("text_model.embeddings.position_embedding.weight", t + "pos_embedding", "pos")
    for n in range(a["text_depth"]):
        block(f"{t}Encoder_0/encoderblock_{n}/", f"text_model.encoder.layers.{n}.")
    put("text_model.final_layer_norm.weight", t + "Encoder_0/encoder_norm/scale")
    put("text_model.final_layer_norm.bias", t + "Encoder_0/encoder_norm/bias")
    put("text_model.head.weight", t + "head/kernel", "dense")
    put("text_model.head.bias", t + "head/bias")
    put("logit_scale", "params/t")
    put("logit_bias", "params/b")
    if state:
        raise SystemExit(f"bigvision-to-hf: unmapped {sorted(state)[:5]}")
    return out


@torch.no_grad()
def bigvision_to_hf(npz: str, dst: str) -> None:
    import numpy as np
    from transformers import SiglipModel

    a = json.loads((Path(npz).parent / "bench_arch.json").read_text())
    data = np.load(npz)
    state = {k: data[k] for k in data.files}      # the whole checkpoint in memory, as the script does
    state = _bv_rename(state, a)
    model = SiglipModel(siglip_config(a)).eval()
    _check(*model.load_state_dict(state, strict=False), "bigvision-to-hf")
    del state
    model.save_pretrained(dst)


# -- big_vision SigLIP -> OpenCLIP (open_clip.convert.load_big_vision_weights) ----------------
def _tiny_siglip_openclip(a: dict):
    """A tiny SigLIP in open_clip (timm trunk registered on the fly) for the smoke run."""
    from open_clip.model import CustomTextCLIP
    from timm.models import register_model
    from timm.models.vision_transformer import _create_vision_transformer

    name = "vit_bench_tiny_siglip"

    @register_model
    def vit_bench_tiny_siglip(pretrained=False, **kw):  # noqa: ARG001
        args = dict(patch_size=a["patch"], embed_dim=a["width"], depth=a["depth"], num_heads=a["heads"],
                    mlp_ratio=a["mlp"] / a["width"], class_token=False, global_pool="map", img_size=a["image"])
        return _create_vision_transformer(name, pretrained=False, **dict(args, **kw))

    cfg = dict(embed_dim=a["width"], init_logit_bias=-10,
               vision_cfg=dict(image_size=a["image"], timm_model_name=name, timm_model_pretrained=False,
                               timm_pool="map", timm_proj="none"),
               text_cfg=dict(context_length=a["ctx"], vocab_size=a["vocab"], width=a["text_width"],
                             heads=a["text_heads"], layers=a["text_depth"], mlp_ratio=a["text_mlp"] / a["text_width"],
                             no_causal_mask=True, proj_bias=True, pool_type="last", norm_kwargs={"eps": 1e-6}))
    return CustomTextCLIP(**cfg), cfg


@torch.no_grad()
def bigvision_to_openclip(npz: str, dst: str) -> None:
    import open_clip
    from open_clip.convert import load_big_vision_weights
    from safetensors.torch import save_file

    a = json.loads((Path(npz).parent / "bench_arch.json").read_text())
    if a.get("open_clip"):
        model = open_clip.create_model(a["open_clip"])
        cfg = open_clip.get_model_config(a["open_clip"])
    else:
        model, cfg = _tiny_siglip_openclip(a)
    load_big_vision_weights(model, npz)
    out = Path(dst)
    out.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "open_clip_model.safetensors"))
    (out / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg}, indent=2))


# -- LoRA merge (PEFT) ----------------------------------------------------------------------
@torch.no_grad()
def merge_peft(base: str, adapter: str, dst: str, auto: str = "AutoModelForCausalLM") -> None:
    import warnings

    import transformers
    from peft import PeftModel

    model = getattr(transformers, auto).from_pretrained(base, dtype="auto")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = PeftModel.from_pretrained(model, adapter)
    merged = model.merge_and_unload()
    merged.save_pretrained(dst)


def merge_peft_vlm(base: str, adapter: str, dst: str) -> None:
    merge_peft(base, adapter, dst, auto="AutoModelForImageTextToText")


# -- vision tower extraction ------------------------------------------------------------------
@torch.no_grad()
def extract_visual_openclip(src: str, dst: str) -> None:
    import open_clip
    from safetensors.torch import save_file

    dtype = _safetensors_dtype(Path(src) / "open_clip_model.safetensors")
    model = open_clip.create_model(f"local-dir:{src}", precision=PRECISION[dtype])
    out = Path(dst)
    out.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.visual.state_dict().items()}, str(out / "model.safetensors"))


@torch.no_grad()
def extract_visual_hf(src: str, dst: str) -> None:
    from transformers import CLIPModel, CLIPVisionModelWithProjection

    full = CLIPModel.from_pretrained(src, dtype="auto")
    vision = CLIPVisionModelWithProjection._from_config(full.config.vision_config, dtype=full.dtype)
    state = {f"vision_model.{k}": v for k, v in full.vision_model.state_dict().items()}
    state["visual_projection.weight"] = full.visual_projection.weight
    _check(*vision.load_state_dict(state, strict=False), "extract-visual-hf")
    vision.save_pretrained(dst)


PEERS = {
    "openclip-to-hf": openclip_to_hf,
    "bigvision-to-hf": bigvision_to_hf,
    "bigvision-to-openclip": bigvision_to_openclip,
    "merge-peft": merge_peft,
    "merge-peft-vlm": merge_peft_vlm,
    "extract-visual-openclip": extract_visual_openclip,
    "extract-visual-hf": extract_visual_hf,
}

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in PEERS:
        raise SystemExit(__doc__)
    PEERS[sys.argv[1]](*sys.argv[2:])
