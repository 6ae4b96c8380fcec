"""Shared fixtures for the GGUF tests: the real SmolLM2 GGUF and transformers' view of it."""

from __future__ import annotations

from pathlib import Path

import pytest

from export.default_model import fetch_gguf
from export.gguf_reader import GGUFCheckpoint


@pytest.fixture(scope="session")
def smollm_gguf() -> Path:
    """SmolLM2-135M-Instruct.Q4_1.gguf via default_model steps 1-2 (cached in models/.cache)."""
    return fetch_gguf(progress=False)


@pytest.fixture(scope="session")
def smollm(smollm_gguf: Path) -> GGUFCheckpoint:
    return GGUFCheckpoint(smollm_gguf)
