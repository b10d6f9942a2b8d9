"""The audit, streamed: the baseline and every candidate format go through the model one decoder layer at a time.

Auditing a 70B model in fp32 in memory would take 280 GB. The quantizers that scale never hold the
whole model: llm-compressor's sequential pipeline onloads one layer at a time, GPTQ's reference
(IST-DASLab/gptq ``llama_sequential``) quantizes layer by layer, carrying only the hidden states
between layers. This does the same for the baseline and N formats at once. The model is a meta-device
skeleton whose parts are read from the safetensors files when needed (:mod:`.source`), and the hidden
states of every window at the current layer boundary are all that crosses from one layer to the next
(:mod:`.spill`: in memory up to a budget, on disk beyond):

1. the token embedding turns the evaluation and calibration windows into layer-0 inputs, cut into the
   batches the in-memory audit uses (``evaluate.iter_hidden``; ``calibrate.first_layer_inputs`` with
   ``QuantSpec.calib_batch``), then is freed;
2. per decoder layer (the next one is read meanwhile): the baseline's evaluation states go through it;
   for each format, a copy of it is calibrated and quantized by ``engine.quantize_layer``, the step
   ``quantize()`` takes, on the full-precision calibration states (one stream shared by every format
   calibrated that way) or, for a sequential algorithm (GPTQ), on the format's own calibration states,
   which then go through the quantized copy; the format's evaluation states go through the copy and
   are compared with the baseline's (layer drift); last, the full-precision calibration states go
   through the float layer, and the layer is dropped;
3. the final norm and lm_head turn each stream's last states into logits, window by window in token
   chunks (:mod:`quantaudit.logits`, of ``LOGIT_BLOCK_BYTES``), paired with the baseline's in the same
   :class:`~quantaudit.metrics.PairedAccumulator`.

Same batches, same modules, same per-layer quantization step: the statistics equal the in-memory
audit's up to float rounding (tests/stream). Memory holds one layer (plus the next being read and one
quantized copy), the boundary states (1 + formats evaluation streams, the calibration streams), and
lm_head at the end: it does not grow with depth. The activation outliers come from the same pass: each linear's
input statistics as the full-precision calibration states go through its layer. So do multiple-choice task items:
every (item, choice) sequence is one more window, in the baseline's stream and in every format's, and the final
stage sums each continuation's log-probs as ``tasks.scoring.score_sequences`` does in memory. Not computed in
streaming mode, as the report says: per-layer sensitivity (each replay needs every later layer at once),
generation tasks (every new token needs the whole model) and lm-eval tasks (lm-eval runs the model itself).
"""

from __future__ import annotations

import copy
import dataclasses
import os
import time
from collections import defaultdict
from contextlib import closing, contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from ..arch import Architecture
from ..data import Windows, resolve_bos
from ..errors import UserError
from ..evaluate import LOGITS_BUDGET_BYTES, auto_batch_size
from ..logits import WORKING_BYTES, OutputHead
from ..measure.drift import DriftAccumulator
from ..measure.outliers import Moments, outlier_report
from ..memory import available_memory, return_large_frees, trim_heap
from ..metrics import PairedAccumulator, PerplexityAccumulator, summarize_logits
from ..models import model_folder
from ..moe import set_all_tokens
from ..progress import console, track
from ..quant.calibrate import LayerInputs, first_layer_inputs, layer_output
from ..quant.engine import (
    LayerPlan,
    LayerRecord,
    QuantizedModel,
    QuantSpec,
    calib_info,
    plan_layers,
    quantize_layer,
)
from ..quant.kvcache import KVQuantizer, attach_kv_quantizer
from ..stream.source import CheckpointParts, checkpoint_fp32_bytes
from ..stream.spill import SpillStore
from ..tasks import compare_task_results
from ..tasks.readers import MULTIPLE_CHOICE, Task
from ..tasks.scoring import choice_sequences, choose, target_logprobs, task_result
from .measurement import BaselineMeasured, Candidate, Measured, StageClock

