"""``quantaudit audit``: quantize to every candidate format, audit each against one baseline pass.

Order of work, chosen so that everything shared is computed once:

1. the baseline's log-probs on the evaluation windows (top-K cache, :mod:`quantaudit.baseline`);
2. the activation-outlier audit on the calibration windows (base model, once);
3. per format: quantize (calibrated on the user's text), paired statistics against the cached
   baseline, decoder-layer and linear-layer drift, per-layer sensitivity, memory, verdict.
   Each finished format is saved to ``formats/NAME.json`` at once (atomically), so an
   interrupted audit loses at most the format in flight and ``--resume`` picks up from there;
4. the recommendation, then ``report.json``, ``report.md`` and ``report.html``, each written atomically.

Every input (flags, model, texts, tasks, plan, device) is checked before ``--out`` is touched. The run
then writes into ``.DIR.incoming`` beside ``DIR`` (:func:`quantaudit.fileio.output_dir`, under a lock),
which replaces ``DIR`` in one atomic swap when the reports are written: a failed or killed run leaves
the previous run in ``DIR`` as it was, and its finished formats in ``.DIR.incoming`` for ``--resume``.

A model too large for memory (``--streaming on``, or ``auto`` when it would not fit) is audited by
:mod:`quantaudit.stream` instead of steps 1-3: one decoder layer at a time from its safetensors files,
every format at once, into the same entries (:func:`format_entry`); sensitivity, outliers and tasks
are then reported as not computed.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .. import __version__
from ..arch import architecture, decoder_layers
from ..data import Windows, load_windows
from ..errors import EXIT_BUDGET_FAILED, EXIT_OK, UserError
from ..evaluate import build_baseline, compare_to_baseline
from ..fidelity import PromptSet, compare_generations, continuations, prompt_set
from ..fileio import atomic_write_json, atomic_write_text, check_out_dir, output_dir
from ..models import LoadedModel, load_model, load_tokenizer
from ..progress import console
from ..quant import GPTQOptions, QuantSpec, quantize
from ..quant.formats import get_format
from ..quant.plan import check_fused_plan, load_plan
from ..stream.source import CheckpointParts, check_model_files
from ..tasks import (
    LM_EVAL_RESULTS,
    check_tasks_bos,
    compare_task_results,
    evaluate_tasks,
    load_tasks,
    tasks_summary,
)
from .budget import Limit, check_budget
from .drift import layer_drift
from .outliers import activation_outliers
from .sensitivity import InputScaled, decoder_index, decoder_stack, sensitivity_kld
from .settings import AuditSettings, validate

SENSITIVITY_TOP = 10
REPORT_FILES = ("report.json", "report.md", "report.html")
OUTPUTS = (*REPORT_FILES, "formats", LM_EVAL_RESULTS)
RESUME_HINT = " or --resume to continue the run in it"


def _drift_points(model: torch.nn.Module, linear_names: list[str]) -> dict[str, str]:
    layers, _, _ = decoder_stack(model)
    points = {f"decoder.{i}": f"model.layers.{i}" for i in range(len(layers))}
    arch = architecture(model)
    points.update({arch.drift_point(name): arch.drift_point(name) for name in linear_names})
    return points


def _sensitivity_swaps(qm, linear_names: list[str], granularity: str) -> dict[str, dict]:
    """What to put into the baseline to quantize one part of it.

    A linear whose SmoothQuant scale was folded into the preceding norm only computes the right
    thing behind that norm; swapped alone into the baseline it gets its input divided by the
    smoothing scale, which is exactly what the folded norm does. A decoder layer is swapped whole
    (folded norms and KV-cache quantization included).
    """
    if granularity == "decoder":
        indices = sorted({decoder_index(name) for name in linear_names} - {None})
        return {f"model.layers.{i}": {f"model.layers.{i}": qm.model.model.layers[i]} for i in indices}
    swaps = {}
    for name in linear_names:
        module, details = qm.model.get_submodule(name), qm.layers[name].details
        if details.get("smoothed_into"):
            module = InputScaled(module, 1.0 / details["smoothing_scale"])
        swaps[name] = {name: module}
    return swaps


@dataclass(frozen=True)
class Candidate:
    """One thing the audit quantizes and judges: a uniform format, or the mixed-precision plan."""

    name: str
    spec: QuantSpec
    description: str
    trtllm_quant_algo: str | None


def candidates(settings: AuditSettings, model: torch.nn.Module) -> list[Candidate]:
    """The uniform ``--formats``, then the ``--plan`` (TensorRT-LLM ``MIXED_PRECISION``) if given."""
    common = {"kv_cache": settings.kv_cache, "kv_scales": settings.kv_scales, "group_size": settings.group_size,
              "exclude": tuple(settings.exclude), "include_lm_head": settings.include_lm_head,
              "smoothquant_alpha": settings.smoothquant_alpha, "gptq": GPTQOptions(act_order=settings.act_order, scale_search=settings.gptq_scale)}
    out = [Candidate(name, QuantSpec(format=name, **common), get_format(name).description,
                     get_format(name).trtllm_quant_algo) for name in settings.formats]
    if settings.plan:
        plan = load_plan(settings.plan, model)
        check_fused_plan(plan.layers, plan.default, model, f"plan file {settings.plan}")
        counts = Counter(plan.layers.values())
        mix = ", ".join(f"{n} x {fmt}" for fmt, n in counts.most_common())
        out.append(Candidate("plan", QuantSpec(format=plan.default, plan=plan.layers, **common),
                             f"mixed precision from {settings.plan}: {mix}; other layers {plan.default}",
                             "MIXED_PRECISION"))
    return out


def format_entry(candidate: Candidate, settings: AuditSettings, qm, stats: dict, quantize_seconds: float,
                 drift: dict, sensitivity: dict) -> dict:
    """The report's entry for one candidate: its records and byte counts (``qm``, a QuantizedModel), paired
    statistics, drift and sensitivity; shared by the in-memory and the streamed audit."""
    records = qm.layers
    linear_names = list(records)
    n_decoder = len(qm.model.model.layers)
    entry = {
        "name": candidate.name,
        "description": candidate.description,
        "trtllm_quant_algo": candidate.trtllm_quant_algo,
        "plan": candidate.spec.plan,  # {layer: format} for the mixed-precision candidate, else None
        "kv_cache": settings.kv_cache,
        "ppl": stats["ppl"], "ppl_unc": stats["ppl_unc"],
        "ppl_ratio": stats["ppl_ratio"], "ppl_ratio_unc": stats["ppl_ratio_unc"],
        "ln_ppl_ratio": stats["ln_ppl_ratio"], "ln_ppl_ratio_unc": stats["ln_ppl_ratio_unc"],
        "kld": stats["kld"], "kld_reverse": stats["kld_reverse"],
        "top1": stats["top1"], "top1_unc": stats["top1_unc"], "delta_p": stats["delta_p"],
        "baseline_top_k": stats["baseline_top_k"],
        "weight_bytes": qm.weight_bytes(),
        "kv_bytes_per_token": qm.kv_bytes_per_token(),
        "quantize_seconds": quantize_seconds,
        "eval_seconds": stats["seconds"],
        "eval_tokens_per_s": stats["tokens_per_s"],
        "calib": qm.calib_info,
        "fallback_layers": [
            {"name": n, "format": r.format, "reason": r.fallback_reason}
            for n, r in records.items() if r.fallback_reason is not None
        ],
        "decoder_layers": [{"index": i, **drift[f"decoder.{i}"]} for i in range(n_decoder) if f"decoder.{i}" in drift],
        "layers": [
            {"name": n, "decoder_layer": decoder_index(n), "format": records[n].format,
             **drift.get(n, {"drift_rel": None, "cosine": None}),
             "sensitivity_kld": sensitivity.get(n, sensitivity.get(f"model.layers.{decoder_index(n)}"))}
            for n in linear_names
        ],
    }
    if settings.sensitivity == "decoder" and sensitivity:
        entry["decoder_sensitivity"] = dict(sensitivity)
    return entry


def audit_format(candidate: Candidate, lm: LoadedModel, calib: Windows, eval_windows: Windows, baseline,
                 settings: AuditSettings, limits: list[Limit], tasks: list | None = None,
                 base_task_results: list | None = None, prompts: PromptSet | None = None,
                 base_generations=None, lm_eval_dir: Path | None = None) -> dict:
    """Everything the report says about one candidate (lm-eval's own results go to ``lm_eval_dir``)."""
    name, spec = candidate.name, candidate.spec
    started = time.perf_counter()
    qm = quantize(lm.model, spec, calib)
    quantize_seconds = time.perf_counter() - started
    stats = compare_to_baseline(baseline, qm.model, eval_windows, settings.batch_size)
    records = qm.layers
    linear_names = list(records)
    quantized = [n for n in linear_names if records[n].fallback_reason is None and records[n].format != "none"]
    drift = layer_drift(lm.model, qm.model, eval_windows.subset(settings.drift_windows),
                        _drift_points(lm.model, linear_names)) if settings.drift_windows else {}
    sensitivity = {}
    if settings.sensitivity != "none" and quantized:
        swaps = _sensitivity_swaps(qm, quantized, settings.sensitivity)
        sensitivity = sensitivity_kld(lm.model, swaps, eval_windows.subset(settings.sensitivity_windows),
                                      description=f"sensitivity {name}")
    entry = format_entry(candidate, settings, qm, stats, quantize_seconds, drift, sensitivity)
    if tasks:
        results = evaluate_tasks(qm.model, lm.tokenizer, tasks, settings.bos, lm_eval_dir, name)
        comparisons = [compare_task_results(base, cand) for base, cand in zip(base_task_results, results)]
        entry["tasks"] = comparisons
        entry["tasks_summary"] = tasks_summary(comparisons)
    if prompts is not None:
        generated = continuations(qm.model, lm.tokenizer, prompts.prompts, prompts.ids, prompts.max_new_tokens,
                                  f"generating ({name})")
        entry["generation"] = compare_generations(base_generations, generated, prompts.prompts, prompts.max_new_tokens)
    entry["failed"] = check_budget(entry, limits)
    entry["passed"] = not entry["failed"]
    del qm
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


@dataclass
class Audited:
    """What the report says about the model, the data and the baseline, and every candidate's entry."""

    model: dict
    eval_windows: Windows
    calib: Windows
    baseline: dict  # perplexity summary, weight_bytes, kv_bytes_per_token
    baseline_top_k: int | None
    formats: list[dict]
    outliers: list[dict]
    tasks: dict | None = None
    streaming: dict | None = None  # set by the streamed audit: what it did and did not compute


def recommend(formats: list[dict], limits: list[Limit]) -> dict:
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


@dataclass
class Inputs:
    """What the audit reads, loaded and checked before ``--out`` is touched: the model (``lm`` in memory, or
    the ``parts`` of its checkpoint when streamed), the texts, the tasks and the candidates."""

    lm: LoadedModel | None
    parts: CheckpointParts | None
    eval_windows: Windows
    calib: Windows
    tasks: list
    candidates: list[Candidate]
    prompts: PromptSet | None = None  # --generate


def check_inputs(settings: AuditSettings, streamed: bool) -> Inputs:
    """Read and check every input the flags name (tasks, model, texts, plan): a bad one fails here, before
    anything is written, and what was read is what the audit then uses."""
    tasks = load_tasks(settings.tasks, settings.task_data, settings.task_limit, settings.task_strict, settings.task_seed,
                       settings.lm_eval_include)
    folder = check_model_files(settings.model)
    if streamed:
        lm, parts = None, CheckpointParts(folder, settings.device)
        tokenizer, model = load_tokenizer(folder), parts.skeleton
    else:
        lm, parts = load_model(settings.model, device=settings.device), None
        tokenizer, model = lm.tokenizer, lm.model
    decoder_layers(model)
    check_tasks_bos(tasks, tokenizer, settings.bos)
    eval_windows = load_windows(settings.eval, tokenizer, settings.seq_len, settings.windows, settings.bos)
    calib = load_windows(settings.calib, tokenizer, settings.calib_seq, settings.calib_size, settings.bos, role="calib")
    prompts = None
    if settings.generate:
        if streamed:
            raise UserError("--generate needs the whole model in memory, but this model is audited layer by layer "
                            "(--streaming auto found too little memory); drop --generate or free memory")
        prompts = prompt_set(settings.generate, tokenizer, settings.chat_template, settings.max_new_tokens)
    return Inputs(lm, parts, eval_windows, calib, tasks, candidates(settings, model), prompts)


def _audit_in_memory(settings: AuditSettings, inputs: Inputs, out: Path, limits: list[Limit], resume: bool) -> Audited:
    lm, eval_windows, calib, tasks = inputs.lm, inputs.eval_windows, inputs.calib, inputs.tasks
    baseline = build_baseline(lm, eval_windows, k=settings.top_k, batch_size=settings.batch_size)
    unquantized = quantize(lm.model, QuantSpec(format="none"), None, progress=False)
    linears = {name: lm.model.get_submodule(name) for name in unquantized.layers}
    base_bytes = {"weight_bytes": unquantized.weight_bytes(), "kv_bytes_per_token": unquantized.kv_bytes_per_token()}
    del unquantized  # a copy of the whole model: not kept while the formats are audited
    linears = {name: m for name, m in linears.items() if isinstance(m, torch.nn.Linear)}  # not MoE routers
    outliers = activation_outliers(lm.model, {n: m for n, m in linears.items() if n != "lm_head"}, calib)
    base_task_results = evaluate_tasks(lm.model, lm.tokenizer, tasks, settings.bos, out / LM_EVAL_RESULTS, "baseline")
    prompts = inputs.prompts
    base_generations = continuations(lm.model, lm.tokenizer, prompts.prompts, prompts.ids, prompts.max_new_tokens,
                                     "generating (baseline)") if prompts else None
    key = settings.fingerprint()
    formats = []
    for candidate in inputs.candidates:
        entry = saved_entry(out, candidate, key) if resume else None
        if entry is None:
            console.print(f"[bold]{candidate.name}[/bold]: {candidate.description}")
            entry = audit_format(candidate, lm, calib, eval_windows, baseline, settings, limits, tasks, base_task_results,
                                 prompts, base_generations, out / LM_EVAL_RESULTS)
            save_entry(out, entry, key)
        formats.append(entry)
    model = {"name": lm.name, "source": lm.source, "fingerprint": lm.fingerprint,
             "architecture": type(lm.model).__name__,
             "params": sum(p.numel() for p in lm.model.parameters()),
             "decoder_layers": len(decoder_stack(lm.model)[0]), "linear_layers": len(linears)}
    return Audited(model, eval_windows, calib,
                   {**baseline.ppl, **base_bytes},
                   baseline.top_k, formats, outliers,
                   {r.task: r.summary for r in base_task_results} if tasks else None)


def run_audit(settings: AuditSettings, out: Path, force: bool = False, resume: bool = False) -> dict:
    """Run the whole audit and write the report files; returns the report dict. Layer by layer from the
    safetensors files (:mod:`quantaudit.stream`) with ``settings.streaming`` on, or auto and too big for memory.
    Every input is checked first; ``out`` changes only when the reports are written (module docstring)."""
    from ..stream.audit import audit_streamed, use_streaming

    limits = validate(settings)
    check_out_dir(out, force or resume, OUTPUTS, RESUME_HINT)
    streamed = use_streaming(settings)
    inputs = check_inputs(settings, streamed)
    with output_dir(out, force, resume, OUTPUTS, keep_partial=True, hint=RESUME_HINT) as work:
        (work / "formats").mkdir(exist_ok=True)
        if streamed:
            audited = audit_streamed(settings, inputs, work, limits, resume)
        else:
            audited = _audit_in_memory(settings, inputs, work, limits, resume)
        return _report(settings, audited, limits, work)


def _report(settings: AuditSettings, audited: Audited, limits: list[Limit], out: Path) -> dict:
    """The recommendation and the report, written to ``out`` (report.json last)."""
    formats = audited.formats
    for entry in formats:  # the budget may have changed since a resumed format was saved
        entry["failed"] = check_budget(entry, limits)
        entry["passed"] = not entry["failed"]
    for entry in formats:
        entry["compression"] = audited.baseline["weight_bytes"] / entry["weight_bytes"]
    report = {
        "schema_version": 1,
        "quantaudit_version": __version__,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "model": audited.model,
        "eval": audited.eval_windows.describe(),
        "calib": {**audited.calib.describe(), "samples": audited.calib.n},
        "settings": {**asdict(settings), "baseline_top_k": audited.baseline_top_k},
        "budget": [l.as_dict() for l in limits],
        "baseline": audited.baseline,
        "formats": formats,
        "sensitivity_top": {
            f["name"]: sorted(({"name": l["name"], "sensitivity_kld": l["sensitivity_kld"]}
                               for l in f["layers"] if l["sensitivity_kld"] is not None),
                              key=lambda l: -l["sensitivity_kld"])[:SENSITIVITY_TOP]
            for f in formats
        },
        "outliers": audited.outliers,
        "recommendation": recommend(formats, limits),
    }
    if audited.tasks:
        report["tasks"] = audited.tasks
    if audited.streaming:
        report["streaming"] = audited.streaming
    write_report(report, out)
    if settings.gpu:
        from ..advise import advise

        try:
            report["advice"] = advise(model=settings.model, gpu=settings.gpu, report=out / "report.json")
        except UserError as exc:  # e.g. the model does not fit that GPU: say so in the report
            report["advice"] = {"gpu": settings.gpu, "error": str(exc)}
        write_report(report, out)
    return report


def write_report(report: dict, out: Path) -> None:
    from ..report.html import render_html
    from ..report.markdown import render_markdown

    atomic_write_text(out / "report.md", render_markdown(report))
    atomic_write_text(out / "report.html", render_html(report))
    atomic_write_json(out / "report.json", report)  # last: its presence means the run finished
