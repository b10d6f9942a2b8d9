"""Paired statistics of a candidate model against its baseline, as llama.cpp ``--kl-divergence``.

Reference: llama.cpp ``tools/perplexity/perplexity.cpp`` (``log_softmax`` against stored base
log-probs, ``kl_divergence`` and its final summary). Per scored token (position ``t`` predicting
token ``t + 1``):

* ``kld``         KL(base‖quant) = Σ_v p_b(v) (log p_b(v) − log p_q(v));
* ``kld_reverse`` KL(quant‖base), the same with the roles swapped;
* ``top1``        argmax p_q == argmax p_b;
* ``delta_p``     Δp = p_q(target) − p_b(target);
* ``nll``         −log p(target) of each model.

Aggregates follow llama.cpp's formulas: a mean and its uncertainty are ``sum/n`` and
``sqrt((sum2/n − mean²) / (n − 1))``; PPL = exp(mean nll) ± PPL·unc(mean nll); ln(PPL(q)/PPL(b))
has uncertainty ``sqrt(u_q² + u_b² − 2 cov)`` with ``cov = (Σ nll_q nll_b / n − m_q m_b) / (n − 1)``
(evaluated as ``sqrt((var_q + var_b − 2 n·cov) / (n − 1))``, one root, so identical models give 0);
PPL(q) − PPL(b) likewise; the log-prob correlation is ``cov / (u_q u_b)`` (Pearson's r of the two
nll series); RMS Δp is
``sqrt(mean Δp²)`` ± ``unc(mean Δp²) / (2 RMS)``; top-1 agreement p ± ``sqrt(p (1 − p) / (n − 1))``.
Percentiles use llama.cpp's sorted-array interpolation: the q-quantile of n sorted values sits at
position ``q (n − 1)``, linearly interpolated between its neighbours (numpy's ``"linear"`` method;
the median is the 0.5-quantile, which is llama.cpp's mean of the two middle values for even n).

The base distribution arrives as a :class:`BaselineChunk`: the top-K base log-probs and their ids
(the rest of the vocabulary is one *tail bin* of mass ``1 − Σ_K p_b``) or, with ``topk_ids=None``,
all V log-probs ("exact" mode, empty tail). KL over the K ids plus the tail bin is the KL of the
two distributions coarse-grained to K + 1 outcomes: a lower bound of the full-vocabulary KL that
equals it exactly when K = V, so both modes share one definition.

Where this differs from llama.cpp, and why:

* base log-probs are exact float32 (llama.cpp stores all V as uint16 steps of a [max − 16, max]
  range and skips terms with log p_b < −16, an approximation): quantaudit.baseline keeps the base
  model's final hidden states instead and recomputes the logits;
* uncertainties use the formula for every n ≥ 2 (llama.cpp prints 0 below 11 tokens);
* which positions are scored is decided by the windows (quantaudit.data: every position of a
  window, as lm-eval); llama.cpp scores only the second half of each chunk.

Memory: :class:`PairedAccumulator` keeps three float32 scalars per scored token (forward KL,
reverse KL, Δp: 12 bytes a token) for the percentiles, plus float64 running sums; never logits,
so memory grows by a few bytes per token, not with vocabulary × windows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .errors import UserError

# Percentiles reported for per-token KL (llama.cpp's list); Δp adds the quartiles as llama.cpp does.
KLD_PERCENTILES = {"max": 1.0, "p99.9": 0.999, "p99": 0.99, "p95": 0.95, "p90": 0.90, "median": 0.5,
                   "p10": 0.10, "p5": 0.05, "p1": 0.01, "p0.1": 0.001, "min": 0.0}
DELTA_P_PERCENTILES = {"max": 1.0, "p99.9": 0.999, "p99": 0.99, "p95": 0.95, "p90": 0.90, "p75": 0.75,
                       "median": 0.5, "p25": 0.25, "p10": 0.10, "p5": 0.05, "p1": 0.01, "p0.1": 0.001, "min": 0.0}
# 1 − Σ_K exp(log p) is only resolved to ~1e-7 from float32 log-probs; tail masses are floored
# here so a rounding-level tail never yields log(0).
TAIL_FLOOR = 1e-8


@dataclass
class BaselineChunk:
    """What a baseline keeps of its logits for T scored tokens.

    ``topk_logprobs`` [T, K] float32, descending, with ``topk_ids`` [T, K] (int32/int64); or, in
    exact mode (``topk_ids is None``), all V log-probs [T, V] in vocabulary order.
    ``target_logprob`` [T] float32 is the exact base log-prob of the next token. ``argmax`` [T]
    is the base model's top token, taken once when the chunk is made: a baseline reused for N
    candidates then does not repeat a pass over the vocabulary per candidate.
    """

    topk_logprobs: torch.Tensor
    topk_ids: torch.Tensor | None
    target_logprob: torch.Tensor
    argmax: torch.Tensor | None = None

    @property
    def tokens(self) -> int:
        return self.target_logprob.shape[0]

    @property
    def top_k(self) -> int | None:
        """K, or None when the chunk holds the full vocabulary."""
        return None if self.topk_ids is None else self.topk_ids.shape[-1]

    @property
    def nbytes(self) -> int:
        extra = [t.nbytes for t in (self.topk_ids, self.argmax) if t is not None]
        return self.topk_logprobs.nbytes + self.target_logprob.nbytes + sum(extra)

    def top1(self) -> torch.Tensor:
        """The base model's argmax token at each position."""
        if self.argmax is not None:
            return self.argmax
        return self.topk_logprobs.argmax(-1) if self.topk_ids is None else self.topk_ids[:, 0].long()

    def rows(self, rows: slice) -> BaselineChunk:
        """The chunk of tokens ``rows`` (views)."""
        ids, argmax = (None if t is None else t[rows] for t in (self.topk_ids, self.argmax))
        return BaselineChunk(self.topk_logprobs[rows], ids, self.target_logprob[rows], argmax)

    @staticmethod
    def cat(chunks: list[BaselineChunk]) -> BaselineChunk:
        """Consecutive chunks of top-K log-probs as one."""
        return BaselineChunk(torch.cat([c.topk_logprobs for c in chunks]), torch.cat([c.topk_ids for c in chunks]),
                             torch.cat([c.target_logprob for c in chunks]))

    def to(self, device) -> BaselineChunk:
        ids, argmax = (None if t is None else t.to(device) for t in (self.topk_ids, self.argmax))
        return BaselineChunk(self.topk_logprobs.to(device), ids, self.target_logprob.to(device), argmax)


