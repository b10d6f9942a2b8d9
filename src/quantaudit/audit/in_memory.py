"""The in-memory executor: the whole model loaded, each candidate quantized, measured and dropped in turn.

Everything shared is computed once, before the candidates: the baseline's log-probs on the evaluation windows
(:mod:`quantaudit.baseline`), the activation-outlier audit on the calibration windows, and the baseline's task
results and generations. Then per candidate: quantize (calibrated on the user's text), paired statistics against
the cached baseline, decoder-layer and linear-layer drift, per-layer sensitivity, tasks, generation.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..baseline import Baseline, open_shared_baseline
from ..evaluate import build_baseline, compare_to_baseline
from ..fidelity import compare_generations, continuations
from ..measure.drift import layer_drift
from ..measure.outliers import activation_outliers
from ..measure.sensitivity import InputScaled, decoder_index, decoder_stack, sensitivity_kld
from ..progress import console
from ..quant import QuantSpec, quantize
from ..tasks import compare_task_results, evaluate_tasks
from .measurement import BaselineMeasured, Candidate, Measured, StageClock


def drift_points(model: torch.nn.Module, linear_names: list[str]) -> dict[str, str]:
    """Where layer drift is measured: every decoder layer's output and each linear's (MoE experts: their block)."""
    from ..arch import architecture

    layers, _, _ = decoder_stack(model)
    points = {f"decoder.{i}": f"model.layers.{i}" for i in range(len(layers))}
    arch = architecture(model)
    points.update({arch.drift_point(name): arch.drift_point(name) for name in linear_names})
    return points


def sensitivity_swaps(qm, linear_names: list[str], granularity: str) -> dict[str, dict]:
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


@dataclass
class Shared:
    """What every candidate is measured against, computed once: the baseline cache (on disk, where a worker on
    another process or node opens it by path), and the baseline's task results and generations."""

    baseline_path: Path
    base_tasks: list
    base_generations: list | None
    cache: Baseline | None = field(default=None, repr=False, compare=False)  # open in this process

    def open(self) -> Baseline:
        """The baseline cache, opened where this process reads it (checked complete, of this version)."""
        if self.cache is None:
            self.cache = open_shared_baseline(self.baseline_path)
        return self.cache

    def __getstate__(self):  # sent to a worker without the opened cache
        return {**self.__dict__, "cache": None}


class InMemoryExecutor:
    """Measures candidates on the loaded model (``inputs``: ``audit.run.Inputs``); lm-eval's own per-sample
    results go to ``lm_eval_dir``."""

    def __init__(self, settings, inputs, lm_eval_dir: Path, shared: Shared | None = None):
        self.settings, self.inputs, self.lm_eval_dir = settings, inputs, lm_eval_dir
        self.lm = inputs.session.lm
        self.shared = shared
        self._baseline: BaselineMeasured | None = None

    def measure(self, todo: list[Candidate]) -> Iterator[Measured]:
        """The shared measurements, then each candidate of ``todo`` in turn."""
        self.prepare()
        for candidate in todo:
            console.print(f"[bold]{candidate.name}[/bold]: {candidate.description}")
            yield self.measure_one(candidate)

    def prepare(self) -> BaselineMeasured:
        """What every candidate is measured against, computed once (:class:`Shared`), and the baseline's report."""
        s, lm, inputs = self.settings, self.lm, self.inputs
        clock = StageClock()
        with clock("logits"):
            cache = build_baseline(lm, inputs.session.eval, k=s.top_k, batch_size=s.batch_size)
        unquantized = quantize(lm.model, QuantSpec(format="none"), None, progress=False)
        linears = {name: lm.model.get_submodule(name) for name in unquantized.layers}
        linears = {name: m for name, m in linears.items() if isinstance(m, torch.nn.Linear)}  # not MoE routers
        base_bytes = unquantized.weight_bytes(), unquantized.kv_bytes_per_token()
        del unquantized  # a copy of the whole model: not kept while the formats are audited
        with clock("outliers"):
            outliers = activation_outliers(lm.model, {n: m for n, m in linears.items() if n != "lm_head"},
                                           inputs.session.calib)
        base_tasks, base_generations, prompts = [], None, inputs.prompts
        if inputs.tasks:
            with clock("tasks"):
                base_tasks = evaluate_tasks(lm.model, lm.tokenizer, inputs.tasks, s.bos, self.lm_eval_dir, "baseline")
        if prompts is not None:
            with clock("generation"):
                base_generations = continuations(lm.model, lm.tokenizer, prompts.prompts, prompts.ids,
                                                 prompts.max_new_tokens, "generating (baseline)")
        self.shared = Shared(cache.path, base_tasks, base_generations, cache)
        model = {"name": lm.name, "source": lm.source, "fingerprint": lm.fingerprint,
                 "architecture": type(lm.model).__name__, "params": sum(p.numel() for p in lm.model.parameters()),
                 "decoder_layers": len(decoder_stack(lm.model)[0]), "linear_layers": len(linears)}
        self._baseline = BaselineMeasured(
            model, cache.ppl, *base_bytes, cache.top_k, outliers,
            {r.task: r.summary for r in base_tasks} if inputs.tasks else None, seconds=clock.seconds)
        return self._baseline

    def baseline(self) -> BaselineMeasured:
        """After :meth:`measure`: the baseline's measurements."""
        return self._baseline

    def measure_one(self, candidate: Candidate) -> Measured:
        """One candidate quantized and measured against :attr:`shared` (from :meth:`prepare`, or given)."""
        s, lm, inputs, shared = self.settings, self.lm, self.inputs, self.shared
        eval_windows, clock = inputs.session.eval, StageClock()
        with clock("quantize"):
            qm = quantize(lm.model, candidate.spec, inputs.session.calib)
        with clock("evaluate"):
            stats = compare_to_baseline(shared.open(), qm.model, eval_windows, s.batch_size)
        quantized = [n for n, r in qm.layers.items() if r.fallback_reason is None and r.format != "none"]
        drift, sensitivity, tasks, generation = {}, {}, None, None
        if s.drift_windows:
            with clock("drift"):
                drift = layer_drift(lm.model, qm.model, eval_windows.subset(s.drift_windows),
                                    drift_points(lm.model, list(qm.layers)))
        if s.sensitivity != "none" and quantized:
            with clock("sensitivity"):
                sensitivity = sensitivity_kld(lm.model, sensitivity_swaps(qm, quantized, s.sensitivity),
                                              eval_windows.subset(s.sensitivity_windows),
                                              description=f"sensitivity {candidate.name}")
        if inputs.tasks:
            with clock("tasks"):
                results = evaluate_tasks(qm.model, lm.tokenizer, inputs.tasks, s.bos, self.lm_eval_dir, candidate.name)
                tasks = [compare_task_results(base, cand) for base, cand in zip(shared.base_tasks, results)]
        if inputs.prompts is not None:
            prompts = inputs.prompts
            with clock("generation"):
                generated = continuations(qm.model, lm.tokenizer, prompts.prompts, prompts.ids, prompts.max_new_tokens,
                                          f"generating ({candidate.name})")
                generation = compare_generations(shared.base_generations, generated, prompts.prompts,
                                                 prompts.max_new_tokens)
        return Measured.of(candidate, qm, stats=stats, drift=drift, sensitivity=sensitivity, tasks=tasks,
                           generation=generation, seconds=clock.seconds)
