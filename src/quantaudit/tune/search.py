"""The mixed-precision search itself, on a table of per-unit options; measurement is a callback.

Each unit has options (format, stored bytes, sensitivity): the sensitivity is the mean KLD when
only that unit is quantized in that format (the audit's per-layer sensitivity). The prediction
for a plan is the sum of its units' sensitivities (additive errors); every plan the search acts on
is *measured*, and the predicted value is kept beside the measured one.

Order of moves. Only the lower convex hull of a unit's (bytes, sensitivity) points is worth
using: a point above it costs bytes that another mix buys more accuracy with. Starting from each
unit's cheapest hull point, moves up the hull are ordered by sensitivity removed per byte added,
greedily across units: Intel Neural Compressor's op-by-op fallback ordered by sensitivity, and
the greedy solution of the multiple-choice knapsack that ModelOpt's ``auto_quantize`` solves as a
linear programme (the LP optimum differs from it by at most one fractional unit).

Budget mode: the plans along that order are prefixes ``P_0 .. P_N``; the smallest passing prefix
is found by bisection on measured values (a handful of evaluations, not N); then a second pass
tries to lower raised units one rung again (cheapest predicted loss per byte first), keeping each
lowering the measurement accepts. Effective-bits mode: the greedy fill of the byte target
(moves that no longer fit are skipped), plus the prefixes before it, each measured; the lowest
measured KLD within the target wins.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Option:
    format: str
    bytes: int
    sensitivity: float


@dataclass(frozen=True)
class Move:
    unit: str
    source: Option
    target: Option

    @property
    def gain(self) -> float:
        """Sensitivity removed per byte added."""
        return (self.source.sensitivity - self.target.sensitivity) / (self.target.bytes - self.source.bytes)


def hull(options: list[Option]) -> list[Option]:
    """Lower convex hull of (bytes, sensitivity), cheapest first, sensitivity strictly falling."""
    points: list[Option] = []
    for o in sorted(options, key=lambda o: (o.bytes, o.sensitivity)):
        if points and o.sensitivity >= points[-1].sensitivity:
            continue  # no better than something no bigger
        while len(points) >= 2:
            a, b = points[-2], points[-1]
            # b is not on the hull when the a->o slope is at least as steep as a->b
            if (a.sensitivity - b.sensitivity) * (o.bytes - a.bytes) <= (a.sensitivity - o.sensitivity) * (b.bytes - a.bytes):
                points.pop()
            else:
                break
        points.append(o)
    return points


def greedy_moves(table: dict[str, list[Option]]) -> tuple[dict[str, Option], list[Move]]:
    """Each unit's starting (cheapest) option and all hull moves, best gain per byte first."""
    hulls = {unit: hull(options) for unit, options in table.items()}
    start = {unit: h[0] for unit, h in hulls.items()}
    heap = [(-Move(u, h[0], h[1]).gain, u, 1) for u, h in hulls.items() if len(h) > 1]
    heapq.heapify(heap)
    moves = []
    while heap:
        _, unit, rung = heapq.heappop(heap)
        h = hulls[unit]
        moves.append(Move(unit, h[rung - 1], h[rung]))
        if rung + 1 < len(h):  # hull slopes fall along a unit, so its next move can only come later
            heapq.heappush(heap, (-Move(unit, h[rung], h[rung + 1]).gain, unit, rung + 1))
    return start, moves


def apply_moves(start: dict[str, Option], moves: list[Move]) -> dict[str, Option]:
    plan = dict(start)
    for m in moves:
        plan[m.unit] = m.target
    return plan


def predicted(plan: dict[str, Option]) -> float:
    return sum(o.sensitivity for o in plan.values())


def plan_bytes(plan: dict[str, Option]) -> int:
    return sum(o.bytes for o in plan.values())


def key(plan: dict[str, Option]) -> tuple:
    return tuple(sorted((unit, o.format) for unit, o in plan.items()))


@dataclass
class Trial:
    label: str
    plan: dict[str, Option]
    measured: dict  # what measure() returned
    passed: bool


