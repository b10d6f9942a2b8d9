"""Shared fixtures: the real models and data in ../shared (skipped with a message when absent)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("QUANTAUDIT_QUIET", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED = (REPO / ".." / "shared").resolve()
STORIES_HF = SHARED / "models" / "stories260K" / "hf"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"../shared not found at {SHARED}: the real models and data live there")
    return SHARED


@pytest.fixture(scope="session")
def stories(shared_dir):
    """stories260K (llama2.c, Llama architecture, vocab 512) as a LoadedModel."""
    from quantaudit.models import load_model

    return load_model(str(STORIES_HF))


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M-Instruct, the embedded default (dequantized GGUF, cached)."""
    from quantaudit.models import load_model

    return load_model("smollm2-135m")
