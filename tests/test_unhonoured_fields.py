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
replace its case here with a test of its effect.
"""

from __future__ import annotations

import pytest

from serve.errors import InvalidRequestError
from serve.protocol import ChatCompletionRequest, CompletionRequest, parse_request

USER = [{"role": "user", "content": "Hi there"}]

# field -> a value that, in vLLM, changes the output of a short greedy request
FIELDS = {
    "min_tokens": 12,
    "include_stop_str_in_output": True,
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


@pytest.mark.parametrize("field", ["min_tokens", "prompt_logprobs", "include_stop_str_in_output"])
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
    with pytest.raises(InvalidRequestError) as info:
        parse_request(ChatCompletionRequest, {"messages": USER, "skip_special_tokens": False})
    assert info.value.param == "skip_special_tokens" and info.value.code == "unsupported_parameter"


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
