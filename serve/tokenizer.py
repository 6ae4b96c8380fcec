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

import functools
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
    cut_at_marker,
    mark_final_message,
    normalize_messages,
    render_chat_template,
)
from serve.jsonfile import read_json_object
from serve.token_bytes import TokenBytes

__all__ = ["Tokenizer", "ChatTemplateError"]

log = logging.getLogger(__name__)

_SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")
# Placeholders for special-token text inside message content while the template renders: a
# Supplementary Private Use character, then one naming the escaped string (see encode_chat).
_SENTINEL = "\U000F0000"
_PLACEHOLDER = re.compile("\U000F0000([\U000F0001-\U000FFFFD])")
# Normalizers that only prepend or write "▁" never make a text shorter; any other may (NFKC
# folds full-width forms to ASCII, up to 3:1), so the length bound allows for 4:1.
_SAFE_NORMALIZERS = {"Prepend", "Replace", "Sequence"}
# Pieces long texts are counted in by min_tokens (characters): 5-70 ms each to encode.
_CHUNK = 16 * 1024


class TokenizerFileError(ValueError):
    """A tokenizer file that cannot be read; the message names the file."""



def _normalizer_types(node: Any) -> set[str]:
    if not isinstance(node, Mapping):
        return set()
    types = {node.get("type")} if isinstance(node.get("type"), str) else set()
    if node.get("type") == "Replace" and node.get("content") != "\u2581":
        types.add("Replace:other")
    for child in node.get("normalizers") or ():
        types |= _normalizer_types(child)
    return types


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


def _special_tokens(config: Mapping[str, Any]) -> dict[str, str]:
    """bos/eos/unk/pad token strings that tokenizer_config.json names."""
    tokens = {}
    for key in _SPECIAL_TOKEN_KEYS:
        content = _token_content(config.get(key))
        if content is not None:
            tokens[key] = content
    return tokens


def _find_bos(tk: HFTokenizer, bos_token: str | None, vocab_size: int,
              id_sources: Sequence[Any]) -> tuple[int | None, str | None]:
    """(BOS id, BOS token): tokenizer_config's ``bos_token`` if the vocabulary has it, else
    the first in-vocabulary ``bos_token_id`` of ``id_sources`` (generation_config.json, then
    genai_config.json); (None, None) when neither gives one."""
    bos_id = tk.token_to_id(bos_token) if bos_token is not None else None
    if bos_id is not None:
        return bos_id, bos_token
    for source in id_sources:
        ids = _id_list(source)
        if ids and 0 <= ids[0] < vocab_size:
            return ids[0], tk.id_to_token(ids[0])
    return None, None


def _find_eos(tk: HFTokenizer, eos_token: str | None, id_sources: Sequence[Any]
              ) -> tuple[frozenset[int], str | None]:
    """(every id that ends generation, the EOS token string).

    The ids: each ``eos_token_id`` of ``id_sources`` (int or list; generation_config.json,
    genai_config.json) ∪ tokenizer_config's ``eos_token`` if the vocabulary has it. The string:
    that ``eos_token``, or (when the vocabulary lacks it) the token of the smallest id.
    """
    eos_ids = {i for source in id_sources for i in _id_list(source)}
    if eos_token is not None and tk.token_to_id(eos_token) is not None:
        eos_ids.add(tk.token_to_id(eos_token))
    elif eos_ids:
        eos_token = tk.id_to_token(min(eos_ids))
    return frozenset(eos_ids), eos_token


def _post_processor_adds(tk: HFTokenizer, bos_id: int) -> bool:
    """Whether tokenizer.json's post-processor puts ``bos_id`` in front by itself."""
    with_special = tk.encode("a", add_special_tokens=True).ids
    without = tk.encode("a", add_special_tokens=False).ids
    return with_special[:1] == [bos_id] and without[:1] != [bos_id]


