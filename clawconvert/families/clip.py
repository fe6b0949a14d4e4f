"""CLIP ViT family: canonical keys are transformers ``CLIPModel``'s; tables in ``mappings/clip/``.

Config translation OpenCLIP ``model_cfg`` <-> ``CLIPConfig`` is exact:

====================================  ======================================================
OpenCLIP                              CLIPConfig
====================================  ======================================================
``embed_dim``                         ``projection_dim``
``quick_gelu``                        ``hidden_act`` ``quick_gelu`` (else exact ``gelu``)
``vision_cfg.width / head_width``     ``vision_config.num_attention_heads``
``int(width * mlp_ratio)``            ``intermediate_size`` (bigG: 1664 * 4.9231 -> 8192)
``norm_kwargs.eps`` (default 1e-5)    ``layer_norm_eps``
``image_size``, ``patch_size``        ``image_size``, ``patch_size``
``text_cfg.context_length``           ``text_config.max_position_embeddings``
``text_cfg.pool_type`` argmax         ``eos_token_id`` = 49407 on the CLIP BPE vocabulary
                                      (EOT is the largest id, so first-EOT == argmax);
                                      2 (transformers' legacy argmax pooling) otherwise
``text_cfg.pool_type`` eos, eos_id    ``eos_token_id`` = eos_id (eos_id 2 is refused: HF
                                      reads 2 as legacy argmax pooling)
pad 0 (open_clip's tokenizer)         ``pad_token_id`` 49407: HF pads with EOT (as OpenAI's
                                      tokenizers do); ids after EOT never change outputs
====================================  ======================================================

Options transformers' CLIP cannot express are refused before anything is written, with
the option named (:data:`BLOCKERS`).
"""
from __future__ import annotations

import gzip
import json
import math
from functools import lru_cache
from pathlib import Path
from typing import Any

from ..deps import installed, need
from ..errors import ClawError
from . import Extras, Family, FormatCodec, Shapes, custom_block_blockers

CLIP_BPE_VOCAB = 49408
CLIP_EOT = 49407
CLIP_BOS = 49406
OPENCLIP_LN_EPS = 1e-5

# (tower, option, is_blocking(value), why) -- each row names a config option that has no
# lossless transformers CLIPModel equivalent.
BLOCKERS: list[tuple[str, str, Any, str]] = [
    ("vision_cfg", "layers", lambda v: not isinstance(v, int), "a ModifiedResNet (RN50...) image tower"),
    ("vision_cfg", "timm_model_name", bool, "a timm image tower (only SigLIP trunks convert, as the siglip family)"),
    ("vision_cfg", "ls_init_value", lambda v: v is not None, "LayerScale in the image tower"),
    ("vision_cfg", "attentional_pool", bool, "an attentional pooler in the image tower"),
    ("vision_cfg", "no_ln_pre", bool, "no pre-LayerNorm in the image tower (CLIPA)"),
    ("vision_cfg", "pool_type", lambda v: v not in (None, "tok"), "image pooling other than the class token"),
    ("vision_cfg", "final_ln_after_pool", bool, "LayerNorm after pooling in the image tower"),
    ("vision_cfg", "pos_embed_type", lambda v: v not in (None, "learnable"), "non-learnable image position embeddings"),
    ("vision_cfg", "act_kwargs", bool, "custom activation arguments in the image tower"),
    *custom_block_blockers("vision_cfg", "image"),
    ("vision_cfg", "input_patchnorm", bool, "patch normalisation before the image patch embedding"),
    ("text_cfg", "hf_model_name", bool, "a Hugging Face text encoder tower (hf-text)"),
    ("text_cfg", "ls_init_value", lambda v: v is not None, "LayerScale in the text tower"),
    ("text_cfg", "embed_cls", bool, "a CLS token in the text tower (CoCa)"),
    ("text_cfg", "no_causal_mask", bool, "a text tower without causal mask (CLIPA)"),
    ("text_cfg", "use_pad_mask", bool, "a padding mask in the text tower"),
    ("text_cfg", "pool_type", lambda v: v not in (None, "argmax", "eos"), "text pooling other than argmax/eos"),
    ("text_cfg", "final_ln_after_pool", bool, "LayerNorm after pooling in the text tower"),
    ("text_cfg", "proj_type", lambda v: v not in (None, "linear"), "a text projection other than linear"),
    ("text_cfg", "proj_bias", bool, "a bias on the text projection"),
    ("text_cfg", "act_kwargs", bool, "custom activation arguments in the text tower"),
    *custom_block_blockers("text_cfg", "text"),
    ("", "multimodal_cfg", bool, "a multimodal text decoder (CoCa)"),
    ("", "init_logit_bias", lambda v: v is not None, "a logit bias (SigLIP-style loss); CLIPModel has none"),
]


