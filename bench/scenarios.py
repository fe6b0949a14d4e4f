"""The benchmark scenarios, one small declarative entry each.

A scenario names the synthetic checkpoint it runs on (``source``: a kind understood by
``synth.py`` and the sizes to build), the path inside that checkpoint the tools take
(``src``), and its tools: clawconvert, the peer paths, and the ``cp`` floor.  Argument
templates are filled from::

    {py}      the Python running the bench (the project's venv)
    {claw}    ``{py} -m clawconvert``
    {peers}   bench/peers.py
    {floors}  bench/floors.py (compute floors: the unavoidable arithmetic, without I/O)
    {ckpt}    the cached checkpoint directory
    {src}     the scenario's source path (``src`` filled with {ckpt})
    {dst}     a fresh output path (does not exist yet)
    {weights} the checkpoint's weight files (for cp)

A tool whose ``requires`` is not met by this checkout (a subcommand or a format that has
not landed yet) is reported as "skipped: command not available" and lights up by itself
once it exists.  ``large`` marks the sizes the issue's targets apply to (ViT-L/14 and up,
and the merge).
"""
from __future__ import annotations

from dataclasses import dataclass, field

SYNTH_VERSION = 1   # bump when synth.py writes different bytes: cached checkpoints are rewritten


@dataclass(frozen=True)
class Tool:
    name: str
    role: str                       # "clawconvert" | "peer" | "floor" | "reference" | "compute"
    argv: tuple[str, ...]
    requires: tuple[tuple[str, str], ...] = ()   # ("command", "extract-visual"), ("format", "big_vision")
    note: str = ""


@dataclass(frozen=True)
class Scenario:
    key: str
    number: str
    title: str
    source: str                     # synth.py kind
    sizes: tuple[str, ...]          # full-size run (scenario 1 follows --sizes)
    tiny_sizes: tuple[str, ...]     # smoke run
    src: str
    tools: tuple[Tool, ...]
    large: tuple[str, ...] = ()     # sizes the targets apply to
    follows_sizes: bool = False     # sizes come from --sizes
    largest_size_only: bool = False # runs once, at the largest of --sizes
    wall_vs_cp_target: bool = False
    rss_fraction_target: bool = False
    flatness_target: bool = False
    notes: tuple[str, ...] = field(default_factory=tuple)


# clawconvert fsyncs what it writes (its outputs are durable once it says so), so the floor
# is cp of the same bytes followed by an fsync of the copies; plain cp, which only reaches
# the page cache, is shown next to it for reference.
CP = Tool("cp + fsync (floor)", "floor",
          ("sh", "-c", 'd="$1"; shift; cp -- "$@" "$d"/ && sync -- "$d"/* "$d"', "sh", "{dst}", "{weights}"),
          note="cp of the checkpoint's weight files, then fsync of the copies: reading and writing the "
               "same bytes once, durably (clawconvert fsyncs its outputs)")
CP_CACHE = Tool("cp (page cache only)", "reference", ("cp", "--", "{weights}", "{dst}/"),
                note="plain cp: the writes reach the page cache only (no fsync), like the peers' save_pretrained")


LORA_PRODUCTS = Tool("LoRA products alone (B @ A for every pair, no output)", "compute",
                     ("{py}", "{floors}", "lora-products", "{ckpt}/adapter"),
                     note="python + numpy reading the adapter and computing every float32 B @ A on all cores, "
                          "writing nothing: the arithmetic any merge of this adapter has to do")


def claw(*args: str, requires=()) -> Tool:
    return Tool("clawconvert", "clawconvert", ("{claw}",) + args, requires=requires)


def peer(name: str, label: str, *args: str) -> Tool:
    return Tool(f"peer: {label}", "peer", ("{py}", "{peers}", name) + args)


