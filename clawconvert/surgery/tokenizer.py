"""A base model's tokenizer files: found beside its weights, or built from what the table names.

Most bases carry HF tokenizer files.  A Qwen-1 base carries a tiktoken ranks file instead
(``qwen.tiktoken``), from which :mod:`.tiktoken_bpe` builds a fast ``tokenizer.json`` with the
special tokens the architecture table (``tokenizer:`` in ``mappings/architectures/qwen.yaml``)
fixes; without either, the caller says what is missing.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from ..architectures import Architecture

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt", "chat_template.jinja",
                   "chat_template.json")


def base_tokenizer(base: Path, arch: Architecture, config: dict,
                   scratch: Callable[[], Path]) -> tuple[Path | None, list[str]]:
    """The directory holding BASE's tokenizer: BASE itself, or a fast tokenizer built (in the
    directory ``scratch()`` makes) from a tiktoken file the architecture table names (Qwen-1's
    qwen.tiktoken); None, with a note saying what is missing, when there is neither."""
    if any((base / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")):
        return base, []
    spec = arch.tokenizer
    if not spec:
        return None, []
    ranks = base / spec["tiktoken"]
    if not ranks.is_file():
        return None, [f"{base} has no {spec['tiktoken']}: no tokenizer written (put Qwen-1's {spec['tiktoken']}, "
                      f"which every Qwen-1 checkpoint and the dashscope wheel ship, beside its config.json)"]
    from .tiktoken_bpe import build
    where = scratch()
    build(ranks, spec, where, model_max_length=config.get("seq_length"))
    return where, [f"tokenizer.json built from {spec['tiktoken']} (byte-level BPE, every token checked)"]


def special_token_id(arch: Architecture, token: str) -> int | None:
    """The id of a special token the architecture's tokenizer fixes (Qwen-1: <|extra_0|> is 151646)."""
    spec = arch.tokenizer
    if not spec:
        return None
    names = list(spec.get("special_tokens", []))
    extra = spec.get("extra_tokens")
    if extra:
        names += [extra["format"].format(i=i) for i in range(int(extra["count"]))]
    return int(spec["first_special_id"]) + names.index(token) if token in names else None


def portable_tokenizer_config(out: Path) -> list[str]:
    """Make a transformers-5 ``tokenizer_config.json`` one that transformers 4.x reads too (as
    llama.cpp's converter runs it): a class name both know, ``extra_special_tokens`` as 4.x's
    ``additional_special_tokens`` list, and every added token listed in ``added_tokens_decoder``
    (4.x rebuilds added tokens from it; without it ``<image>`` becomes a pad token)."""
    import json

    from ..io.readers import read_json_file
    cfg_file, tok_file = Path(out) / "tokenizer_config.json", Path(out) / "tokenizer.json"
    if not cfg_file.is_file():
        return []
    config = read_json_file(cfg_file, "tokenizer_config.json")
    changed = []
    if config.get("tokenizer_class") in ("TokenizersBackend", None):
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        changed.append("tokenizer_class")
    extra = config.get("extra_special_tokens")
    if isinstance(extra, list):
        config["additional_special_tokens"] = list(dict.fromkeys([*config.get("additional_special_tokens", []), *extra]))
        del config["extra_special_tokens"]
        changed.append("additional_special_tokens")
    if tok_file.is_file() and "added_tokens_decoder" not in config:
        added = read_json_file(tok_file, "tokenizer.json").get("added_tokens") or []
        config["added_tokens_decoder"] = {
            str(t["id"]): {k: t.get(k, d) for k, d in (("content", ""), ("lstrip", False), ("normalized", False),
                                                       ("rstrip", False), ("single_word", False), ("special", True))}
            for t in added}
        changed.append("added_tokens_decoder")
    if changed:
        cfg_file.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    return changed