def _check_representable(cfg: dict) -> None:
    for tower, option, blocks, why in BLOCKERS:
        part = cfg.get(tower, {}) if tower else cfg
        if option in part and blocks(part[option]):
            where = f"{tower}.{option}" if tower else option
            raise ClawError(f"not representable as transformers CLIPModel because {where}={part[option]!r}: {why}")
    for tower in ("vision_cfg", "text_cfg"):
        nk = cfg.get(tower, {}).get("norm_kwargs") or {}
        if set(nk) - {"eps"}:
            raise ClawError(f"not representable as transformers CLIPModel because {tower}.norm_kwargs={nk!r}")
    img = cfg["vision_cfg"].get("image_size", 224)
    if isinstance(img, (list, tuple)) and len(set(img)) != 1:
        raise ClawError(f"not representable as transformers CLIPModel because vision_cfg.image_size={img!r} is not square")
    patch = cfg["vision_cfg"].get("patch_size", 16)
    if isinstance(patch, (list, tuple)) and len(set(patch)) != 1:
        raise ClawError(f"not representable as transformers CLIPModel because vision_cfg.patch_size={patch!r} is not square")


def _first(v: Any) -> int:
    return int(v[0]) if isinstance(v, (list, tuple)) else int(v)


def _eps(tower_cfg: dict) -> float:
    return float((tower_cfg.get("norm_kwargs") or {}).get("eps", OPENCLIP_LN_EPS))


def openclip_to_config(model_cfg: dict):
    """OpenCLIP ``model_cfg`` -> a ``CLIPConfig``-like :class:`~clawconvert.hfconfig.HFConfig`
    (raises ClawError when not representable)."""
    from ..hfconfig import make

    _check_representable(model_cfg)
    v, t = model_cfg["vision_cfg"], model_cfg["text_cfg"]
    act = "quick_gelu" if model_cfg.get("quick_gelu") else "gelu"
    vw = int(v.get("width", 768))
    v_heads, rem = divmod(vw, int(v.get("head_width", 64)))
    if rem:
        raise ClawError(f"vision_cfg.width={vw} is not a multiple of head_width={v.get('head_width', 64)}")
    tw = int(t.get("width", 512))
    vocab = int(t.get("vocab_size", CLIP_BPE_VOCAB))
    pool = t.get("pool_type", "argmax")
    if pool == "eos":
        eos = int(t.get("eos_id", 2))
        if eos == 2:
            raise ClawError("not representable as transformers CLIPModel because text_cfg.pool_type='eos' with eos_id=2: "
                            "transformers treats eos_token_id 2 as legacy argmax pooling")
    else:  # argmax over token ids
        eos = CLIP_EOT if vocab == CLIP_BPE_VOCAB and not t.get("hf_tokenizer_name") else 2
    E = int(model_cfg["embed_dim"])
    vision = dict(hidden_size=vw, intermediate_size=int(vw * float(v.get("mlp_ratio", 4.0))),
                  num_hidden_layers=int(v.get("layers", 12)), num_attention_heads=v_heads,
                  image_size=_first(v.get("image_size", 224)), patch_size=_first(v.get("patch_size", 16)),
                  hidden_act=act, layer_norm_eps=_eps(v), projection_dim=E, num_channels=3)
    text = dict(vocab_size=vocab, hidden_size=tw, intermediate_size=int(tw * float(t.get("mlp_ratio", 4.0))),
                num_hidden_layers=int(t.get("layers", 12)), num_attention_heads=int(t.get("heads", 8)),
                max_position_embeddings=int(t.get("context_length", 77)), hidden_act=act,
                layer_norm_eps=_eps(t), projection_dim=E,
                pad_token_id=CLIP_EOT if vocab == CLIP_BPE_VOCAB else int(t.get("pad_id", 0)),
                bos_token_id=CLIP_BOS if vocab == CLIP_BPE_VOCAB else 0, eos_token_id=eos)
    return make("clip", text_config=text, vision_config=vision, projection_dim=E)


