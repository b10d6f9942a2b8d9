"""``quantaudit autotune``: the cheapest mixed-precision plan that meets an accuracy budget.

Steps, each measured on the same evaluation windows and the same cached baseline:

1. per candidate format (``--formats`` and ``--fallback``), one job: quantize the whole model, evaluate
   it (the uniform formats, real ``quantize()`` results), and measure each unit's sensitivity in it
   (:mod:`quantaudit.tune.candidates`). With ``--ray`` each job is a Ray task that sends back only the
   quantized linears (:class:`~quantaudit.tune.candidates.FormatParts`); the rest runs in this process,
   which holds the 16-bit model and those linears, as a sequential run does;
2. the search (:mod:`quantaudit.tune.search`), measuring plans composed from the per-format
   models' modules;
3. the chosen plan is quantized for real with ``quantize(QuantSpec(plan=...))`` and evaluated:
   that is the reported result (what ``export`` writes). If the composed estimate was too
   optimistic and the real plan misses the budget, more units are raised along the greedy order
   and the plan is quantized again (at most ``verify_attempts`` times). The result is never worse
   than the best uniform format: if that is cheaper than the verified plan, or the plan never
   verifies, the uniform format is the plan.

Outputs: ``DIR/autotune.json`` (plan, bytes, effective bits, metrics, ``best_uniform``, the
trade-off curve with predicted and measured KLD per point), ``DIR/plan.json`` (just the plan, for
``audit --plan`` / ``export``) and ``DIR/autotune.html`` (the report renderer's size-vs-KLD plot).
"""

from __future__ import annotations

import datetime as dt
import math
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

from .. import __version__
from ..baseline import open_shared_baseline
from ..errors import EXIT_BUDGET_FAILED, EXIT_OK, UserError
from ..evaluate import build_baseline, compare_to_baseline
from ..fileio import atomic_write_json, atomic_write_text, check_out_dir, output_dir
from ..measure.budget import Limit, check_budget
from ..progress import console
from ..quant import QuantSpec, quantize
from ..quant.formats import get_format
from ..quant.plan import effective_bits, expand_plan, plan_units
from ..session import open_session
from .candidates import Candidates, FormatParts
from .search import Option, Searcher, Trial, greedy_moves, plan_bytes, predicted, search_budget, search_size
from .settings import NONE, AutotuneSettings

METRIC_KEYS = ("tokens", "ppl_base", "ppl", "ppl_unc", "ppl_ratio", "ppl_ratio_unc", "ln_ppl_ratio", "ln_ppl_ratio_unc",
               "kld", "kld_reverse", "top1", "top1_unc", "delta_p")


OUTPUTS = ("autotune.json", "plan.json", "autotune.html")


def _metrics(summary: dict) -> dict:
    return {k: summary[k] for k in METRIC_KEYS if k in summary}


def _point(label: str, source: str, weight_bytes: int, linear_bytes: int, params: int, summary: dict,
           predicted_kld: float | None, passed: bool | None) -> dict:
    return {"label": label, "source": source, "weight_bytes": weight_bytes, "linear_weight_bytes": linear_bytes,
            "effective_bits": effective_bits(linear_bytes, params), "kld": summary["kld"]["mean"],
            "predicted_kld": predicted_kld, "ppl_ratio": summary["ppl_ratio"], "top1": summary["top1"], "passed": passed}


@dataclass
class Uniform:
    """One format quantized for the whole model: its evaluation, what plans take from it, and each unit's
    sensitivity in it (``{unit: KLD}``). What a Ray worker returns (small: the quantized linears only)."""

    summary: dict
    parts: FormatParts | None  # None for 16-bit
    sensitivity: dict[str, float]