NOT_STREAMED = "not computed in streaming mode"
# An in-memory audit holds the model, its quantized copy (float weights until replaced, then codes and
# dequantized weights) and the sensitivity swaps: about three fp32 copies, plus a batch's activations (sized by
# evaluate.LOGITS_BUDGET_BYTES) and the chunks of logits its statistics work on (logits.WORKING_BYTES).
IN_MEMORY_COPIES = 3
# float32 logits of one chunk of tokens in the final stage, smaller than logits.LOGIT_CHUNK_BYTES: the streamed
# audit is judged by its peak memory (bench/bench_stream.py), at some speed at large vocabularies
LOGIT_BLOCK_BYTES = 4 * 2**20
DEFAULT_RAM_SHARE = 4  # boundary states kept in memory up to this fraction of the free memory


def in_memory_bytes(fp32_weight_bytes: int) -> int:
    """Estimated peak memory of an in-memory audit of a model with these fp32 weights."""
    return IN_MEMORY_COPIES * fp32_weight_bytes + LOGITS_BUDGET_BYTES + WORKING_BYTES


def _free_bytes(device: torch.device) -> int | None:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return available_memory()


def use_streaming(settings) -> bool:
    """``settings.streaming``: on, off, or auto: on when the in-memory estimate exceeds the free memory
    (and the model has safetensors weights to stream from)."""
    if settings.streaming != "auto":
        return settings.streaming == "on"
    folder, _ = model_folder(settings.model)
    try:
        needed = in_memory_bytes(checkpoint_fp32_bytes(folder))
    except UserError:  # no safetensors: nothing to stream from
        return False
    free = _free_bytes(torch.device(settings.device))
    if free is None or needed <= free:
        return False
    console.print(f"[bold]streaming[/bold]: an in-memory audit needs about {needed / 2**30:.1f} GiB, "
                  f"{free / 2**30:.1f} GiB are free; reading one decoder layer at a time")
    return True


@contextmanager
def _threads_within_cpus():
    """torch uses the machine's physical cores by default; where this process may run on fewer (a pinned
    container), more threads only contend, and the layer reader needs a share too."""
    before = torch.get_num_threads()
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch.set_num_threads(min(before, cpus))
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass
class _Batches:
    """A window set cut into the batches every stream over it uses, with every layer's call kwargs per batch
    ([layer][batch]) and each batch's real-token mask."""

    parts: list[slice] = field(default_factory=list)
    layer_kwargs: list[list[dict]] = field(default_factory=list)
    masks: list[torch.Tensor] = field(default_factory=list)


def _layer0(front: nn.Module, windows: Windows, size: int, cut: bool) -> tuple[_Batches, list[torch.Tensor]]:
    """Layer-0 inputs of ``windows`` in batches of ``size``, each cut to its longest window when ``cut``
    (as ``evaluate.iter_hidden`` runs them; calibration keeps whole windows, as ``quantize()`` does)."""
    batches, hidden = _Batches(), []
    for start in range(0, windows.n, size):
        part = slice(start, min(start + size, windows.n))
        width = int(windows.lengths[part].max()) if cut else windows.seq_len
        got = first_layer_inputs(front, front.model.layers, windows.ids[part, :width], windows.lengths[part], size)
        batches.parts.append(part)
        batches.layer_kwargs = batches.layer_kwargs or [[] for _ in got.layer_kwargs]
        for mine, new in zip(batches.layer_kwargs, got.layer_kwargs, strict=True):
            mine += new
        batches.masks += got.masks
        hidden += got.hidden
    return batches, hidden


