"""Peers' request extensions that change the output and are not honoured here get a 400 naming
the field (`serve.protocol._UNHONOURED`), never a 200 that ignores them (QA s6-qa2: before, all
12 cases below were accepted and ignored). llorch honours several vLLM extensions (`top_k`,
`min_p`, `repetition_penalty`, `ignore_eos`, `guided_*`, `continue_final_message`), so a vLLM
user reasonably sends the others too; these change what vLLM returns, but llorch answers 200
with the output unchanged (e.g. `include_stop_str_in_output: true` with `stop: ["!"]` gave
"Hello", vLLM gives "Hello!"; `min_tokens: 12` still stopped at EOS after 10 tokens; completions refuse `best_of` ≠ `n`
(400) while chat accepts and ignores it;
`prompt_logprobs: 1` returned no prompt logprobs). The house rule: a field that changes the
output is honoured or answered 400 naming it. Where one of these gets honoured instead,
replace its case here with a test of its effect: chat and completions now honour
`min_tokens`, `include_stop_str_in_output`, `allowed_token_ids` and
`skip_special_tokens: false` (their effects: tests/test_server_e2e.py, tests/test_engine.py),
which the other routes still refuse.
"""

from __future__ import annotations

import pytest

from serve.errors import InvalidRequestError
from serve.protocol import ChatCompletionRequest, CompletionRequest, parse_request

USER = [{"role": "user", "content": "Hi there"}]

# field -> a value that, in vLLM, changes the output of a short greedy request
FIELDS = {
    "bad_words": ["Hello"],
    "truncate_prompt_tokens": 3,
    "prompt_logprobs": 1,
    "best_of": 3,
    "use_beam_search": True,
}


@pytest.mark.parametrize("field", sorted(FIELDS))
def test_chat_refuses_unhonoured_vllm_extension(field: str) -> None:
    body = {"messages": USER, "stop": ["!"], field: FIELDS[field]}
    with pytest.raises(InvalidRequestError) as info:
        parse_request(ChatCompletionRequest, body)
    assert info.value.param == field


def test_chat_echo_is_refused() -> None:
    """vLLM's chat `echo: true` prepends the last message's text to the answer."""
    with pytest.raises(InvalidRequestError) as info:
        parse_request(ChatCompletionRequest, {"messages": USER, "echo": True})
    assert info.value.param == "echo"


@pytest.mark.parametrize("field", ["prompt_logprobs", "truncate_prompt_tokens"])
def test_completions_refuses_unhonoured_vllm_extension(field: str) -> None:
    body = {"prompt": "Hello", "stop": ["!"], field: FIELDS[field]}
    with pytest.raises(InvalidRequestError) as info:
        parse_request(CompletionRequest, body)
    assert info.value.param == field


def test_their_no_op_defaults_are_accepted() -> None:
    """Clients (LangChain, litellm) send some of these with vLLM's defaults: no 400 then."""
    body = {"messages": USER, "min_tokens": 0, "skip_special_tokens": True, "best_of": 1,
            "use_beam_search": False, "include_stop_str_in_output": False, "stop_token_ids": [],
            "prompt_logprobs": None, "echo": False, "length_penalty": 1.0}
    assert parse_request(ChatCompletionRequest, body).messages


# vLLM's extensions chat and completions honour, with a value that changes the output
HONOURED = {"min_tokens": 12, "include_stop_str_in_output": True, "allowed_token_ids": [5, 6],
            "skip_special_tokens": False, "stop_token_ids": [28]}


@pytest.mark.parametrize("field", sorted(HONOURED))
def test_honoured_extensions_reach_the_sampling_params_and_are_refused_elsewhere(field: str) -> None:
    """Chat and completions declare them (their effects: tests/test_server_e2e.py); Responses
    and Anthropic Messages do not, and answer 400 naming the field rather than ignore it."""
    from serve.api_messages import MessagesRequest
    from serve.api_responses import ResponsesRequest

    value = HONOURED[field]
    want = tuple(value) if isinstance(value, list) else value
    for model, body in ((ChatCompletionRequest, {"messages": USER}), (CompletionRequest, {"prompt": "Hi"})):
        params = parse_request(model, {**body, field: value}).to_sampling_params(None)
        assert getattr(params, field) == want
    for model, body in ((ResponsesRequest, {"input": "Hi"}),
                        (MessagesRequest, {"model": "m", "max_tokens": 4, "messages": USER})):
        with pytest.raises(InvalidRequestError) as info:
            parse_request(model, {**body, field: value})
        assert info.value.param == field and info.value.code == "unsupported_parameter"


@pytest.mark.parametrize(("body", "param", "code"), [
    ({"min_tokens": -1}, "min_tokens", "integer_below_min_value"),
    ({"min_tokens": 5, "max_tokens": 4}, "min_tokens", "invalid_value"),
    ({"min_tokens": 5, "max_completion_tokens": 4, "max_tokens": 9}, "min_tokens", "invalid_value"),
    ({"min_tokens": "3"}, "min_tokens", "invalid_type"),
    ({"allowed_token_ids": []}, "allowed_token_ids", "empty_array"),
    ({"allowed_token_ids": [3, -1]}, "allowed_token_ids", "invalid_value"),
    ({"allowed_token_ids": 3}, "allowed_token_ids", "invalid_type"),
    ({"include_stop_str_in_output": "yes"}, "include_stop_str_in_output", "invalid_type"),
    ({"skip_special_tokens": 0}, "skip_special_tokens", "invalid_type"),
])
def test_bad_values_of_honoured_extensions_are_a_400_naming_them(body, param, code) -> None:
    for model, base in ((ChatCompletionRequest, {"messages": USER}), (CompletionRequest, {"prompt": "Hi"})):
        if "max_completion_tokens" in body and model is CompletionRequest:
            continue
        with pytest.raises(InvalidRequestError) as info:
            parse_request(model, {**base, **body})
        assert info.value.param.startswith(param) and info.value.code == code, info.value


def test_min_tokens_up_to_max_tokens_is_fine() -> None:
    req = parse_request(ChatCompletionRequest, {"messages": USER, "min_tokens": 4, "max_tokens": 4})
    assert req.to_sampling_params(4).min_tokens == 4
    req = parse_request(CompletionRequest, {"prompt": "Hi", "min_tokens": 99})  # no max: the context's
    assert req.to_sampling_params(None).min_tokens == 99


def test_stop_token_ids_are_honoured_on_chat_and_completions_and_refused_elsewhere() -> None:
    """Chat and completions declare `stop_token_ids` (honoured: tests/test_engine.py); a route
    that does not, Responses, answers 400 naming it rather than ignore it."""
    from serve.api_responses import ResponsesRequest

    assert parse_request(ChatCompletionRequest, {"messages": USER, "stop_token_ids": [28]}) \
        .to_sampling_params(None).stop_token_ids == (28,)
    assert parse_request(CompletionRequest, {"prompt": "Hi", "stop_token_ids": [5, 5]}) \
        .to_sampling_params(None).stop_token_ids == (5,)
    with pytest.raises(InvalidRequestError) as info:
        parse_request(ChatCompletionRequest, {"messages": USER, "stop_token_ids": [-1]})
    assert info.value.param.startswith("stop_token_ids")
    with pytest.raises(InvalidRequestError) as info:
        parse_request(ResponsesRequest, {"input": "Hi", "stop_token_ids": [28]})
    assert info.value.param == "stop_token_ids"