class _Tuner:
    """Holds what every step shares: model, windows, baseline, candidates, option table. In a Ray worker the
    baseline the driver published is opened (``baseline_path``) rather than built."""

    def __init__(self, s: AutotuneSettings, limits: list[Limit], baseline_path: Path | None = None):
        self.s, self.limits = s, limits
        session = open_session(s)
        self.lm, self.eval, self.calib = session.lm, session.eval, session.calib
        self.baseline = (build_baseline(self.lm, self.eval, batch_size=s.batch_size) if baseline_path is None
                         else open_shared_baseline(baseline_path))
        self.units = plan_units(self.lm.model)
        self.params = sum(u.params for u in self.units)
        # What plans are composed on: the 16-bit model, with its KV cache quantized as --kv-cache says (scales
        # calibrated on it: the composed estimate's third approximation, see tune.candidates)
        self.base = self.lm.model if s.kv_cache == "none" else self.quantize(self.spec(NONE)).model
        self.distributed: dict | None = None  # with --ray: how the jobs ran (cluster.run_description)

    def passes(self, summary: dict) -> bool:
        return not check_budget(summary, self.limits)

    def evaluate(self, model) -> dict:
        return compare_to_baseline(self.baseline, model, self.eval, self.s.batch_size)

    def quantize(self, spec: QuantSpec):
        return quantize(self.lm.model, spec, self.calib)

    def spec(self, fmt: str, plan: dict[str, str] | None = None) -> QuantSpec:
        return self.s.quant_spec(fmt, plan)

    def measure_uniform(self, fmt: str) -> Uniform:
        """``fmt`` for the whole model: quantized, evaluated, and each unit's sensitivity measured in it."""
        qm = self.quantize(self.spec(fmt))
        summary = self.evaluate(qm.model)
        parts = FormatParts.of(qm, self.units)
        windows = self.eval.subset(self.s.sensitivity_windows)
        return Uniform(summary, parts, Candidates(self.base, self.units, {fmt: parts}).sensitivities(fmt, windows))

    def uniform(self) -> dict[str, Uniform]:
        """Every ladder format for the whole model (:meth:`measure_uniform`), one after another or as Ray tasks."""
        quantized = [f for f in self.s.ladder if f != NONE]
        if self.s.ray:
            measured = self._uniform_on_ray(quantized)
        else:
            measured = {}
            for fmt in quantized:
                console.print(f"[bold]{fmt}[/bold]: {get_format(fmt).description}")
                measured[fmt] = self.measure_uniform(fmt)
        if NONE in self.s.ladder:
            measured[NONE] = Uniform(self.evaluate(self.base), None, {})
        return {f: measured[f] for f in self.s.ladder}

    def _uniform_on_ray(self, formats: list[str]) -> dict[str, Uniform]:
        """One Ray task per format (:func:`run_job`), on the baseline this process published."""
        import tempfile

        from ..cluster import connected, run_description, run_jobs
        from ..models import cache_dir

        with tempfile.TemporaryDirectory(prefix="autotune-jobs-", dir=cache_dir()) as attempts:
            with connected(self.s.ray, cache_dir()) as ray:
                settings = ray.put(self.s)
                arguments = {fmt: (settings, fmt, self.baseline.path, Path(attempts)) for fmt in formats}
                measured = dict(run_jobs(ray, run_job, arguments, device=self.s.device, what="format"))
                self.distributed = run_description(self.s.ray, ray, Path(attempts), formats)
        return measured

    def trial_point(self, t: Trial, fixed: int) -> dict:
        linear = plan_bytes(t.plan)
        return _point(t.label, "composed", fixed + linear, linear, self.params, t.measured, predicted(t.plan),
                      t.passed if self.limits else None)

    def verify(self, plan: dict[str, Option]):
        """quantize(spec with plan) and its evaluation: the numbers that are reported."""
        most_common = Counter(o.format for o in plan.values()).most_common(1)[0][0]  # only names lm_head's (excluded) format
        spec = self.spec(most_common, expand_plan(self.units, {u: o.format for u, o in plan.items()}))
        qm = self.quantize(spec)
        return qm, self.evaluate(qm.model)


def run_job(s: AutotuneSettings, fmt: str, baseline_path: Path, attempts: Path) -> Uniform:
    """One format in a Ray worker: the model and texts read again from the settings, the published baseline
    opened; the same :meth:`_Tuner.measure_uniform` a sequential run calls."""
    from ..cluster import record_attempt

    record_attempt(attempts, fmt)
    return _Tuner(s, [], baseline_path).measure_uniform(fmt)


