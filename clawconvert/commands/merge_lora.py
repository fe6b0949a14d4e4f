"""``clawconvert merge-lora``: PEFT LoRA adapter (+ connector + vision tower) -> merged HF checkpoint, streamed.

The work is done by :func:`clawconvert.surgery.merge_lora.merge_lora` (also
``clawconvert.merge_lora``); this module only defines the command line.
"""
from __future__ import annotations

import argparse
import sys

from ..hub import add_push_option, maybe_push
from .common import add_output_options

ORDER = 40

HELP = "merge a PEFT LoRA adapter into its base model, or assemble a runnable HF LLaVA from LoRA + connector + vision tower"
DESCRIPTION = """\
Merge the PEFT LoRA adapter ADAPTER into the Hugging Face model BASE and write the result
to the directory OUT, streaming tensor by tensor: resident memory stays near one base tensor
(plus the adapter's factors), never the whole model, and output shards are written as they
fill.

BASE is an HF causal LM directory (llama, qwen2, mistral, gemma, ...) or a vision-language
model (LLaVA, LLaVA-NeXT, LLaVA-OneVision, Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Gemma 3, Idefics3,
SmolVLM: the tables in mappings/architectures/); ADAPTER a PEFT directory (adapter_config.json
+ adapter_model.safetensors or .bin).

The merge is PEFT's own arithmetic, computed in float32 and cast once: scale alpha/r
(alpha/sqrt(r) with use_rslora), rank_pattern / alpha_pattern, fan_in_fan_out,
lora_bias, DoRA magnitudes, LoRA on embeddings; modules_to_save, trained biases and saved
embeddings replace the base's tensors.  Adapter names are matched through every layout of
BASE's architecture table, so adapters saved under transformers 4 and 5 module names
(language_model.model.* / model.language_model.*, visual.* / model.visual.*) both fit, LoRA
on a VLM's vision tower and a connector in modules_to_save merge like the rest, and a LoRA
trained on the standalone LLM fits the VLM's language model.

Tied input/output embeddings: the output reproduces the unmerged PEFT model.  When the
adapter changes both sides the same way (peft's ensure_weight_tying) the tie is kept and
the change is applied once (peft's own merge_and_unload gives W + 2*delta there).  When
only one side changes (say a LoRA on embed_tokens), the head is written as its own tensor
and tie_word_embeddings is set to false.  The command prints which it did.

Without --vision, OUT is the merged model in BASE's own architecture, with every other file
BASE has (tokenizer, chat template, processor and generation configs, license) copied byte
for byte, in the key layout the most readers load (see `clawconvert inspect BASE`; --layout
picks another).

With --vision and a connector, OUT is an HF LlavaForConditionalGeneration directory.
--vision is an HF CLIP/SigLIP directory (full model or vision model), read in place, or
any source `clawconvert extract-visual` accepts (OpenCLIP, big_vision), whose image tower
is extracted to a scratch directory beside OUT first.
  * weights: vision_tower.vision_model.*, multi_modal_projector.linear_{1,2}.*,
    language_model.model.*, language_model.lm_head.weight (when untied) -- the llava-hf
    layout that transformers 4.x and 5.x and vLLM load;
  * the connector is Linear-GELU-Linear, from --connector (an nn.Sequential state dict
    such as other_params.bin holding feature_proj.state_dict(), LLaVA's mm_projector.bin /
    non_lora_trainables.bin, or HF multi_modal_projector.*) or from the adapter's
    modules_to_save;
  * the image token (--image-token) is added to the tokenizer as one special token; if its
    id is past the embedding rows, embed_tokens (and an untied lm_head) grow, new rows at
    the mean row;
  * config.json: image_token_index = that id, vision_feature_layer (default -1: the last
    layer's hidden state), vision_feature_select_strategy ('default' drops CLS: CLIP;
    'full': SigLIP), image_seq_length, projector_hidden_act gelu;
  * a LlavaProcessor (image processor, tokenizer, chat template) that AutoProcessor loads
    and that expands each <image> to one token per image feature.

Bad input -- adapter shapes that do not fit BASE, target modules BASE lacks, a connector
whose widths do not match the vision tower or the LLM, an unknown connector layout -- stops
with one line naming the tensor, before anything is written.  Sources are never modified."""

EPILOG = """\
examples:
  clawconvert merge-lora Qwen2-0.5B my-lora out/merged --dtype bf16
  clawconvert merge-lora Qwen2-0.5B my-lora out/llava --vision clip-vit-large-patch14 \\
      --connector other_params.bin
  clawconvert merge-lora llava-1.5-7b-hf my-llava-lora out/llava-merged
  clawconvert merge-lora Qwen2.5-VL-3B-Instruct my-vl-lora out/merged --layout transformers-5
  clawconvert merge-lora hf-hub:Qwen/Qwen2-0.5B hf-hub:me/qwen-lora out/merged --push-to me/qwen-merged"""

