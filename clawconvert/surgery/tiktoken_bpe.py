"""A fast ``tokenizer.json`` from a tiktoken BPE ranks file (Qwen-1's ``qwen.tiktoken``).

tiktoken merges, inside each pre-tokenized piece, the adjacent pair whose concatenation has the
lowest rank, after first taking a piece that is itself a token whole.  The same tokenizer in
Hugging Face ``tokenizers`` terms is byte-level BPE with ``ignore_merges`` (the whole-piece
lookup) and one merge per multi-byte token, found by running that rank-ordered BPE on the
token's own bytes with the tokens ranked below it: the last step's two parts are its merge.
The architecture table gives the rest (``tokenizer:`` in ``mappings/architectures/qwen.yaml``):
the pre-tokenizer pattern, the normaliser, the special tokens and their ids.

:func:`build` checks its result before anyone uses it: every token's bytes encode to that token
alone.  The tests also compare it with tiktoken itself and with the ids the tutorial's own
``QWenTokenizer`` produced.
"""
from __future__ import annotations

import base64
import json
from pathlib import Path

from ..errors import ClawError


def byte_symbols() -> list[str]:
    """GPT-2's byte -> printable character table (what byte-level BPE vocabularies are written in)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return [out[b] for b in range(256)]


def read_ranks(path: Path) -> dict[bytes, int]:
    ranks: dict[bytes, int] = {}
    try:
        lines = Path(path).read_bytes().splitlines()
    except OSError as e:
        raise ClawError(f"{path}: cannot read: {e.strerror or e}") from e
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except (ValueError, TypeError) as e:
            raise ClawError(f"{path}: line {n} is not 'base64-token rank'") from e
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ClawError(f"{path}: ranks are not 0..{len(ranks) - 1} without gaps")
    return ranks


def _merge_of(token: bytes, ranks: dict[bytes, int]) -> tuple[bytes, bytes]:
    """The pair rank-ordered BPE joins last when it builds ``token`` from its bytes."""
    limit = ranks[token]
    parts = [token[i:i + 1] for i in range(len(token))]
    while len(parts) > 2:
        best, at = None, -1
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < limit and (best is None or r < best):
                best, at = r, i
        if best is None:
            break
        parts[at:at + 2] = [parts[at] + parts[at + 1]]
    if len(parts) != 2:
        raise ClawError(f"tiktoken token {token!r} (rank {limit}) cannot be built from lower-ranked tokens")
    return parts[0], parts[1]


def build(ranks_file: Path, spec: dict, out_dir: Path, model_max_length: int | None = None,
          chat_template: str | None = None) -> list[str]:
    """Write ``tokenizer.json`` and ``tokenizer_config.json`` into ``out_dir``; return their names."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    ranks = read_ranks(ranks_file)
    sym = byte_symbols()

    def text(b: bytes) -> str:
        return "".join(sym[x] for x in b)

    vocab = {text(t): r for t, r in ranks.items()}
    merges = [(text(a), text(b)) for a, b in
              (_merge_of(t, ranks) for t, _ in sorted(ranks.items(), key=lambda kv: kv[1]) if len(t) > 1)]
    model = models.BPE(vocab=vocab, merges=merges, ignore_merges=True)
    tok = Tokenizer(model)
    if spec.get("normalizer") == "NFC":
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(spec["pattern"]), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    specials = list(spec.get("special_tokens", []))
    extra = spec.get("extra_tokens")
    if extra:
        specials += [extra["format"].format(i=i) for i in range(int(extra["count"]))]
    first = int(spec.get("first_special_id", len(ranks)))
    if first != len(ranks):
        raise ClawError(f"{ranks_file}: {len(ranks)} ranks, but the table puts the special tokens at {first}")
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    for i, t in enumerate(specials):
        if tok.token_to_id(t) != first + i:
            raise ClawError(f"internal: special token {t} got id {tok.token_to_id(t)}, expected {first + i}")
    _check(tok, ranks, text)
    out_dir = Path(out_dir)
    tok.save(str(out_dir / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length or 32768,
        "eos_token": spec.get("eos_token"), "pad_token": spec.get("pad_token"),
        "bos_token": None, "unk_token": None,
        # both transformers 4.x and 5.x read the added tokens from here
        "added_tokens_decoder": {str(first + i): {"content": t, "lstrip": False, "normalized": False,
                                                  "rstrip": False, "single_word": False, "special": True}
                                 for i, t in enumerate(specials)},
    }
    if chat_template:
        config["chat_template"] = chat_template
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    return ["tokenizer.json", "tokenizer_config.json"]


def _check(tok, ranks: dict[bytes, int], text) -> None:
    """Every token's bytes, through the BPE model alone, give that token and nothing else."""
    model = tok.model
    for token, rank in ranks.items():
        got = model.tokenize(text(token))
        if len(got) != 1 or got[0].id != rank:
            raise ClawError(f"internal: the converted BPE splits token {token!r} (rank {rank}) into "
                            f"{[t.id for t in got]}")
