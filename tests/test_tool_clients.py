"""Real client libraries calling tools against the real server (default model): LangChain's
`with_structured_output(method="function_calling")` and `bind_tools`, instructor's TOOLS
mode, and openai-agents with a function tool on its chat-completions model. Each must get
a validated call back on the first try (no retries)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Literal

import instructor
import pytest
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from openai import AsyncOpenAI, OpenAI
from pydantic import BaseModel, Field
from test_server_e2e import running_server

MODEL = "smollm2-135m-instruct"
pytestmark = pytest.mark.slow


class City(BaseModel):
    """Facts about a city."""

    name: str = Field(max_length=30)
    country: str = Field(max_length=30)
    # The default model writes this number's digits on and on ("1.528888…" on the named City
    # call, fp32 KV; instructor's request did it with int8 KV): the test holds because numbers
    # take at most 10 fraction digits (serve.constraints.bound_numbers), not by a lucky seed.
    population_millions: float = Field(ge=0, le=50)


class Ticket(BaseModel):
    """A bug-tracker ticket."""

    title: str = Field(max_length=60)
    priority: Literal["low", "medium", "high"]
    labels: list[Literal["bug", "feature", "docs"]] = Field(max_length=3)


PROMPTS = [
    (City, "Tell me about Paris, the capital of France."),
    (Ticket, "File a ticket: the login button crashes the app."),
]


@tool
def get_weather(city: str, unit: Literal["celsius", "fahrenheit"] = "celsius") -> str:
    """Current weather in a city."""
    return f"22 degrees {unit} in {city}"


@pytest.fixture(scope="module")
def base_url(default_model_dir, tmp_path_factory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("tool-clients") / "server.log"
    with running_server(default_model_dir, "--max-batch", "2", "--model-name", MODEL,
                        log_path=log) as base:
        yield base


def _llm(base_url):
    return ChatOpenAI(model=MODEL, base_url=f"{base_url}/v1", api_key="x", temperature=0,
                      max_tokens=200, max_retries=0)


@pytest.mark.parametrize("model, prompt", PROMPTS, ids=["City", "Ticket"])
def test_langchain_with_structured_output_function_calling(base_url, model, prompt):
    out = _llm(base_url).with_structured_output(model, method="function_calling").invoke(prompt)
    assert isinstance(out, model)


@pytest.mark.parametrize("tool_choice", ["any", "get_weather"])
def test_langchain_bind_tools(base_url, tool_choice):
    msg = _llm(base_url).bind_tools([get_weather], tool_choice=tool_choice).invoke(
        "What's the weather in Oslo?")
    [call] = msg.tool_calls
    assert call["name"] == "get_weather" and isinstance(call["args"]["city"], str)
    assert get_weather.invoke(call["args"])  # the arguments fit the tool's signature


@pytest.mark.parametrize("model, prompt", PROMPTS, ids=["City", "Ticket"])
def test_instructor_tools_mode(base_url, model, prompt):
    with OpenAI(base_url=f"{base_url}/v1", api_key="x", max_retries=0) as raw:
        client = instructor.from_openai(raw, mode=instructor.Mode.TOOLS)
        out = client.chat.completions.create(model=MODEL, response_model=model, max_retries=0,
                                             temperature=0, max_tokens=200,
                                             messages=[{"role": "user", "content": prompt}])
    assert isinstance(out, model)


def test_openai_agents_function_tool(base_url):
    from agents import (
        Agent,
        ModelSettings,
        OpenAIChatCompletionsModel,
        Runner,
        function_tool,
        set_tracing_disabled,
    )

    set_tracing_disabled(True)
    calls = []

    @function_tool
    def lookup_population(city: str) -> str:
        """The population of a city."""
        calls.append(city)
        return f"{city}: 2.1 million"

    async def run():
        async with AsyncOpenAI(base_url=f"{base_url}/v1", api_key="x", max_retries=0) as client:
            agent = Agent(
                name="assistant",
                instructions="Answer with the help of the tools.",
                model=OpenAIChatCompletionsModel(model=MODEL, openai_client=client),
                model_settings=ModelSettings(tool_choice="required", temperature=0, max_tokens=120),
                tools=[lookup_population],
                tool_use_behavior="stop_on_first_tool",
            )
            return await Runner.run(agent, "How many people live in Paris?")

    result = asyncio.run(run())
    assert len(calls) == 1 and isinstance(calls[0], str)
    assert result.final_output == f"{calls[0]}: 2.1 million"