def _raise_further(table: dict[str, list[Option]], plan: dict[str, Option], gap: float) -> dict[str, Option] | None:
    """Apply the next greedy moves until the predicted KLD falls by ``gap`` (at least one move)."""
    _, moves = greedy_moves(table)
    plan, removed, applied = dict(plan), 0.0, 0
    for m in moves:
        if plan[m.unit] == m.source:
            plan[m.unit] = m.target
            removed += m.source.sensitivity - m.target.sensitivity
            applied += 1
            if removed >= gap:
                break
    return plan if applied else None


def _kld_gap(summary: dict, limits: list[Limit]) -> float:
    kld = [l.value for l in limits if l.metric == "kld" and l.op in ("<=", "<")]
    return max(summary["kld"]["mean"] - min(kld), 0.0) if kld else 0.0


def autotune(s: AutotuneSettings, out: Path, force: bool = False) -> dict:
    """Run the whole search and write DIR/autotune.json, plan.json and autotune.html; returns the result."""
    started = time.perf_counter()
    s.check()  # every flag, before any slow work
    limits = s.limits()
    check_out_dir(out, force, OUTPUTS)
    s.use_shared_dir()  # with --ray: the baseline is published where every worker reads it
    tuner = _Tuner(s, limits)  # the model and texts: checked before --out is touched
    with output_dir(out, force, outputs=OUTPUTS) as work:
        result, summaries = _tune(s, tuner, limits, started)
        _write(result, summaries, work)
    return result