def summarize_logits(logits: torch.Tensor, targets: torch.Tensor, k: int | None = None) -> BaselineChunk:
    """Base logits [T, V] and next tokens [T] -> a :class:`BaselineChunk` (``k=None``: exact, no sort)."""
    logprobs = F.log_softmax(logits.float(), dim=-1)
    target_logprob = logprobs.gather(-1, targets[:, None].long()).squeeze(-1)
    if k is None or k >= logprobs.shape[-1]:
        return BaselineChunk(logprobs, None, target_logprob, logprobs.argmax(-1))
    values, ids = logprobs.topk(k, dim=-1, sorted=True)
    return BaselineChunk(values, ids, target_logprob)


def target_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """−log softmax(logits)[target] per row of logits [T, V], in float32."""
    return F.cross_entropy(logits.float(), targets.long(), reduction="none")


def scored_rows(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None):
    """Logits [..., V] and targets [...] -> the scored rows [T, V] and [T] (a view when all are scored)."""
    if mask is None or bool(mask.all()):
        return logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)
    return logits[mask], targets[mask]


def _rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Σ_v a·b per row without materialising a·b (a batched matmul: ~3x faster than mul + sum on CPU)."""
    return torch.einsum("tv,tv->t", a, b)


def token_statistics(base: BaselineChunk, quant_logits: torch.Tensor, targets: torch.Tensor) -> dict:
    """Per-token paired statistics (see the module docstring) of quant logits [T, V] against ``base``."""
    if quant_logits.shape[0] != base.tokens:
        raise ValueError(f"baseline chunk has {base.tokens} tokens, candidate logits {quant_logits.shape[0]}")
    quant = F.log_softmax(quant_logits.float(), dim=-1)
    lb = base.topk_logprobs
    lq = quant if base.topk_ids is None else quant.gather(-1, base.topk_ids.long())
    pb, pq = lb.exp(), lq.exp()
    diff = lb - lq
    kld = _rowdot(pb, diff)
    kld_reverse = 0.0 - _rowdot(pq, diff)  # 0 − x rather than −x: +0.0, not −0.0, when equal
    if base.topk_ids is not None:  # the tail bin: everything outside the base top-K, as one outcome
        tail_b = (1 - pb.sum(-1, dtype=torch.float64)).clamp_min(TAIL_FLOOR)
        tail_q = (1 - pq.sum(-1, dtype=torch.float64)).clamp_min(TAIL_FLOOR)
        log_ratio = tail_b.log() - tail_q.log()
        kld = kld + (tail_b * log_ratio).float()
        kld_reverse = kld_reverse - (tail_q * log_ratio).float()
    target_q = quant.gather(-1, targets[:, None].long()).squeeze(-1)
    return {
        "kld": kld,
        "kld_reverse": kld_reverse,
        "delta_p": target_q.exp() - base.target_logprob.exp(),
        "top1": quant.argmax(-1) == base.top1(),  # both argmaxes taken on log-probs, ties alike
        "nll_base": -base.target_logprob,
        "nll_quant": -target_q,
    }


class Moments:
    """float64 running sums of a per-token series: count, Σx, Σx²."""

    def __init__(self):
        self.n, self.s1, self.s2 = 0, 0.0, 0.0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().double()
        self.n += x.numel()
        self.s1 += float(x.sum())
        self.s2 += float((x * x).sum())

    @property
    def mean(self) -> float:
        return self.s1 / self.n

    @property
    def var(self) -> float:
        """Population variance ``Σx²/n − mean²``."""
        return max(self.s2 / self.n - self.mean**2, 0.0)

    def mean_unc(self) -> tuple[float, float]:
        """Mean and its standard error ``sqrt(var / (n − 1))`` (llama.cpp ``mean_and_uncertainty``)."""
        return self.mean, math.sqrt(self.var / (self.n - 1))


def _require_tokens(n: int) -> None:
    if n < 2:
        raise UserError(f"only {n} scored token(s): at least 2 are needed; give more text or a longer --seq-len")


class PerplexityAccumulator:
    """One model's perplexity over streamed tokens: PPL = exp(mean nll) ± PPL·unc(mean nll)."""

    def __init__(self):
        self.nll = Moments()

    def add_nll(self, nll: torch.Tensor) -> None:
        self.nll.add(nll)

    def update(self, logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        rows, tgt = scored_rows(logits, targets, mask)
        self.add_nll(target_nll(rows, tgt))

    @property
    def tokens(self) -> int:
        return self.nll.n

    def summary(self) -> dict:
        _require_tokens(self.tokens)
        mean, unc = self.nll.mean_unc()
        ppl = math.exp(mean)
        return {"tokens": self.tokens, "ppl": ppl, "ppl_unc": ppl * unc, "ln_ppl": mean, "ln_ppl_unc": unc}


def paired_difference(first: torch.Tensor, second: torch.Tensor) -> tuple[float, float]:
    """Mean of ``second − first`` per token and its standard error (as :meth:`Moments.mean_unc`), for
    two candidates' per-token values on the same tokens against the same baseline. Pairing removes
    the token-to-token variation both share, so a real difference far smaller than either mean's
    own uncertainty is still resolved."""
    if first.shape != second.shape:
        raise ValueError(f"paired values need the same tokens: {tuple(first.shape)} vs {tuple(second.shape)}")
    _require_tokens(first.numel())
    d = second.double() - first.double()
    return float(d.mean()), math.sqrt(float(d.var(unbiased=False)) / (d.numel() - 1))


def percentiles(values: np.ndarray, fractions: dict[str, float]) -> dict[str, float]:
    """llama.cpp's percentiles: linear interpolation at position ``q (n − 1)`` of the sorted values."""
    found = np.quantile(values.astype(np.float64), list(fractions.values()), method="linear")
    return {name: float(v) for name, v in zip(fractions, found)}


class PairedAccumulator:
    """Streams (baseline chunk, candidate logits) pairs into llama.cpp's KL-divergence summary."""

    PER_TOKEN = ("kld", "kld_reverse", "delta_p")  # kept as float32 for the percentiles

    def __init__(self):
        self.base, self.quant = PerplexityAccumulator(), PerplexityAccumulator()
        self.sum_nll_cross = 0.0
        self.moments = {name: Moments() for name in ("kld", "kld_reverse", "delta_p", "delta_p_sq")}
        self.same_top1 = 0
        self.values: dict[str, list[torch.Tensor]] = {name: [] for name in self.PER_TOKEN}
        self.top_k: int | None = None

    def update(self, base: BaselineChunk, quant_logits: torch.Tensor, targets: torch.Tensor,
               mask: torch.Tensor | None = None) -> None:
        """Add the scored positions of ``quant_logits`` [..., V] (``mask`` selects them, as ``base`` was built)."""
        if self.base.tokens and base.top_k != self.top_k:
            raise ValueError(f"baseline chunks mix top-K {self.top_k} and {base.top_k}")
        self.top_k = base.top_k
        rows, tgt = scored_rows(quant_logits, targets, mask)
        stats = token_statistics(base, rows, tgt)
        self.base.add_nll(stats["nll_base"])
        self.quant.add_nll(stats["nll_quant"])
        self.sum_nll_cross += float((stats["nll_base"].double() * stats["nll_quant"].double()).sum())
        for name in ("kld", "kld_reverse", "delta_p"):
            self.moments[name].add(stats[name])
        self.moments["delta_p_sq"].add(stats["delta_p"].double() ** 2)
        self.same_top1 += int(stats["top1"].sum())
        for name in self.PER_TOKEN:
            self.values[name].append(stats[name].detach().float().cpu())

    @property
    def tokens(self) -> int:
        return self.base.tokens

    def per_token(self, name: str) -> torch.Tensor:
        """The per-token values of ``name`` (one of ``PER_TOKEN``) in scoring order."""
        return torch.cat(self.values[name])

    @property
    def stored_bytes(self) -> int:
        """Bytes held for the percentiles: ``4 * len(PER_TOKEN)`` per token, independent of vocabulary."""
        return sum(t.nbytes for chunks in self.values.values() for t in chunks)

    def summary(self) -> dict:
        n = self.tokens
        _require_tokens(n)
        base, quant = self.base.summary(), self.quant.summary()
        nll_b, nll_q = self.base.nll, self.quant.nll
        # llama.cpp's covariance term; variances are combined before the square root (not as
        # u_q² + u_b² − 2 cov of rounded roots) so identical models give exactly 0.
        cov = self.sum_nll_cross / n - nll_b.mean * nll_q.mean
        ln_ratio = nll_q.mean - nll_b.mean
        ln_ratio_unc = math.sqrt(max(nll_q.var + nll_b.var - 2 * cov, 0.0) / (n - 1))
        ppl_b, ppl_q = base["ppl"], quant["ppl"]
        ppl_diff_var = ppl_q**2 * nll_q.var + ppl_b**2 * nll_b.var - 2 * ppl_q * ppl_b * cov
        correlation = cov / math.sqrt(nll_q.var * nll_b.var) if nll_q.var > 0 and nll_b.var > 0 else None
        mse, mse_unc = self.moments["delta_p_sq"].mean_unc()
        rms = math.sqrt(mse)
        top1 = self.same_top1 / n
        per_token = {name: self.per_token(name).numpy() for name in self.PER_TOKEN}
        kld_mean, kld_unc = self.moments["kld"].mean_unc()
        rev_mean, rev_unc = self.moments["kld_reverse"].mean_unc()
        dp_mean, dp_unc = self.moments["delta_p"].mean_unc()
        return {
            "tokens": n,
            "baseline_top_k": self.top_k,  # None: full-vocabulary KL; K: top-K + tail bin
            "ppl_base": ppl_b, "ppl_base_unc": base["ppl_unc"],
            "ppl": ppl_q, "ppl_unc": quant["ppl_unc"],
            "ln_ppl_ratio": ln_ratio, "ln_ppl_ratio_unc": ln_ratio_unc,
            "ppl_ratio": math.exp(ln_ratio), "ppl_ratio_unc": math.exp(ln_ratio) * ln_ratio_unc,
            "ppl_diff": ppl_q - ppl_b, "ppl_diff_unc": math.sqrt(max(ppl_diff_var, 0.0) / (n - 1)),
            # Pearson's r of the two nll series (llama.cpp's Cor(ln PPL(Q), ln PPL(base))), rounding clipped
            "logprob_correlation": None if correlation is None else max(-1.0, min(correlation, 1.0)),
            "kld": {"mean": kld_mean, "unc": kld_unc, **percentiles(per_token["kld"], KLD_PERCENTILES)},
            "kld_reverse": {"mean": rev_mean, "unc": rev_unc,
                            **percentiles(per_token["kld_reverse"], KLD_PERCENTILES)},
            "top1": top1, "top1_unc": math.sqrt(top1 * (1 - top1) / (n - 1)),
            "delta_p": {"mean": dp_mean, "unc": dp_unc, "rms": rms, "rms_unc": 0.5 / rms * mse_unc if rms > 0 else 0.0,
                        **percentiles(per_token["delta_p"], DELTA_P_PERCENTILES)},
        }
