"""``quantaudit audit``: quantize to every candidate format and audit each against one baseline.

One orchestrator, two executors that differ only in how activations flow:

1. validate every flag, then read every input (model, texts, tasks, plan, prompts: :func:`check_inputs`)
   before ``--out`` is touched;
2. the candidates (:func:`candidates`: the ``--formats``, then the ``--plan``), minus those a previous run
   finished with the same settings (``--resume``: ``formats/NAME.json``);
3. measure them: in memory (:mod:`.in_memory`, one candidate at a time), or layer by layer from the
   safetensors files (:mod:`.streamed`, every candidate at once) when ``--streaming`` is on, or auto and the
   model would not fit. Each returns typed :class:`~.measurement.Measured` results; :func:`format_entry` renders
   each into the report's entry, saved to ``formats/NAME.json`` at once (atomically), so an interrupted
   audit loses at most what was in flight;
4. the budget, checked once per entry; the recommendation; ``report.json``, ``report.md``, ``report.html``,
   each written atomically.

The run writes into ``.DIR.incoming`` beside ``DIR`` (:func:`quantaudit.fileio.output_dir`, under a lock), which
replaces ``DIR`` in one atomic swap when the reports are written: a failed or killed run leaves the previous
run in ``DIR`` as it was, and its finished formats in ``.DIR.incoming`` for ``--resume``.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from dataclasses import asdict
from pathlib import Path

from .. import __version__
from ..errors import EXIT_BUDGET_FAILED, EXIT_OK, UserError
from ..fileio import atomic_write_json, atomic_write_text, check_out_dir, output_dir
from ..measure.budget import Limit, check_budget
from ..measure.sensitivity import decoder_index
from ..progress import console
from ..tasks import LM_EVAL_RESULTS, tasks_summary
from .in_memory import InMemoryExecutor
from .inputs import Inputs, check_inputs
from .measurement import BaselineMeasured, Candidate, Measured
from .settings import AuditSettings
from .streamed import StreamedExecutor, use_streaming

SENSITIVITY_TOP = 10
REPORT_FILES = ("report.json", "report.md", "report.html")
OUTPUTS = (*REPORT_FILES, "formats", LM_EVAL_RESULTS)
RESUME_HINT = " or --resume to continue the run in it"
STATISTICS = ("ppl", "ppl_unc", "ppl_ratio", "ppl_ratio_unc", "ln_ppl_ratio", "ln_ppl_ratio_unc", "kld", "kld_reverse",
              "top1", "top1_unc", "delta_p", "baseline_top_k")


def format_entry(m: Measured, settings: AuditSettings) -> dict:
    """The report's entry for one candidate: the one place a measurement becomes report fields."""
    c, stats = m.candidate, m.stats
    entry = {
        "name": c.name,
        "description": c.description,
        "trtllm_quant_algo": c.trtllm_quant_algo,
        "plan": c.spec.plan,  # {layer: format} for the mixed-precision candidate, else None
        "kv_cache": settings.kv_cache,
        **{key: stats[key] for key in STATISTICS},
        "weight_bytes": m.weight_bytes,
        "kv_bytes_per_token": m.kv_bytes_per_token,
        "quantize_seconds": m.seconds["quantize"],
        "eval_seconds": stats["seconds"],
        "eval_tokens_per_s": stats["tokens_per_s"],
        "seconds": m.seconds,
        "calib": m.calib,
        "fallback_layers": [{"name": n, "format": l.format, "reason": l.fallback_reason}
                            for n, l in m.layers.items() if l.fallback_reason is not None],
        "decoder_layers": [{"index": i, **m.drift[f"decoder.{i}"]} for i in range(m.decoder_layers)
                           if f"decoder.{i}" in m.drift],
        "layers": [
            {"name": n, "decoder_layer": decoder_index(n), "format": l.format,
             **m.drift.get(n, {"drift_rel": None, "cosine": None}),
             "sensitivity_kld": m.sensitivity.get(n, m.sensitivity.get(f"model.layers.{decoder_index(n)}"))}
            for n, l in m.layers.items()
        ],
    }
    if settings.sensitivity == "decoder" and m.sensitivity:
        entry["decoder_sensitivity"] = dict(m.sensitivity)
    if m.not_computed:
        entry["not_computed"] = dict(m.not_computed)
    if m.tasks is not None:
        entry["tasks"] = m.tasks
        entry["tasks_summary"] = tasks_summary(m.tasks)
    if m.generation is not None:
        entry["generation"] = m.generation
    return entry


def saved_entry(out: Path, candidate: Candidate, key: str) -> dict | None:
    """The entry a previous run in ``out`` finished for ``candidate`` with the same settings, if any (``--resume``)."""
    saved = out / "formats" / f"{candidate.name}.json"
    if saved.is_file():
        try:
            record = json.loads(saved.read_text(encoding="utf-8"))
            same = record.get("settings_fingerprint") == key and record["entry"].get("plan") == candidate.spec.plan
        except (ValueError, AttributeError, KeyError, TypeError):
            console.print(f"[yellow]{saved} is damaged: {candidate.name} is audited again[/yellow]")
            return None
        if same:
            console.print(f"[dim]{candidate.name}: reusing the finished result in {saved}[/dim]")
            return record["entry"]
    return None


def save_entry(out: Path, entry: dict, key: str) -> None:
    atomic_write_json(out / "formats" / f"{entry['name']}.json", {"settings_fingerprint": key, "entry": entry})