def _tune(s: AutotuneSettings, tuner: _Tuner, limits: list[Limit], started: float) -> tuple[dict, dict]:
    """The search and its verification (module docstring): the result and each uniform format's summary."""
    uniforms = tuner.uniform()
    cands = Candidates(tuner.base, tuner.units, {f: u.parts for f, u in uniforms.items() if u.parts is not None})
    summaries = {f: u.summary for f, u in uniforms.items()}
    fixed = cands.fixed_bytes()
    table = cands.table(s.ladder, {f: u.sensitivity for f, u in uniforms.items()})
    by_format = {(u, o.format): o for u, opts in table.items() for o in opts}

    uniform = []
    for fmt in s.ladder:
        linear = sum(cands.unit_bytes(u, fmt) for u in tuner.units)
        point = _point(f"uniform {fmt}", "quantize", fixed + linear, linear, tuner.params, summaries[fmt],
                       sum(by_format[(u.name, fmt)].sensitivity for u in tuner.units if (u.name, fmt) in by_format),
                       tuner.passes(summaries[fmt]) if limits else None)
        uniform.append({"name": fmt, **point, "failed": check_budget(summaries[fmt], limits), "metrics": _metrics(summaries[fmt])})

    def measure(plan: dict[str, Option]) -> dict:
        with cands.composed(plan):
            return tuner.evaluate(tuner.base)

    searcher = Searcher(measure, tuner.passes if limits else (lambda m: True))
    if s.effective_bits is not None:
        limit = math.floor(s.effective_bits / 8 * tuner.params)
        smallest = plan_bytes(greedy_moves(table)[0])
        if limit < smallest:
            raise UserError(f"--effective-bits {s.effective_bits:g} is below the smallest plan "
                            f"({effective_bits(smallest, tuner.params):.3f} bits with every unit in its cheapest format)")
        chosen, info = search_size(table, searcher, limit, s.probes)
        fitting = [u for u in uniform if u["linear_weight_bytes"] <= limit]
        best_uniform = min(fitting, key=lambda u: u["kld"]) if fitting else None
    else:
        chosen, info = search_budget(table, searcher, s.refine)
        passing = [u for u in uniform if u["passed"]]
        best_uniform = min(passing, key=lambda u: u["weight_bytes"]) if passing else None

    # Final verification by a real quantize() of the plan.
    plan, composed = chosen.plan, chosen
    attempts = []
    while True:
        qm, verified = tuner.verify(plan)
        attempts.append({"kld": verified["kld"]["mean"], "predicted_kld": predicted(plan),
                         "composed_kld": composed.measured["kld"]["mean"] if composed else None,
                         "weight_bytes": qm.weight_bytes(), "passed": tuner.passes(verified)})
        if s.effective_bits is not None or tuner.passes(verified) or len(attempts) >= s.verify_attempts:
            break
        raised = _raise_further(table, plan, _kld_gap(verified, limits))
        if raised is None:
            break
        plan, composed = raised, None
    tuned = set(expand_plan(tuner.units, {u: o.format for u, o in plan.items()}))
    linear = sum(r.storage_bytes() for n, r in qm.layers.items() if n in tuned)
    result_plan = {n: r.format for n, r in qm.layers.items() if n in tuned}
    final = {"label": "autotuned plan", "source": "quantize", "weight_bytes": qm.weight_bytes(), "linear_bytes": linear,
             "summary": verified, "plan": result_plan, "predicted_kld": predicted(plan), "passed": tuner.passes(verified)}
    outcome = "mixed plan verified by quantize()"
    if s.effective_bits is None and best_uniform is not None and (not final["passed"] or final["weight_bytes"] >= best_uniform["weight_bytes"]):
        fmt = best_uniform["name"]
        outcome = (f"uniform {fmt} kept: the mixed plan " + ("failed the budget when quantized for real"
                   if not final["passed"] else "was not smaller"))
        final = {"label": f"uniform {fmt}", "source": "quantize", "weight_bytes": best_uniform["weight_bytes"],
                 "linear_bytes": best_uniform["linear_weight_bytes"], "summary": summaries[fmt], "passed": True,
                 "plan": expand_plan(tuner.units, {u.name: fmt for u in tuner.units}),
                 "predicted_kld": best_uniform["predicted_kld"]}

    final_point = _point(final["label"] + " (quantize)", "quantize", final["weight_bytes"], final["linear_bytes"],
                         tuner.params, final["summary"], final["predicted_kld"], final["passed"] if limits else None)
    curve = [{k: u[k] for k in final_point} for u in uniform]
    curve += [tuner.trial_point(t, fixed) for t in searcher.trials] + [final_point]
    failed = check_budget(final["summary"], limits)
    result = {
        "mode": "effective_bits" if s.effective_bits is not None else "budget",
        "plan": final["plan"],
        "weight_bytes": final["weight_bytes"],
        "linear_weight_bytes": final["linear_bytes"],
        "linear_params": tuner.params,
        "effective_bits": effective_bits(final["linear_bytes"], tuner.params),
        "target_effective_bits": s.effective_bits,
        "kld": final["summary"]["kld"]["mean"],
        "predicted_kld": final["predicted_kld"],
        "composed_kld": attempts[-1]["composed_kld"] if final["label"] == "autotuned plan" else None,
        "metrics": _metrics(final["summary"]),
        "budget": [l.as_dict() for l in limits],
        "passed": not failed,
        "failed": failed,
        "exit_code": EXIT_OK if not failed else EXIT_BUDGET_FAILED,
        "best_uniform": None if best_uniform is None else {k: best_uniform[k] for k in
                                                           ("name", "weight_bytes", "linear_weight_bytes", "effective_bits", "kld", "passed")},
        "uniform": uniform,
        "curve": curve,
        "units": [{"name": u.name, "linears": list(u.linears), "params": u.params,
                   "format": final["plan"][u.linears[0]],
                   "options": [{"format": o.format, "bytes": o.bytes, "sensitivity_kld": o.sensitivity} for o in table[u.name]]}
                  for u in tuner.units],
        "search": {**info, "evaluations": len(searcher.trials), "verification": attempts, "outcome": outcome,
                   "measured_over_predicted": _additivity(curve)},
        "model": {"name": tuner.lm.name, "source": tuner.lm.source, "fingerprint": tuner.lm.fingerprint},
        "eval": tuner.eval.describe(),
        "calib": {**tuner.calib.describe(), "samples": tuner.calib.n},
        "settings": asdict(s),
        "seconds": time.perf_counter() - started,
    }
    if tuner.distributed is not None:
        result["ray"] = tuner.distributed
    return result, summaries


