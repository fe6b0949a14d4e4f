"""``clawconvert extract-visual`` / ``extract-text``: one tower of a CLIP/SigLIP model, alone."""
from __future__ import annotations

import argparse
import sys

from ..hub import add_push_option
from .common import add_output_options, add_source_options

ORDER = 30

COMMANDS = {
    "visual": dict(
        name="extract-visual", targets=("hf", "timm", "openclip"),
        help="cut the image tower out of a CLIP/SigLIP checkpoint (transformers, timm or OpenCLIP)",
        outputs="""\
outputs (--to):
  hf        CLIPVisionModel (CLIPVisionModelWithProjection with --with-projection) or
            SiglipVisionModel: config.json, model.safetensors with vision_model.* keys
            (the layout transformers 4.x/5.x, vLLM and LLaVA's vision_tower read),
            preprocessor_config.json.
  timm      a timm ViT checkpoint (model.safetensors + timm's config.json) for the
            registered architecture that holds the tower exactly, e.g.
            vit_base_patch32_clip_224; the command prints the architecture and the
            timm.create_model(...) line that loads it. Without --with-projection the
            model has no head (num_classes=0); with it, the head is the projection.
  openclip  the tower's OpenCLIP tensors (visual.*) with open_clip_config.json; built
            with open_clip's own tower builder (the command prints the lines).

A DINOv2 or DINOv3 model (hf, timm or torch-hub original) is one image tower:
extract-visual converts it whole (hf: Dinov2Model / Dinov2WithRegistersModel /
DINOv3ViTModel; timm: its vit_*_dinov2 / vit_*_dinov3 architecture, loadable with
timm.create_model("local-dir:DST")), and --verify compares the output with the source,
each in its own framework.""",
        examples="""\
examples:
  clawconvert extract-visual fixtures/openclip_tiny out/vision --verify
  clawconvert extract-visual hf-hub:openai/clip-vit-base-patch32 out/b32-timm --to timm
  clawconvert extract-visual epoch_32.pt out/vision --model-name ViT-B-32 --with-projection"""),
    "text": dict(
        name="extract-text", targets=("hf", "openclip"),
        help="cut the text tower out of a CLIP/SigLIP checkpoint (transformers or OpenCLIP)",
        outputs="""\
outputs (--to):
  hf        CLIPTextModel (CLIPTextModelWithProjection with --with-projection) or
            SiglipTextModel: config.json, model.safetensors with text_model.* keys,
            tokenizer files when the source has them (the CLIP BPE is built offline).
  openclip  the tower's OpenCLIP text tensors with open_clip_config.json; built with
            open_clip's own text tower builder (the command prints the lines).""",
        examples="""\
examples:
  clawconvert extract-text fixtures/openclip_tiny out/text --with-projection --verify
  clawconvert extract-text out/hf out/text-openclip --to openclip"""),
}

DESCRIPTION = """\
Write the {tower} tower of SRC, alone, to the directory DST.

SRC is any full checkpoint `clawconvert convert` reads: an OpenCLIP directory or
checkpoint file (with --model-name / --model-config), a transformers CLIPModel /
SiglipModel directory, a big_vision .npz, or hf-hub:org/name[@revision].

Only the tower's tensors are read (from a sharded source, only the shards that hold
them), one at a time. The projection into the shared embedding space is left out
unless --with-projection is given (OpenCLIP towers always keep it: open_clip's tower
modules own it). Nothing is written when SRC has no {tower} tower or its family is
unknown; the output appears atomically.

{outputs}

--verify runs the extracted tower and the full model in the same framework on the same
inputs and fails (writing nothing) unless the outputs are bit-identical{timm}. When SRC
is in another framework, the full model is also converted and compared with SRC, as
`convert --verify` does."""


def register(sub) -> None:
    for tower, spec in COMMANDS.items():
        p = sub.add_parser(spec["name"], help=spec["help"], epilog=spec["examples"],
                           description=DESCRIPTION.format(tower="image" if tower == "visual" else "text",
                                                          outputs=spec["outputs"],
                                                          timm="; a timm tower is compared with transformers within "
                                                               "--tolerance" if tower == "visual" else ""),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("src", metavar="SRC", help="full source checkpoint (directory, file, or hf-hub:org/name)")
        p.add_argument("dst", metavar="DST", help="output directory (must not exist unless --overwrite)")
        p.add_argument("--to", choices=spec["targets"], default="hf",
                       help=f"output format: {', '.join(spec['targets'])} (default: hf)")
        p.add_argument("--with-projection", action="store_true",
                       help="keep the projection into the shared image-text embedding space "
                            + ("(CLIPVisionModelWithProjection; the timm head)" if tower == "visual"
                               else "(CLIPTextModelWithProjection)"))
        add_source_options(p)
        add_output_options(p)
        g = p.add_argument_group("verification")
        g.add_argument("--verify", action="store_true",
                       help="require the tower's outputs to equal the full model's bit for bit (timm: within "
                            "--tolerance of transformers); loads the full model, so it needs its memory")
        if "timm" in spec["targets"]:
            g.add_argument("--tolerance", type=float, default=None,
                           help="--verify --to timm: max abs difference from transformers (default 1e-4)")
        add_push_option(p)
        p.set_defaults(func=run, tower=tower)


def run(args) -> int:
    from ..surgery.extract import extract, format_figures
    result = extract(args.src, args.dst, args.tower, args.to, with_projection=args.with_projection,
                     src_format=args.src_format, model_name=args.model_name, model_config=args.model_config,
                     dtype=args.dtype, max_shard_size=args.max_shard_size, verify=args.verify,
                     tolerance=getattr(args, "tolerance", None), overwrite=args.overwrite, unsafe_pickle=args.unsafe_pickle,
                     progress=not args.quiet and sys.stderr.isatty())
    what = "timm architecture " if result.target_format == "timm" else ""
    print(f"wrote {result.destination} ({result.family} {result.tower} tower as {what}{result.model_class}): "
          f"{result.tensors} tensors, {result.bytes / 1e6:.1f} MB in {', '.join(result.files)}")
    if result.target_format == "timm":
        print(f"timm architecture: {result.model_class}")
    for note in result.notes:
        print(f"note: {note}")
    if result.verification:
        print(format_figures(result.verification))
    print("load it with:")
    for line in result.load:
        print(f"    {line}")
    if getattr(args, "push_to", None):
        from ..hub import maybe_push
        maybe_push(args, result.destination)
    return 0
