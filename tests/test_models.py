"""Model loading: HF folder, GGUF (cached), short names, and the errors a user can hit."""

from __future__ import annotations

import time

import pytest
import torch

from quantaudit.errors import UserError
from quantaudit.models import load_model, resolve_model_path

LLAMA2C_REFERENCE = (
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the park. "
    "One day, she saw a big, red ball."
)


def test_stories260k_greedy_generation_matches_llama2c_reference(stories):
    tok = stories.tokenizer
    ids = tok("Once upon a time", return_tensors="pt").input_ids
    assert ids[0, 0].item() == tok.bos_token_id  # BOS first, as llama2.c's run.c
    with torch.inference_mode():
        out = stories.model.generate(ids, max_new_tokens=40, do_sample=False)
    text = tok.decode(out[0], skip_special_tokens=True)
    assert text.startswith(LLAMA2C_REFERENCE), text


def test_stories260k_shape(stories):
    cfg = stories.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size) == (64, 5, 512)
    assert sum(p.numel() for p in stories.model.parameters()) == 260_032 - 0  # tied embeddings


def test_fingerprint_is_stable_and_identifies_the_folder(stories, shared_dir):
    again = load_model(stories.source)
    assert again.fingerprint == stories.fingerprint


@pytest.mark.parametrize(
    "spec, fragment",
    [
        ("/nonexistent/model", "model not found"),
        ("no-such-short-name", "short name"),
    ],
)
def test_missing_model_is_a_user_error(spec, fragment):
    with pytest.raises(UserError, match=fragment):
        resolve_model_path(spec)


def test_folder_without_config_and_non_gguf_file(tmp_path):
    with pytest.raises(UserError, match="no config.json"):
        resolve_model_path(str(tmp_path))
    other = tmp_path / "weights.bin"
    other.write_bytes(b"x")
    with pytest.raises(UserError, match="not .gguf"):
        resolve_model_path(str(other))


def test_corrupt_gguf_is_a_user_error(tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTAUDIT_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF but not really")
    with pytest.raises(UserError, match="cannot load model"):
        load_model(str(bad))
    assert not any((tmp_path / "cache").rglob("config.json"))  # nothing half-written in the cache


@pytest.mark.slow
def test_smollm2_gguf_cache_reloads_fast_and_identically(smollm2):
    start = time.perf_counter()
    again = load_model("smollm2-135m")
    elapsed = time.perf_counter() - start
    assert again.source == smollm2.source and "quantaudit" in again.source
    a = dict(smollm2.model.named_parameters())
    for name, p in again.model.named_parameters():
        assert torch.equal(p, a[name]), name
    cfg = again.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size) == (30, 576, 49152)
    # Loose sanity bound, not a benchmark: a cached reload must not re-run the ~20 s dequantization.
    assert elapsed < 10, elapsed
