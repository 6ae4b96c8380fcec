"""Request validation (param names, messages with numbers), wire → engine conversion, and
the logprob / usage shapes of responses."""

from __future__ import annotations

import pytest

from serve.errors import InvalidRequestError
from serve.events import TokenLogprob, Usage
from serve.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    check_context,
    check_token_ids,
    parse_request,
)
from serve.responses import CompletionLogprobs, chat_logprobs_content, usage_dict
from serve.sampling import SamplingParams

MSG = [{"role": "user", "content": "hi"}]


def chat(**fields):
    return parse_request(ChatCompletionRequest, {"messages": MSG, **fields})


def completion(**fields):
    return parse_request(CompletionRequest, {"prompt": "hi", **fields})


def error_of(fn, **fields) -> InvalidRequestError:
    with pytest.raises(InvalidRequestError) as info:
        fn(**fields)
    return info.value


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"temperature": 2.5}, "temperature"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": "hot"}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"n": 0}, "n"),
        ({"n": 17}, "n"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -2.5}, "frequency_penalty"),
        ({"logit_bias": {"abc": 1}}, "logit_bias"),
        ({"logit_bias": {"5": 101}}, "logit_bias"),
        ({"logit_bias": {"-5": 1}}, "logit_bias"),
        ({"logit_bias": [1, 2]}, "logit_bias"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"stop": 5}, "stop"),
        ({"stop": [""]}, "stop"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_completion_tokens": 0}, "max_completion_tokens"),
        ({"max_tokens": "many"}, "max_tokens"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"seed": "x"}, "seed"),
        ({"top_k": -2}, "top_k"),
        ({"min_p": 1.5}, "min_p"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
    ],
)
def test_chat_field_errors_name_the_param(fields, param):
    err = error_of(chat, **fields)
    assert err.param == param
    assert err.status_code == 400 and err.type == "invalid_request_error"
    assert param in err.message


@pytest.mark.parametrize(
    "messages, param",
    [
        ([], "messages"),
        ("hello", "messages"),
        ([{"content": "x"}], "messages.[0].role"),
        ([{"role": "robot", "content": "x"}], "messages.[0].role"),
        ([{"role": "tool", "content": "x"}], "messages.[0].tool_call_id"),
        # a result must answer a call an earlier assistant message made (OpenAI's rule)
        ([MSG[0], {"role": "tool", "tool_call_id": "nope", "content": "sunny"}],
         "messages.[1].tool_call_id"),
        ([MSG[0], {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function",
                                                          "function": {"name": "f", "arguments": "{}"}}]},
          {"role": "tool", "tool_call_id": "c1", "content": "r1"},
          {"role": "tool", "tool_call_id": "c2", "content": "r2"}], "messages.[3].tool_call_id"),
        ([MSG[0], {"role": "tool", "tool_call_id": "c1", "content": "early"},
          {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function",
                                                "function": {"name": "f", "arguments": "{}"}}]}],
         "messages.[1].tool_call_id"),
        ([MSG[0], {"role": "user", "content": [{"type": "image_url", "image_url": {}}]}], "messages.[1].content"),
        ([{"role": "user", "content": [{"type": "text"}]}], "messages.[0].content"),
        ([{"role": "user", "content": 5}], "messages.[0].content"),
    ],
)
def test_message_errors_name_the_nested_param(messages, param):
    err = error_of(lambda: parse_request(ChatCompletionRequest, {"messages": messages}))
    assert err.param == param


def test_missing_messages():
    err = error_of(lambda: parse_request(ChatCompletionRequest, {"model": "m"}))
    assert err.param == "messages" and "Missing required parameter" in err.message


def test_messages_say_the_numbers():
    assert "2.5 is greater than the maximum of 2" in error_of(chat, temperature=2.5).message
    assert "0 is less than the minimum of 1" in error_of(chat, max_tokens=0).message
    assert "empty array" in error_of(lambda: parse_request(ChatCompletionRequest, {"messages": []})).message


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"prompt": []}, "prompt"),
        ({"prompt": [1, "a"]}, "prompt"),
        ({"prompt": [[1], []]}, "prompt"),
        ({"prompt": [-1]}, "prompt"),
        ({"prompt": None}, "prompt"),
        ({"logprobs": 6}, "logprobs"),
        ({"suffix": "end"}, "suffix"),
        ({"best_of": 3}, "best_of"),
        ({"echo": "perhaps"}, "echo"),
    ],
)
def test_completion_field_errors_name_the_param(fields, param):
    err = error_of(completion, **fields)
    assert err.param == param


def test_content_parts_and_roles_reach_the_template():
    req = parse_request(
        ChatCompletionRequest,
        {
            "messages": [
                {"role": "developer", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                {"role": "assistant", "content": None},
            ]
        },
    )
    assert req.template_messages() == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "a\nb"},
        {"role": "assistant", "content": ""},
    ]


