"""What the ingress hands a replica and gets back, with no Ray in it (unit-testable).

The ingress turns one HTTP request into a `ForwardedRequest` (the ASGI scope's essentials
plus the whole body) and the replica answers with a stream of lists of `ResponsePart`s: one
`("start", status, headers)`, then `("body", bytes)` pieces in the app's order, the bodies
sent meanwhile joined (`serve.scale.coalesce`), so a stream stays a stream with fewer,
larger items crossing Ray under load.

`routing_text` is the text the prefix-affinity router matches on: what the chat template
puts first (system prompt, then the turns), so requests sharing a system prompt share a
routing prefix. `stream_error` frames "the replica died" as the wire format's own final
error event for a stream that had already started. `merge_metrics` joins the replicas'
`/metrics` texts, each sample labelled with its replica.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

# ("start", status: int, headers: list[(name, value) bytes]) | ("body", chunk: bytes)
ResponsePart = tuple[Any, ...]

ROUTING_TEXT_CHARS = 32_768  # past this a prompt's tail cannot change where it goes
GENERATING_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/messages")


@dataclass
class ForwardedRequest:
    """One HTTP request as the replica's ASGI app will see it.

    `prompt` is the routing text (`routing_text`), "" when the request has none (GET, a
    body that is not JSON): Ray Serve's routers look for an argument with a `prompt`
    attribute."""

    method: str
    path: str
    query_string: bytes = b""
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""
    client: tuple[str, int] | None = None
    prompt: str = ""

    def scope(self) -> dict[str, Any]:
        """An ASGI 3 HTTP scope for this request (`http_version` 1.1, no root path)."""
        return {
            "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1", "method": self.method, "scheme": "http",
            "path": self.path, "raw_path": self.path.encode("latin-1", "replace"),
            "query_string": self.query_string, "root_path": "", "headers": list(self.headers),
            "client": self.client, "server": None, "state": {},
        }


def json_object(body: bytes) -> dict | None:
    """``body`` parsed as a JSON object; None where it is not valid JSON or not an object."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


async def complete_lifespan(receive: Any, send: Any) -> None:
    """Answer an ASGI lifespan scope: every startup / shutdown message is acknowledged as
    complete (the apps behind it start and stop with their replica, not with this scope)."""
    while True:
        message = await receive()
        kind = message["type"].rsplit(".", 1)[-1]
        await send({"type": f"lifespan.{kind}.complete"})
        if kind == "shutdown":
            return


def routing_text(path: str, body: bytes) -> str:
    """The prompt text a generating request starts with, for prefix-affinity routing.

    Chat and Anthropic Messages: the system prompt, then each message's role and text;
    Responses: `instructions` then `input`; completions: the (first) prompt, token ids as
    text. Anything unparsable or any other path gives "" (no affinity). At most
    `ROUTING_TEXT_CHARS` characters. Never raises: a bad body is the replica's to refuse."""
    if path.rstrip("/") not in GENERATING_PATHS or not body:
        return ""
    data = json_object(body)
    if data is None:
        return ""
    parts: list[str] = []
    for key in ("system", "instructions"):
        parts.append(_text(data.get(key)))
    if isinstance(data.get("messages"), list):
        for message in data["messages"]:
            if isinstance(message, dict):
                parts.append(f"\n{message.get('role', '')}:{_text(message.get('content'))}")
    parts.append(_text(data.get("input")))
    prompt = data.get("prompt")
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        prompt = prompt[0]  # several prompts: the first decides
    parts.append(_text(prompt))
    return "".join(parts)[:ROUTING_TEXT_CHARS]


def _text(value: Any) -> str:
    """The text inside a content value: a string, text parts, token ids, nested items."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value} "
    if isinstance(value, list):
        return "".join(_text(item) for item in value)
    if isinstance(value, dict):
        if isinstance(value.get("text"), str):
            return value["text"]
        if "content" in value:
            return _text(value["content"])
    return ""


def stream_error(path: str, message: str, code: str) -> bytes:
    """The final event of a stream whose replica died after the stream began, in the wire
    format of `path`: OpenAI's `data: {"error": …}` + `data: [DONE]`, the Responses API's
    `error` event, or Anthropic's `event: error`."""
    path = path.rstrip("/")
    if path == "/v1/messages":
        payload = {"type": "error", "error": {"type": "api_error", "message": message}}
        return f"event: error\ndata: {json.dumps(payload)}\n\n".encode()
    if path == "/v1/responses":
        payload = {"type": "error", "code": code, "message": message, "param": None}
        return f"event: error\ndata: {json.dumps(payload)}\n\n".encode()
    error = {"error": {"message": message, "type": "server_error", "param": None, "code": code}}
    return f"data: {json.dumps(error)}\n\ndata: [DONE]\n\n".encode()


def merge_metrics(texts: dict[str, str]) -> str:
    """Prometheus texts of several replicas as one, each sample labelled `replica="id"`;
    `# HELP`/`# TYPE` lines once per metric family, the family's samples after them."""
    families: dict[str, tuple[list[str], list[str]]] = {}  # name -> (comments, samples)
    family = ""
    for rid in sorted(texts):
        for line in texts[rid].splitlines():
            if line.startswith("# "):
                family = line.split(" ", 3)[2]
                comments = families.setdefault(family, ([], []))[0]
                if line not in comments:
                    comments.append(line)
            elif line.strip():
                head, _, value = line.rpartition(" ")
                name, _, labels = head.rstrip("}").partition("{")
                labels = f'replica="{rid}"' + (f",{labels}" if labels else "")
                families.setdefault(family, ([], []))[1].append(f"{name}{{{labels}}} {value}")
    return "".join(line + "\n" for comments, samples in families.values()
                   for line in (*comments, *samples))
