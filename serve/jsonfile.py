"""The one reader of the JSON files in a model directory (config.json, genai_config.json,
generation_config.json, llorch.json, tokenizer_config.json, chat_template.json)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_json_object(path: Path, error: type[Exception]) -> dict[str, Any]:
    """The JSON object in `path` (UTF-8).

    Args:
        path: the file; a missing one reads as {}.
        error: the exception class to raise for a file that is not valid JSON (its message
            names the file: `<path>: not valid JSON (<why>)`).

    Returns:
        The object; {} for a missing file or a top-level value that is not an object.

    Raises:
        error: the file is not valid UTF-8 JSON.
    """
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        raise error(f"{path}: not valid JSON ({exc})") from None
    return data if isinstance(data, dict) else {}
