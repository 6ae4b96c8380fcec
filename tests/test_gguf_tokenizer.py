"""Tokenizer files rebuilt from GGUF metadata."""

from __future__ import annotations

import json
import random

import pytest
from _gguf_tiny import bpe_vocab, spm_vocab, write_gguf
from tokenizers import Tokenizer

from export.config import ExportError
from export.gguf_reader import GGUFCheckpoint
from export.gguf_tokenizer import build_tokenizer, tokenizer_files

pytest_plugins = ["_gguf_fixtures"]  # smollm_gguf, smollm


def _random_text(seed: int, n: int = 400) -> str:
    """Printable characters from many scripts, plus whitespace runs."""
    ranges = [(0x20, 0x7E), (0xA0, 0x17F), (0x370, 0x3FF), (0x400, 0x4FF), (0x590, 0x6FF),
              (0x900, 0x97F), (0x3040, 0x30FF), (0x4E00, 0x4E80), (0xAC00, 0xAC80),
              (0x1F300, 0x1F64F), (0x2000, 0x206F)]  # fmt: skip
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        if rng.random() < 0.15:
            out.append(rng.choice([" ", "  ", "\n", "\t", "\n\n", " \n ", "   "]))
        else:
            lo, hi = rng.choice(ranges)
            out.append(chr(rng.randint(lo, hi)))
    return "".join(out)


CORPUS = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "12345 3.14159",
    "Call 555-0123 or +1 (800) 123-4567; 1,000,000.00 and 2024-01-31T12:00:00Z",
    "def fib(n):\n    if n < 2:\n        return n\n\treturn fib(n - 1) + fib(n - 2)\n",
    'for (int i = 0; i < 10; ++i) {\n\t\tprintf("%d\\n", i);\n}',
    "👩‍👩‍👧‍👦 family, 🏳️‍🌈 flag, 👍🏽 thumbs, 😀😃😄",
    "日本語のテキストです。中文也可以。한국어 텍스트",
    "مرحبا بالعالم، كيف حالك؟",
    "Привет, мир! Ελληνικά. हिन्दी में पाठ",
    "a    b\t\tc   \n   d",
    "\n\n\n",
    "   leading and trailing   ",
    "don't I'll we've they're SHE'S",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "e\u0301 cafe\u0301 naïve façade",
    "https://example.com/path?q=1&r=2#frag x@y.z",
    "∑ x² ≤ √y → ∞ ≠ 0",
    "\u200b zero width \u200d joiner",
    _random_text(0),
    _random_text(1),
]


# -- SmolLM2 (gpt2 / smollm) ------------------------------------------------------------------


@pytest.fixture(scope="session")
def smollm_tok(smollm) -> Tokenizer:
    return build_tokenizer(smollm)


@pytest.fixture(scope="session")
def transformers_gguf_tokenizer(smollm_gguf):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm_gguf.parent), gguf_file=smollm_gguf.name)


FIXED = CORPUS[:-2]  # all but the random texts


@pytest.mark.slow
def test_smollm_matches_transformers_gguf_tokenizer(smollm_tok, transformers_gguf_tokenizer):
    # transformers' GGUF conversion always prepends BOS (it ignores add_bos_token=false), so
    # compare the text's own tokens.
    for text in FIXED:
        ours = smollm_tok.encode(text).ids
        ref = transformers_gguf_tokenizer.encode(text, add_special_tokens=False)
        assert ours == ref, text


@pytest.mark.slow
def test_smollm_matches_transformers_plus_digit_split(smollm_tok, transformers_gguf_tokenizer):
    """Random multi-script text: transformers' vocab/merges/specials + llama.cpp's \\p{N} split.

    transformers' conversion drops the `smollm` pre-type's digit split (harmless for SmolLM2's
    vocab, which has no multi-digit tokens) except after a whitespace run: see below.
    """
    from tokenizers import pre_tokenizers

    ref = Tokenizer.from_str(transformers_gguf_tokenizer.backend_tokenizer.to_str())
    ref.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), ref.pre_tokenizer]
    )
    for seed in range(2, 8):
        text = _random_text(seed, 2000)
        assert smollm_tok.encode(text).ids == ref.encode(text, add_special_tokens=False).ids


@pytest.mark.slow
def test_smollm_whitespace_before_digit(smollm_tok, transformers_gguf_tokenizer):
    """llama.cpp (smollm: split \\p{N}, then GPT-2's regex) and SmolLM2's own tokenizer.json
    (Digits, then ByteLevel) keep a whitespace run before a digit whole; transformers' GGUF
    conversion (GPT-2 regex only) leaves the run's last space for " 8"."""
    assert smollm_tok.encode("x   8").tokens == ["x", "ĠĠĠ", "8"]
    ref = transformers_gguf_tokenizer.encode("x   8", add_special_tokens=False)
    assert transformers_gguf_tokenizer.convert_ids_to_tokens(ref) == ["x", "ĠĠ", "Ġ", "8"]