def _mlp_ratio(width: int, intermediate: int) -> float:
    """A float ratio that open_clip's ``int(width * mlp_ratio)`` turns back into ``intermediate``."""
    ratio = intermediate / width
    for _ in range(4):
        if int(width * ratio) == intermediate:
            return ratio
        ratio = math.nextafter(ratio, math.inf)
    raise ClawError(f"intermediate_size {intermediate} cannot be written as int({width} * mlp_ratio)")


def config_to_openclip(config) -> dict:
    """``CLIPConfig`` -> OpenCLIP ``model_cfg`` (raises ClawError when not representable)."""
    v, t = config.vision_config, config.text_config
    if v.hidden_act != t.hidden_act or v.hidden_act not in ("gelu", "quick_gelu"):
        raise ClawError(f"not representable in OpenCLIP because hidden_act is {v.hidden_act!r} (vision) / "
                        f"{t.hidden_act!r} (text): open_clip uses one of gelu / quick_gelu for both towers")
    if v.hidden_size % v.num_attention_heads:
        raise ClawError("vision hidden_size is not a multiple of num_attention_heads")
    vision: dict[str, Any] = dict(image_size=v.image_size, layers=v.num_hidden_layers, width=v.hidden_size,
                                  head_width=v.hidden_size // v.num_attention_heads,
                                  mlp_ratio=_mlp_ratio(v.hidden_size, v.intermediate_size), patch_size=v.patch_size)
    text: dict[str, Any] = dict(context_length=t.max_position_embeddings, vocab_size=t.vocab_size,
                                width=t.hidden_size, heads=t.num_attention_heads, layers=t.num_hidden_layers,
                                mlp_ratio=_mlp_ratio(t.hidden_size, t.intermediate_size))
    eos = t.eos_token_id
    if not (eos == 2 or (eos == CLIP_EOT and t.vocab_size == CLIP_BPE_VOCAB)):
        text.update(pool_type="eos", eos_id=int(eos))
    for part, cfg in ((vision, v), (text, t)):
        if not math.isclose(cfg.layer_norm_eps, OPENCLIP_LN_EPS, rel_tol=0, abs_tol=1e-12):
            part["norm_kwargs"] = {"eps": cfg.layer_norm_eps}
    out = {"embed_dim": config.projection_dim, "vision_cfg": vision, "text_cfg": text}
    if v.hidden_act == "quick_gelu":
        out["quick_gelu"] = True
    return out


def claims_openclip(model_cfg: dict) -> bool:
    """CLIP claims every OpenCLIP config that is not a SigLIP (timm SigLIP trunk / logit bias)."""
    v = model_cfg.get("vision_cfg", {})
    return "siglip" not in str(v.get("timm_model_name") or "").lower() and model_cfg.get("init_logit_bias") is None


# ------------------------------------------------------------------------------------
# HF side files: preprocessor_config.json and the CLIP BPE tokenizer, built offline
# ------------------------------------------------------------------------------------
_INTERPOLATION = {"bicubic": 3, "bilinear": 2, "nearest": 0, "lanczos": 1}
# open_clip.constants.OPENAI_DATASET_MEAN / _STD (tests/test_hfconfig.py compares them)
OPENAI_DATASET_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_DATASET_STD = (0.26862954, 0.26130258, 0.27577711)
BOS_TOKEN, EOS_TOKEN = "<|startoftext|>", "<|endoftext|>"