@contextmanager
def _captured(layer: nn.Module, points: dict[str, str], keep: torch.Tensor | None):
    """While the block runs: each point's ({name: path in ``layer``, "" for its own}) output at the ``keep`` positions."""
    got: dict[str, torch.Tensor] = {}

    def hook(name):
        return lambda module, args, output: got.__setitem__(name, layer_output(output)[keep])

    handles = [layer.get_submodule(path).register_forward_hook(hook(name)) for name, path in points.items()]
    try:
        yield got
    finally:
        for handle in handles:
            handle.remove()


class _Stream:
    """One model's hidden states over a window set at the current layer boundary, batch by batch in the store."""

    def __init__(self, store: SpillStore, name: str, batches: _Batches, hidden: list[torch.Tensor]):
        self.store, self.name, self.batches = store, name, batches
        for j, h in enumerate(hidden):
            store.put((name, j), h)

    def __iter__(self):
        return (self.store.get((self.name, j)) for j in range(len(self.batches.parts)))

    def drain(self):
        """Every batch once, each forgotten when the next is asked for (the final stage needs them once)."""
        for j in range(len(self.batches.parts)):
            yield self.store.get((self.name, j))
            self.store.pop((self.name, j))

    def inputs(self) -> LayerInputs:
        """For ``engine.quantize_layer`` (``calibrate.collect`` only iterates the hidden states)."""
        return LayerInputs(self, self.batches.layer_kwargs, self.batches.masks)

    def advance(self, layer: nn.Module, index: int, points: dict[str, str] | None = None,
                watch: list[torch.Tensor | None] | None = None) -> list[dict[str, torch.Tensor]]:
        """Replace every batch by decoder layer ``index``'s output on it; for the batches ``watch`` gives
        positions of, also return what each of ``points`` output there."""
        seen = []
        for j, (hidden, kwargs) in enumerate(zip(self, self.batches.layer_kwargs[index], strict=True)):
            keep = watch[j] if watch else None
            with _captured(layer, points if keep is not None else {}, keep) as got:
                out = layer_output(layer(hidden, **kwargs))
            self.store.put((self.name, j), out)
            if keep is not None:
                seen.append(got)
        return seen


def _watched(batches: _Batches, drift_windows: int) -> list[torch.Tensor | None] | None:
    """Per evaluation batch, the real positions of the first ``drift_windows`` windows (None: none in it)."""
    if not drift_windows:
        return None
    watch = []
    for part, mask in zip(batches.parts, batches.masks):
        rows = torch.arange(part.start, part.stop, device=mask.device) < drift_windows
        watch.append(mask & rows[:, None] if part.start < drift_windows else None)
    return watch


def _drift_points(arch: Architecture, index: int, layer: nn.Module) -> dict[str, str]:
    """Where layer drift is measured in decoder layer ``index``, named as ``audit.run`` reports it."""
    paths = (arch.drift_point(p) for g in arch.layer_groups(layer) for p in g.linears)
    return {f"decoder.{index}": "", **{f"model.layers.{index}.{p}": p for p in paths}}


@contextmanager
def _input_moments(layer: nn.Module, index: int, moments: dict[str, Moments] | None):
    """While the block runs on the calibration states: every linear's input added to its ``moments`` (None: off),
    MoE experts on every token, as the in-memory outlier audit sees them."""
    if moments is None:
        yield
        return
    linears = {f"model.layers.{index}.{path}": m for path, m in layer.named_modules() if isinstance(m, nn.Linear)}
    for name, m in linears.items():
        moments.setdefault(name, Moments(torch.zeros(m.in_features, device=m.weight.device)))
    hooks = [m.register_forward_pre_hook(lambda _m, args, s=moments[name]: s.add(args[0])) for name, m in linears.items()]
    set_all_tokens(layer, True)
    try:
        yield
    finally:
        set_all_tokens(layer, False)
        for hook in hooks:
            hook.remove()


def _streamable(task) -> bool:
    """A task whose items a layer-by-layer pass can score: multiple choice from a task file (not generation, whose
    every new token needs the whole model, nor lm-eval, which runs the model itself)."""
    return isinstance(task, Task) and task.kind == MULTIPLE_CHOICE