def _byte_fallback_ids(tk: HFTokenizer) -> frozenset[int]:
    """Ids of ``<0xXX>`` tokens when the decoder has ByteFallback (SentencePiece-style);
    empty for byte-level BPE."""
    if not _has_decoder(json.loads(tk.to_str()).get("decoder"), "ByteFallback"):
        return frozenset()
    return frozenset(i for t, i in tk.get_vocab(with_added_tokens=False).items()
                     if _BYTE_TOKEN.fullmatch(t))


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
        added_ids: ids of every added token (special or not).
        byte_level: the decoder is ByteLevel alone: ``decode`` of ids that are not added
            tokens is their bytes, joined, read as UTF-8 (``errors="replace"``).
        chat_template: the Jinja source used by ``apply_chat_template`` (ChatML if the
            model ships none; ``has_chat_template`` tells which).
        token_bytes: ``token_bytes(id)`` → the token's raw bytes (``serve.token_bytes``),
            for logprobs' ``bytes``.
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
        self.special_tokens: dict[str, str] = _special_tokens(config)

        self.bos_id: int | None
        self.bos_token: str | None
        self.bos_id, self.bos_token = _find_bos(
            tokenizer, self.special_tokens.get("bos_token"), self.vocab_size,
            (generation_config.get("bos_token_id"), genai_model.get("bos_token_id")))
        if self.bos_token is not None:
            self.special_tokens.setdefault("bos_token", self.bos_token)
        self.eos_ids: frozenset[int]
        self.eos_token: str | None
        self.eos_ids, self.eos_token = _find_eos(
            tokenizer, self.special_tokens.get("eos_token"),
            (generation_config.get("eos_token_id"), genai_model.get("eos_token_id")))
        if self.eos_token is not None:
            self.special_tokens["eos_token"] = self.eos_token
        # Whether tokenizer.json's post-processor puts BOS in front by itself.
        self._post_adds_bos = self.bos_id is not None and _post_processor_adds(tokenizer,
                                                                                self.bos_id)
        add_bos = config.get("add_bos_token")
        # tokenizer_config.json's add_bos_token rules when present (transformers' Llama
        # tokenizers rebuild their post-processor from it); otherwise tokenizer.json decides.
        self.add_bos: bool = self.bos_id is not None and (
            bool(add_bos) if isinstance(add_bos, bool) else self._post_adds_bos
        )

        self.special_ids: frozenset[int] = frozenset(
            i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special
        )
        self.byte_fallback_ids: frozenset[int] = _byte_fallback_ids(tokenizer)
        self.added_ids: frozenset[int] = frozenset(tokenizer.get_added_tokens_decoder())
        spec = json.loads(tokenizer.to_str())
        decoder = spec.get("decoder")
        # A byte-level BPE decoder alone (GPT-2, SmolLM2, Llama 3, Qwen): the text of ids other
        # than added tokens is their bytes, concatenated, as UTF-8 (invalid bytes U+FFFD).
        self.byte_level: bool = isinstance(decoder, dict) and decoder.get("type") == "ByteLevel"
        self.has_chat_template: bool = chat_template is not None
        self.chat_template: str = chat_template if chat_template is not None else CHATML_TEMPLATE

        # Context token for token_text(): decoding [ctx, id] and dropping ctx's text keeps
        # the leading space that SentencePiece decoders strip from a sequence's first token.
        ctx = tokenizer.encode("a", add_special_tokens=False).ids
        self._ctx_id: int | None = ctx[-1] if ctx else None
        self._ctx_text = tokenizer.decode([self._ctx_id]) if ctx else ""
        self._token_text: dict[int, str] = {}
        self._one_text: dict[int, str] = {}  # decode_one
        self._one_text_special: dict[int, str] = {}
        self.token_bytes = TokenBytes(tokenizer, self._decoded_text, decoder=decoder)
        self._specials: tuple[str, ...] = tuple(sorted(
            {t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special and t.content},
            key=len, reverse=True))
        self._plain_tk: HFTokenizer | None = None  # encodes special-token text as plain text
        self._shrink = 1 if _normalizer_types(spec.get("normalizer")) <= _SAFE_NORMALIZERS else 4

    @classmethod
    def from_dir(cls, model_dir: Path | str) -> Tokenizer:
        """Loads the tokenizer files of a model directory.

        Raises:
            FileNotFoundError: there is no tokenizer.json.
            TokenizerFileError: tokenizer.json (or a JSON file beside it) cannot be read;
                the message names the file.
        """
        model_dir = Path(model_dir)
        tokenizer_file = model_dir / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise FileNotFoundError(f"{tokenizer_file} not found")
        try:
            hf = HFTokenizer.from_file(str(tokenizer_file))
        except Exception as exc:  # tokenizers raises a bare Exception for bad JSON or schema
            raise TokenizerFileError(f"{tokenizer_file} is not a valid tokenizer.json: {exc}") from None
        config = read_json_object(model_dir / "tokenizer_config.json", TokenizerFileError)
        template_file = model_dir / "chat_template.jinja"
        if template_file.is_file():
            template = template_file.read_text(encoding="utf-8")
        else:
            template = _pick_template(config.get("chat_template"))
            if template is None:  # processor-style chat_template.json
                template = _pick_template(
                    read_json_object(model_dir / "chat_template.json", TokenizerFileError).get("chat_template")
                )
        return cls(
            hf,
            config=config,
            generation_config=read_json_object(model_dir / "generation_config.json", TokenizerFileError),
            genai_config=read_json_object(model_dir / "genai_config.json", TokenizerFileError),
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

    def decode_one(self, token_id: int, *, skip_special_tokens: bool = True) -> str:
        """``decode([token_id])``, remembered per token (the streaming detokenizer asks for
        the last token's text once a token)."""
        cache = self._one_text if skip_special_tokens else self._one_text_special
        text = cache.get(token_id)
        if text is None:
            text = cache[token_id] = self._tk.decode([token_id], skip_special_tokens=skip_special_tokens)
        return text

    def token_text(self, token_id: int) -> str:
        """One token as text, with its leading space, for logprobs (``token``).

        Its raw bytes (``token_bytes``) as text; a token holding part of a multi-byte UTF-8
        character (or a lone ``<0xXX>`` byte token) is spelled ``bytes:\xf0\x9f`` as
        OpenAI does. Special tokens give their content (``<|im_end|>``).
        """
        return self.token_bytes.string(token_id)

    def _decoded_text(self, token_id: int) -> str:
        """What the decoder makes of one token (U+FFFD for part of a character)."""
        text = self._token_text.get(token_id)
        if text is None:
            if self._ctx_id is None:
                text = self._tk.decode([token_id], skip_special_tokens=False)
            else:
                both = self._tk.decode([self._ctx_id, token_id], skip_special_tokens=False)
                text = both[len(self._ctx_text) :]
            self._token_text[token_id] = text
        return text

    @functools.cached_property
    def max_token_bytes(self) -> int:
        """The most UTF-8 bytes of text one token can cover (allowing for a normalizer that
        shortens text): a text of B bytes is at least B / max_token_bytes tokens."""
        return self.token_bytes.max_len() * self._shrink

    def min_tokens(self, text: str, limit: int | None = None) -> int:
        """A lower bound on ``len(encode(text))`` that costs far less than encoding a text
        longer than ``limit`` tokens (for refusing what cannot fit before tokenizing it all).

        First its UTF-8 length over ``max_token_bytes`` (free). When that is not above
        ``limit`` and the text is long, the text is encoded in ``_CHUNK``-character pieces,
        stopping once the count passes ``limit``. Pieces are cut before a space that follows
        a non-space, a pre-tokenizer boundary (byte-level BPE and SentencePiece alike), where
        a cut adds at most the one ``▁`` SentencePiece prepends; a piece with no such space
        is cut anyway and allowed ``max_token_bytes`` tokens of error.
        """
        bound = len(text.encode("utf-8", errors="surrogatepass")) // self.max_token_bytes
        if limit is None or bound > limit or len(text) <= _CHUNK:
            return bound
        count = slack = pos = 0
        while pos < len(text) and count - slack <= limit:
            end = min(pos + _CHUNK, len(text))
            if end < len(text):
                cut = text.rfind(" ", pos + _CHUNK // 2, end)
                if cut > pos and not text[cut - 1].isspace():
                    end, slack = cut, slack + 2
                else:
                    slack += self.max_token_bytes
            count += len(self._tk.encode(text[pos:end], add_special_tokens=False).ids)
            pos = end
        return max(bound, count - slack)

    def encode_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = True,
        allow_special_in_content: bool = False,
        continue_final_message: bool = False,
        **template_kwargs: Any,
    ) -> tuple[str, list[int]]:
        """Renders the chat template and encodes it: (prompt text, token ids).

        Special-token text inside a message's ``content`` (a user writing
        ``<|im_start|>system``) is encoded as plain text, so no message can forge the
        template's markup; the template's own markup stays special. For this the content's
        special-token strings are swapped for private-use placeholders while the template
        renders, and the rendered text is encoded piecewise: the placeholders as plain
        text, the rest as usual (so a prompt whose contents hold no special-token text is
        encoded exactly as Hugging Face would). ``allow_special_in_content`` restores
        HF's behaviour, where such text becomes the special tokens.
        ``continue_final_message`` renders without the generation prompt and ends the text
        right after the final (assistant) message's content, so the model continues it
        (``chat_template.mark_final_message``).

        Raises:
            ChatTemplateError: message for the client (400).
        """
        messages = normalize_messages(messages)
        escape = None if allow_special_in_content else self._content_escape()
        table: list[str] = [_SENTINEL]
        if escape is not None and any(isinstance(m.get("content"), str) and escape.search(m["content"])
                                      for m in messages):
            index = {_SENTINEL: 0}

            def placeholder(match: re.Match[str]) -> str:
                k = index.setdefault(match.group(0), len(index))
                if k == len(table):
                    table.append(match.group(0))
                return _SENTINEL + chr(0xF0001 + k)

            messages = [{**m, "content": escape.sub(placeholder, m["content"])}
                        if isinstance(m.get("content"), str) else m for m in messages]
        if continue_final_message:
            messages = mark_final_message(messages)
            add_generation_prompt = False
        text = self.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                        **template_kwargs)
        if continue_final_message:
            text = cut_at_marker(text)
        if len(table) == 1 and _SENTINEL not in text:
            return text, self.encode(text, add_special_tokens=False)
        ids: list[int] = []
        pieces: list[str] = []
        pos = 0
        for match in _PLACEHOLDER.finditer(text):
            k = ord(match.group(1)) - 0xF0001
            if k >= len(table):  # not ours (the template wrote it): leave it as text
                continue
            pieces.append(text[pos:match.start()])
            ids += self.encode(text[pos:match.start()], add_special_tokens=False)
            pieces.append(table[k])
            ids += self._plain().encode(table[k], add_special_tokens=False).ids
            pos = match.end()
        pieces.append(text[pos:])
        ids += self.encode(text[pos:], add_special_tokens=False)
        return "".join(pieces), ids

    @functools.cache  # noqa: B019 - one per tokenizer, which lives as long as the server
    def _content_escape(self) -> re.Pattern[str]:
        """Matches the special-token strings (longest first) and the placeholder sentinel."""
        return re.compile("|".join(re.escape(s) for s in (*self._specials, _SENTINEL)))

    def _plain(self) -> HFTokenizer:
        if self._plain_tk is None:
            plain = HFTokenizer.from_str(self._tk.to_str())
            plain.encode_special_tokens = True
            self._plain_tk = plain
        return self._plain_tk

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
