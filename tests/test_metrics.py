"""metrics.py against independent float64 brute force (numpy), on small random logits."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from quantaudit.errors import UserError
from quantaudit.metrics import (
    DELTA_P_PERCENTILES,
    KLD_PERCENTILES,
    PairedAccumulator,
    PerplexityAccumulator,
    summarize_logits,
)


def llama_percentile(sorted_values: np.ndarray, fraction: float) -> float:
    """llama.cpp's ``percentile`` lambda, transcribed."""
    if fraction <= 0:
        return float(sorted_values[0])
    if fraction >= 1:
        return float(sorted_values[-1])
    p = fraction * (len(sorted_values) - 1)
    ip = int(p)
    p -= ip
    return float((1 - p) * sorted_values[ip] + p * sorted_values[min(ip + 1, len(sorted_values) - 1)])


def mean_unc(x: np.ndarray) -> tuple[float, float]:
    n = len(x)
    return x.mean(), math.sqrt(x.var() / (n - 1))


def brute_force(base_logits: np.ndarray, quant_logits: np.ndarray, targets: np.ndarray) -> dict:
    """Every statistic from full float64 logits, written out the long way."""
    lb = base_logits - np.log(np.exp(base_logits - base_logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - base_logits.max(-1, keepdims=True)
    lq = quant_logits - np.log(np.exp(quant_logits - quant_logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - quant_logits.max(-1, keepdims=True)
    pb, pq = np.exp(lb), np.exp(lq)
    kld = (pb * (lb - lq)).sum(-1)
    kld_rev = (pq * (lq - lb)).sum(-1)
    rows = np.arange(len(targets))
    nll_b, nll_q = -lb[rows, targets], -lq[rows, targets]
    dp = pq[rows, targets] - pb[rows, targets]
    n = len(targets)
    mb, ub = mean_unc(nll_b)
    mq, uq = mean_unc(nll_q)
    cov = np.cov(nll_q, nll_b, bias=True)[0, 1] / (n - 1)
    ln_ratio_unc = math.sqrt(uq**2 + ub**2 - 2 * cov)
    mse, mse_unc = mean_unc(dp**2)
    top1 = (quant_logits.argmax(-1) == base_logits.argmax(-1)).mean()
    out = {
        "tokens": n,
        "ppl_base": math.exp(mb), "ppl_base_unc": math.exp(mb) * ub,
        "ppl": math.exp(mq), "ppl_unc": math.exp(mq) * uq,
        "ln_ppl_ratio": mq - mb, "ln_ppl_ratio_unc": ln_ratio_unc,
        "ppl_ratio": math.exp(mq - mb), "ppl_ratio_unc": math.exp(mq - mb) * ln_ratio_unc,
        "ppl_diff": math.exp(mq) - math.exp(mb),
        "ppl_diff_unc": math.sqrt((math.exp(mq) * uq) ** 2 + (math.exp(mb) * ub) ** 2
                                  - 2 * math.exp(mq) * math.exp(mb) * cov),
        "logprob_correlation": np.corrcoef(nll_q, nll_b)[0, 1],
        "top1": top1, "top1_unc": math.sqrt(top1 * (1 - top1) / (n - 1)),
    }
    for name, values, fractions in (("kld", kld, KLD_PERCENTILES), ("kld_reverse", kld_rev, KLD_PERCENTILES),
                                    ("delta_p", dp, DELTA_P_PERCENTILES)):
        m, u = mean_unc(values)
        ordered = np.sort(values)
        out[name] = {"mean": m, "unc": u, **{k: llama_percentile(ordered, f) for k, f in fractions.items()}}
    out["delta_p"]["rms"] = math.sqrt(mse)
    out["delta_p"]["rms_unc"] = 0.5 / math.sqrt(mse) * mse_unc
    return out


TIMINGS = {"seconds", "tokens_per_s"}


def assert_summary_close(got: dict, want: dict, rel: float = 1e-4, abs_: float = 1e-6) -> None:
    for key, value in want.items():
        if isinstance(value, dict):
            assert_summary_close(got[key], value, rel, abs_)
        elif value is None:
            assert got[key] is None, key
        elif key not in TIMINGS:
            assert got[key] == pytest.approx(value, rel=rel, abs=abs_), key


def random_pair(seed: int, tokens: int = 400, vocab: int = 64, noise: float = 0.5):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(tokens, vocab, generator=g) * 3
    quant = base + noise * torch.randn(tokens, vocab, generator=g)
    targets = torch.multinomial(torch.softmax(base, -1), 1, generator=g).squeeze(-1)
    return base, quant, targets


def test_exact_statistics_match_brute_force_and_stream_in_any_split():
    base, quant, targets = random_pair(0)
    want = brute_force(base.double().numpy(), quant.double().numpy(), targets.numpy())
    whole = PairedAccumulator()
    whole.update(summarize_logits(base, targets), quant, targets)
    streamed = PairedAccumulator()
    for part in torch.tensor_split(torch.arange(len(targets)), [7, 150, 151]):
        streamed.update(summarize_logits(base[part], targets[part]), quant[part], targets[part])
    assert 0.05 < want["kld"]["mean"] < 0.5  # a realistic, non-trivial divergence
    assert 0.5 < want["top1"] < 1.0
    assert_summary_close(whole.summary(), want)
    assert_summary_close(streamed.summary(), want)
    assert whole.summary()["baseline_top_k"] is None


def test_identical_models_give_exact_zeros():
    base, _, targets = random_pair(1)
    acc = PairedAccumulator()
    acc.update(summarize_logits(base, targets), base.clone(), targets)
    s = acc.summary()
    assert s["kld"]["mean"] == 0.0 and s["kld"]["max"] == 0.0 and s["kld_reverse"]["max"] == 0.0
    assert s["top1"] == 1.0 and s["top1_unc"] == 0.0
    assert s["delta_p"]["mean"] == 0.0 and s["delta_p"]["rms"] == 0.0 and s["delta_p"]["rms_unc"] == 0.0
    assert s["ppl_ratio"] == 1.0 and s["ln_ppl_ratio_unc"] == 0.0 and s["ppl"] == s["ppl_base"]


def test_topk_tail_bin_is_the_coarse_grained_kl_and_a_monotone_lower_bound():
    base, quant, targets = random_pair(2, vocab=100)
    lb, lq = torch.log_softmax(base.double(), -1), torch.log_softmax(quant.double(), -1)
    full = None
    previous = 0.0
    for k in (5, 20, 50, 99, 100):
        acc = PairedAccumulator()
        acc.update(summarize_logits(base, targets, k), quant, targets)
        s = acc.summary()
        # brute force: K+1 outcomes = the base top-K ids and "everything else"
        ids = lb.topk(k, -1).indices
        pb, pq = lb.exp().gather(-1, ids), lq.exp().gather(-1, ids)
        tb, tq = (1 - pb.sum(-1)).clamp_min(1e-8), (1 - pq.sum(-1)).clamp_min(1e-8)
        want = ((pb * (pb.log() - pq.log())).sum(-1) + tb * (tb.log() - tq.log())).numpy()
        want_rev = ((pq * (pq.log() - pb.log())).sum(-1) + tq * (tq.log() - tb.log())).numpy()
        assert s["kld"]["mean"] == pytest.approx(want.mean(), rel=1e-4)
        assert s["kld_reverse"]["mean"] == pytest.approx(want_rev.mean(), rel=1e-4)
        assert s["kld"]["p99"] == pytest.approx(llama_percentile(np.sort(want), 0.99), rel=1e-4)
        assert s["kld"]["mean"] >= previous - 1e-6  # refining the partition can only raise KL
        previous = s["kld"]["mean"]
        assert s["baseline_top_k"] == (None if k == 100 else k)  # K = V is the exact mode
        full = s
    exact = (lb.exp() * (lb - lq)).sum(-1).mean().item()
    assert full["kld"]["mean"] == pytest.approx(exact, rel=1e-5)


def test_masked_update_scores_only_masked_positions():
    base, quant, targets = random_pair(3, tokens=60)
    mask = torch.rand(60, generator=torch.Generator().manual_seed(0)) > 0.3
    masked = PairedAccumulator()
    masked.update(summarize_logits(base[mask], targets[mask]), quant, targets, mask)
    selected = PairedAccumulator()
    selected.update(summarize_logits(base[mask], targets[mask]), quant[mask], targets[mask])
    assert masked.summary() == selected.summary()
    assert masked.tokens == int(mask.sum())


def test_memory_is_a_few_bytes_per_token_whatever_the_vocabulary():
    acc = PairedAccumulator()
    for seed in range(6):
        base, quant, targets = random_pair(seed, tokens=100, vocab=2000)
        acc.update(summarize_logits(base, targets, 16), quant, targets)
        assert acc.stored_bytes == 12 * acc.tokens  # three float32 per token, no logits
    held = [t for chunks in acc.values.values() for t in chunks]
    assert all(t.dtype == torch.float32 and t.dim() == 1 for t in held)


def test_perplexity_accumulator_matches_brute_force():
    base, _, targets = random_pair(4)
    acc = PerplexityAccumulator()
    acc.update(base.reshape(8, 50, -1), targets.reshape(8, 50))
    lb = torch.log_softmax(base.double(), -1)
    nll = -lb[torch.arange(len(targets)), targets].numpy()
    m, u = mean_unc(nll)
    s = acc.summary()
    assert s["tokens"] == 400
    assert s["ppl"] == pytest.approx(math.exp(m), rel=1e-6)
    assert s["ppl_unc"] == pytest.approx(math.exp(m) * u, rel=1e-5)


def test_too_few_tokens_is_a_user_error():
    base, quant, targets = random_pair(5, tokens=1)
    acc = PairedAccumulator()
    acc.update(summarize_logits(base, targets), quant, targets)
    with pytest.raises(UserError, match="at least 2"):
        acc.summary()
