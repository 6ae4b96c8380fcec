"""Request bodies: Content-Type, size, JSON syntax, nesting depth and text validity, checked
before any route looks at a field.

Every route that takes a body reads it through `read_json`, so each of these is refused the
same way everywhere, as an OpenAI-shaped 4xx:

- a Content-Type other than `application/json` (optionally `; charset=utf-8`) → 415. A POST
  with a "simple" Content-Type (`text/plain`, a form) or none needs no CORS preflight, so
  without this check any web page could make a browser on this machine start generations
  on a key-less localhost server (CSRF-style);
- more than `limit` bytes → 413, counted while reading (a Content-Length is not trusted);
- not JSON, `NaN`/`Infinity` (not JSON, though Python reads them), not an object → 400;
- containers nested deeper than `MAX_DEPTH` → 400 (Python's parser raises RecursionError
  near 1000 levels; no request we serve needs more than a handful);
- a lone UTF-16 surrogate (`"\\ud83d"`), which JSON allows but is no Unicode text and
  breaks the tokenizer and UTF-8 output → 400 naming the field;
- `Content-Encoding: gzip` or `deflate` (RFC 9110 §8.4; what `requests`/`httpx` users set
  for big prompts) is decoded first, the size limit applying to the decoded body too (a
  small bomb cannot grow past it: 413); any other coding (`br`, `zstd`, …) → 415 naming it.

A client that disconnects while sending the body raises `ClientGone` (not an APIError:
nobody is there to read an answer; the route wrapper logs and counts it as 499).
"""

from __future__ import annotations

import json
import re
import zlib
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request

from serve.errors import InvalidRequestError, PayloadTooLargeError, UnsupportedMediaTypeError

MAX_DEPTH = 64
# Bodies above this are parsed on a worker thread, so a big one does not stall the loop.
_THREAD_PARSE_BYTES = 256 * 1024
# A \uD800-\uDFFF escape: the only way JSON text can carry a surrogate.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


class ClientGone(Exception):
    """The client disconnected before its request body was complete."""


def check_content_type(request: Request) -> None:
    """415 unless the Content-Type is `application/json` (charset, if given, utf-8)."""
    header = request.headers.get("content-type")
    media, _, params = (header or "").partition(";")
    charset = ""
    for param in params.split(";"):
        key, _, value = param.strip().partition("=")
        if key.strip().lower() == "charset":
            charset = value.strip().strip('"').lower()
    if media.strip().lower() == "application/json" and charset in ("", "utf-8", "utf8"):
        return
    got = f"'{header}'" if header else "none"
    raise UnsupportedMediaTypeError(
        f"Unsupported Content-Type {got}: request bodies must be JSON sent with "
        "'Content-Type: application/json' (with curl: -H 'Content-Type: application/json').",
        code="unsupported_media_type",
    )


async def read_json(request: Request, limit: int) -> dict[str, Any]:
    """The body as a JSON object, after every check in the module docstring.

    Raises:
        UnsupportedMediaTypeError (415), PayloadTooLargeError (413), InvalidRequestError (400);
        ClientGone when the client hangs up mid-body.
    """
    check_content_type(request)
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise PayloadTooLargeError(f"The request body is {declared} bytes; the limit is {limit} bytes.")
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise PayloadTooLargeError(f"The request body exceeds the limit of {limit} bytes.")
    except ClientDisconnect:
        raise ClientGone() from None
    body = decode_content(bytes(body), request.headers.get("content-encoding", ""), limit)
    if len(body) > _THREAD_PARSE_BYTES:
        return await run_in_threadpool(parse_json, bytes(body))
    return parse_json(bytes(body))


_CODINGS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}


def decode_content(body: bytes, encoding: str, limit: int) -> bytes:
    """`body` with its `Content-Encoding` codings undone, last applied first (RFC 9110
    §8.4.1); `identity` or none: as it is.

    Raises:
        UnsupportedMediaTypeError (415): a coding other than gzip / deflate.
        PayloadTooLargeError (413): the decoded body exceeds `limit` bytes.
        InvalidRequestError (400): the body is not valid data of its coding.
    """
    codings = [c.strip().lower() for c in encoding.split(",") if c.strip()]
    for coding in reversed(codings):
        if coding == "identity":
            continue
        if coding not in _CODINGS:
            raise UnsupportedMediaTypeError(
                f"Unsupported Content-Encoding '{coding}': send the body uncompressed, or with "
                "gzip or deflate.", code="unsupported_media_type")
        decoder = zlib.decompressobj(_CODINGS[coding])
        try:
            out = decoder.decompress(body, limit + 1)
        except zlib.error as exc:
            raise InvalidRequestError(f"The request body is not valid {coding} data ({exc}).") from None
        if len(out) > limit or decoder.unconsumed_tail:
            raise PayloadTooLargeError(f"The decoded request body exceeds the limit of {limit} bytes.")
        body = out
    return body


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def parse_json(body: bytes) -> dict[str, Any]:
    """Parse and check a body (see the module docstring); raises InvalidRequestError."""
    try:
        data = json.loads(body, parse_constant=_no_constant)
    except RecursionError:
        raise _too_deep() from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidRequestError(
            f"We could not parse the JSON body of your request ({exc}). The body must be a JSON object."
        ) from None
    if not isinstance(data, dict):
        raise InvalidRequestError("The request body must be a JSON object.")
    _check_tree(data, surrogates=_SURROGATE_ESCAPE.search(body) is not None)
    return data


def _too_deep() -> InvalidRequestError:
    return InvalidRequestError(f"The JSON body is nested too deeply (the limit is {MAX_DEPTH} levels).")


def _check_tree(data: dict[str, Any], *, surrogates: bool) -> None:
    """Depth and (when the body has surrogate escapes) text validity, iteratively."""
    stack: list[tuple[Any, tuple[str | int, ...]]] = [(data, ())]
    while stack:
        node, path = stack.pop()
        if len(path) >= MAX_DEPTH:
            raise _too_deep()
        items = node.items() if isinstance(node, dict) else enumerate(node)
        for key, value in items:
            if surrogates and isinstance(key, str):
                _check_text(key, path)
            if isinstance(value, dict | list):
                if value:
                    stack.append((value, (*path, key)))
            elif surrogates and isinstance(value, str):
                _check_text(value, (*path, key))


def _check_text(text: str, path: tuple[str | int, ...]) -> None:
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        param = ".".join(f"[{p}]" if isinstance(p, int) else str(p) for p in path) or None
        raise InvalidRequestError(
            f"Invalid '{param}': the string holds a lone UTF-16 surrogate "
            f"(U+{ord(text[exc.start]):04X}), which is not Unicode text.",
            param=param,
        ) from None
