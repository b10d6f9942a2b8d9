"""Paired comparison of a quantized model's task results against the baseline's.

Both models answer the very same items, so the right test is paired: only the items whose outcome
flipped carry information. The exact McNemar test treats the right->wrong count ``b`` among the
``b + c`` discordant items as Binomial(b + c, 1/2) under "no difference" and reports the two-sided
p-value ``min(1, 2 * P[X <= min(b, c)])`` (exact integer arithmetic, no scipy). The paired bootstrap
of the accuracy difference resamples items with replacement; since each item's difference is +1, -1
or 0, a resample's mean is fixed by how many of each it drew, so we draw those counts from the
multinomial directly: the same distribution as resampling indices, without an n_boot x n matrix.
"""

from __future__ import annotations

from math import comb

import numpy as np

from .scoring import TaskResult

# The audit's default task gates in quantaudit.measure.budget's grammar; the names are keys of
# :func:`compare_task_results` and :func:`tasks_summary`.
DEFAULT_TASK_BUDGET = "recovery>=0.95,acc_drop<=0.01"
BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_SEED = 0


def mcnemar_exact_p(right_to_wrong: int, wrong_to_right: int) -> float:
    """Two-sided exact McNemar p-value on the discordant pairs (1.0 when there are none)."""
    n = right_to_wrong + wrong_to_right
    tail = sum(comb(n, k) for k in range(min(right_to_wrong, wrong_to_right) + 1))
    return min(1.0, 2 * tail / 2**n)


def paired_bootstrap_ci(right_to_wrong: int, wrong_to_right: int, n: int, resamples: int = BOOTSTRAP_RESAMPLES,
                        seed: int = BOOTSTRAP_SEED, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of acc_quant - acc_base over paired bootstrap resamples of the n items."""
    probs = [wrong_to_right / n, right_to_wrong / n, (n - right_to_wrong - wrong_to_right) / n]
    counts = np.random.default_rng(seed).multinomial(n, probs, size=resamples)
    diffs = (counts[:, 0] - counts[:, 1]) / n
    lo, hi = np.quantile(diffs, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def compare_task_results(base: TaskResult, cand: TaskResult, metric: str = "acc",
                         resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED) -> dict:
    """Accuracy change of ``cand`` against ``base`` on the same items, for ``metric`` "acc" or "acc_norm".

    ``acc_base``/``acc_quant`` are the values of ``metric``; ``recovery`` = acc_quant / acc_base (None
    when the baseline scores 0); ``acc_drop`` = acc_base - acc_quant. Flips are counted per item. For an
    lm-eval task, ``metric`` names the lm-eval key paired (e.g. ``"exact_match,strict-match"``) and
    ``lm_eval`` holds both models' results entries.
    """
    if (base.fingerprint, base.lines) != (cand.fingerprint, cand.lines):
        raise ValueError(f"results of {base.task} and {cand.task} are over different items: cannot pair them")
    if base.bos != cand.bos:
        raise ValueError(f"baseline used BOS policy {base.bos!r}, candidate {cand.bos!r}: not comparable")
    per_item = {"acc": lambda r: r.correct, "acc_norm": lambda r: r.correct_norm}[metric]
    b_ok, c_ok = per_item(base), per_item(cand)
    if b_ok is None:
        raise ValueError(f"{base.task} ({base.kind}) has no {metric}")
    n = len(b_ok)
    right_to_wrong = sum(b and not c for b, c in zip(b_ok, c_ok))
    wrong_to_right = sum(c and not b for b, c in zip(b_ok, c_ok))
    acc_base, acc_quant = sum(b_ok) / n, sum(c_ok) / n
    lo, hi = paired_bootstrap_ci(right_to_wrong, wrong_to_right, n, resamples, seed)
    comparison = {
        "task": base.task,
        "metric": metric,
        "n": n,
        "acc_base": acc_base,
        "acc_quant": acc_quant,
        "recovery": acc_quant / acc_base if acc_base > 0 else None,
        "acc_drop": acc_base - acc_quant,
        "right_to_wrong": right_to_wrong,
        "wrong_to_right": wrong_to_right,
        "mcnemar_p": mcnemar_exact_p(right_to_wrong, wrong_to_right),
        "acc_diff_ci95": [lo, hi],
        "bootstrap": {"resamples": resamples, "seed": seed},
    }
    if "lm_eval" in base.summary:  # an lm-eval task (.harness): the key paired, and every metric as lm-eval has it
        comparison["metric"] = base.summary["metric"]
        comparison["lm_eval"] = {"base": base.summary["lm_eval"], "quant": cand.summary["lm_eval"]}
    return comparison


def tasks_summary(comparisons: list[dict]) -> dict:
    """The worst task for the budget: lowest ``recovery`` and largest ``acc_drop``, with their task names.

    Tasks whose baseline scored 0 have no recovery and are left out of its minimum.
    """
    with_recovery = [c for c in comparisons if c["recovery"] is not None]
    worst_recovery = min(with_recovery, key=lambda c: c["recovery"], default=None)
    worst_drop = max(comparisons, key=lambda c: c["acc_drop"], default=None)
    return {
        "recovery": worst_recovery and worst_recovery["recovery"],
        "recovery_task": worst_recovery and worst_recovery["task"],
        "acc_drop": worst_drop and worst_drop["acc_drop"],
        "acc_drop_task": worst_drop and worst_drop["task"],
        "tasks": [c["task"] for c in comparisons],
    }
