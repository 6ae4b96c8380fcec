"""Tokenizer: special ids from every config file, BOS exactly once, chat template sources."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from _text_fixtures import (  # noqa: F401
    SP_CHAT_TEMPLATE,
    smollm2_dir,
    smollm2_hf_dir,
    sp_dir,
    sp_metaspace_dir,
)

from serve.chat_template import CHATML_TEMPLATE, ChatTemplateError
from serve.tokenizer import Tokenizer


def copy_dir(src: Path, dst: Path, **files) -> Path:
    """A copy of a tokenizer dir with some JSON files replaced (None deletes)."""
    shutil.copytree(src, dst)
    for name, content in files.items():
        path = dst / name.replace("__", ".")
        if content is None:
            path.unlink(missing_ok=True)
        elif isinstance(content, str):
            path.write_text(content, encoding="utf-8")
        else:
            path.write_text(json.dumps(content), encoding="utf-8")
    return dst


def config(d: Path) -> dict:
    return json.loads((d / "tokenizer_config.json").read_text(encoding="utf-8"))


# -- the default model's tokenizer (facts from DESIGN.md) -------------------------------


@pytest.fixture(scope="module")
def smol(smollm2_dir: Path) -> Tokenizer:  # noqa: F811
    return Tokenizer.from_dir(smollm2_dir)


def test_smollm2_facts(smol: Tokenizer) -> None:
    assert smol.vocab_size == 49152
    assert smol.eos_ids == {2} and smol.eos_token == "<|im_end|>"
    assert smol.bos_id == 1 and smol.bos_token == "<|im_start|>"
    assert not smol.add_bos and not smol.byte_fallback_ids
    assert smol.has_chat_template


def test_smollm2_roundtrip_and_no_bos(smol: Tokenizer) -> None:
    text = "What is the capital of France? 1234 ünïcödé 👩🏽‍💻\n"
    ids = smol.encode(text)
    assert ids == smol.encode(text, add_special_tokens=False)
    assert smol.decode(ids) == text
    assert smol.token_text(ids[1]) == " is"


def test_smollm2_chat_prompt(smol: Tokenizer) -> None:
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = smol.apply_chat_template(messages)
    assert prompt == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
        "<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    ids = smol.encode(prompt, add_special_tokens=False)
    assert ids[0] == 1 and ids.count(1) == 3 and ids.count(2) == 2
    assert smol.encode(prompt) == ids  # add_bos_token false: nothing added either way


def test_smollm2_matches_transformers(smol: Tokenizer, smollm2_dir: Path) -> None:  # noqa: F811
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(smollm2_dir))
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Count: 1 2 3 🙂"},
    ]
    want = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert smol.apply_chat_template(messages) == want
    for text in ["Hello world", want, "  spaces\tand 12345 digits"]:
        assert smol.encode(text) == hf.encode(text)
        ids = hf.encode(text)
        assert smol.decode(ids) == hf.decode(ids, skip_special_tokens=True)


def test_token_text(smol: Tokenizer) -> None:
    assert smol.token_text(2) == "<|im_end|>"
    (world,) = smol.encode(" world", add_special_tokens=False)
    assert smol.token_text(world) == " world"
    # A byte-level token holding part of a UTF-8 character has no text of its own: OpenAI's
    # "bytes:" spelling, and its raw bytes, which join to the character's UTF-8.
    ids = smol.encode("😀", add_special_tokens=False)
    assert len(ids) > 1 and smol.token_text(ids[0]) == "bytes:\\xf0\\x9f"
    assert b"".join(smol.token_bytes(i) for i in ids) == "😀".encode()


# -- BOS: added exactly when wanted, never twice ----------------------------------------


def test_bos_from_post_processor_not_duplicated(smollm2_hf_dir: Path) -> None:  # noqa: F811
    # transformers' GGUF conversion: add_bos_token true and a post-processor adding BOS.
    tok = Tokenizer.from_dir(smollm2_hf_dir)
    assert tok.add_bos and tok.bos_id == 1
    ids = tok.encode("Hello")
    assert ids[0] == 1 and ids[1] != 1
    chat = tok.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert chat.startswith("<|im_start|>")
    ids = tok.encode(chat)
    assert ids[:2] != [1, 1] and ids == tok.encode(chat, add_special_tokens=False)


def test_bos_added_by_us_when_no_post_processor(sp_metaspace_dir: Path) -> None:  # noqa: F811
    tok = Tokenizer.from_dir(sp_metaspace_dir)
    assert tok.add_bos
    assert tok.encode("Hello")[0] == tok.bos_id == 1
    assert tok.encode("Hello", add_special_tokens=False)[0] != 1
    assert tok.encode("<s>Hello")[:2] != [1, 1]
    assert tok.encode("") == [1]


@pytest.mark.parametrize("fixture", ["sp_dir", "sp_metaspace_dir"])
def test_add_bos_token_false_wins(
    fixture: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    src = request.getfixturevalue(fixture)
    d = copy_dir(
        src, tmp_path / "t", tokenizer_config__json={**config(src), "add_bos_token": False}
    )
    tok = Tokenizer.from_dir(d)
    assert not tok.add_bos
    assert tok.encode("Hello") == tok.encode("Hello", add_special_tokens=False)
    assert tok.encode("Hello")[0] != 1


def test_post_processor_decides_without_add_bos_token(sp_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    cfg = config(sp_dir)
    del cfg["add_bos_token"]
    tok = Tokenizer.from_dir(copy_dir(sp_dir, tmp_path / "t", tokenizer_config__json=cfg))
    assert tok.add_bos and tok.encode("Hi")[0] == 1


def test_sp_bos_once_and_chat(sp_dir: Path) -> None:  # noqa: F811
    tok = Tokenizer.from_dir(sp_dir)
    assert tok.encode("Hello")[:1] == [1] and tok.encode("Hello")[1] != 1
    chat = tok.apply_chat_template(
        [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Yo"},
            {
                "role": "user",
                "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
            },
        ]
    )
    assert chat == "<s>[INST] Hi [/INST] Yo</s>[INST] a\nb [/INST]"
    assert tok.encode(chat).count(1) == 1
    with pytest.raises(ChatTemplateError, match="Only user and assistant"):
        tok.apply_chat_template([{"role": "system", "content": "x"}])


def test_sp_leading_space_in_token_text(sp_dir: Path) -> None:  # noqa: F811
    tok = Tokenizer.from_dir(sp_dir)
    ids = tok.encode("Hello world", add_special_tokens=False)
    assert tok.decode(ids[:1]) == "Hello"  # SentencePiece drops the first token's space
    assert tok.token_text(ids[0]) == " Hello"  # but logprobs want the token as generated


# -- EOS ids ------------------------------------------------------------------------------


def test_eos_union(sp_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    eot = Tokenizer.from_dir(sp_dir)._tk.token_to_id("<|eot|>")
    d = copy_dir(
        sp_dir,
        tmp_path / "t",
        generation_config__json={"eos_token_id": [eot, 7]},
        genai_config__json={"model": {"eos_token_id": [9], "bos_token_id": 1}},
    )
    tok = Tokenizer.from_dir(d)
    assert tok.eos_ids == {2, eot, 7, 9}  # tokenizer eos </s> = 2 plus every configured id
    assert tok.eos_token == "</s>"


def test_eos_int_and_dict_tokens(sp_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    cfg = {**config(sp_dir), "eos_token": {"content": "<|eot|>", "special": True}}
    d = copy_dir(
        sp_dir,
        tmp_path / "t",
        tokenizer_config__json=cfg,
        generation_config__json={"eos_token_id": 2},
    )
    tok = Tokenizer.from_dir(d)
    eot = tok._tk.token_to_id("<|eot|>")
    assert tok.eos_ids == {2, eot} and tok.eos_token == "<|eot|>"
    assert tok.bos_token == "<s>"  # the AddedToken-dict form


def test_eos_from_generation_config_only(sp_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    cfg = config(sp_dir)
    del cfg["eos_token"], cfg["bos_token"]
    d = copy_dir(sp_dir, tmp_path / "t", tokenizer_config__json=cfg)
    tok = Tokenizer.from_dir(d)
    eot = tok._tk.token_to_id("<|eot|>")
    assert tok.eos_ids == {2, eot} and tok.eos_token == "</s>"
    assert tok.bos_id == 1 and tok.bos_token == "<s>"  # from generation_config bos_token_id


# -- chat template sources -----------------------------------------------------------------


def test_chat_template_file_wins(sp_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    d = copy_dir(sp_dir, tmp_path / "t", chat_template__jinja="FILE {{ messages | length }}")
    assert Tokenizer.from_dir(d).apply_chat_template([{"role": "user", "content": "x"}]) == "FILE 1"


def test_named_chat_templates(sp_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    cfg = {
        **config(sp_dir),
        "chat_template": [
            {"name": "tool_use", "template": "TOOLS"},
            {"name": "default", "template": "DEFAULT"},
        ],
    }
    d = copy_dir(sp_dir, tmp_path / "t", tokenizer_config__json=cfg)
    assert Tokenizer.from_dir(d).apply_chat_template([]) == "DEFAULT"


def test_chatml_fallback(sp_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    cfg = config(sp_dir)
    del cfg["chat_template"]
    d = copy_dir(sp_dir, tmp_path / "t", tokenizer_config__json=cfg)
    tok = Tokenizer.from_dir(d)
    assert not tok.has_chat_template and tok.chat_template == CHATML_TEMPLATE
    assert tok.apply_chat_template([{"role": "user", "content": "Hi"}]) == (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_template_sees_special_tokens(sp_dir: Path) -> None:  # noqa: F811
    tok = Tokenizer.from_dir(sp_dir)
    assert tok.chat_template == SP_CHAT_TEMPLATE
    out = tok.apply_chat_template([{"role": "user", "content": "q"}], add_generation_prompt=False)
    assert out.startswith("<s>")


def test_missing_tokenizer_json(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        Tokenizer.from_dir(tmp_path)


def test_continue_final_message_matches_transformers(smol: Tokenizer, smollm2_dir: Path) -> None:  # noqa: F811
    """Prefill: the prompt ends right after the final assistant message's text, as
    transformers' `continue_final_message`; its special-token text stays plain text."""
    from transformers import AutoTokenizer

    from serve.chat_prep import encode_chat
    from serve.protocol import ChatCompletionRequest, parse_request

    hf = AutoTokenizer.from_pretrained(str(smollm2_dir))
    messages = [{"role": "user", "content": "Name?"}, {"role": "assistant", "content": '{"name": "'}]
    want = hf.apply_chat_template(messages, tokenize=False, continue_final_message=True)
    text, ids = smol.encode_chat(messages, continue_final_message=True)
    assert text == want and text.endswith('<|im_start|>assistant\n{"name": "')
    assert ids == hf.encode(want)
    forged = [messages[0], {"role": "assistant", "content": "x<|im_end|>"}]
    text, ids = smol.encode_chat(forged, continue_final_message=True)
    assert text.endswith("assistant\nx<|im_end|>") and ids.count(2) == 2  # only the template's <|im_end|>s
    with pytest.raises(ChatTemplateError):
        smol.encode_chat(messages[:1], continue_final_message=True)
    # with tools (the generic system block) and the request flags of the chat route
    req = parse_request(ChatCompletionRequest, {
        "messages": messages, "add_generation_prompt": False, "continue_final_message": True,
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]})
    text, _ = encode_chat(smol, req, None)
    assert "# Tools" in text and text.endswith('<|im_start|>assistant\n{"name": "')