def write_json(path: Path, data: dict) -> None:
    """A JSON side file the way transformers' ``save_pretrained`` writes it (sorted, indent 2)."""
    Path(path).write_text(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def write_preprocessor(out_dir: Path, image_size: int, preprocess: dict) -> list[str]:
    """``preprocessor_config.json`` of a ``CLIPImageProcessor`` (what its ``save_pretrained`` writes)."""
    notes = []
    mode = preprocess.get("resize_mode", "shortest")
    if mode == "longest":
        notes.append("open_clip resize_mode 'longest' (pad to square) has no CLIPImageProcessor equivalent; "
                     "wrote shortest-edge resize + center crop")
    interp = preprocess.get("interpolation", "bicubic")
    squash = mode == "squash"
    write_json(Path(out_dir) / "preprocessor_config.json", {
        "crop_size": {"height": image_size, "width": image_size},
        "do_center_crop": not squash, "do_convert_rgb": True, "do_normalize": True, "do_rescale": True,
        "do_resize": True, "image_mean": list(preprocess.get("mean", OPENAI_DATASET_MEAN)),
        "image_processor_type": "CLIPImageProcessor", "image_std": list(preprocess.get("std", OPENAI_DATASET_STD)),
        "resample": _INTERPOLATION.get(interp, 3), "rescale_factor": 1 / 255,
        "size": {"height": image_size, "width": image_size} if squash else {"shortest_edge": image_size}})
    return notes


def open_clip_dir() -> Path:
    """open_clip's installed package directory, found without importing open_clip (torch)."""
    import importlib.util
    need("open_clip", to="reading open_clip's built-in model configs and BPE vocabulary")
    return Path(list(importlib.util.find_spec("open_clip").submodule_search_locations)[0])


def bytes_to_unicode() -> dict[int, str]:
    """open_clip's (and OpenAI's) reversible byte -> printable character table of the CLIP BPE."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(2 ** 8):
        if b not in bs:
            bs.append(b)
            cs.append(2 ** 8 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


@lru_cache(maxsize=1)
def clip_bpe() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The CLIP BPE vocabulary and merges from open_clip's shipped file, the way its tokenizer builds them."""
    with gzip.open(open_clip_dir() / "bpe_simple_vocab_16e6.txt.gz") as f:
        merges = f.read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    pairs = [tuple(m.split()) for m in merges]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(p) for p in pairs] + [BOS_TOKEN, EOS_TOKEN]
    return {tok: i for i, tok in enumerate(vocab)}, pairs


def clip_bpe_files(out_dir: Path) -> tuple[Path, Path]:
    """vocab.json + merges.txt from open_clip's shipped BPE file."""
    vocab, pairs = clip_bpe()
    vocab_file, merges_file = out_dir / "vocab.json", out_dir / "merges.txt"
    vocab_file.write_text(json.dumps(vocab, ensure_ascii=False))
    merges_file.write_text("#version: 0.2\n" + "\n".join(" ".join(p) for p in pairs) + "\n")
    return vocab_file, merges_file


def clip_backend_tokenizer(vocab: dict[str, int], merges: list[tuple[str, str]]):
    """The ``tokenizers`` pipeline transformers' ``CLIPTokenizer`` builds (no torch needed)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE

    tok = Tokenizer(BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                        end_of_word_suffix="</w>", fuse_unk=False, unk_token=EOS_TOKEN))
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                           normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""),
                             behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (BOS_TOKEN, EOS_TOKEN)])
    tok.post_processor = processors.RobertaProcessing((EOS_TOKEN, vocab[EOS_TOKEN]), (BOS_TOKEN, vocab[BOS_TOKEN]),
                                                      trim_offsets=False, add_prefix_space=False)
    return tok


# tokenizer.json, vocab.json and merges.txt are the same bytes for every model on the CLIP BPE
BPE_FILES = ("tokenizer.json", "vocab.json", "merges.txt")
BPE_FILES_LAYOUT = 1   # bump when the files written here change: cached copies are rebuilt


def build_clip_bpe_files(out_dir: Path) -> None:
    """Write :data:`BPE_FILES` for open_clip's BPE into ``out_dir``."""
    clip_bpe_files(out_dir)
    vocab, pairs = clip_bpe()
    clip_backend_tokenizer(vocab, pairs).save(str(Path(out_dir) / "tokenizer.json"))


