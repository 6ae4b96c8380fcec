"""Message content as one text, as the API adapters read it (`serve.api_responses` for
Responses input items, `serve.api_messages` for Anthropic `system` and `tool_result`
content): a string as it is, or a list of text parts joined by newlines (as the chat route
joins them). Anything else is a 400 naming where it stands, in the route's own notation.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from serve.errors import InvalidRequestError


def join_text_parts(content: Any, param: str, *, fields: Mapping[str, str],
                    part_path: str = "{param}[{j}]") -> str:
    """`content` as one string.

    Args:
        content: a string, or a list of parts `{"type": t, fields[t]: str}` (parsed JSON).
        param: where `content` stands in the request (`input[0].content`), for errors.
        fields: the part types accepted → the field that holds each one's text
            (`{"text": "text"}`; Responses also `{"refusal": "refusal"}`).
        part_path: where part `j` stands: OpenAI's `input[0].content[1]` (the default) or
            Anthropic's `system.[1]` (`"{param}.[{j}]"`).

    Raises:
        InvalidRequestError: `content` is neither; a part of a type not in `fields` (param
            `….type`); a part whose text field is no string (param `….<field>`).
    """
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise InvalidRequestError("Content must be a string or a list of content parts.", param=param)
    texts = []
    for j, part in enumerate(content):
        at = part_path.format(param=param, j=j)
        kind = part.get("type") if isinstance(part, dict) else None
        field = fields.get(kind) if isinstance(kind, str) else None
        if field is None:
            raise InvalidRequestError(f"Content parts of type {kind!r} are not supported by this server; only "
                                      f"{', '.join(map(repr, fields))} (no images, files or audio).",
                                      param=f"{at}.type")
        if not isinstance(part.get(field), str):
            raise InvalidRequestError(f"Invalid '{at}.{field}': {kind} parts need a string '{field}'.",
                                      param=f"{at}.{field}")
        texts.append(part[field])
    return "\n".join(texts)
