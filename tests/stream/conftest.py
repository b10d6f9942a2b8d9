"""Fixtures for the streaming tests: stories260K, small evaluation and calibration sets, one torch thread."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def stories_dir(shared_dir):
    return shared_dir / "models" / "stories260K" / "hf"


@pytest.fixture(scope="session")
def text(shared_dir):
    return shared_dir / "data" / "tinystories_sample.txt"


@pytest.fixture(scope="session")
def eval_windows(stories, text):
    """7 windows of 200 tokens: with batch_size 3, two full batches and a partial one, windows of unequal length."""
    from quantaudit.data import load_windows

    return load_windows(text, stories.tokenizer, seq_len=200, n_windows=7)


@pytest.fixture(scope="session")
def calib(stories, text):
    from quantaudit.data import load_windows

    return load_windows(text, stories.tokenizer, seq_len=128, n_windows=5, role="calib")