def cached_clip_bpe_files() -> Path | None:
    """A folder holding :data:`BPE_FILES`, built once per BPE file and ``tokenizers`` version in
    the user's cache (``CLAWCONVERT_CACHE``, else ``$XDG_CACHE_HOME/clawconvert``): building them
    costs 0.15-0.2 s of CPU, which every OpenCLIP -> HF conversion would pay beside the tensor
    stream.  None when the cache cannot be written (the files are then built in place)."""
    import hashlib
    import os
    import shutil
    import tempfile

    import tokenizers
    bpe = open_clip_dir() / "bpe_simple_vocab_16e6.txt.gz"
    key = hashlib.sha256(bpe.read_bytes() + f"|{tokenizers.__version__}|{BPE_FILES_LAYOUT}".encode()).hexdigest()[:16]
    root = Path(os.environ.get("CLAWCONVERT_CACHE") or
                Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "clawconvert")
    folder = root / f"clip-bpe-{key}"
    if all((folder / n).is_file() for n in BPE_FILES):
        return folder
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".clip-bpe-", dir=root))
        build_clip_bpe_files(tmp)
        try:
            tmp.rename(folder)   # atomic: another process building the same files at once is harmless
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError:
        return None
    return folder if all((folder / n).is_file() for n in BPE_FILES) else None


def write_clip_tokenizer(out_dir: Path, context_length: int) -> None:
    """The CLIP BPE tokenizer as transformers 5 saves a ``CLIPTokenizer``: tokenizer.json (fast),
    tokenizer_config.json, and vocab.json + merges.txt for slow/legacy loaders."""
    import shutil

    out_dir = Path(out_dir)
    cached = cached_clip_bpe_files()
    if cached is None:
        build_clip_bpe_files(out_dir)
    else:
        for name in BPE_FILES:
            shutil.copyfile(cached / name, out_dir / name)
    # pad with EOT like OpenAI's own HF tokenizers: "!" (open_clip's pad id 0) would be matched
    # as a special token inside text and change the ids of any "!"; padding after EOT never
    # changes the outputs (causal attention, pooling at the first EOT)
    write_json(out_dir / "tokenizer_config.json", {
        "backend": "tokenizers", "bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "model_max_length": context_length,
        "pad_token": EOS_TOKEN, "tokenizer_class": "CLIPTokenizer", "unk_token": EOS_TOKEN})


def read_hf_preprocess(src_dir: Path) -> dict:
    """HF ``preprocessor_config.json`` -> open_clip-style ``preprocess_cfg``."""
    path = Path(src_dir) / "preprocessor_config.json"
    if not (path.exists() or path.is_symlink()):
        return {}
    from ..io.readers import read_json_file
    p = read_json_file(path, "preprocessor config")  # one-line errors: empty, a directory, bad or deep JSON
    if not isinstance(p, dict):
        raise ClawError(f"{path}: not a JSON object")
    inv = {v: k for k, v in _INTERPOLATION.items()}
    out: dict[str, Any] = {}
    for key, name in (("image_mean", "mean"), ("image_std", "std")):
        if key in p:
            v = p[key]
            v = [v] * 3 if isinstance(v, (int, float)) and not isinstance(v, bool) else v
            if not (isinstance(v, list) and v and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)):
                raise ClawError(f"{path}: '{key}' must be a list of numbers (got {json.dumps(p[key])[:60]})")
            out[name] = tuple(v)
    if "resample" in p:
        out["interpolation"] = inv.get(p["resample"], "bicubic") if isinstance(p["resample"], int) else "bicubic"
    size = p.get("size") or {}
    if isinstance(size, dict) and "height" in size and not p.get("do_center_crop", True):
        out["resize_mode"] = "squash"
    else:
        out["resize_mode"] = "shortest"
    return out


