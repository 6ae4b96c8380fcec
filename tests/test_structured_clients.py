"""Real client libraries doing structured extraction against the real server (default model):
LangChain's `ChatOpenAI.with_structured_output(method="json_schema")` and instructor in its
JSON_SCHEMA mode. They must get a validated object back on the first try (no retries).

instructor's JSON mode sends only `{"type": "json_object"}` and describes the schema in the
prompt: the server enforces "a JSON object", and what the 135M model writes into it need not
match the schema, so that mode is not a guarantee this server (or OpenAI) can give.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal

import instructor
import pytest
from langchain_openai import ChatOpenAI
from openai import OpenAI
from pydantic import BaseModel, Field
from test_server_e2e import running_server

MODEL = "smollm2-135m-instruct"
pytestmark = pytest.mark.slow


class City(BaseModel):
    name: str = Field(max_length=30)
    country: str = Field(max_length=30)
    population_millions: float = Field(ge=0, le=50)


class Ticket(BaseModel):
    title: str = Field(max_length=60)
    priority: Literal["low", "medium", "high"]
    labels: list[Literal["bug", "feature", "docs"]] = Field(max_length=3)


PROMPTS = [
    (City, "Tell me about Paris, the capital of France."),
    (Ticket, "File a ticket: the login button crashes the app."),
]


@pytest.fixture(scope="module")
def base_url(default_model_dir, tmp_path_factory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("structured-clients") / "server.log"
    with running_server(default_model_dir, "--max-batch", "2", "--model-name", MODEL,
                        log_path=log) as base:
        yield base


@pytest.mark.parametrize("model, prompt", PROMPTS, ids=["City", "Ticket"])
def test_langchain_with_structured_output_json_schema(base_url, model, prompt):
    llm = ChatOpenAI(model=MODEL, base_url=f"{base_url}/v1", api_key="x", temperature=0,
                     max_tokens=300, max_retries=0)
    out = llm.with_structured_output(model, method="json_schema", strict=True).invoke(prompt)
    assert isinstance(out, model)


@pytest.mark.parametrize("model, prompt", PROMPTS, ids=["City", "Ticket"])
def test_instructor_json_schema_mode(base_url, model, prompt):
    with OpenAI(base_url=f"{base_url}/v1", api_key="x", max_retries=0) as openai_client:
        client = instructor.from_openai(openai_client, mode=instructor.Mode.JSON_SCHEMA)
        out = client.chat.completions.create(model=MODEL, response_model=model, max_retries=0,
                                             max_tokens=300, temperature=0,
                                             messages=[{"role": "user", "content": prompt}])
    assert isinstance(out, model)
