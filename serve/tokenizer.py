"""The model directory's tokenizer: encode/decode, special ids, EOS ids, chat template.

Reads the Hugging Face files the exporter writes (see DESIGN.md, "The model directory"):

- ``tokenizer.json``         the ``tokenizers`` pipeline (byte-level BPE or SentencePiece-style)
- ``tokenizer_config.json``  special tokens (strings, or AddedToken dicts with ``content``),
                             ``add_bos_token``, ``chat_template`` (a string, or a list of
                             ``{"name", "template"}`` of which "default" is used)
- ``chat_template.jinja``    a separate template file; takes priority, as in transformers
- ``generation_config.json`` ``eos_token_id`` (int or list), ``bos_token_id``
- ``genai_config.json``      ``model.eos_token_id`` / ``model.bos_token_id`` if present

Decoding is exactly what ``tokenizer.json`` says. transformers' Python-side
``clean_up_tokenization_spaces`` is not applied: a streamed decode cannot honour it
consistently (it rewrites " ." across token boundaries), and Llama-family configs turn it off.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as HFTokenizer

from serve.chat_template import (
    CHATML_TEMPLATE,
    ChatTemplateError,
    normalize_messages,
    render_chat_template,
)

__all__ = ["Tokenizer", "ChatTemplateError"]

log = logging.getLogger(__name__)

_SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    with path.open(encoding="utf-8") as f:
        data = json.load(f)
    return data if isinstance(data, dict) else {}


def _token_content(value: Any) -> str | None:
    """A special token from tokenizer_config.json: a string or an AddedToken dict."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _id_list(value: Any) -> list[int]:
    """``eos_token_id`` as written by HF / GenAI: an int, a list of ints, or absent."""
    if isinstance(value, bool):
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


