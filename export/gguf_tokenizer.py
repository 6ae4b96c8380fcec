"""Hugging Face tokenizer files rebuilt from GGUF metadata (`tokenizers` only, no transformers).

Two GGUF tokenizer models are understood:

- `gpt2`: byte-level BPE. Vocab + merges come straight from the file; the pre-tokenizer
  (the regex llama.cpp splits text with) is chosen by `tokenizer.ggml.pre`.
- `llama`: SentencePiece-style BPE with byte fallback (`<0xNN>` tokens). GGUF keeps only
  vocab + scores; merges are rebuilt the way SentencePiece ranks them: a pair merges when
  the merged piece is in the vocab, higher merged-piece score first.

A GGUF that embeds the original `tokenizer.huggingface.json` is used as is.
"""

from __future__ import annotations

import json
from typing import Any

from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
)

from export.config import ExportError
from export.gguf_reader import GGUFCheckpoint

# llama.cpp token types (tokenizer.ggml.token_type)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# The regexes llama.cpp uses per `tokenizer.ggml.pre` (llama-vocab.cpp), as HF Split patterns.
_LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _gpt2_pre() -> pre_tokenizers.PreTokenizer:
    # ByteLevel's built-in regex is GPT-2's.
    return pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)


def _digits_then_gpt2() -> pre_tokenizers.PreTokenizer:
    # llama.cpp: split off every \p{N} on its own, then the GPT-2 regex.
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), _gpt2_pre()])


def _split_then_bytes(pattern: str) -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
        ]
    )


# tokenizer.ggml.pre -> (pre-tokenizer factory, ignore_merges, add_bos default)
_BPE_PRE = {
    "default": (_gpt2_pre, False, False),
    "gpt-2": (_gpt2_pre, False, False),
    "smollm": (_digits_then_gpt2, False, False),
    "starcoder": (_digits_then_gpt2, False, False),
    "refact": (_digits_then_gpt2, False, False),
    # llama.cpp's LLAMA3 pre-type also skips merges for words already in the vocab.
    "llama-bpe": (lambda: _split_then_bytes(_LLAMA3_REGEX), True, True),
    "llama3": (lambda: _split_then_bytes(_LLAMA3_REGEX), True, True),
    "llama-v3": (lambda: _split_then_bytes(_LLAMA3_REGEX), True, True),
    "qwen2": (lambda: _split_then_bytes(_QWEN2_REGEX), False, False),
}


def build_tokenizer(ckpt: GGUFCheckpoint) -> Tokenizer:
    """The `tokenizers.Tokenizer` equivalent of the GGUF's tokenizer metadata.

    Raises:
        ExportError: unknown `tokenizer.ggml.model` or `tokenizer.ggml.pre`, or missing fields.
    """
    hf_json = ckpt.metadata.get("tokenizer.huggingface.json")
    if hf_json:
        return Tokenizer.from_str(hf_json)
    kind = ckpt.metadata.get("tokenizer.ggml.model")
    if kind == "gpt2":
        tok = _byte_level_bpe(ckpt)
    elif kind == "llama":
        tok = _sentencepiece_bpe(ckpt)
    else:
        raise ExportError(
            f"{ckpt.path}: tokenizer.ggml.model {kind!r} is not supported (supported: gpt2, llama)"
        )
    _add_special_tokens(tok, ckpt)
    tok.post_processor = _post_processor(ckpt)
    return tok


def tokenizer_files(ckpt: GGUFCheckpoint) -> dict[str, dict[str, Any]]:
    """`tokenizer.json`, `tokenizer_config.json`, `generation_config.json` as JSON-able dicts."""
    tok = build_tokenizer(ckpt)
    tokens = ckpt.tokens()

    def token(key: str) -> str | None:
        i = ckpt.metadata.get(key)
        return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None

    cfg: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": token("tokenizer.ggml.bos_token_id"),
        "eos_token": token("tokenizer.ggml.eos_token_id"),
        "unk_token": token("tokenizer.ggml.unknown_token_id"),
        "pad_token": token("tokenizer.ggml.padding_token_id"),
        "add_bos_token": add_bos_token(ckpt),
        "add_eos_token": bool(ckpt.metadata.get("tokenizer.ggml.add_eos_token", False)),
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(ckpt.metadata.get("llama.context_length", 2048)),
    }
    template = ckpt.metadata.get("tokenizer.chat_template")
    if template:
        cfg["chat_template"] = template
    return {
        "tokenizer.json": json.loads(tok.to_str()),
        "tokenizer_config.json": cfg,
        "generation_config.json": generation_config(ckpt),
    }