@pytest.mark.parametrize("text", CORPUS)
def test_smollm_round_trip(smollm_tok, text):
    ids = smollm_tok.encode(text).ids
    decoded = smollm_tok.decode(ids, skip_special_tokens=False)
    assert decoded == text
    if "Ġ" not in text and "Ċ" not in text:  # (the random texts may hold them)
        assert "Ġ" not in decoded and "Ċ" not in decoded


def test_smollm_no_bos_and_specials(smollm_tok):
    assert smollm_tok.encode("hi").ids == smollm_tok.encode("hi", add_special_tokens=False).ids
    ids = smollm_tok.encode("<|im_start|>user\nhi<|im_end|>").ids
    assert ids[0] == 1 and ids[-1] == 2 and len(ids) == 5
    assert smollm_tok.decode(ids, skip_special_tokens=True) == "user\nhi"
    added = smollm_tok.get_added_tokens_decoder()
    assert sorted(added) == list(range(17))
    assert all(t.special for t in added.values())


def test_smollm_splits_digits(smollm_tok):
    pieces = [p for p, _ in smollm_tok.pre_tokenizer.pre_tokenize_str("x 12345 3.14")]
    assert pieces == ["x", "Ġ", "1", "2", "3", "4", "5", "Ġ", "3", ".", "1", "4"]
    assert len(smollm_tok.encode("12345").ids) == 5


