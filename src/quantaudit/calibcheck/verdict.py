"""What calib-check's measured KLDs support, and nothing more.

Every KLD here is measured on the same eval tokens against the same baseline, so two calibration sets (or
two sample counts) are compared by the mean of their per-token KLD difference and its paired standard error
(:func:`quantaudit.metrics.paired_difference`): the token-to-token variation both share cancels, and a real
difference far below either KLD's own uncertainty is still resolved.

* A format is **calibration-sensitive** when some pair of sets differs by more than ``SIGNIFICANT_SIGMAS``
  standard errors; otherwise it is "insensitive on this evaluation text" and no ranking is claimed. Only the
  significant pairs are ever stated as an order; the best (lowest mean) and worst sets are named with the sets
  the measurement cannot tell from them. With many sets and formats some 2-sigma pair is expected by
  chance (about one in twenty independent pairs); the report gives every pair's difference and error so a
  reader can judge a lone borderline one.
* A sample-count curve **flattens** at the smallest count from which no larger count measures better than
  the full set by more than ``SIGNIFICANT_SIGMAS`` standard errors: more samples stopped helping there.
* Whether the coverage heuristics **predicted** the measured order is counted over the significant pairs
  only (a pair inside the noise has no order to predict).
"""

from __future__ import annotations

from itertools import combinations
from typing import TYPE_CHECKING, Callable

from ..metrics import paired_difference

if TYPE_CHECKING:
    import torch

SIGNIFICANT_SIGMAS = 2.0
SENSITIVE = "calibration-sensitive"
INSENSITIVE = "insensitive on this evaluation text"
ONE_SET = "not judged: one calibration set"


def compare_pair(a: str, a_tokens: torch.Tensor, b: str, b_tokens: torch.Tensor) -> dict:
    """``difference`` = mean KLD of ``b`` minus that of ``a`` per token, its standard error, and the better
    of the two when the difference is significant (else ``better`` is None)."""
    diff, unc = paired_difference(a_tokens, b_tokens)
    significant = abs(diff) > SIGNIFICANT_SIGMAS * unc
    return {"a": a, "b": b, "difference": diff, "unc": unc, "significant": significant,
            "better": (a if diff > 0 else b) if significant else None}


def sensitivity(per_token: dict[str, torch.Tensor]) -> dict:
    """The verdict for one format from each set's per-token KLDs (``label -> values``, in the sets' order)."""
    labels = list(per_token)
    pairs = [compare_pair(a, per_token[a], b, per_token[b]) for a, b in combinations(labels, 2)]
    out = {"verdict": ONE_SET if len(labels) < 2 else INSENSITIVE, "sensitive": None if len(labels) < 2 else False,
           "pairs": pairs, "best": None, "best_tied": [], "worst": None, "worst_tied": [], "best_vs_worst": None}
    if any(p["significant"] for p in pairs):
        means = {label: float(values.double().mean()) for label, values in per_token.items()}
        best, worst = min(labels, key=means.get), max(labels, key=means.get)
        significant = {frozenset((p["a"], p["b"])) for p in pairs if p["significant"]}

        def tied(ref: str) -> list[str]:  # the sets the measurement cannot tell from ``ref``
            return [label for label in labels if label != ref and frozenset((ref, label)) not in significant]

        out.update(verdict=SENSITIVE, sensitive=True, best=best, best_tied=tied(best), worst=worst,
                   worst_tied=tied(worst), best_vs_worst=compare_pair(best, per_token[best], worst, per_token[worst]))
    return out


def flattening(per_count: dict[int, torch.Tensor]) -> dict:
    """Where a sample-count curve stops improving (``samples -> per-token KLDs``; the largest count is the
    reference). Each point: its difference to the largest count (positive: worse) and the paired error."""
    counts = sorted(per_count)
    full = counts[-1]
    points = []
    for count in counts:
        diff, unc = paired_difference(per_count[full], per_count[count]) if count != full else (0.0, 0.0)
        points.append({"samples": count, "difference_to_largest": diff, "unc": unc,
                       "worse_than_largest": diff > SIGNIFICANT_SIGMAS * unc and count != full,
                       "better_than_largest": diff < -SIGNIFICANT_SIGMAS * unc and count != full})
    flat_from = next(p["samples"] for i, p in enumerate(points) if not any(q["worse_than_largest"] for q in points[i:]))
    if len(counts) == 1:
        text = f"one sample count ({full}): no curve to judge"
    elif flat_from == full:
        previous = counts[-2]
        text = (f"still improving at {full} samples ({previous} samples measured worse): more calibration samples "
                "may help")
    elif flat_from == counts[0]:
        text = f"no measurable gain from more samples: {flat_from} sample(s) already within the noise of {full}"
    else:
        text = f"stops improving after {flat_from} samples (more, up to {full}, measured no better)"
    if better := [str(p["samples"]) for p in points if p["better_than_largest"]]:
        text += f"; {', '.join(better)} sample(s) measured better than {full}: more samples did not help here"
    return {"points": points, "flattens_at": flat_from, "still_improving": flat_from == full and len(counts) > 1,
            "verdict": text}


def coverage_agreement(formats: list[dict], prefers: Callable[[str, str], str]) -> dict:
    """Did coverage pick the measured better set of every significant pair? ``prefers(a, b)`` is coverage's
    pick; each significant pair of each format's ``pairs`` gets ``coverage_prefers`` and ``coverage_agrees``."""
    judged = agreeing = 0
    for f in formats:
        for pair in f.get("pairs") or []:
            if pair["significant"]:
                pair["coverage_prefers"] = prefers(pair["a"], pair["b"])
                pair["coverage_agrees"] = pair["coverage_prefers"] == pair["better"]
                judged += 1
                agreeing += pair["coverage_agrees"]
    if judged == 0:
        verdict = "nothing to predict: no pair of sets differs significantly"
    elif agreeing == judged:
        verdict = f"predicted: coverage picked the measured better set in all {judged} significant pair(s)"
    elif agreeing == 0:
        verdict = f"did not predict: coverage picked the measured worse set in all {judged} significant pair(s)"
    else:
        verdict = f"partly: coverage picked the measured better set in {agreeing} of {judged} significant pairs"
    return {"significant_pairs": judged, "agreeing": agreeing, "verdict": verdict}