SCENARIOS: tuple[Scenario, ...] = (
    Scenario(
        key="openclip-hf", number="1", title="OpenCLIP -> HF CLIP",
        source="openclip", sizes=("B32", "L14", "H14", "bigG"), tiny_sizes=("tiny", "tiny2"),
        src="{ckpt}", follows_sizes=True, large=("L14", "H14", "bigG"),
        wall_vs_cp_target=True, rss_fraction_target=True, flatness_target=True,
        tools=(
            claw("convert", "{src}", "{dst}", "--to", "hf", "-q"),
            peer("openclip-to-hf", "open_clip model + CLIPModel + copy + save_pretrained", "{src}", "{dst}"),
            CP,
            CP_CACHE,
        ),
    ),
    Scenario(
        key="bigvision-hf", number="2a", title="big_vision SigLIP .npz -> HF",
        source="big_vision", sizes=("So400m",), tiny_sizes=("tiny",), src="{ckpt}/siglip.npz",
        large=("So400m",), wall_vs_cp_target=True,
        tools=(
            claw("convert", "{src}", "{dst}", "--to", "hf", "-q", requires=(("format", "big_vision"),)),
            peer("bigvision-to-hf", "whole .npz + SiglipModel + save_pretrained (transformers' script)",
                 "{src}", "{dst}"),
            CP,
            CP_CACHE,
        ),
    ),
    Scenario(
        key="bigvision-openclip", number="2b", title="big_vision SigLIP .npz -> OpenCLIP",
        source="big_vision", sizes=("So400m",), tiny_sizes=("tiny",), src="{ckpt}/siglip.npz",
        large=("So400m",), wall_vs_cp_target=True,
        tools=(
            claw("convert", "{src}", "{dst}", "--to", "openclip", "-q", requires=(("format", "big_vision"),)),
            peer("bigvision-to-openclip", "open_clip model + load_big_vision_weights + save", "{src}", "{dst}"),
            CP,
            CP_CACHE,
        ),
    ),
    Scenario(
        key="merge-lora", number="3", title="merge-lora: r=64 LoRA on all linear layers into a 1B bf16 LLM",
        source="llm-lora", sizes=("1B",), tiny_sizes=("tiny",), src="{ckpt}", large=("1B",),
        tools=(
            claw("merge-lora", "{ckpt}/base", "{ckpt}/adapter", "{dst}", "-q", requires=(("command", "merge-lora"),)),
            peer("merge-peft", "PEFT merge_and_unload + save_pretrained", "{ckpt}/base", "{ckpt}/adapter", "{dst}"),
            CP,
            LORA_PRODUCTS,
            CP_CACHE,
        ),
    ),
    Scenario(
        key="merge-lora-vlm", number="3b",
        title="merge-lora: LoRA on both towers + merger into a Qwen2.5-VL-3B-shaped bf16 VLM",
        source="vlm-lora", sizes=("3B",), tiny_sizes=("tiny",), src="{ckpt}", large=("3B",),
        tools=(
            claw("merge-lora", "{ckpt}/base", "{ckpt}/adapter", "{dst}", "-q", requires=(("command", "merge-lora"),)),
            peer("merge-peft-vlm", "PEFT merge_and_unload + save_pretrained (AutoModelForImageTextToText)",
                 "{ckpt}/base", "{ckpt}/adapter", "{dst}"),
            CP,
            LORA_PRODUCTS,
            CP_CACHE,
        ),
    ),
    Scenario(
        key="extract-visual", number="4", title="extract-visual from the largest OpenCLIP checkpoint",
        source="openclip", sizes=("bigG",), tiny_sizes=("tiny",), src="{ckpt}", largest_size_only=True,
        large=("L14", "H14", "bigG"),
        tools=(
            claw("extract-visual", "{src}", "{dst}", "--to", "openclip", "-q",
                 requires=(("command", "extract-visual"),)),
            peer("extract-visual-openclip", "open_clip full model, save model.visual", "{src}", "{dst}"),
            CP,
            CP_CACHE,
        ),
    ),
)

BY_KEY = {s.key: s for s in SCENARIOS}
