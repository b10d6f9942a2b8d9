"""Forward loops on stories260K, checked against brute force from full logits computed here."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from test_metrics import assert_summary_close, brute_force

from quantaudit.data import load_windows
from quantaudit.errors import UserError
from quantaudit.evaluate import (
    build_baseline,
    compare_models,
    compare_to_baseline,
    evaluate_perplexity,
    iter_hidden,
)


@pytest.fixture(scope="module")
def windows(stories, shared_dir):
    return load_windows(shared_dir / "data" / "tinystories_sample.txt", stories.tokenizer)


@pytest.fixture(scope="module")
def noisy(stories):
    """stories260K with Gaussian noise (5% of each tensor's std, seed 0): KLD ~0.07."""
    model = copy.deepcopy(stories.model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * p.std() * 0.05)
    return model


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        path = tmp_path_factory.mktemp("cache")
        patch.setenv("QUANTAUDIT_CACHE", str(path))
        yield path


def full_logits(model, windows) -> tuple[np.ndarray, np.ndarray]:
    """Scored float64 logits [N, V] and targets [N], one window per forward, no padding."""
    logits, targets = [], []
    with torch.no_grad():
        for i in range(windows.n):
            n = int(windows.lengths[i]) - 1
            out = model(windows.ids[i : i + 1, : n + 1]).logits[0, :n]
            logits.append(out.double().numpy())
            targets.append(windows.ids[i, 1 : n + 1].numpy())
    return np.concatenate(logits), np.concatenate(targets)


@pytest.fixture(scope="module")
def reference(stories, noisy, windows):
    base, targets = full_logits(stories.model, windows)
    quant, _ = full_logits(noisy, windows)
    return base, quant, targets


@pytest.fixture(scope="module")
def lockstep(stories, noisy, windows):
    return compare_models(stories, noisy, windows)


@pytest.fixture(scope="module")
def exact_baseline(stories, windows, cache):
    return build_baseline(stories, windows)


@pytest.fixture(scope="module")
def cached(exact_baseline, noisy, windows):
    return compare_to_baseline(exact_baseline, noisy, windows)


def test_stories_perplexity_matches_llama2c_and_brute_force(stories, windows, reference):
    base, _, targets = reference
    result = evaluate_perplexity(stories, windows)
    shifted = base - base.max(-1, keepdims=True)
    nll = np.log(np.exp(shifted).sum(-1)) - shifted[np.arange(len(targets)), targets]
    assert result["tokens"] == windows.scored_tokens == len(targets) == 1804
    assert 3.4 < result["ppl"] < 3.7  # llama2.c's figure for these stories: ~3.55
    assert result["ppl"] == pytest.approx(math.exp(nll.mean()), rel=1e-5)
    assert result["ppl_unc"] == pytest.approx(math.exp(nll.mean()) * math.sqrt(nll.var() / (len(nll) - 1)), rel=1e-4)
    assert result["tokens_per_s"] > 0
    one_by_one = evaluate_perplexity(stories, windows, batch_size=1)
    assert one_by_one["ppl"] == pytest.approx(result["ppl"], rel=1e-6)


def test_iter_hidden_cuts_each_batch_to_its_longest_window(stories, windows):
    batches = list(iter_hidden(stories, windows, batch_size=2))
    assert [(b[0].start, b[0].stop) for b in batches] == [(0, 2), (2, 4), (4, 5)]
    for part, hidden in batches:
        assert hidden.dtype == torch.float32
        assert hidden.shape == (part.stop - part.start, int(windows.lengths[part].max()), 64)


def test_model_against_itself_is_exactly_zero(stories, windows):
    s = compare_models(stories, stories.model, windows)
    assert s["tokens"] == 1804 and s["baseline_top_k"] is None
    assert s["kld"]["max"] == 0.0 and s["kld"]["mean"] == 0.0 and s["kld_reverse"]["max"] == 0.0
    assert s["top1"] == 1.0 and s["delta_p"]["rms"] == 0.0 and s["delta_p"]["max"] == 0.0
    assert s["ppl_ratio"] == 1.0 and s["ln_ppl_ratio_unc"] == 0.0 and s["ppl"] == s["ppl_base"]


def test_compare_models_matches_brute_force_on_a_perturbed_copy(lockstep, reference):
    assert 0.01 < lockstep["kld"]["mean"] < 0.3
    assert lockstep["ppl_ratio"] > 1.0 and lockstep["top1"] < 1.0
    assert_summary_close(lockstep, brute_force(*reference))


def test_cached_baseline_equals_lockstep_comparison(stories, windows, exact_baseline, cached, lockstep, reference):
    assert exact_baseline.meta["storage"] == ["hidden"] and exact_baseline.top_k is None
    assert exact_baseline.ppl["ppl"] == pytest.approx(lockstep["ppl_base"], rel=1e-9)
    assert_summary_close(cached, lockstep, rel=1e-6, abs_=1e-9)
    itself = compare_to_baseline(exact_baseline, stories, windows)
    assert itself["kld"]["max"] <= 1e-7 and itself["top1"] == 1.0  # base logits are recomputed bit-identically on CPU


def test_top64_baseline_is_within_one_percent_on_stories(stories, noisy, windows, cached):
    top64 = compare_to_baseline(build_baseline(stories, windows, k=64), noisy, windows)
    assert top64["baseline_top_k"] == 64
    assert top64["kld"]["mean"] <= cached["kld"]["mean"]  # the tail bin gives a lower bound
    assert top64["kld"]["mean"] == pytest.approx(cached["kld"]["mean"], rel=0.01)
    assert top64["top1"] == cached["top1"] and top64["ppl"] == cached["ppl"]


def test_mismatched_windows_or_vocabulary_are_user_errors(stories, windows, exact_baseline):
    with pytest.raises(UserError, match="other evaluation windows"):
        compare_to_baseline(exact_baseline, stories, windows.subset(2))
    other = torch.nn.Module()
    other.get_output_embeddings = lambda: torch.nn.Linear(4, 7)
    with pytest.raises(UserError, match="different vocabularies"):
        compare_models(stories, other, windows)
    with pytest.raises(UserError, match="at least 1"):
        build_baseline(stories, windows, k=0)