def _kv_quantizer(layer: nn.Module, plan: LayerPlan, spec: QuantSpec) -> KVQuantizer | None:
    """``kvcache.install_kv_quantizers`` for one layer copy, whose attention has its own (deep-copied) config."""
    if not plan.kv_format.kind:
        return None
    attention = layer.get_submodule(plan.arch.attention)
    return attach_kv_quantizer(attention, plan.kv_format, spec.kv_scales, attention.o_proj.weight.device,
                               attention.config._attn_implementation or "eager")


def _copy_to_quantize(layer: nn.Module) -> nn.Module:
    """A copy of ``layer`` sharing its linear weights, which quantization only reads before replacing the
    linears (an in-place write would corrupt the baseline's layer: tests/stream compares every format with the
    in-memory path); the rest is copied, as SmoothQuant divides norm weights in place."""
    shared = {id(m.weight): m.weight for m in layer.modules() if isinstance(m, nn.Linear)}
    return copy.deepcopy(layer, shared)


def _shell(record: LayerRecord) -> LayerRecord:
    """``record`` with its tensors on the meta device: sizes and dtypes for the byte counts, no storage, so
    the records of every layer can be kept."""
    def meta(value):
        return value.to("meta") if isinstance(value, torch.Tensor) else value

    tensors = {f.name: meta(getattr(record, f.name)) for f in dataclasses.fields(record) if f.name != "details"}
    return LayerRecord(**tensors, details={k: meta(v) for k, v in record.details.items()})


@dataclass
class StreamedFormat:
    qm: QuantizedModel  # records and byte counts; its model is the meta-device skeleton (shapes only)
    stats: dict  # as evaluate.compare_to_baseline: PairedAccumulator.summary(), seconds, tokens_per_s
    drift: dict  # as measure.drift.layer_drift: {point: {"drift_rel", "cosine"}}
    quantize_seconds: float
    tasks_seconds: float = 0.0


@dataclass
class StreamedAudit:
    baseline: dict  # the baseline's perplexity summary (PerplexityAccumulator)
    formats: dict[str, StreamedFormat]
    outliers: dict[str, Moments] | None = None  # per linear input, on the calibration windows (measure.outliers)
    # per scored sequence (stream_audit's ``sequences``), its continuation's summed log-prob: "baseline" and each format
    continuation_logprobs: dict[str, torch.Tensor] | None = None


@dataclass
class _FormatRun:
    """One candidate's state while the layers stream past."""

    spec: QuantSpec
    plan: LayerPlan
    eval: _Stream
    calib: _Stream | None  # its own calibration states (sequential algorithms), else the shared full-precision ones
    sequences: _Stream | None = None  # the task sequences scored by their continuations (stream_audit's ``sequences``)
    acc: PairedAccumulator = field(default_factory=PairedAccumulator)
    drift: dict = field(default_factory=lambda: defaultdict(DriftAccumulator))
    records: dict = field(default_factory=dict)
    kv_scales: dict = field(default_factory=dict)
    quantize_seconds: float = 0.0
    eval_seconds: float = 0.0
    tasks_seconds: float = 0.0

    def step(self, index: int, layer: nn.Module, shared: _Stream | None, more: bool, total_tokens: int,
             points: dict[str, str] | None, watch, reference: list[dict]) -> None:
        started = time.perf_counter()
        qlayer = _copy_to_quantize(layer)
        calib = self.calib or shared
        new: dict[str, LayerRecord] = {}
        kv = quantize_layer(qlayer, index, self.plan, self.spec, calib.inputs() if self.plan.calibrating else None,
                            total_tokens, new, _kv_quantizer(qlayer, self.plan, self.spec))
        if kv is not None:
            self.kv_scales[index] = kv
        self.records.update((name, _shell(record)) for name, record in new.items())
        if self.calib is not None and more:
            self.calib.advance(qlayer, index)
        self.quantize_seconds += time.perf_counter() - started
        started = time.perf_counter()
        for got, ref in zip(self.eval.advance(qlayer, index, points, watch), reference):
            for name, value in got.items():
                self.drift[name].add(value, ref[name])
        self.eval_seconds += time.perf_counter() - started
        if self.sequences is not None:
            started = time.perf_counter()
            self.sequences.advance(qlayer, index)
            self.tasks_seconds += time.perf_counter() - started