def test_smollm_tokenizer_files(smollm, smollm_tok):
    files = tokenizer_files(smollm)
    assert set(files) == {"tokenizer.json", "tokenizer_config.json", "generation_config.json"}
    reloaded = Tokenizer.from_str(json.dumps(files["tokenizer.json"]))
    for text in CORPUS[:6]:
        assert reloaded.encode(text).ids == smollm_tok.encode(text).ids
    cfg = files["tokenizer_config.json"]
    assert cfg["bos_token"] == "<|im_start|>"
    assert cfg["eos_token"] == cfg["pad_token"] == "<|im_end|>"
    assert cfg["unk_token"] == "<|endoftext|>"
    assert cfg["add_bos_token"] is False and cfg["add_eos_token"] is False
    assert cfg["chat_template"].startswith("{% for message in messages %}")
    assert cfg["model_max_length"] == 8192
    assert cfg["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert cfg["clean_up_tokenization_spaces"] is False
    assert files["generation_config.json"] == {
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 2,
    }
    json.dumps(files)  # JSON-able


# -- synthetic SentencePiece-style (llama) tokenizer -----------------------------------------

SPM_TEXTS = [
    "hello world",
    " hello  world ",
    "the world in the st",
    "héllo wörld 😀 日本",
    "a\n\nb\tc",
    "   ",
    "",
    "xyz QWERTY 12",
]


@pytest.fixture(scope="module")
def spm(tmp_path_factory):
    path = write_gguf(tmp_path_factory.mktemp("spm") / "spm.gguf", tokenizer="llama")
    ckpt = GGUFCheckpoint(path)
    return ckpt, build_tokenizer(ckpt)


@pytest.mark.parametrize("text", SPM_TEXTS)
def test_spm_round_trip(spm, text):
    _, tok = spm
    enc = tok.encode(text)
    assert enc.ids[0] == 1  # add_bos_token defaults to true for llama tokenizers
    assert tok.decode(enc.ids) == text
    assert 0 not in enc.ids  # byte fallback, never <unk>


def test_spm_merges_by_score(spm):
    ckpt, tok = spm
    tokens = ckpt.tokens()
    enc = tok.encode("hello world")
    assert enc.tokens == ["<s>", "▁hello", "▁world"]
    assert tok.encode("héllo").tokens == ["<s>", "▁", "h", "<0xC3>", "<0xA9>", "llo"]
    assert tokens[enc.ids[1]] == "▁hello"


def test_spm_special_and_user_tokens(spm):
    _, tok = spm
    enc = tok.encode("hello<tool></s>", add_special_tokens=False)
    assert enc.tokens == ["▁hello", "<tool>", "</s>"]
    assert tok.decode(enc.ids, skip_special_tokens=True) == "hello<tool>"  # user-defined stays
    added = {t.content: t.special for t in tok.get_added_tokens_decoder().values()}
    assert added == {"<s>": True, "</s>": True, "<tool>": False}


def test_spm_matches_transformers(spm, tmp_path):
    """transformers' GGUF conversion of the same file (it ignores USER_DEFINED tokens)."""
    from transformers import AutoTokenizer

    ckpt, tok = spm
    ref = AutoTokenizer.from_pretrained(str(ckpt.path.parent), gguf_file=ckpt.path.name)
    for text in SPM_TEXTS:
        assert tok.encode(text).ids == ref.encode(text), text


def test_spm_without_space_prefix(tmp_path):
    path = write_gguf(
        tmp_path / "t.gguf",
        tokenizer="llama",
        extra={"tokenizer.ggml.add_space_prefix": False, "tokenizer.ggml.add_bos_token": False},
    )
    tok = build_tokenizer(GGUFCheckpoint(path))
    enc = tok.encode("hello world")
    assert enc.tokens == ["hello", "▁world"]
    for text in SPM_TEXTS:
        assert tok.decode(tok.encode(text).ids) == text


def test_spm_tokenizer_files(spm):
    ckpt, _ = spm
    files = tokenizer_files(ckpt)
    cfg = files["tokenizer_config.json"]
    assert (cfg["bos_token"], cfg["eos_token"], cfg["unk_token"]) == ("<s>", "</s>", "<unk>")
    assert cfg["pad_token"] is None and cfg["add_bos_token"] is True
    assert "chat_template" not in cfg
    assert files["generation_config.json"] == {"bos_token_id": 1, "eos_token_id": 2}


# -- synthetic byte-level BPE (gpt2) tokenizers ----------------------------------------------


@pytest.mark.parametrize("pre", ["gpt-2", "default", "smollm", "llama-bpe", "qwen2"])
def test_bpe_pre_tokenizers_round_trip(tmp_path, pre):
    tok = build_tokenizer(
        GGUFCheckpoint(write_gguf(tmp_path / "t.gguf", tokenizer="gpt2", pre=pre))
    )
    assert tok.encode(" hello world", add_special_tokens=False).tokens == ["Ġ", "hello", "Ġworld"]
    for text in CORPUS:
        ids = tok.encode(text, add_special_tokens=False).ids  # llama-bpe adds BOS by default
        assert tok.decode(ids, skip_special_tokens=False) == text


@pytest.mark.parametrize(
    ("pre", "pieces"),
    [
        ("gpt-2", ["12345"]),
        ("smollm", ["1", "2", "3", "4", "5"]),
        ("llama-bpe", ["123", "45"]),
        ("qwen2", ["1", "2", "3", "4", "5"]),
    ],
)
def test_bpe_digit_splitting(tmp_path, pre, pieces):
    tok = build_tokenizer(
        GGUFCheckpoint(write_gguf(tmp_path / "t.gguf", tokenizer="gpt2", pre=pre))
    )
    assert [p for p, _ in tok.pre_tokenizer.pre_tokenize_str("12345")] == pieces


def test_bpe_unknown_pre(tmp_path):
    ckpt = GGUFCheckpoint(write_gguf(tmp_path / "t.gguf", tokenizer="gpt2", pre="jais"))
    with pytest.raises(ExportError, match=r"tokenizer\.ggml\.pre 'jais'.*supported: .*smollm"):
        build_tokenizer(ckpt)


def test_unknown_tokenizer_model(tmp_path):
    path = write_gguf(tmp_path / "t.gguf", tokenizer="llama")
    ckpt = GGUFCheckpoint(path)
    ckpt.metadata["tokenizer.ggml.model"] = "rwkv"
    with pytest.raises(ExportError, match=r"tokenizer\.ggml\.model 'rwkv'"):
        build_tokenizer(ckpt)


def test_bpe_add_bos_and_eos_ids(tmp_path):
    extra = {
        "tokenizer.ggml.add_bos_token": True,
        "tokenizer.ggml.eot_token_id": 0,
        "tokenizer.ggml.eom_token_id": 5,
    }
    ckpt = GGUFCheckpoint(
        write_gguf(tmp_path / "t.gguf", tokenizer="gpt2", pre="gpt-2", extra=extra)
    )
    tok = build_tokenizer(ckpt)
    assert tok.encode("hello").ids == [0, len(bpe_vocab()[0]) - 6]  # bos, "hello"
    assert tok.encode("hello", add_special_tokens=False).tokens == ["hello"]
    files = tokenizer_files(ckpt)
    assert files["generation_config.json"]["eos_token_id"] == [1, 0, 5]
    assert files["tokenizer_config.json"]["add_bos_token"] is True


def test_embedded_hf_tokenizer_json_wins(tmp_path):
    tokens = spm_vocab()[0]
    embedded = Tokenizer.from_str(
        json.dumps(
            {
                "version": "1.0",
                "model": {"type": "WordLevel", "vocab": {t: i for i, t in enumerate(tokens)},
                          "unk_token": "<unk>"},
                "pre_tokenizer": {"type": "Whitespace"},
            }
        )
    )  # fmt: skip
    path = write_gguf(tmp_path / "t.gguf", extra={"tokenizer.huggingface.json": embedded.to_str()})
    tok = build_tokenizer(GGUFCheckpoint(path))
    assert tok.to_str() == embedded.to_str()