def recommendation(formats: list[dict], limits: list[Limit]) -> dict:
    """The cheapest passing format; if none passes, the closest one and the layers to keep high."""
    passing = sorted((f for f in formats if f["passed"]), key=lambda f: f["weight_bytes"])
    if passing:
        best = passing[0]
        return {"format": best["name"], "passed": True, "exit_code": EXIT_OK, "keep_high_precision": [],
                "reason": f"cheapest format meeting the budget ({', '.join(map(str, limits))}): "
                          f"{best['weight_bytes'] / 2**20:.1f} MiB of weights, mean KLD {best['kld']['mean']:.4g}"}
    closest = min(formats, key=lambda f: f["kld"]["mean"])
    ranked = sorted((l for l in closest["layers"] if l["sensitivity_kld"] is not None),
                    key=lambda l: -l["sensitivity_kld"])
    keep = [l["name"] for l in ranked[:SENSITIVITY_TOP]]
    return {
        "format": None, "passed": False, "exit_code": EXIT_BUDGET_FAILED, "closest": closest["name"],
        "keep_high_precision": keep,
        "reason": (f"no format meets the budget ({', '.join(map(str, limits))}); closest is {closest['name']} "
                   f"({'; '.join(closest['failed'])}). Its most sensitive layers are listed to keep in higher "
                   "precision; `quantaudit autotune` verifies such a plan by measurement."),
    }


def run_audit(settings: AuditSettings, out: Path, force: bool = False, resume: bool = False) -> dict:
    """Run the whole audit and write the report files; returns the report dict (module docstring)."""
    started = time.perf_counter()
    settings.check()  # every flag, before anything is read or written
    limits = settings.limits()
    check_out_dir(out, force or resume, OUTPUTS, RESUME_HINT)
    streamed = use_streaming(settings)
    if streamed and settings.ray:
        raise UserError("--ray runs each format's job in memory, but this model does not fit (--streaming auto "
                        "chose layer streaming); drop --ray, or free memory")
    inputs = check_inputs(settings, streamed)
    with output_dir(out, force, resume, OUTPUTS, keep_partial=True, hint=RESUME_HINT) as work:
        (work / "formats").mkdir(exist_ok=True)
        key = settings.fingerprint()
        done = {c.name: entry for c in inputs.candidates if resume and (entry := saved_entry(work, c, key)) is not None}
        if streamed:
            executor = StreamedExecutor(settings, inputs)
        elif settings.ray:
            from .distributed import RayExecutor

            executor = RayExecutor(settings, inputs, work, work / LM_EVAL_RESULTS)
        else:
            executor = InMemoryExecutor(settings, inputs, work / LM_EVAL_RESULTS)
        for measured in executor.measure([c for c in inputs.candidates if c.name not in done]):
            entry = format_entry(measured, settings)
            save_entry(work, entry, key)
            done[entry["name"]] = entry
            del measured
        formats = [done[c.name] for c in inputs.candidates]
        return _report(settings, inputs, executor.baseline(), formats, limits, work, started)


def _report(settings: AuditSettings, inputs: Inputs, base: BaselineMeasured, formats: list[dict],
            limits: list[Limit], out: Path, started: float) -> dict:
    """The budget (once per entry: a resumed one may have been saved under another), the recommendation and the
    report, written to ``out`` (report.json last)."""
    for entry in formats:
        entry["failed"] = check_budget(entry, limits)
        entry["passed"] = not entry["failed"]
        entry["compression"] = base.weight_bytes / entry["weight_bytes"]
    calib, eval_windows = inputs.session.calib, inputs.session.eval
    report = {
        "schema_version": 1,
        "quantaudit_version": __version__,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "model": base.model,
        "eval": eval_windows.describe(),
        "calib": {**calib.describe(), "samples": calib.n},
        "settings": {**asdict(settings), "baseline_top_k": base.top_k},
        "budget": [l.as_dict() for l in limits],
        "baseline": {**base.ppl, "weight_bytes": base.weight_bytes, "kv_bytes_per_token": base.kv_bytes_per_token},
        "formats": formats,
        "sensitivity_top": {
            f["name"]: sorted(({"name": l["name"], "sensitivity_kld": l["sensitivity_kld"]}
                               for l in f["layers"] if l["sensitivity_kld"] is not None),
                              key=lambda l: -l["sensitivity_kld"])[:SENSITIVITY_TOP]
            for f in formats
        },
        "outliers": base.outliers,
        "recommendation": recommendation(formats, limits),
    }
    if base.tasks:
        report["tasks"] = base.tasks
    if base.streaming:
        report["streaming"] = base.streaming
    if base.distributed:
        report["ray"] = base.distributed
    report["timings"] = {"baseline_seconds": base.seconds,
                         "format_seconds": {f["name"]: f.get("seconds", {}) for f in formats}}
    if settings.gpu:
        from ..advise import advise

        write_report(report, out)  # the advisor reads it
        try:
            report["advice"] = advise(model=settings.model, gpu=settings.gpu, report=out / "report.json")
        except UserError as exc:  # e.g. the model does not fit that GPU: say so in the report
            report["advice"] = {"gpu": settings.gpu, "error": str(exc)}
    write_report(report, out, started)
    return report


def write_report(report: dict, out: Path, started: float | None = None) -> None:
    """report.md, report.html, then report.json (its presence means the run finished); with ``started``, the
    time the renderers took and the run's total go into report.json's timings."""
    from ..report.html import render_html
    from ..report.markdown import render_markdown

    rendering = time.perf_counter()
    atomic_write_text(out / "report.md", render_markdown(report))
    atomic_write_text(out / "report.html", render_html(report))
    if started is not None:
        report["timings"].update(report_seconds=time.perf_counter() - rendering,
                                 total_seconds=time.perf_counter() - started)
    atomic_write_json(out / "report.json", report)
