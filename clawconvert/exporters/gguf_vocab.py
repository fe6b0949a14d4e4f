"""The tokenizer of an HF model directory as GGUF ``tokenizer.ggml.*`` metadata, as llama.cpp's converter writes it.

Three vocabularies, tried in this order (convert_hf_to_gguf.py's ``_set_vocab_sentencepiece``,
``_set_vocab_llama_hf`` and ``_set_vocab_gpt2``):

* ``tokenizer.model`` (SentencePiece): pieces, scores and types from the model itself;
* ``tokenizer.json`` holding a SentencePiece-style BPE with ``byte_fallback`` (what
  transformers writes for a Llama tokenizer when ``tokenizer.model`` is not kept): pieces by
  id; a merged piece's score is minus the rank of the merge that makes it, which gives
  llama.cpp's score-driven SentencePiece merging the same order as the BPE merges;
* ``tokenizer.json`` holding a byte-level BPE (GPT-2 / Qwen2 / Llama 3): tokens and merges,
  with llama.cpp's pre-tokenizer named by the architecture table.

Added tokens come from ``tokenizer.json``'s ``added_tokens`` (ids and the ``special`` flag),
else ``tokenizer_config.json``'s ``added_tokens_decoder``, else ``added_tokens.json``; special
ones are CONTROL tokens, the others USER_DEFINED.  The list is padded to the embedding rows
with ``[PAD<i>]`` (UNUSED), as the converter does.  Special token ids, ``add_bos``/``add_eos``
and the chat template are read by gguf-py's own ``SpecialVocab``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ClawError
from ..io.readers import read_json_file


@dataclass
class Vocab:
    model: str                     # tokenizer.ggml.model: llama (SentencePiece) | gpt2 (byte-level BPE)
    pre: str                       # tokenizer.ggml.pre
    tokens: list[str]
    scores: list[float]
    types: list[int]               # gguf.TokenType values
    merges: list[str] = field(default_factory=list)
    origin: str = ""               # which file, for messages and the manifest


def read_vocab(directory: Path, rows: int, bpe_pre: str) -> Vocab:
    """The vocabulary of ``directory``, padded to ``rows`` (the embedding's rows)."""
    directory = Path(directory)
    tokenizer_json = directory / "tokenizer.json"
    data = read_json_file(tokenizer_json, "tokenizer file") if tokenizer_json.is_file() else None
    if (directory / "tokenizer.model").is_file():
        vocab = _sentencepiece(directory / "tokenizer.model")
    elif data is not None and _model(data).get("type") == "BPE" and _model(data).get("byte_fallback"):
        vocab = _spm_bpe(data)
    elif data is not None and _model(data).get("type") == "BPE" and (data.get("decoder") or {}).get("type") == "ByteLevel":
        vocab = _byte_level_bpe(data, bpe_pre)
    else:
        raise ClawError(f"{directory}: no tokenizer llama.cpp can read: expected tokenizer.model (SentencePiece) "
                        f"or a tokenizer.json holding a byte-fallback or byte-level BPE")
    _add_added_tokens(vocab, directory, data)
    if len(vocab.tokens) > rows:
        raise ClawError(f"{directory}: the tokenizer has {len(vocab.tokens)} tokens but the embedding only {rows} rows")
    _pad(vocab, rows)
    return vocab


def _model(data: dict) -> dict:
    model = data.get("model")
    return model if isinstance(model, dict) else {}


def _token_types():
    import gguf
    return gguf.TokenType


def _sentencepiece(path: Path) -> Vocab:
    from sentencepiece import SentencePieceProcessor

    T = _token_types()
    sp = SentencePieceProcessor()
    try:
        sp.LoadFromFile(str(path))
    except Exception as e:
        raise ClawError(f"{path}: not a SentencePiece model ({str(e).splitlines()[0][:200]})") from e
    tokens, scores, types = [], [], []
    for i in range(sp.vocab_size()):
        tokens.append(sp.IdToPiece(i))
        scores.append(float(sp.GetScore(i)))
        kind = T.NORMAL
        if sp.IsUnknown(i):
            kind = T.UNKNOWN
        elif sp.IsControl(i):
            kind = T.CONTROL
        elif sp.IsUnused(i):
            kind = T.UNUSED
        elif sp.IsByte(i):
            kind = T.BYTE
        types.append(int(kind))
    return Vocab("llama", "default", tokens, scores, types, origin="tokenizer.model (SentencePiece)")


def _by_id(vocab: dict[str, int], origin: str) -> list[str]:
    tokens: list[str | None] = [None] * len(vocab)
    for piece, i in vocab.items():
        if not isinstance(i, int) or not 0 <= i < len(vocab) or tokens[i] is not None:
            raise ClawError(f"{origin}: token ids are not 0..{len(vocab) - 1}, each once")
        tokens[i] = piece
    return tokens  # type: ignore[return-value]


def _merge_pairs(model: dict) -> list[tuple[str, str]]:
    pairs = []
    for m in model.get("merges") or []:
        a, b = m.split(" ", 1) if isinstance(m, str) else m
        pairs.append((a, b))
    return pairs


def _spm_bpe(data: dict) -> Vocab:
    T = _token_types()
    model = _model(data)
    tokens = _by_id(model.get("vocab") or {}, "tokenizer.json")
    index = {t: i for i, t in enumerate(tokens)}
    scores = [0.0] * len(tokens)
    for rank, (a, b) in enumerate(_merge_pairs(model)):
        made = index.get(a + b)
        if made is not None and scores[made] == 0.0:
            scores[made] = -float(rank + 1)
    types = [int(T.BYTE if len(t) == 6 and t.startswith("<0x") and t.endswith(">") else T.NORMAL) for t in tokens]
    unk = model.get("unk_token")
    if unk in index:
        types[index[unk]] = int(T.UNKNOWN)
    return Vocab("llama", "default", tokens, scores, types,
                 origin="tokenizer.json (SentencePiece BPE with byte fallback; scores from the merge ranks)")


def _byte_level_bpe(data: dict, pre: str) -> Vocab:
    T = _token_types()
    model = _model(data)
    tokens = _by_id(model.get("vocab") or {}, "tokenizer.json")
    merges = [f"{a} {b}" for a, b in _merge_pairs(model)]
    return Vocab("gpt2", pre, tokens, [0.0] * len(tokens), [int(T.NORMAL)] * len(tokens), merges,
                 origin=f"tokenizer.json (byte-level BPE, pre-tokenizer '{pre}')")


def _added_tokens(directory: Path, data: dict | None) -> list[tuple[int, str, bool]]:
    if data is not None and isinstance(data.get("added_tokens"), list):
        return [(int(t["id"]), str(t["content"]), bool(t.get("special"))) for t in data["added_tokens"]]
    config = directory / "tokenizer_config.json"
    decoder = read_json_file(config, "tokenizer config").get("added_tokens_decoder") if config.is_file() else None
    if isinstance(decoder, dict):
        return [(int(i), str(t["content"]), bool(t.get("special"))) for i, t in decoder.items()]
    added = directory / "added_tokens.json"
    if added.is_file():
        return [(int(i), str(t), False) for t, i in read_json_file(added, "added tokens file").items()]
    return []


def _add_added_tokens(vocab: Vocab, directory: Path, data: dict | None) -> None:
    T = _token_types()
    for i, content, special in sorted(_added_tokens(directory, data)):
        if i >= len(vocab.tokens):
            _pad(vocab, i)
            vocab.tokens.append(content)
            vocab.scores.append(-1000.0)
            vocab.types.append(int(T.CONTROL if special else T.USER_DEFINED))
        elif vocab.tokens[i] == content or vocab.tokens[i].startswith("[PAD"):
            vocab.tokens[i] = content
            if special:
                vocab.types[i] = int(T.CONTROL)
            elif vocab.types[i] == int(T.UNUSED):
                vocab.types[i] = int(T.USER_DEFINED)
        else:
            raise ClawError(f"{directory}: added token {content!r} has id {i}, which the vocabulary gives to "
                            f"{vocab.tokens[i]!r}")


def _pad(vocab: Vocab, rows: int) -> None:
    T = _token_types()
    for i in range(len(vocab.tokens), rows):
        vocab.tokens.append(f"[PAD{i}]")
        vocab.scores.append(-1000.0)
        vocab.types.append(int(T.UNUSED))


def add_to_writer(writer: Any, vocab: Vocab, directory: Path) -> dict[str, Any]:
    """Write the vocabulary, special ids, add_bos/eos and chat template; returns what was written."""
    import gguf

    writer.add_tokenizer_model(vocab.model)
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_scores(vocab.scores)
    writer.add_token_types(vocab.types)
    if vocab.merges:
        writer.add_token_merges(vocab.merges)
    special = gguf.SpecialVocab(str(directory), load_merges=False, n_vocab=len(vocab.tokens))
    special.add_to_gguf(writer, quiet=True)
    return {"origin": vocab.origin, "model": vocab.model, "pre": vocab.pre, "tokens": len(vocab.tokens),
            "special_token_ids": dict(special.special_token_ids), "add_special_token": dict(special.add_special_token),
            "chat_template": special.chat_template is not None}
