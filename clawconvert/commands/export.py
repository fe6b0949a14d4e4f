"""``clawconvert export``: a tower as ONNX (onnxruntime, optimum, transformers.js) or an LLM / LLaVA as GGUF (llama.cpp).

The exporters live in :mod:`clawconvert.exporters` (one module per target); this module only
defines the command line.
"""
from __future__ import annotations

import argparse
import sys

from .common import add_source_options

ORDER = 45

HELP = "export for a runtime: a CLIP/SigLIP/DINO tower to ONNX, an HF causal LM or LLaVA to GGUF (llama.cpp)"
DESCRIPTION = """\
Write SRC in a deployment format to the directory DST.  Every output is checked with the
target's own runtime or reader before it is put in place; nothing is written on failure.

--to onnx   one CLIP / SigLIP / DINOv2 / DINOv3 tower for onnxruntime, optimum and
            transformers.js.  SRC is an HF tower directory (CLIPVisionModel[WithProjection],
            SiglipVisionModel, CLIPTextModel[WithProjection], SiglipTextModel,
            Dinov2[WithRegisters]Model, DINOv3ViTModel), or a model in any format
            extract-visual reads (HF CLIPModel / SiglipModel, OpenCLIP, big_vision, timm,
            a torch-hub DINO file), whose --tower (default: visual) is extracted first, with
            its projection.
              DST/model.onnx             input pixel_values (or input_ids), dynamic batch axis
                                         (text: dynamic sequence axis too); outputs
                                         last_hidden_state, pooler_output, then image_embeds /
                                         text_embeds when the tower has a projection
              DST/model_quantized.onnx   with --quantize int8 (onnxruntime dynamic quantisation)
              DST/onnx/                  the same files where transformers.js looks for them
              DST/config.json, preprocessor_config.json, tokenizer files
            onnxruntime runs the file on a batch size other than the exported one and is
            compared with the PyTorch tower: fp32 must agree within --tolerance (1e-4); the
            int8 deviation is measured and printed.

--to gguf   for llama.cpp: an HF causal LM (llama, mistral, qwen2, as merge-lora writes
            them), an HF LLaVA with a CLIP or SigLIP tower, or a native VLM (Qwen2-VL,
            Qwen2.5-VL, Qwen3-VL, Gemma 3, Idefics3 / SmolVLM, LLaVA-NeXT, LLaVA-OneVision).
              DST/model-<type>.gguf      the language model, tokenizer included (SentencePiece
                                         tokenizer.model, or a byte-fallback or byte-level BPE
                                         tokenizer.json; added tokens such as <image> keep their
                                         ids), under the architecture llama.cpp's converter
                                         gives it (llama, qwen2, qwen2vl, qwen3vl, gemma3)
              DST/mmproj-<type>.gguf     vision tower + projector with the clip.* metadata
                                         clip.cpp reads: LLaVA (projector mlp, feature layer,
                                         image mean / std, patch and image size, activation),
                                         Qwen2-VL, Qwen2.5-VL, Qwen3-VL (deepstack mergers
                                         too), Gemma 3, Idefics3 / SmolVLM, LLaVA-NeXT (as
                                         llama.cpp's legacy scripts write it: LLaVA's, plus
                                         grid pinpoints, spatial_unpad, model.image_newline;
                                         mtmd tiles the image but lays it out its own way).
                                         OneVision gets the language model only, with a note
                                         saying why; Qwen3-VL MoE is refused.
            --outtype f32, f16 (default), bf16 or q8_0 (8-bit blocks of 32 for 2-D weights whose
            rows divide by 32; norms, biases and embeddings of positions stay f32, as llama.cpp's
            own converter does).  Tensors stream one at a time from the safetensors headers;
            the files are read back with the gguf reader before they are put in place.
            Run with llama.cpp:  llama-mtmd-cli -m DST/model-f16.gguf --mmproj DST/mmproj-f16.gguf
                                 --image photo.jpg -p "describe the image" --jinja
            CLIP LLaVAs: stock llama.cpp puts the class token after the patches
            (ggml-org/llama.cpp#25814), which breaks every CLIP LLaVA; run a llama.cpp with the
            fix (PR #25844; tools/build_llama_cpp.sh builds one).  SigLIP LLaVAs run on stock."""

EPILOG = """\
examples:
  clawconvert export out/hf out/vision-onnx --to onnx --quantize int8
  clawconvert export fixtures/openclip_tiny out/text-onnx --to onnx --tower text
  clawconvert export out/merged out/merged-gguf --to gguf --outtype q8_0
  clawconvert export out/llava out/llava-gguf --to gguf"""


def register(sub) -> None:
    p = sub.add_parser("export", help=HELP, description=DESCRIPTION, epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", metavar="SRC", help="model directory or checkpoint (or hf-hub:org/name)")
    p.add_argument("dst", metavar="DST", help="output directory (must not exist unless --overwrite)")
    p.add_argument("--to", required=True, choices=["onnx", "gguf"], help="output format")
    g = p.add_argument_group("onnx")
    g.add_argument("--tower", choices=["visual", "text"], default=None,
                   help="which tower of a full model (default: visual)")
    g.add_argument("--quantize", choices=["int8"], default=None,
                   help="also write model_quantized.onnx: int8 weights by onnxruntime dynamic quantisation")
    g.add_argument("--tolerance", type=float, default=None,
                   help="max abs difference of the fp32 ONNX outputs from PyTorch's (default: 1e-4)")
    g.add_argument("--opset", type=int, default=None, help="ONNX opset (default: 18)")
    g = p.add_argument_group("gguf")
    g.add_argument("--outtype", choices=["f32", "f16", "bf16", "q8_0"], default=None,
                   help="tensor type of the weight matrices (default: f16)")
    add_source_options(p)
    g = p.add_argument_group("output")
    g.add_argument("--overwrite", action="store_true",
                   help="replace an existing destination (the old one survives until the new one is complete)")
    g.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..exporters import export
    result = export(args.src, args.dst, args.to, tower=args.tower, quantize=args.quantize, tolerance=args.tolerance,
                    opset=args.opset, outtype=args.outtype, src_format=args.src_format, model_name=args.model_name,
                    model_config=args.model_config, unsafe_pickle=args.unsafe_pickle, overwrite=args.overwrite,
                    progress=not args.quiet and sys.stderr.isatty())
    print(f"wrote {result.destination} ({result.target}, {result.source}): {', '.join(result.files)}")
    for note in result.notes:
        print(f"note: {note}")
    for line in result.summary:
        print(line)
    print("run it with:")
    for line in result.load:
        print(f"    {line}")
    return 0