def _plans(parts: CheckpointParts, specs: dict[str, QuantSpec], calib: Windows) -> dict[str, LayerPlan]:
    plans = {}
    for name, spec in specs.items():
        plans[name] = plan_layers(parts.skeleton, spec, calib)
        if plans[name].assignments["lm_head"].reason is None:
            raise UserError(f"{name}: layer streaming keeps lm_head unquantized (as TensorRT-LLM does by default)")
    if len({spec.calib_batch for spec in specs.values()}) > 1:
        raise ValueError("streamed formats share one calibration batching: give them the same calib_batch")
    return plans


@torch.no_grad()
def stream_audit(parts: CheckpointParts, specs: dict[str, QuantSpec], calib: Windows, windows: Windows,
                 store: SpillStore, batch_size: int | None = None, top_k: int | None = None, drift_windows: int = 0,
                 progress: bool = True, outliers: bool = False, sequences: Windows | None = None,
                 continuation_lengths: torch.Tensor | None = None) -> StreamedAudit:
    """Quantize the checkpoint to each of ``specs`` and compare each with its baseline on ``windows``,
    reading one decoder layer at a time (see the module docstring). ``top_k``, ``batch_size`` and
    ``drift_windows`` mean what they mean to the in-memory audit; with ``outliers``, each linear's input
    statistics on the full-precision calibration states as they pass (the outlier audit's). ``sequences``
    (windows, each a whole token sequence) go through the same layers, in the baseline and in every format,
    and the summed log-prob of each one's last ``continuation_lengths[i]`` tokens comes back: the task items'
    log-likelihoods, as :func:`quantaudit.tasks.scoring.score_sequences` computes them in memory."""
    plans = _plans(parts, specs, calib)
    return_large_frees()
    calib_batch = next(iter(specs.values())).calib_batch if specs else 1
    with parts.with_embedding() as front:
        eval_batches, eval_hidden = _layer0(front, windows, batch_size or auto_batch_size(front, windows), cut=True)
        calibrating = outliers or any(plan.calibrating for plan in plans.values())
        calib_batches, calib_hidden = _layer0(front, calib, calib_batch, cut=False) if calibrating else (None, [])
        seq_batches, seq_hidden = (_layer0(front, sequences, batch_size or auto_batch_size(front, sequences), cut=True)
                                   if sequences is not None else (None, []))
    base = _Stream(store, "eval/baseline", eval_batches, eval_hidden)
    seq_base = _Stream(store, "tasks/baseline", seq_batches, seq_hidden) if sequences is not None else None
    runs = {
        name: _FormatRun(specs[name], plan, _Stream(store, f"eval/{name}", eval_batches, eval_hidden),
                         _Stream(store, f"calib/{name}", calib_batches, calib_hidden)
                         if plan.calibrating and plan.sequential else None)
        for name, plan in plans.items()
    }
    if sequences is not None:
        for name, run in runs.items():
            run.sequences = _Stream(store, f"tasks/{name}", seq_batches, seq_hidden)
    needs_shared = outliers or any(plan.calibrating and not plan.sequential for plan in plans.values())
    shared = _Stream(store, "calib/full-precision", calib_batches, calib_hidden) if needs_shared else None
    del eval_hidden, calib_hidden, seq_hidden
    total_tokens = int(calib.lengths.sum())
    watch = _watched(eval_batches, drift_windows)
    linear_inputs: dict[str, Moments] = {}

    with _threads_within_cpus(), closing(parts.layers()) as layers:
        steps = track(layers, "streaming decoder layers", total=parts.n_layers) if progress else layers
        for index, layer in steps:
            more = index + 1 < parts.n_layers
            points = _drift_points(parts.arch, index, layer) if watch else None
            reference = base.advance(layer, index, points, watch)
            if seq_base is not None:
                seq_base.advance(layer, index)
            for run in runs.values():
                run.step(index, layer, shared, more, total_tokens, points, watch, reference)
            if shared is not None and (more or outliers):
                with _input_moments(layer, index, linear_inputs if outliers else None):
                    shared.advance(layer, index)
            del layer, reference
            trim_heap()  # the layer's small temporaries would otherwise fragment the heap, which grows with depth
        norm = parts.final_norm()  # read once for every stream's final stage
        head = OutputHead.from_weight(parts.lm_head_weight(), None, parts.config)
        base_ppl = _final_logits(norm, head, windows, eval_batches, base, runs, top_k, drift_windows)
        continuations = None
        if sequences is not None:
            continuations = {"baseline": _continuation_logprobs(norm, head, sequences, continuation_lengths, seq_base)}
            for name, run in runs.items():
                started = time.perf_counter()
                continuations[name] = _continuation_logprobs(norm, head, sequences, continuation_lengths,
                                                             run.sequences)
                run.tasks_seconds += time.perf_counter() - started

    formats = {}
    for name, run in runs.items():
        run.records.update((n, _shell(r)) for n, r in run.plan.fallback_records(parts.skeleton).items())
        records = {n: run.records[n] for n in run.plan.assignments}
        qm = QuantizedModel(parts.skeleton, run.spec, records, run.kv_scales, calib_info(calib, run.plan.calibrating),
                            run.quantize_seconds)
        summary = run.acc.summary()  # the seconds are those of this format's layers and logits
        stats = {**summary, "seconds": run.eval_seconds, "tokens_per_s": summary["tokens"] / run.eval_seconds}
        formats[name] = StreamedFormat(qm, stats, {k: a.result() for k, a in run.drift.items()}, run.quantize_seconds,
                                       run.tasks_seconds)
    return StreamedAudit(base_ppl.summary(), formats, linear_inputs if outliers else None, continuations)