def register(sub) -> None:
    p = sub.add_parser("merge-lora", help=HELP, description=DESCRIPTION, epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("base", metavar="BASE", help="HF causal LM or vision-language model directory (or hf-hub:org/name)")
    p.add_argument("adapter", metavar="ADAPTER", help="PEFT LoRA adapter directory (or hf-hub:org/name)")
    p.add_argument("out", metavar="OUT", help="output directory (must not exist unless --overwrite)")
    g = p.add_argument_group("LLaVA assembly")
    g.add_argument("--vision", metavar="SRC",
                   help="vision tower: an HF CLIPModel/SiglipModel or CLIPVisionModel/SiglipVisionModel directory, "
                        "or any source extract-visual accepts (OpenCLIP, big_vision); makes OUT an HF "
                        "LlavaForConditionalGeneration")
    g.add_argument("--connector", metavar="FILE",
                   help="Linear-GELU-Linear connector weights (.bin/.pt/.safetensors): nn.Sequential '0.*, 2.*', "
                        "LLaVA 'mm_projector.{0,2}.*' or HF 'multi_modal_projector.linear_{1,2}.*' "
                        "(default: the adapter's modules_to_save)")
    g.add_argument("--image-token", default=None, metavar="TOKEN",
                   help="image placeholder token, added to the tokenizer when missing (default: <image>; for a "
                        "Qwen-1 base <|extra_0|>, the VLM-learning tutorial's replace token)")
    g.add_argument("--vision-feature-layer", type=int, default=None, metavar="N",
                   help="vision hidden state fed to the connector (default: the adapter folder's original-LLaVA "
                        "config.json mm_vision_select_layer, else -1, the last layer)")
    g.add_argument("--vision-feature-select-strategy", choices=["default", "full"], default=None,
                   help="'default' drops the CLS token, 'full' keeps all (default: 'default' for CLIP, "
                        "'full' for SigLIP)")
    g.add_argument("--chat-template", metavar="FILE",
                   help="Jinja chat template for the processor (default: a built-in one with image items, "
                        "ChatML when the tokenizer has <|im_start|>)")
    p.add_argument("--layout", metavar="NAME",
                   help="key layout of OUT, one of its architecture table's layouts (mappings/architectures/; "
                        "`clawconvert inspect BASE` lists them); default: the table's write layout, the one most "
                        "readers load (e.g. llava-hf: transformers 4.x and 5.x, vLLM)")
    add_output_options(p)
    v = p.add_argument_group("verification")
    v.add_argument("--verify", action="store_true",
                   help="before OUT is put in place, run it and the unmerged model (BASE + ADAPTER in peft; for "
                        "an assembled LLaVA, vision tower -> connector -> peft LLM) on the same inputs and compare "
                        "(fails, writing nothing, above the tolerance); remote-code sources are not run")
    v.add_argument("--tolerance", type=float, default=None, help="max abs logit difference for --verify (1e-4)")
    p.add_argument("--unsafe-pickle", action="store_true",
                   help="load .bin/.pt files without weights_only (runs code from the file: trusted files only)")
    add_push_option(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..surgery.merge_lora import merge_lora
    result = merge_lora(
        args.base, args.adapter, args.out, connector=args.connector, vision=args.vision, dtype=args.dtype,
        image_token=args.image_token, vision_feature_layer=args.vision_feature_layer,
        vision_feature_select_strategy=args.vision_feature_select_strategy, chat_template=args.chat_template,
        layout=args.layout, max_shard_size=args.max_shard_size, overwrite=args.overwrite, unsafe_pickle=args.unsafe_pickle,
        progress=not args.quiet and sys.stderr.isatty(), verify=args.verify, tolerance=args.tolerance)
    m = result.merge
    print(f"wrote {result.destination} ({result.architecture}): {result.tensors} tensors, "
          f"{result.bytes / 1e6:.1f} MB in {', '.join(result.files)}")
    print(f"merged {m['lora_modules']} LoRA modules (scales {m['scales']}; DoRA {m['dora_modules']}, "
          f"embedding {m['embedding_modules']}), {len(m['replaced_from_adapter'])} tensors taken from the adapter")
    if result.tie.get("tied"):
        print(result.tie["detail"])
    for note in result.notes:
        print(f"note: {note}")
    if result.verification:
        from ..surgery.verify_merge import format_figures
        print(format_figures(result.verification))
    maybe_push(args, result.destination)
    return 0
