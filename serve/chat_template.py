"""Chat templates rendered with Hugging Face semantics.

The environment mirrors ``transformers.utils.chat_template_utils._compile_jinja_template``:
an ``ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)`` with the
``loopcontrols`` extension and a no-op ``{% generation %}`` block, the ``tojson`` filter
without HTML escaping, and the globals ``raise_exception`` and ``strftime_now``. Templates
see ``messages``, ``add_generation_prompt``, ``tools``, ``documents`` and the special
tokens (``bos_token``, ``eos_token``, …), exactly the variables ``apply_chat_template``
passes in transformers.

Every failure while compiling or rendering becomes a ``ChatTemplateError`` whose message
can be shown to the client (the routes answer it with a 400).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.meta
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

# Used when a tokenizer ships no chat template at all: the ChatML layout that transformers
# used as its class-level default before v4.43 (and that SmolLM2 uses).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class ChatTemplateError(ValueError):
    """A chat template could not be compiled or rendered; the message is for the client."""


class _GenerationBlock(jinja2.ext.Extension):
    """``{% generation %}…{% endgeneration %}``: transformers uses it to find assistant
    tokens for training masks; when serving it only renders its body."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(str(message))


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | str | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Jinja's own tojson escapes <, >, & and ' for HTML; chat templates want plain JSON.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=16)
def compile_template(source: str) -> jinja2.Template:
    """Compiles (and caches) a chat template.

    Raises:
        ChatTemplateError: the template is not valid Jinja.
    """
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_GenerationBlock, jinja2.ext.loopcontrols],
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise ChatTemplateError(
            f"invalid chat template (line {exc.lineno}): {exc.message}"
        ) from exc


@functools.lru_cache(maxsize=16)
def template_variables(source: str) -> frozenset[str]:
    """The variables a template reads from its context (``tools``, ``documents``, …);
    ``"tools" in template_variables(t)`` tells whether it renders tool definitions.

    Raises:
        ChatTemplateError: the template is not valid Jinja.
    """
    env = compile_template(source).environment
    try:
        return frozenset(jinja2.meta.find_undeclared_variables(env.parse(source)))
    except jinja2.TemplateSyntaxError as exc:  # compile_template would have raised first
        raise ChatTemplateError(f"invalid chat template: {exc.message}") from exc


def normalize_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Returns copies of ``messages`` whose list-of-parts content is joined into one string.

    OpenAI lets ``content`` be ``[{"type": "text", "text": …}, …]``; templates written for
    Hugging Face expect a string, so text parts are joined with a newline (as vLLM does for
    string-content templates). Any other part type is refused.

    Raises:
        ChatTemplateError: a message is not an object, or a part is not a text part.
    """
    out: list[dict[str, Any]] = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ChatTemplateError(f"messages[{i}] must be an object")
        message = dict(message)
        content = message.get("content")
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                if not isinstance(part, Mapping) or part.get("type") != "text":
                    kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
                    raise ChatTemplateError(
                        f"messages[{i}].content[{j}]: unsupported content part type {kind!r}; "
                        "only 'text' parts are supported"
                    )
                text = part.get("text")
                if not isinstance(text, str):
                    raise ChatTemplateError(f"messages[{i}].content[{j}].text must be a string")
                texts.append(text)
            message["content"] = "\n".join(texts)
        out.append(message)
    return out


def render_chat_template(
    source: str,
    messages: Sequence[Mapping[str, Any]],
    *,
    add_generation_prompt: bool = True,
    tools: list[dict[str, Any]] | None = None,
    documents: list[dict[str, Any]] | None = None,
    special_tokens: Mapping[str, str] | None = None,
    **extra: Any,
) -> str:
    """Renders ``source`` the way ``transformers``' ``apply_chat_template(tokenize=False)`` does.

    Args:
        source: the Jinja template.
        messages: chat messages; content already a string (see ``normalize_messages``).
        add_generation_prompt: end with the header that starts the assistant's turn.
        tools, documents: passed through to the template (None when absent, as in HF).
        special_tokens: ``bos_token``, ``eos_token``, … made visible to the template.
        extra: further template variables; they override special tokens, as in HF.

    Returns:
        The rendered prompt text.

    Raises:
        ChatTemplateError: compile or render failure, including ``raise_exception(msg)``
            called by the template (then the message is ``msg`` verbatim).
    """
    template = compile_template(source)
    variables = {**(special_tokens or {}), **extra}
    try:
        return template.render(
            messages=list(messages),
            tools=tools,
            documents=documents,
            add_generation_prompt=add_generation_prompt,
            **variables,
        )
    except ChatTemplateError:
        raise
    # Templates are code we did not write, run on input the client chose: any error they
    # raise (a missing key, `None + str`, a sandbox refusal) is reported to the client.
    except (
        jinja2.TemplateError,
        LookupError,
        TypeError,
        ValueError,
        AttributeError,
        ArithmeticError,
        RecursionError,
    ) as exc:
        raise ChatTemplateError(f"chat template error: {type(exc).__name__}: {exc}") from exc


# Appended to the final message's content when it is continued (a private-use character no
# tokenizer gives meaning to); the rendered text is cut where it lands.
CONTINUE_MARKER = "\U0010FFFD"


def mark_final_message(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The (normalized) messages with `CONTINUE_MARKER` after the final (assistant) message's text, so
    `cut_at_marker` can end the rendered prompt right there: the model continues that
    message (transformers' `continue_final_message`, which cuts at the content's last
    occurrence instead; a marker also survives templates that trim content).

    Raises:
        ChatTemplateError: the final message is not an assistant message with text content.
    """
    out = [dict(m) for m in messages]
    final = out[-1] if out else {}
    if final.get("role") != "assistant" or final.get("tool_calls"):
        raise ChatTemplateError("only a final assistant message without tool calls can be continued")
    final["content"] = (final.get("content") or "") + CONTINUE_MARKER  # normalized: a string
    return out


def cut_at_marker(text: str) -> str:
    """The rendered prompt up to `CONTINUE_MARKER` (dropped), i.e. without the end of the
    final turn.

    Raises:
        ChatTemplateError: the template did not render the final message's content.
    """
    at = text.rfind(CONTINUE_MARKER)
    if at < 0 or CONTINUE_MARKER in text[:at]:
        raise ChatTemplateError("the chat template does not render the final assistant message, "
                                "so it cannot be continued")
    return text[:at]
