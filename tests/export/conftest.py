"""Fixtures for the export tests: stories260K quantized once per (format, KV cache), small calibration.

AWQ runs with a 2-point grid here to keep the module fast; the export is what is under test, and it
must carry whatever the engine produced.
"""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def calib(stories, shared_dir):
    from quantaudit.data import load_windows

    return load_windows(shared_dir / "data" / "tinystories_sample.txt", stories.tokenizer, seq_len=32, n_windows=2,
                        role="calib")


@pytest.fixture(scope="session")
def ids(stories, shared_dir):
    from quantaudit.data import load_windows

    return load_windows(shared_dir / "data" / "tinystories_sample.txt", stories.tokenizer, seq_len=32, n_windows=2).ids


@pytest.fixture(scope="session")
def quantized(stories, calib):
    """quantized(fmt, kv="none", **spec) -> QuantizedModel, cached for the session."""
    from quantaudit.quant import AWQOptions, QuantSpec, quantize

    cache = {}

    def get(fmt: str, kv: str = "none", **spec):
        key = (fmt, kv, tuple(sorted((k, str(v)) for k, v in spec.items())))
        if key not in cache:
            spec = {"group_size": 64, "awq": AWQOptions(n_grid=2), **spec}
            cache[key] = quantize(stories.model, QuantSpec(format=fmt, kv_cache=kv, **spec), calib, progress=False)
        return cache[key]

    return get


@pytest.fixture(scope="session")
def common(shared_dir):
    """`quantaudit export` flags for stories260K with a small calibration."""
    data = str(shared_dir / "data" / "tinystories_sample.txt")
    return ["--model", str(shared_dir / "models" / "stories260K" / "hf"), "--calib", data, "--calib-size", "2",
            "--calib-seq", "32"]