def _pick_template(value: Any) -> str | None:
    """``chat_template`` from tokenizer_config.json: a string or a list of named templates."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {
            t["name"]: t["template"]
            for t in value
            if isinstance(t, Mapping)
            and isinstance(t.get("name"), str)
            and isinstance(t.get("template"), str)
        }
        if "default" in named:
            return named["default"]
        if named:
            # transformers refuses here; serving the first one beats serving none.
            name = next(iter(named))
            log.warning("no 'default' among chat templates %s; using %r", sorted(named), name)
            return named[name]
    return None


def _has_decoder(node: Any, kind: str) -> bool:
    """Whether a tokenizer.json ``decoder`` (possibly a Sequence) contains ``kind``."""
    if isinstance(node, Mapping):
        if node.get("type") == kind:
            return True
        return any(_has_decoder(d, kind) for d in node.get("decoders") or ())
    return False


class Tokenizer:
    """Encode/decode plus everything the server needs to know about special tokens.

    Attributes:
        vocab_size: tokens including added ones (the model's logits may be wider).
        eos_ids: every id that ends generation: generation_config.json ``eos_token_id``
            (int or list) ∪ genai_config.json ``model.eos_token_id`` ∪ the tokenizer's eos.
        bos_id, bos_token, eos_token: None when the model has none.
        add_bos: whether ``encode(add_special_tokens=True)`` starts with BOS.
        special_ids: ids of added tokens marked special (skipped when decoding).
        byte_fallback_ids: ids of ``<0xXX>`` tokens that the decoder turns into raw bytes
            (empty for byte-level BPE); the detokenizer holds runs of them back.
        chat_template: the Jinja source used by ``apply_chat_template`` (ChatML if the
            model ships none; ``has_chat_template`` tells which).
    """

    def __init__(
        self,
        tokenizer: HFTokenizer,
        *,
        config: Mapping[str, Any] | None = None,
        generation_config: Mapping[str, Any] | None = None,
        genai_config: Mapping[str, Any] | None = None,
        chat_template: str | None = None,
    ) -> None:
        config = config or {}
        generation_config = generation_config or {}
        genai_model = (genai_config or {}).get("model") or {}
        self._tk = tokenizer
        self.vocab_size: int = tokenizer.get_vocab_size(with_added_tokens=True)

        self.special_tokens: dict[str, str] = {}
        for key in _SPECIAL_TOKEN_KEYS:
            content = _token_content(config.get(key))
            if content is not None:
                self.special_tokens[key] = content

        bos_token = self.special_tokens.get("bos_token")
        bos_id = tokenizer.token_to_id(bos_token) if bos_token is not None else None
        if bos_id is None:
            for source in (generation_config.get("bos_token_id"), genai_model.get("bos_token_id")):
                ids = _id_list(source)
                if ids and 0 <= ids[0] < self.vocab_size:
                    bos_id = ids[0]
                    bos_token = tokenizer.id_to_token(bos_id)
                    break
        self.bos_id: int | None = bos_id
        self.bos_token: str | None = bos_token if bos_id is not None else None
        if self.bos_token is not None:
            self.special_tokens.setdefault("bos_token", self.bos_token)

        eos_ids = set(_id_list(generation_config.get("eos_token_id")))
        eos_ids.update(_id_list(genai_model.get("eos_token_id")))
        eos_token = self.special_tokens.get("eos_token")
        if eos_token is not None and tokenizer.token_to_id(eos_token) is not None:
            eos_ids.add(tokenizer.token_to_id(eos_token))
        elif eos_ids:
            eos_token = tokenizer.id_to_token(min(eos_ids))
            self.special_tokens["eos_token"] = eos_token
        self.eos_ids: frozenset[int] = frozenset(eos_ids)
        self.eos_token: str | None = eos_token

        # Whether tokenizer.json's post-processor puts BOS in front by itself.
        self._post_adds_bos = False
        if self.bos_id is not None:
            with_special = tokenizer.encode("a", add_special_tokens=True).ids
            without = tokenizer.encode("a", add_special_tokens=False).ids
            self._post_adds_bos = with_special[:1] == [self.bos_id] and without[:1] != [self.bos_id]
        add_bos = config.get("add_bos_token")
        # tokenizer_config.json's add_bos_token rules when present (transformers' Llama
        # tokenizers rebuild their post-processor from it); otherwise tokenizer.json decides.
        self.add_bos: bool = self.bos_id is not None and (
            bool(add_bos) if isinstance(add_bos, bool) else self._post_adds_bos
        )

        self.special_ids: frozenset[int] = frozenset(
            i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special
        )
        decoder = json.loads(tokenizer.to_str()).get("decoder")
        if _has_decoder(decoder, "ByteFallback"):
            self.byte_fallback_ids: frozenset[int] = frozenset(
                i
                for t, i in tokenizer.get_vocab(with_added_tokens=False).items()
                if _BYTE_TOKEN.fullmatch(t)
            )
        else:
            self.byte_fallback_ids = frozenset()

        self.has_chat_template: bool = chat_template is not None
        self.chat_template: str = chat_template if chat_template is not None else CHATML_TEMPLATE

        # Context token for token_text(): decoding [ctx, id] and dropping ctx's text keeps
        # the leading space that SentencePiece decoders strip from a sequence's first token.
        ctx = tokenizer.encode("a", add_special_tokens=False).ids
        self._ctx_id: int | None = ctx[-1] if ctx else None
        self._ctx_text = tokenizer.decode([self._ctx_id]) if ctx else ""
        self._token_text: dict[int, str] = {}

    @classmethod
    def from_dir(cls, model_dir: Path | str) -> Tokenizer:
        """Loads the tokenizer files of a model directory.

        Raises:
            FileNotFoundError: there is no tokenizer.json.
        """
        model_dir = Path(model_dir)
        tokenizer_file = model_dir / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise FileNotFoundError(f"{tokenizer_file} not found")
        config = _read_json(model_dir / "tokenizer_config.json")
        template_file = model_dir / "chat_template.jinja"
        if template_file.is_file():
            template = template_file.read_text(encoding="utf-8")
        else:
            template = _pick_template(config.get("chat_template"))
            if template is None:  # processor-style chat_template.json
                template = _pick_template(
                    _read_json(model_dir / "chat_template.json").get("chat_template")
                )
        return cls(
            HFTokenizer.from_file(str(tokenizer_file)),
            config=config,
            generation_config=_read_json(model_dir / "generation_config.json"),
            genai_config=_read_json(model_dir / "genai_config.json"),
            chat_template=template,
        )

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``.

        With ``add_special_tokens`` the ids start with BOS exactly when the model wants it
        (``add_bos``), and never with two: a text that already begins with the BOS token
        (a rendered chat template, say) does not get another.
        """
        ids = self._tk.encode(text, add_special_tokens=add_special_tokens).ids
        if not add_special_tokens or self.bos_id is None:
            return ids
        bos = self.bos_id
        if self._post_adds_bos:
            if not self.add_bos or ids[1:2] == [bos]:
                del ids[0]
        elif self.add_bos and ids[:1] != [bos]:
            ids.insert(0, bos)
        return ids

    def to_json(self) -> str:
        """The tokenizer.json pipeline as JSON text (what llguidance's LLTokenizer reads)."""
        return self._tk.to_str()

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        """Text of ``ids`` as tokenizer.json's decoder writes it."""
        return self._tk.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_text(self, token_id: int) -> str:
        """Decoded text of one token, with its leading space, for logprobs.

        A byte-level token holding part of a multi-byte UTF-8 character (or a lone
        ``<0xXX>`` byte-fallback token) comes out as U+FFFD: one token alone has no text.
        Special tokens give their content (``<|im_end|>``).
        """
        text = self._token_text.get(token_id)
        if text is None:
            if self._ctx_id is None:
                text = self._tk.decode([token_id], skip_special_tokens=False)
            else:
                both = self._tk.decode([self._ctx_id, token_id], skip_special_tokens=False)
                text = both[len(self._ctx_text) :]
            self._token_text[token_id] = text
        return text

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        **extra: Any,
    ) -> str:
        """Renders the chat template (ChatML when the model has none).

        Content given as a list of text parts is joined first. Encode the result with
        ``add_special_tokens=False`` when the template writes the BOS itself (``encode``
        also refuses to add a second BOS in front of one).

        Raises:
            ChatTemplateError: message for the client (400).
        """
        return render_chat_template(
            self.chat_template,
            normalize_messages(messages),
            add_generation_prompt=add_generation_prompt,
            tools=tools,
            special_tokens=self.special_tokens,
            **extra,
        )