@dataclass
class Searcher:
    """Measures plans once each (cached) and keeps every trial for the trade-off curve."""

    measure: Callable[[dict[str, Option]], dict]
    passes: Callable[[dict], bool]
    trials: list[Trial] = field(default_factory=list)
    _cache: dict = field(default_factory=dict)

    def trial(self, plan: dict[str, Option], label: str) -> Trial:
        k = key(plan)
        if k not in self._cache:
            measured = self.measure(plan)
            self._cache[k] = Trial(label, dict(plan), measured, self.passes(measured))
            self.trials.append(self._cache[k])
        return self._cache[k]


def search_budget(table: dict[str, list[Option]], searcher: Searcher, refine: int) -> tuple[Trial, dict]:
    """The cheapest measured plan found that passes (or the most accurate one if none does)."""
    start, moves = greedy_moves(table)
    n = len(moves)
    prefix = lambda k: apply_moves(start, moves[:k])  # noqa: E731
    lo = searcher.trial(prefix(0), "most aggressive (greedy step 0)")
    info = {"greedy_moves": n, "bisection_steps": 0, "lowering_tried": 0, "lowered": []}
    if lo.passed:
        info["chosen_prefix"] = 0
        return lo, info
    hi_k, hi = n, searcher.trial(prefix(n), f"most accurate (greedy step {n})")
    if not hi.passed:
        info["chosen_prefix"] = n
        return hi, info
    lo_k = 0
    while hi_k - lo_k > 1:  # invariant: prefix(lo_k) fails, prefix(hi_k) passes (as measured)
        mid = (lo_k + hi_k) // 2
        t = searcher.trial(prefix(mid), f"greedy step {mid}/{n}")
        info["bisection_steps"] += 1
        if t.passed:
            hi_k, hi = mid, t
        else:
            lo_k = mid
    info["chosen_prefix"] = hi_k
    best = hi
    for m in lowering_candidates(table, best.plan)[:refine]:
        if best.plan[m.unit] != m.target:
            continue
        lowered = dict(best.plan)
        lowered[m.unit] = m.source
        t = searcher.trial(lowered, f"lower {m.unit} to {m.source.format}")
        info["lowering_tried"] += 1
        if t.passed:
            best = t
            info["lowered"].append({"unit": m.unit, "from": m.target.format, "to": m.source.format})
    return best, info


def lowering_candidates(table: dict[str, list[Option]], plan: dict[str, Option]) -> list[Move]:
    """One rung down the hull for every raised unit, smallest predicted loss per byte saved first."""
    out = []
    for unit, chosen in plan.items():
        h = hull(table[unit])
        i = next((j for j, o in enumerate(h) if o == chosen), 0)
        if i > 0:
            out.append(Move(unit, h[i - 1], h[i]))
    return sorted(out, key=lambda m: m.gain)


def fill_bytes(table: dict[str, list[Option]], limit: int) -> tuple[dict[str, Option], list[int]]:
    """Greedy fill of a byte limit along the move order, and the prefix lengths that fit whole."""
    start, moves = greedy_moves(table)
    plan, used = dict(start), plan_bytes(start)
    blocked: set[str] = set()
    fitting_prefixes, whole = [0], True
    for k, m in enumerate(moves, 1):
        extra = m.target.bytes - m.source.bytes
        if m.unit in blocked or used + extra > limit:
            blocked.add(m.unit)  # a unit's later rungs depend on this one
            whole = False
            continue
        plan[m.unit], used = m.target, used + extra
        if whole:
            fitting_prefixes.append(k)
    return plan, fitting_prefixes


def search_size(table: dict[str, list[Option]], searcher: Searcher, limit: int, probes: int) -> tuple[Trial, dict]:
    """The lowest measured KLD among the greedy fill and up to ``probes`` prefixes within ``limit`` bytes."""
    start, moves = greedy_moves(table)
    fill, prefixes = fill_bytes(table, limit)
    last = prefixes[-1]
    picks = sorted({last * j // max(1, probes - 1) for j in range(probes)} | {last}) if probes > 0 else []
    trials = [searcher.trial(fill, "greedy fill of the size target")]
    trials += [searcher.trial(apply_moves(start, moves[:k]), f"greedy step {k}/{len(moves)}") for k in picks]
    best = min(trials, key=lambda t: t.measured["kld"]["mean"])
    return best, {"greedy_moves": len(moves), "fill_moves": sum(1 for u in fill if fill[u] != start[u]),
                  "prefixes_measured": picks}