def test_unknown_fields_are_ignored():
    req = chat(frobnicate=True, tools=[], response_format={"type": "text"}, user="u")
    assert req.user == "u"
    assert not hasattr(req, "frobnicate")


def test_prompt_forms():
    assert completion(prompt="a").prompt == ["a"]
    assert completion(prompt=["a", "b"]).prompt == ["a", "b"]
    assert completion(prompt=[1, 2]).prompt == [[1, 2]]
    assert completion(prompt=[[1], [2, 3]]).prompt == [[1], [2, 3]]


def params_of(req):
    """What the routes do: the request's max_tokens, decided once, into its sampling params."""
    return req.to_sampling_params(req.requested_max_tokens())


def test_chat_to_sampling_params():
    params = params_of(chat(
        max_tokens=7, temperature=0.5, top_p=0.9, top_k=40, min_p=0.05, seed=3,
        presence_penalty=0.5, frequency_penalty=-0.5, repetition_penalty=1.1,
        logit_bias={"10": -100, "11": 5.5}, stop="END", n=2, logprobs=True, top_logprobs=3,
        ignore_eos=True,
    ))
    assert params == SamplingParams(
        max_tokens=7, temperature=0.5, top_p=0.9, top_k=40, min_p=0.05, seed=3,
        presence_penalty=0.5, frequency_penalty=-0.5, repetition_penalty=1.1,
        logit_bias={10: -100.0, 11: 5.5}, stop=("END",), n=2, logprobs=3, ignore_eos=True,
    )


def test_chat_defaults_and_spellings():
    params = params_of(chat())
    assert params == SamplingParams()  # max_tokens None: the engine fills the rest of the context
    assert params_of(chat(max_tokens=5, max_completion_tokens=9)).max_tokens == 9
    assert params_of(chat(logprobs=True)).logprobs == 0
    assert params_of(chat(logprobs=False)).logprobs is None
    assert params_of(chat(top_k=-1)).top_k == 0
    assert params_of(chat(top_p=0)).greedy
    assert params_of(chat(n=None, temperature=None, stop=None)) == SamplingParams()


def test_completion_to_sampling_params():
    params = params_of(completion(logprobs=2, max_tokens=4, stop=["x", "y"], best_of=1))
    assert (params.logprobs, params.max_tokens, params.stop) == (2, 4, ("x", "y"))
    assert params_of(completion()).logprobs is None


def test_check_context_says_the_numbers():
    with pytest.raises(InvalidRequestError) as info:
        check_context(prompt_tokens=1000, max_tokens=8000, max_length=8192, what="messages", param="messages")
    assert info.value.param == "messages"
    assert (
        "This model's maximum context length is 8192 tokens. However, you requested 9000 tokens "
        "(1000 in the messages, 8000 in the completion)" in info.value.message
    )
    with pytest.raises(InvalidRequestError) as info:
        check_context(prompt_tokens=9000, max_tokens=None, max_length=8192, what="prompt", param="prompt")
    assert "resulted in 9000 tokens" in info.value.message and info.value.param == "prompt"
    with pytest.raises(InvalidRequestError):
        check_context(prompt_tokens=0, max_tokens=None, max_length=8192, what="prompt", param="prompt")
    check_context(prompt_tokens=192, max_tokens=8000, max_length=8192, what="prompt", param="prompt")


def test_check_token_ids():
    check_token_ids([0, 99], 100, param="prompt")
    with pytest.raises(InvalidRequestError) as info:
        check_token_ids([5, 100], 100, param="logit_bias")
    assert info.value.param == "logit_bias" and "100" in info.value.message


def test_usage_dict():
    assert usage_dict(Usage(3, 4)) == {
        "prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7,
        "prompt_tokens_details": {"cached_tokens": 0},
    }


def test_logprob_shapes():
    text = {1: "a", 2: "bé"}.__getitem__
    lps = [TokenLogprob(2, -0.25, ((2, -0.25), (1, -1.5)))]
    assert chat_logprobs_content(lps, text) == [
        {
            "token": "bé", "logprob": -0.25, "bytes": [98, 195, 169],
            "top_logprobs": [
                {"token": "bé", "logprob": -0.25, "bytes": [98, 195, 169]},
                {"token": "a", "logprob": -1.5, "bytes": [97]},
            ],
        }
    ]
    acc = CompletionLogprobs(text)
    first = acc.block([None, TokenLogprob(1, -1.0, ((1, -1.0),))], [2, 1])
    second = acc.block(lps, [2])
    assert first == {
        "tokens": ["bé", "a"], "token_logprobs": [None, -1.0],
        "top_logprobs": [None, {"a": -1.0}], "text_offset": [0, 2],
    }
    assert second["text_offset"] == [3]
