"""The OpenAI wire protocol's tool types (request side): function definitions, tool
choices, and the calls assistant turns carry. `serve.protocol` builds the chat request
from them; `to_template()` gives the shapes Hugging Face chat templates take.
"""

from __future__ import annotations

import json
import re
from typing import Any

from pydantic import BaseModel, ConfigDict, field_validator


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False, strict=True)  # as serve.protocol's


TOOL_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")


class FunctionCall(_Request):
    """An assistant turn's call: `arguments` is the JSON text the model wrote."""

    name: str
    arguments: str = "{}"

    @field_validator("arguments", mode="before")
    @classmethod
    def _arguments(cls, value: Any) -> str:
        if isinstance(value, dict):  # some clients send the object itself
            return json.dumps(value, ensure_ascii=False)
        if not isinstance(value, str):
            raise ValueError("must be a JSON string")
        try:
            parsed = json.loads(value) if value.strip() else {}
        except ValueError:
            raise ValueError(f"{value[:40]!r} is not valid JSON") from None
        if not isinstance(parsed, dict):
            raise ValueError("must be a JSON object")
        return value


class ToolCall(_Request):
    id: str
    type: str = "function"
    function: FunctionCall

    @field_validator("type")
    @classmethod
    def _type(cls, value: str) -> str:
        if value != "function":
            raise ValueError(f"'{value}' is not supported; only 'function'")
        return value


class FunctionDef(_Request):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, name: str) -> str:
        if not TOOL_NAME.fullmatch(name):
            raise ValueError(f"{name!r} does not match '^[a-zA-Z0-9_-]{{1,64}}$'")
        return name

    def to_template(self) -> dict[str, Any]:
        """The JSON-schema dict Hugging Face templates iterate (`{"type": "function",
        "function": {"name", "description", "parameters"}}`)."""
        function: dict[str, Any] = {"name": self.name}
        if self.description is not None:
            function["description"] = self.description
        function["parameters"] = self.parameters if self.parameters is not None else {
            "type": "object", "properties": {}}
        return {"type": "function", "function": function}


class ToolDef(_Request):
    type: str = "function"
    function: FunctionDef

    @field_validator("type")
    @classmethod
    def _type(cls, value: str) -> str:
        if value != "function":
            raise ValueError(f"tools of type '{value}' are not supported; only 'function'")
        return value


def check_tool_choice(value: Any, *, legacy: bool = False) -> str | dict[str, Any] | None:
    """`"none" | "auto" | "required" | {"type": "function", "function": {"name"}}` or
    OpenAI's `{"type": "allowed_tools", "allowed_tools": {"mode": "auto" | "required",
    "tools": [{"type": "function", "function": {"name"}}, …]}}` (legacy `function_call`:
    `"none" | "auto" | {"name"}`) → the mode, `{"name": …}`, or `{"allowed": [names…],
    "mode": …}` (the tools that may be called; every tool is still in the prompt).

    Raises:
        ValueError: any other value (pydantic makes it a 400 naming `tool_choice`).
    """
    if value is None:
        return None
    modes = ("none", "auto") if legacy else ("none", "auto", "required")
    if isinstance(value, str):
        if value not in modes:
            raise ValueError(f"{value!r} is not one of {list(modes)} or an object naming a function")
        return value
    if isinstance(value, dict) and not legacy and value.get("type") == "allowed_tools":
        return _allowed_tools(value.get("allowed_tools"))
    if isinstance(value, dict):
        function = value if legacy else value.get("function")
        name = function.get("name") if isinstance(function, dict) else None
        if not legacy and value.get("type", "function") != "function":
            raise ValueError("only {'type': 'function', 'function': {'name': ...}} may be named")
        if isinstance(name, str) and name:
            return {"name": name}
    shape = "{'name': ...}" if legacy else "{'type': 'function', 'function': {'name': ...}}"
    raise ValueError(f"must be one of {list(modes)} or {shape}")


def _allowed_tools(spec: Any) -> dict[str, Any]:
    """OpenAI's `allowed_tools` body (`{"mode", "tools"}`) → `{"allowed": [names…], "mode"}`."""
    if not isinstance(spec, dict) or spec.get("mode") not in ("auto", "required"):
        raise ValueError("allowed_tools needs 'mode' ('auto' or 'required') and 'tools'")
    tools = spec.get("tools")
    if not isinstance(tools, list) or not tools:
        raise ValueError("allowed_tools.tools must be a non-empty list of {'type': 'function', "
                         "'function': {'name': ...}}")
    names = []
    for tool in tools:
        function = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else None
        name = function.get("name") if isinstance(function, dict) else None
        if not isinstance(name, str) or not name:
            raise ValueError("allowed_tools.tools must list {'type': 'function', 'function': {'name': ...}} "
                             "(function tools only)")
        names.append(name)
    return {"allowed": names, "mode": spec["mode"]}