def add_bos_token(ckpt: GGUFCheckpoint) -> bool:
    """tokenizer.ggml.add_bos_token, defaulting the way llama.cpp does per tokenizer."""
    value = ckpt.metadata.get("tokenizer.ggml.add_bos_token")
    if value is not None:
        return bool(value)
    if ckpt.metadata.get("tokenizer.ggml.model") == "llama":
        return True
    entry = _BPE_PRE.get(ckpt.metadata.get("tokenizer.ggml.pre", "default"))
    return bool(entry and entry[2])


def eos_token_ids(ckpt: GGUFCheckpoint) -> list[int]:
    """Every id that ends generation: eos, then eot / eom when the GGUF names them."""
    ids: list[int] = []
    for key in ("eos_token_id", "eot_token_id", "eom_token_id"):
        value = ckpt.metadata.get(f"tokenizer.ggml.{key}")
        if value is not None and int(value) not in ids:
            ids.append(int(value))
    return ids


def generation_config(ckpt: GGUFCheckpoint) -> dict[str, Any]:
    cfg: dict[str, Any] = {}
    bos = ckpt.metadata.get("tokenizer.ggml.bos_token_id")
    if bos is not None:
        cfg["bos_token_id"] = int(bos)
    eos = eos_token_ids(ckpt)
    if eos:
        cfg["eos_token_id"] = eos[0] if len(eos) == 1 else eos
    pad = ckpt.metadata.get("tokenizer.ggml.padding_token_id")
    if pad is not None:
        cfg["pad_token_id"] = int(pad)
    # Sampling defaults the model's publisher baked into the GGUF (general.sampling.*).
    sampling = {
        "temperature": "general.sampling.temp",
        "top_p": "general.sampling.top_p",
        "top_k": "general.sampling.top_k",
        "min_p": "general.sampling.min_p",
        "repetition_penalty": "general.sampling.penalty_repeat",
    }
    for key, gguf_key in sampling.items():
        if ckpt.metadata.get(gguf_key) is not None:
            cfg[key] = ckpt.metadata[gguf_key]
    if "temperature" in cfg:
        cfg["do_sample"] = cfg["temperature"] > 0
    return cfg


# -- the two tokenizer models ----------------------------------------------------------


def _byte_level_bpe(ckpt: GGUFCheckpoint) -> Tokenizer:
    pre = ckpt.metadata.get("tokenizer.ggml.pre", "default")
    if pre not in _BPE_PRE:
        raise ExportError(
            f"{ckpt.path}: tokenizer.ggml.pre {pre!r} is not supported "
            f"(supported: {', '.join(_BPE_PRE)})"
        )
    make_pre, ignore_merges, _ = _BPE_PRE[pre]
    merges = ckpt.merges()
    if merges is None:
        raise ExportError(f"{ckpt.path}: tokenizer.ggml.merges is missing (required for gpt2)")
    vocab = {t: i for i, t in enumerate(ckpt.tokens())}
    tok = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=[tuple(m.split(" ", 1)) for m in merges],
            ignore_merges=ignore_merges,
        )
    )
    tok.pre_tokenizer = make_pre()
    tok.decoder = decoders.ByteLevel()
    return tok