def _continuation_logprobs(norm: nn.Module, head: OutputHead, sequences: Windows, continuation_lengths: torch.Tensor,
                           stream: _Stream) -> torch.Tensor:
    """Final norm and lm_head on one stream of ``sequences``: each sequence's summed log-prob (float64) of its last
    ``continuation_lengths[i]`` tokens given the ones before, as ``tasks.scoring.score_sequences`` sums them."""
    totals = torch.zeros(sequences.n, dtype=torch.float64)
    for part, hidden in zip(stream.batches.parts, stream.drain()):
        last = norm(hidden)
        for row, i in enumerate(range(part.start, part.stop)):
            length, cont = int(sequences.lengths[i]), int(continuation_lengths[i])
            # input position t predicts token t + 1: the continuation's tokens are predicted at L-1-c .. L-2
            picked = last[row, length - 1 - cont : length - 1]
            targets = sequences.ids[i, length - cont : length].to(picked.device)
            totals[i] = target_logprobs(head, picked, targets).sum().cpu()
    return totals


def _final_logits(norm: nn.Module, head: OutputHead, windows: Windows, batches: _Batches, base: _Stream,
                  runs: dict[str, _FormatRun], top_k: int | None, drift_windows: int) -> PerplexityAccumulator:
    """Final norm and lm_head on every stream, window by window in token chunks (:mod:`quantaudit.logits`): the
    baseline's log-probs (``metrics.summarize_logits``, as ``baseline.BaselineWindow`` recomputes them) against
    each format's logits; lm_head's outputs for the layer drift, as ``audit.drift`` compares them."""
    k = None if top_k is None or top_k >= head.vocab else top_k
    base_ppl = PerplexityAccumulator()
    streams = [base.drain(), *(run.eval.drain() for run in runs.values())]
    for part, hidden in zip(batches.parts, zip(*streams)):
        base_last = norm(hidden[0])
        quant_last = []
        for run, last in zip(runs.values(), hidden[1:]):
            started = time.perf_counter()
            quant_last.append(norm(last))
            run.eval_seconds += time.perf_counter() - started
        for row, window in enumerate(range(part.start, part.stop)):
            length = int(windows.lengths[window])
            targets = windows.ids[window, 1:length].to(base_last.device)
            for rows in head.slices(length, LOGIT_BLOCK_BYTES):  # every real position: drift compares the last too
                scored = slice(rows.start, min(rows.stop, length - 1))  # the window's last position predicts nothing
                base_raw = head.layer(base_last[row, rows])
                chunk = summarize_logits(head.transform(base_raw)[: scored.stop - scored.start], targets[scored], k)
                base_ppl.add_nll(-chunk.target_logprob)
                for run, last in zip(runs.values(), quant_last):
                    started = time.perf_counter()
                    raw = head.layer(last[row, rows])
                    if chunk.tokens:
                        run.acc.update(chunk, head.transform(raw)[: chunk.tokens], targets[scored])
                    if window < drift_windows:
                        run.drift["lm_head"].add(raw, base_raw)
                    run.eval_seconds += time.perf_counter() - started
    return base_ppl


