"""The tokenizer of a GGUF file: what llama.cpp's tokenizer (and transformers' GGUF loader) reads.

Two kinds of Hugging Face fast tokenizer (`tokenizer.json`) are written, each as the GGUF
tokenizer model llama.cpp runs it with:

    tokenizer.json                                     GGUF model  llama.cpp
    BPE over bytes (ByteLevel pre-tokenizer), a split  "gpt2"      BPE: the merges, in rank order,
    regex llama.cpp knows (GPT-2, Llama 3, Qwen,                   after its own copy of the
    SmolLM)                                                        split regex (`pre`)
    BPE with byte fallback over "▁"-spelled text       "llama"     SentencePiece: greedy merging
    (SentencePiece style: Llama 2, Mistral v0.x,                   of the pair whose result has the
    Phi-3, Gemma)                                                  highest score; <0xXX> tokens
                                                                   for bytes not in the vocabulary

A SentencePiece-style `tokenizer.json` keeps the merges but not SentencePiece's piece scores, which
are what llama.cpp's tokenizer merges by. In a SentencePiece BPE model a piece's score is minus
its merge order, so the score written for a token is minus the rank of the first merge that makes
it (`merge_scores`): merging by the highest score is then merging by the lowest rank, which is what
the `tokenizers` BPE does. Tokens no merge makes (characters, bytes, specials) score 0; the merges
are written too (transformers' loader rebuilds the tokenizer from them). Whether a "▁" is put in
front of the text (`add_space_prefix`) comes from the tokenizer's normalizer (Prepend "▁") or its
Metaspace pre-tokenizer (prepend scheme "first"/"always").

Anything else (WordPiece, Unigram, a split regex llama.cpp has no copy of) is refused before
calibration, with what was found.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from omniquant.errors import ExportError

METASPACE = "\u2581"
# llama.cpp's token types
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


@dataclass(frozen=True)
class Vocab:
    """What llama.cpp's tokenizer reads."""

    model: str  # "gpt2": byte-level BPE; "llama": SentencePiece style
    pre: str  # llama.cpp's pre-tokenizer name ("default" for SentencePiece)
    tokens: list[str]
    types: list[int]  # NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE
    merges: list[str]
    special: dict[str, int]  # bos, eos, unk, pad -> id
    add_bos: bool
    add_eos: bool
    chat_template: str | None
    scores: list[float] | None = None  # SentencePiece only: llama.cpp merges by these
    add_space_prefix: bool | None = None  # SentencePiece only


# the split regex of known byte-level BPE tokenizers (tokenizer.json) -> llama.cpp's name
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPLIT_PRE = {_LLAMA3_SPLIT: "llama-bpe", _QWEN2_SPLIT: "qwen2"}


def pre_tokenizer_name(pre: dict[str, Any] | None) -> str | None:
    """llama.cpp's name for a byte-level BPE pre-tokenizer (tokenizer.json's
    `pre_tokenizer`), or None when it is not one llama.cpp reproduces."""
    if pre is None:
        return None
    steps = _steps(pre)
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
        return "smollm" if steps[1].get("use_regex", True) else None
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        pattern = steps[0].get("pattern", {})
        return SPLIT_PRE.get(pattern.get("Regex", ""))
    return None


