"""Accuracy budgets: ``"kld<=0.02,ppl_ratio<=1.05,top1>=0.9"`` parsed once, checked per format.

Each metric name maps to one place in a format's report entry, so the verdict always names the
measured value that failed.
"""

from __future__ import annotations

import math
import operator
import re
from dataclasses import dataclass

from ..errors import UserError

# metric -> (path into a format entry, what it means)
METRICS = {
    "kld": (("kld", "mean"), "mean KL(base||quant) per token"),
    "kld_p99": (("kld", "p99"), "99th percentile of per-token KLD"),
    "kld_max": (("kld", "max"), "largest per-token KLD"),
    "ppl_ratio": (("ppl_ratio",), "PPL(quant) / PPL(base)"),
    "top1": (("top1",), "share of tokens where both models' argmax agree"),
    "delta_p_rms": (("delta_p", "rms"), "RMS of p_quant(next) - p_base(next)"),
    "recovery": (("tasks_summary", "recovery"), "lowest task accuracy ratio acc_quant / acc_base"),
    "acc_drop": (("tasks_summary", "acc_drop"), "largest task accuracy drop acc_base - acc_quant"),
    "gen_identical": (("generation", "identical"), "share of --generate prompts continued identically"),
    "gen_check_drop": (("generation", "checks", "drop"), "--generate check pass rate, base minus quant"),
}
OPERATORS = {"<=": operator.le, ">=": operator.ge, "<": operator.lt, ">": operator.gt}
DEFAULT_BUDGET = "kld<=0.02,ppl_ratio<=1.05,top1>=0.9"
GRAMMAR = (
    "budget grammar: METRIC OP VALUE[,METRIC OP VALUE...] with OP one of <= >= < > and METRIC one of "
    + ", ".join(METRICS)
    + f' (example: "{DEFAULT_BUDGET}")'
)
_TERM = re.compile(r"^\s*([a-z0-9_]+)\s*(<=|>=|<|>)\s*([-+0-9.eE]+)\s*$")


@dataclass(frozen=True)
class Limit:
    metric: str
    op: str
    value: float

    def as_dict(self) -> dict:
        return {"metric": self.metric, "op": self.op, "value": self.value}

    def __str__(self) -> str:
        return f"{self.metric}{self.op}{self.value:g}"


def parse_budget(text: str) -> list[Limit]:
    """Parse a budget string; anything unparseable is a UserError that shows the grammar."""
    limits = []
    for term in filter(str.strip, text.split(",")):
        match = _TERM.match(term)
        if not match:
            raise UserError(f"cannot parse budget term {term.strip()!r}; {GRAMMAR}")
        metric, op, value = match.groups()
        if metric not in METRICS:
            raise UserError(f"unknown budget metric {metric!r}; {GRAMMAR}")
        try:
            number = float(value)
        except ValueError:
            raise UserError(f"budget value {value!r} is not a number; {GRAMMAR}") from None
        if not math.isfinite(number):
            raise UserError(f"budget value {value!r} is not a finite number; {GRAMMAR}")
        limits.append(Limit(metric, op, number))
    if not limits:
        raise UserError(f"empty budget; {GRAMMAR}")
    return limits


def metric_value(entry: dict, metric: str) -> float | None:
    """The measured value of ``metric`` in a format's report entry (None when not measured)."""
    node = entry
    for key in METRICS[metric][0]:
        if not isinstance(node, dict) or node.get(key) is None:
            return None
        node = node[key]
    return float(node)


def check_budget(entry: dict, limits: list[Limit]) -> list[str]:
    """Failed limits as readable strings (empty: the format passes).

    A limit on a metric that was not measured (e.g. ``recovery`` without ``--tasks``) fails: a
    budget nobody checked is not a budget that holds.
    """
    failed = []
    for limit in limits:
        value = metric_value(entry, limit.metric)
        if value is None:
            failed.append(f"{limit.metric} not measured (needed for {limit})")
        elif not OPERATORS[limit.op](value, limit.value):
            failed.append(f"{limit.metric} {value:.4g} fails {limit}")
    return failed