class StreamedExecutor:
    """Measures every candidate in one layer-by-layer pass over the checkpoint (``inputs``: ``audit.run.Inputs``,
    whose session holds the checkpoint parts); what needs the whole model at once is reported as not computed."""

    def __init__(self, settings, inputs):
        self.settings, self.inputs = settings, inputs
        self._baseline: BaselineMeasured | None = None

    def not_computed(self) -> dict[str, str]:
        s, out = self.settings, {}
        if s.sensitivity != "none":
            out["sensitivity"] = NOT_STREAMED
        others = [task.name if isinstance(task, Task) else "lm_eval:" + ",".join(task.names)
                  for task in self.inputs.tasks if not _streamable(task)]
        if others:
            out["tasks"] = (f"{NOT_STREAMED} for {', '.join(others)}: generation and lm-eval run the whole model "
                            "per token or per request (multiple-choice task files are scored)")
        return out

    def _sequences(self) -> tuple[list, Windows | None, torch.Tensor | None, torch.Tensor | None]:
        """The multiple-choice tasks' (item, choice) sequences as one window set, longest first (how they batch
        best), their continuation lengths, and each sequence's place in :func:`choice_sequences`' order."""
        session = self.inputs.session
        tasks = [task for task in self.inputs.tasks if _streamable(task)]
        if not tasks:
            return [], None, None, None
        bos = resolve_bos(session.tokenizer, self.settings.bos)
        max_positions = getattr(session.parts.config, "max_position_embeddings", None)
        seqs, conts = [], []
        for task in tasks:
            task_seqs, task_conts = choice_sequences(task, session.tokenizer, bos, max_positions)
            seqs += task_seqs
            conts += task_conts
        order = torch.tensor(sorted(range(len(seqs)), key=lambda i: -len(seqs[i])))
        ids = torch.zeros(len(seqs), len(seqs[order[0]]), dtype=torch.long)
        for row, i in enumerate(order.tolist()):
            ids[row, : len(seqs[i])] = torch.tensor(seqs[i])
        lengths = torch.tensor([len(seqs[i]) for i in order.tolist()])
        windows = Windows(ids, lengths, "task items", bos, int(lengths.sum()))
        return tasks, windows, torch.tensor(conts)[order], order

    def _task_results(self, tasks: list, order: torch.Tensor, logprobs: torch.Tensor) -> list:
        """Per task, its result from the sequences' log-likelihoods (in the executor's order, ``order`` maps back)."""
        flat = torch.empty_like(logprobs)
        flat[order] = logprobs
        bos = resolve_bos(self.inputs.session.tokenizer, self.settings.bos)
        results, start = [], 0
        for task in tasks:
            n = sum(len(item.choices) for item in task.items)
            results.append(task_result(task, bos, *choose(task, flat[start : start + n].tolist()), {"batch_size": "auto"}))
            start += n
        return results

    def measure(self, todo: list[Candidate]):
        s, session = self.settings, self.inputs.session
        parts = session.parts
        folder, fingerprint = model_folder(s.model)
        not_computed = self.not_computed()
        console.print(f"[bold]streaming[/bold] {parts.n_layers} decoder layers from {folder}"
                      + (f"; {', '.join(not_computed)}: {NOT_STREAMED}" if not_computed else ""))
        free = available_memory()
        budget = (s.stream_ram_mb * 2**20 if s.stream_ram_mb is not None
                  else (free if free is not None else 4 * 2**30) // DEFAULT_RAM_SHARE)
        clock = StageClock()
        tasks, sequences, continuation_lengths, order = self._sequences()
        with clock("stream"), SpillStore(budget) as store:
            streamed = stream_audit(parts, {c.name: c.spec for c in todo}, session.calib, session.eval, store,
                                    s.batch_size, s.top_k, s.drift_windows, outliers=True, sequences=sequences,
                                    continuation_lengths=continuation_lengths)
            spilled = store.spilled_bytes
        base_tasks = self._task_results(tasks, order, streamed.continuation_logprobs["baseline"]) if tasks else []
        none = QuantSpec(format="none")
        unquantized = QuantizedModel(parts.skeleton, none, plan_layers(parts.skeleton, none, None).fallback_records(
            parts.skeleton), {}, {}, 0.0)
        linears = [n for n in unquantized.layers if isinstance(parts.skeleton.get_submodule(n), nn.Linear)]
        model = {"name": s.model, "source": str(folder), "fingerprint": fingerprint,
                 "architecture": type(parts.skeleton).__name__,
                 "params": sum(p.numel() for p in parts.skeleton.parameters()),
                 "decoder_layers": parts.n_layers, "linear_layers": len(unquantized.layers)}
        vocab = parts.skeleton.get_output_embeddings().weight.shape[0]
        streaming = {"mode": s.streaming, "not_computed": not_computed, "ram_budget_bytes": budget,
                     "spilled_bytes": spilled, "fp32_weight_bytes": parts.fp32_bytes(),
                     "torch_threads": torch.get_num_threads()}
        outliers = outlier_report(parts.skeleton, {n: streamed.outliers[n] for n in linears if n in streamed.outliers})
        self._baseline = BaselineMeasured(
            model, streamed.baseline, unquantized.weight_bytes(), unquantized.kv_bytes_per_token(),
            None if s.top_k is None or s.top_k >= vocab else s.top_k, outliers,
            {r.task: r.summary for r in base_tasks} if tasks else None, streaming=streaming, seconds=clock.seconds)
        for candidate in todo:
            result = streamed.formats[candidate.name]
            seconds = {"quantize": result.quantize_seconds, "evaluate": result.stats["seconds"]}
            comparisons = None
            if tasks:
                results = self._task_results(tasks, order, streamed.continuation_logprobs[candidate.name])
                comparisons = [compare_task_results(b, c) for b, c in zip(base_tasks, results)]
                seconds["tasks"] = result.tasks_seconds
            yield Measured.of(candidate, result.qm, stats=result.stats, drift=result.drift, tasks=comparisons,
                              not_computed=not_computed, seconds=seconds)

    def baseline(self) -> BaselineMeasured:
        """After :meth:`measure`: the baseline's measurements."""
        return self._baseline