def _steps(part: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The steps of a normalizer or pre-tokenizer (a Sequence's, or itself)."""
    if not part:
        return []
    if part.get("type") == "Sequence":
        return list(part.get("normalizers") or part.get("pretokenizers") or [])
    return [part]


def sentencepiece_prefix(spec: dict[str, Any]) -> bool | None:
    """Whether a SentencePiece-style tokenizer.json spells spaces as "▁" (the Replace normalizer
    or a Metaspace pre-tokenizer), and if so whether it puts one in front of the text: True or
    False; None when it is not SentencePiece style."""
    normalizer = _steps(spec.get("normalizer"))
    pre = _steps(spec.get("pre_tokenizer"))
    replaces = any(
        s.get("type") == "Replace"
        and s.get("pattern", {}).get("String") == " "
        and s.get("content") == METASPACE
        for s in normalizer
    )
    metaspace = [s for s in pre if s.get("type") == "Metaspace"]
    others = [s for s in pre if s.get("type") not in ("Metaspace", "Split")]
    if others or not (replaces or metaspace):
        return None
    prepends = any(s.get("type") == "Prepend" and s.get("prepend") == METASPACE for s in normalizer)
    for m in metaspace:
        if m.get("replacement", METASPACE) != METASPACE:
            return None
        scheme = m.get("prepend_scheme", "always" if m.get("add_prefix_space", True) else "never")
        prepends = prepends or scheme in ("first", "always")
    return prepends


def _merge_strings(merges: list[Any]) -> list[str]:
    return [m if isinstance(m, str) else " ".join(m) for m in merges]


def merge_scores(vocab: dict[str, int], merges: list[Any]) -> dict[int, float]:
    """SentencePiece scores recovered from BPE merges ("a b" strings or [a, b] pairs): minus the
    rank of the first merge that makes each token (0 for tokens no merge makes)."""
    scores: dict[int, float] = {}
    for rank, merge in enumerate(merges):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        token_id = vocab.get(left + right)
        if token_id is not None and token_id not in scores:
            scores[token_id] = -float(rank + 1)
    return scores


def _special_ids(tokenizer: Any, model_config: Any, n_vocab: int) -> dict[str, int]:
    special: dict[str, int] = {}
    for key in ("bos", "eos", "unk", "pad"):
        value = getattr(tokenizer, f"{key}_token_id", None)
        if value is None:
            value = getattr(model_config, f"{key}_token_id", None)
        if isinstance(value, int) and 0 <= value < n_vocab:
            special[key] = value
    return special


def _kind(spec: dict[str, Any]) -> tuple[str, str, bool | None]:
    """("gpt2", pre-tokenizer name, None) or ("llama", "default", add_space_prefix), or an
    ExportError naming what was found."""
    model = spec["model"]
    if model.get("type") == "BPE" and not model.get("byte_fallback"):
        pre = pre_tokenizer_name(spec.get("pre_tokenizer"))
        if pre is not None:
            return "gpt2", pre, None
    if model.get("type") == "BPE" and model.get("byte_fallback"):
        prefix = sentencepiece_prefix(spec)
        if prefix is not None:
            return "llama", "default", prefix
    raise ExportError(
        "GGUF export writes byte-level BPE tokenizers (GPT-2, Llama 3, Qwen, SmolLM style) and "
        "SentencePiece-style BPE with byte fallback (Llama 2, Mistral v0.x, Phi-3, Gemma); "
        f"this one ({model.get('type')}, byte fallback {bool(model.get('byte_fallback'))}, "
        f"pre-tokenizer {(spec.get('pre_tokenizer') or {}).get('type')}, normalizer "
        f"{(spec.get('normalizer') or {}).get('type')}) is not one llama.cpp reproduces"
    )


def tokenizer_vocab(tokenizer: Any, n_vocab: int, model_config: Any = None) -> Vocab:
    """The GGUF vocabulary of a fast tokenizer, padded with unused tokens up to the embedding's
    `n_vocab` rows; special ids the tokenizer lacks come from the model's config (a padding id,
    say)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ExportError("GGUF export needs a fast (tokenizers) tokenizer")
    spec = json.loads(backend.to_str())
    kind, pre, space_prefix = _kind(spec)
    model = spec["model"]
    piece_ids: dict[str, int] = dict(model["vocab"])
    by_id: dict[int, str] = {i: t for t, i in piece_ids.items()}
    types = {i: NORMAL for i in by_id}
    if kind == "llama":
        for i, t in by_id.items():
            if _BYTE_TOKEN.fullmatch(t):
                types[i] = BYTE
    for added in spec.get("added_tokens", []):
        by_id[added["id"]] = added["content"]
        types[added["id"]] = CONTROL if added.get("special") else USER_DEFINED
    if kind == "llama" and model.get("unk_token") in piece_ids:
        types[piece_ids[model["unk_token"]]] = UNKNOWN  # also when it is an added special
    if by_id and max(by_id) >= n_vocab:
        raise ExportError(f"the tokenizer has ids up to {max(by_id)}, the model {n_vocab} rows")
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(n_vocab)]
    token_types = [types.get(i, UNUSED) for i in range(n_vocab)]
    merges = _merge_strings(model.get("merges", []))
    scores = None
    if kind == "llama":
        by_merge = merge_scores(piece_ids, model.get("merges", []))
        scores = [by_merge.get(i, 0.0) for i in range(n_vocab)]
    special = _special_ids(tokenizer, model_config, n_vocab)
    probe = tokenizer("a")["input_ids"]
    template = getattr(tokenizer, "chat_template", None)
    return Vocab(
        kind,
        pre,
        tokens,
        token_types,
        merges,
        special,
        "bos" in special and probe[:1] == [special["bos"]],
        "eos" in special and probe[-1:] == [special["eos"]],
        template if isinstance(template, str) else None,
        scores,
        space_prefix,
    )


def check_gguf_tokenizer(tokenizer: Any) -> None:
    """Refuse a tokenizer GGUF export cannot write (before calibration)."""
    tokenizer_vocab(tokenizer, 1 + max(tokenizer.get_vocab().values()))


def add_vocab(writer: Any, vocab: Vocab) -> None:
    """The tokenizer: tokens, types, merges (and scores), special ids, BOS/EOS policy, chat
    template."""
    writer.add_tokenizer_model(vocab.model)
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    if vocab.add_space_prefix is not None:
        writer.add_add_space_prefix(vocab.add_space_prefix)
    writer.add_token_merges(vocab.merges)
    adders = {
        "bos": writer.add_bos_token_id,
        "eos": writer.add_eos_token_id,
        "unk": writer.add_unk_token_id,
        "pad": writer.add_pad_token_id,
    }
    for key, token_id in vocab.special.items():
        adders[key](token_id)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)