def _additivity(curve: list[dict]) -> float | None:
    """Median measured / predicted KLD over the measured plans: 1 when per-unit errors simply add up."""
    ratios = sorted(p["kld"] / p["predicted_kld"] for p in curve if p["predicted_kld"])
    return ratios[len(ratios) // 2] if ratios else None


def report_fragment(result: dict) -> dict:
    """The part of a report.json the HTML/Markdown renderers plot (``report["autotune"]["curve"]``)."""
    return {"autotune": result}


def _format_entry(name: str, description: str, summary: dict, weight_bytes: int, baseline_bytes: int,
                  limits: list[dict], failed: list[str]) -> dict:
    return {"name": name, "description": description, **_metrics(summary), "weight_bytes": weight_bytes,
            "compression": baseline_bytes / weight_bytes, "passed": not failed if limits else None, "failed": failed}


def _write(result: dict, summaries: dict, out: Path) -> None:
    from ..report.html import render_html

    uniform = {u["name"]: u for u in result["uniform"]}
    baseline_bytes = uniform[NONE]["weight_bytes"] if NONE in uniform else None
    any_summary = next(iter(summaries.values()))
    if baseline_bytes is None:  # 16-bit size of every tuned linear plus the fixed part
        some = result["uniform"][0]
        baseline_bytes = some["weight_bytes"] - some["linear_weight_bytes"] + 2 * result["linear_params"]
    formats = [_format_entry(f"uniform {u['name']}", get_format(u["name"]).description, summaries[u["name"]],
                             u["weight_bytes"], baseline_bytes, result["budget"], u["failed"]) for u in result["uniform"]]
    formats.append(_format_entry("autotuned plan", f"mixed precision, {result['effective_bits']:.3f} effective bits per weight",
                                 result["metrics"], result["weight_bytes"], baseline_bytes, result["budget"], result["failed"]))
    report = {
        "schema_version": 1, "quantaudit_version": __version__,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "model": result["model"], "eval": result["eval"], "calib": result["calib"],
        "settings": {k: v for k, v in result["settings"].items() if k != "budget"},
        "budget": result["budget"],
        "baseline": {"ppl": any_summary["ppl_base"], "ppl_unc": any_summary.get("ppl_base_unc"), "weight_bytes": baseline_bytes},
        "formats": formats,
        "recommendation": {"format": "autotuned plan" if result["passed"] else None, "passed": result["passed"],
                           "exit_code": result["exit_code"], "reason": summary_line(result)},
        **report_fragment(result),
    }
    atomic_write_json(out / "plan.json", {"plan": result["plan"]})
    atomic_write_text(out / "autotune.html", render_html(report))
    atomic_write_json(out / "autotune.json", result)  # last: its presence means the run finished


def summary_line(result: dict) -> str:
    b = result["best_uniform"]
    uniform = (f"best uniform {b['name']}: {b['weight_bytes'] / 1e6:.3f} MB, KLD {b['kld']:.4g}" if b
               else "no uniform format meets the target")
    verdict = "meets the budget" if result["passed"] else "FAILS: " + "; ".join(result["failed"])
    return (f"plan: {result['weight_bytes'] / 1e6:.3f} MB, {result['effective_bits']:.3f} effective bits, "
            f"KLD {result['kld']:.4g} (predicted {result['predicted_kld']:.4g}), {verdict}; {uniform}; "
            f"{result['search']['outcome']}")


def curve_table(result: dict):
    from rich.table import Table

    table = Table(title="size vs KLD: every plan measured (composed = modules swapped in; quantize = real)")
    for col in ("#", "plan", "measured by", "weights MB", "eff. bits", "predicted KLD", "measured KLD", "budget"):
        table.add_column(col, justify="left" if col in ("plan", "measured by", "budget") else "right")
    for i, p in enumerate(result["curve"], 1):
        verdict = "-" if p["passed"] is None else ("[green]pass[/green]" if p["passed"] else "[red]fail[/red]")
        pred = "-" if p["predicted_kld"] is None else f"{p['predicted_kld']:.4g}"
        table.add_row(str(i), p["label"], p["source"], f"{p['weight_bytes'] / 1e6:.3f}", f"{p['effective_bits']:.3f}",
                      pred, f"{p['kld']:.4g}", verdict)
    return table