def _sentencepiece_bpe(ckpt: GGUFCheckpoint) -> Tokenizer:
    tokens = ckpt.tokens()
    scores = ckpt.scores()
    if scores is None:
        raise ExportError(f"{ckpt.path}: tokenizer.ggml.scores is missing (required for llama)")
    types = ckpt.token_types() or [NORMAL] * len(tokens)
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = ckpt.merges()
    pairs = (
        [tuple(m.split(" ", 1)) for m in merges]
        if merges
        else sentencepiece_merges(tokens, scores, types)
    )
    unk_id = ckpt.metadata.get("tokenizer.ggml.unknown_token_id")
    unk = tokens[int(unk_id)] if unk_id is not None else None
    tok = Tokenizer(
        models.BPE(vocab=vocab, merges=pairs, unk_token=unk, fuse_unk=True, byte_fallback=True)
    )
    # llama.cpp escapes ' ' as '▁' and, with add_space_prefix, prepends one to every text
    # fragment (the start, and after each special token): a normalizer applied per segment
    # between added tokens does exactly that (Metaspace would skip text already starting
    # with a space, breaking " hello" round trips).
    prefix = bool(ckpt.metadata.get("tokenizer.ggml.add_space_prefix", True))
    replace = normalizers.Replace(" ", "▁")
    tok.normalizer = (
        normalizers.Sequence([normalizers.Prepend("▁"), replace]) if prefix else replace
    )
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    tok.decoder = decoders.Sequence(steps)
    return tok


def sentencepiece_merges(
    tokens: list[str], scores: list[float], types: list[int]
) -> list[tuple[str, str]]:
    """BPE merges equivalent to SentencePiece's score-ranked piece merging.

    Every split of a vocab piece into two vocab pieces is a merge; merges rank by the merged
    piece's score (highest first), ties by the parts' scores.
    """
    mergeable = {t: i for i, t in enumerate(tokens) if types[i] in (NORMAL, USER_DEFINED)}
    ranked: list[tuple[float, float, float, int, str, str]] = []
    for piece, i in mergeable.items():
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            li, ri = mergeable.get(left), mergeable.get(right)
            if li is not None and ri is not None:
                ranked.append((-scores[i], -scores[li], -scores[ri], i, left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


# -- special tokens and BOS ----------------------------------------------------------------


def _add_special_tokens(tok: Tokenizer, ckpt: GGUFCheckpoint) -> None:
    tokens = ckpt.tokens()
    types = ckpt.token_types()
    if types is None:  # no types: at least keep bos / eos / unk / pad whole
        special_ids = {
            int(ckpt.metadata[k])
            for k in (
                "tokenizer.ggml.bos_token_id",
                "tokenizer.ggml.eos_token_id",
                "tokenizer.ggml.unknown_token_id",
                "tokenizer.ggml.padding_token_id",
            )
            if ckpt.metadata.get(k) is not None
        }
        types = [CONTROL if i in special_ids else NORMAL for i in range(len(tokens))]
    special = [
        AddedToken(tokens[i], special=True, normalized=False)
        for i, t in enumerate(types)
        if t == CONTROL
    ]
    user = [
        AddedToken(tokens[i], special=False, normalized=False)
        for i, t in enumerate(types)
        if t == USER_DEFINED
    ]
    if special:
        tok.add_special_tokens(special)
    if user:
        tok.add_tokens(user)


def _post_processor(ckpt: GGUFCheckpoint) -> processors.PostProcessor | None:
    tokens = ckpt.tokens()
    steps: list[processors.PostProcessor] = []
    if ckpt.metadata.get("tokenizer.ggml.model") == "gpt2":
        steps.append(processors.ByteLevel(trim_offsets=False))
    bos_id = ckpt.metadata.get("tokenizer.ggml.bos_token_id")
    eos_id = ckpt.metadata.get("tokenizer.ggml.eos_token_id")
    add_bos = add_bos_token(ckpt) and bos_id is not None
    add_eos = bool(ckpt.metadata.get("tokenizer.ggml.add_eos_token", False)) and eos_id is not None
    if add_bos or add_eos:
        bos = tokens[int(bos_id)] if add_bos else None
        eos = tokens[int(eos_id)] if add_eos else None

        def seq(piece: str, type_id: int) -> str:
            parts = [f"{bos}:{type_id}"] if bos else []
            parts.append(f"{piece}:{type_id}")
            if eos:
                parts.append(f"{eos}:{type_id}")
            return " ".join(parts)

        special = [(t, int(i)) for t, i in ((bos, bos_id), (eos, eos_id)) if t]
        steps.append(
            processors.TemplateProcessing(
                single=seq("$A", 0),
                pair=f"{seq('$A', 0)} {seq('$B', 1)}",
                special_tokens=special,
            )
        )
    if not steps:
        return None
    return steps[0] if len(steps) == 1 else processors.Sequence(steps)
