"""Chat templates: HF semantics, errors as ChatTemplateError, ChatML fallback."""

from __future__ import annotations

import json

import pytest

from serve.chat_template import (
    CHATML_TEMPLATE,
    ChatTemplateError,
    normalize_messages,
    render_chat_template,
)

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi!"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "What is 2+2?"},
]

CHATML_EXPECTED = (
    "<|im_start|>system\nYou are terse.<|im_end|>\n"
    "<|im_start|>user\nHi!<|im_end|>\n"
    "<|im_start|>assistant\nHello.<|im_end|>\n"
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
)


def render(template: str, messages=CONVERSATION, **kw) -> str:
    return render_chat_template(template, normalize_messages(messages), **kw)


def test_chatml_render() -> None:
    assert render(CHATML_TEMPLATE, add_generation_prompt=False) == CHATML_EXPECTED
    assert render(CHATML_TEMPLATE) == CHATML_EXPECTED + "<|im_start|>assistant\n"


def test_matches_transformers() -> None:
    # The reference: transformers' own renderer, on a template using most features.
    from transformers.utils.chat_template_utils import render_jinja_template

    template = (
        "{%- for m in messages %}\n"
        "  {%- if loop.index0 > 5 %}{% break %}{% endif %}\n"
        "  {{- bos_token if loop.first else '' }}<{{ m.role }}>{{ m.content | trim }}\n"
        "  {%- generation %} gen{% endgeneration %}\n"
        "{%- endfor %}\n"
        "{%- if tools %}{{ tools | tojson(indent=2) }}{% endif %}\n"
        "{{- '[END]' if add_generation_prompt }}"
    )
    tools = [{"type": "function", "function": {"name": "f", "description": "é <b>"}}]
    for add in (True, False):
        want, _ = render_jinja_template(
            [CONVERSATION],
            chat_template=template,
            tools=tools,
            add_generation_prompt=add,
            bos_token="<s>",
            eos_token="</s>",
        )
        got = render(
            template,
            tools=tools,
            add_generation_prompt=add,
            special_tokens={"bos_token": "<s>", "eos_token": "</s>"},
        )
        assert got == want[0]


def test_raise_exception() -> None:
    template = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first must be user') }}{% endif %}"
    with pytest.raises(ChatTemplateError) as e:
        render(template)
    assert str(e.value) == "first must be user"


def test_tojson_is_plain_json() -> None:
    template = (
        "{{ messages[0] | tojson }}|{{ {'b': 1, 'a': [1, 2]} | tojson(indent=2, sort_keys=True) }}"
    )
    out = render(template, [{"role": "user", "content": "<é & 'x'>"}])
    left, right = out.split("|", 1)
    assert left == '{"role": "user", "content": "<é & \'x\'>"}'
    assert json.loads(right) == {"a": [1, 2], "b": 1} and "\n  " in right


def test_special_token_variables() -> None:
    template = "{{ bos_token }}{{ messages[0]['content'] }}{{ eos_token }}"
    out = render(template, special_tokens={"bos_token": "<s>", "eos_token": "</s>"})
    assert out == "<s>You are terse.</s>"
    # Undefined variables render empty, as in HF (templates test `if tools` etc.).
    assert render("[{{ bos_token }}{{ tools }}{{ nope }}]") == "[None]"


def test_strftime_now_and_extra_variables() -> None:
    out = render("{{ strftime_now('%Y') }} {{ date_string }}", date_string="today")
    year, rest = out.split(" ")
    assert len(year) == 4 and year.isdigit() and rest == "today"


@pytest.mark.parametrize(
    "template",
    [
        "{% for m in messages %}{{ m.content }}",  # unclosed block
        "{{ messages[0]['content'] | no_such_filter }}",
        "{% if %}",
    ],
)
def test_malformed_template(template: str) -> None:
    with pytest.raises(ChatTemplateError, match="invalid chat template"):
        render(template)


@pytest.mark.parametrize(
    "template",
    [
        "{{ messages[0]['content'] + 1 }}",  # str + int
        "{{ messages[0].content.__class__.__mro__ }}{{ ''.__class__.__subclasses__() }}",
        "{{ messages.append(1) }}",  # the sandbox is immutable
        "{{ undefined_thing.attr }}",
        "{{ 1 // 0 }}",
    ],
)
def test_render_errors_become_chat_template_errors(template: str) -> None:
    with pytest.raises(ChatTemplateError):
        render(template)


def test_list_of_parts_content() -> None:
    messages = [
        {
            "role": "user",
            "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": "world"}],
        },
    ]
    assert render(CHATML_TEMPLATE, messages, add_generation_prompt=False) == (
        "<|im_start|>user\nHello\nworld<|im_end|>\n"
    )
    assert messages[0]["content"][0] == {"type": "text", "text": "Hello"}  # input untouched


def test_non_text_parts_refused() -> None:
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]
    with pytest.raises(ChatTemplateError, match="image_url"):
        normalize_messages(image)
    with pytest.raises(ChatTemplateError):
        normalize_messages([{"role": "user", "content": [{"type": "text", "text": 3}]}])
    with pytest.raises(ChatTemplateError):
        normalize_messages(["not a message"])
