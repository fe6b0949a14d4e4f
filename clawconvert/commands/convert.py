"""``clawconvert convert``: one checkpoint format to another, streamed and optionally verified."""
from __future__ import annotations

import argparse
import sys

from ..hub import add_push_option
from .common import add_output_options, add_source_options

ORDER = 10

HELP = ("convert a CLIP/SigLIP/DINOv2/DINOv3 checkpoint between OpenCLIP, transformers, big_vision, timm and torch hub "
        "(or research code to HF)")
DESCRIPTION = """\
Convert SRC into the format given by --to and write it to the directory DST.

SRC is detected automatically: an OpenCLIP directory (open_clip_config.json +
open_clip_model.safetensors / open_clip_pytorch_model.bin), a transformers directory
(config.json + model.safetensors, sharded or not), a big_vision .npz file, a timm
directory (config.json with `architecture`, as timm's save_for_hf writes it), or an
OpenCLIP checkpoint file (.pt/.bin/.safetensors, training checkpoints with optimizer state
and DDP `module.` prefixes included) together with --model-name or --model-config.
A DINOv2 or DINOv3 torch-hub state dict (dinov2_vits14_pretrain.pth,
dinov3_vitb16_pretrain_lvd1689m-73cec8be.pth ...) takes --model-name with its hub name,
--model-config, or --from original; written with --to original (DST.pth or DST.safetensors).
A DINOv3 file says its architecture in its shapes; its LayerNorm eps and image size are not
in it and default to the published models' (1e-5, 224 px) unless --model-name or
--model-config say otherwise.
SRC may also be hf-hub:org/name[@revision].

Research-code checkpoints convert to their transformers form (--to hf): a Qwen-1 causal LM
(remote-code QWenLMHeadModel) becomes Qwen2ForCausalLM; an original LLaVA 1.5 / 1.6 checkpoint
(haotian-liu llava_llama / llava_mistral / llava_qwen) becomes llava-hf's
LlavaForConditionalGeneration / LlavaNextForConditionalGeneration, with --vision naming its
CLIP tower (the model mm_vision_tower names) when the checkpoint does not hold it.

Nothing is written until the whole conversion has been planned from file headers: every
source tensor must be mapped, every target tensor produced, every shape must agree with the
config. The output appears atomically; the source is never modified."""

EPILOG = """\
examples:
  clawconvert convert fixtures/openclip_tiny out/hf --to hf --verify
  clawconvert convert epoch_32.pt out/hf --to hf --model-name ViT-B-32
  clawconvert convert out/hf out/openclip --to openclip --dtype fp16
  clawconvert convert siglip_base_patch16_224.npz out/hf --to hf --verify
  clawconvert convert out/hf out/siglip.npz --to big_vision --stacked
  clawconvert convert dinov2_vitb14_reg4_pretrain.pth out/hf --to hf --model-name dinov2_vitb14_reg --verify
  clawconvert convert out/hf out/dinov2-timm --to timm --verify
  clawconvert convert out/dinov2-timm out/dinov2_vitb14_reg.pth --to original
  clawconvert convert dinov3_vitb16_pretrain_lvd1689m-73cec8be.pth out/d3 --to hf --model-name dinov3_vitb16 --verify
  clawconvert convert Qwen-7B out/qwen2 --to hf
  clawconvert convert llava-v1.5-7b out/llava-hf --to hf --vision clip-vit-large-patch14-336"""


def register(sub) -> None:
    p = sub.add_parser("convert", help=HELP, description=DESCRIPTION, epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", metavar="SRC", help="source checkpoint (directory, file, or hf-hub:org/name)")
    p.add_argument("dst", metavar="DST", help="output directory, or a .npz file for --to big_vision, a .pth or "
                                              ".safetensors file for --to original "
                                              "(must not exist unless --overwrite)")
    p.add_argument("--to", required=True, metavar="FMT", help="target format: hf, openclip, big_vision, timm or original")
    add_source_options(p)
    add_output_options(p)
    p.add_argument("--vision", metavar="SRC", default=None,
                   help="original LLaVA sources: the CLIP tower (HF directory or hf-hub:) whose config, "
                        "preprocessing and, when the checkpoint lacks them, weights the LLaVA gets")
    p.add_argument("--stacked", nargs="?", const="img,txt", default=None, choices=["img,txt", "txt", "img"],
                   metavar="TOWER", help="--to big_vision: write the stacked (scan) layout, encoderblock/<leaf> "
                                         "with a leading depth axis, in both towers, or in one TOWER only (txt: "
                                         "as SigLIP 2 is released); default: per-layer encoderblock_N/")
    g = p.add_argument_group("verification")
    g.add_argument("--verify", action="store_true",
                   help="run source and output in their own frameworks on the same inputs and compare "
                        "(fails, writing nothing, above the tolerance)")
    g.add_argument("--tolerance", type=float, default=None,
                   help="max abs difference allowed by --verify (default 1e-4 in fp32)")
    add_push_option(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from .. import api
    from ..errors import ClawError
    from ..formats import get_format
    if getattr(args, "push_to", None) and get_format(args.to).writes_file:
        raise ClawError(f"--push-to needs an output directory; --to {args.to} writes one file "
                        f"(push a directory made with --to hf or --to openclip)")
    result = api.convert(args.src, args.dst, to=args.to, src_format=args.src_format, model_name=args.model_name,
                         model_config=args.model_config, dtype=args.dtype, max_shard_size=args.max_shard_size,
                         verify=args.verify, tolerance=args.tolerance, overwrite=args.overwrite,
                         unsafe_pickle=args.unsafe_pickle, progress=not args.quiet and sys.stderr.isatty(),
                         write_options={"stacked": args.stacked}, vision=args.vision)
    print(f"wrote {result.destination} ({result.target_format}, {result.family}): {result.tensors} tensors, "
          f"{result.bytes / 1e6:.1f} MB in {', '.join(result.files)}")
    for note in result.notes:
        print(f"note: {note}")
    if result.verification:
        from ..verify import format_figures
        print(format_figures(result.verification))
    if getattr(args, "push_to", None):
        from ..hub import maybe_push
        maybe_push(args, result.destination)
    return 0