class ClipFamily(Family):
    name = "clip"
    hf_model_types = ("clip",)
    towers = {"visual": ("vision_model.", "visual_projection."), "text": ("text_model.", "text_projection.")}
    timm_architectures = "vit_*_clip_*"     # timm ViTs holding CLIP image towers (pre_norm=True)

    def __init__(self) -> None:
        super().__init__()
        self.codecs["openclip"] = FormatCodec(read=openclip_to_config, write=config_to_openclip, claims=claims_openclip)

    def hf_architecture(self, config) -> str:
        return "CLIPModel"

    def canonical_shapes(self, config) -> dict[str, tuple[int, ...]]:
        """``CLIPModel``'s state dict, from the config (tests compare it with the model on ``meta``)."""
        t, v = config.text_config, config.vision_config
        T, D = t.hidden_size, v.hidden_size
        P = v.patch_size
        grid = v.image_size // v.patch_size
        s = Shapes()
        s.add("logit_scale", ())
        s.add("text_model.embeddings.token_embedding.weight", (t.vocab_size, T))
        s.add("text_model.embeddings.position_embedding.weight", (t.max_position_embeddings, T))
        s.encoder("text_model.encoder", t, norm_first=False)
        s.norm("text_model.final_layer_norm", T)
        s.add("vision_model.embeddings.class_embedding", (D,))
        s.add("vision_model.embeddings.patch_embedding.weight", (D, v.num_channels, P, P))
        s.add("vision_model.embeddings.position_embedding.weight", (grid * grid + 1, D))
        s.norm("vision_model.pre_layrnorm", D)
        s.encoder("vision_model.encoder", v, norm_first=False)
        s.norm("vision_model.post_layernorm", D)
        s.linear("visual_projection", config.projection_dim, D, bias=False)
        s.linear("text_projection", config.projection_dim, T, bias=False)
        return dict(s)

    def params(self, config) -> dict[str, Any]:
        return {"vision_layers": config.vision_config.num_hidden_layers,
                "text_layers": config.text_config.num_hidden_layers,
                "text_prefix": "",
                "D": config.vision_config.hidden_size, "T": config.text_config.hidden_size}

    def write_hf_extras(self, out_dir: Path, config, extras: Extras) -> list[str]:
        return (self.write_hf_tower_extras(out_dir, config, extras, "visual")
                + self.write_hf_tower_extras(out_dir, config, extras, "text"))

    # -- towers --------------------------------------------------------------------------
    def tower_config(self, config, tower: str):
        import copy
        sub = copy.deepcopy(config.vision_config if tower == "visual" else config.text_config)
        sub.projection_dim = config.projection_dim   # the *WithProjection classes read it here
        return sub

    def tower_architecture(self, tower: str, with_projection: bool) -> str:
        name = {"visual": "CLIPVisionModel", "text": "CLIPTextModel"}[tower]
        return name + ("WithProjection" if with_projection else "")

    def write_hf_tower_extras(self, out_dir: Path, config, extras: Extras, tower: str) -> list[str]:
        if tower == "visual":
            return write_preprocessor(out_dir, config.vision_config.image_size, extras.preprocess)
        if extras.tokenizer_dir is not None:
            return copy_tokenizer(extras.tokenizer_dir, out_dir)
        if config.text_config.vocab_size == CLIP_BPE_VOCAB and extras.tokenizer_note is None:
            if not installed("open_clip"):  # the core install: the weights convert, the vocabulary is not here
                return ["no tokenizer files written: the CLIP BPE vocabulary is read from open_clip, "
                        "which is not installed (pip install 'clawconvert[verify]')"]
            write_clip_tokenizer(out_dir, config.text_config.max_position_embeddings)
            return []
        return [extras.tokenizer_note or "no tokenizer files written: the text vocabulary is not CLIP's BPE"]


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "spiece.model", "tokenizer.model", "added_tokens.json")


def copy_tokenizer(src: Path, dst: Path) -> list[str]:
    import shutil
    copied = [n for n in TOKENIZER_FILES if (Path(src) / n).is_file()]
    for n in copied:
        shutil.copyfile(Path(src) / n, dst / n)
    return [] if copied else [f"no tokenizer files found in {src}"]


FAMILY = ClipFamily()
