"""Forward loops: perplexity of one model, baselines, and candidate-vs-baseline comparisons.

Every loop runs the model over :class:`~quantaudit.data.Windows` in batches under
``torch.inference_mode()`` (``use_cache=False``: no KV cache is built for a single full pass) and
streams window by window into an accumulator from :mod:`quantaudit.metrics`, so memory holds one
batch of logits at a time. A batch is cut to its longest window: under causal attention the
trailing padding cannot affect real positions, so it need not be computed. Window ``i`` scores its
first ``lengths[i] - 1`` positions, a contiguous prefix, so its logits are taken as a view.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import torch

from .baseline import Baseline, BaselineWriter, baseline_key, baselines_root, open_baseline
from .data import Windows
from .errors import UserError
from .metrics import PairedAccumulator, PerplexityAccumulator, summarize_logits
from .models import LoadedModel
from .progress import track

# Default batch: as many windows as keep one batch of float32 logits under this size
# (SmolLM2, 512 tokens: 2 windows; stories260K: all of them, up to MAX_AUTO_BATCH).
LOGITS_BUDGET_BYTES = 256 * 2**20
MAX_AUTO_BATCH = 64


def _module(model) -> torch.nn.Module:
    return model.model if isinstance(model, LoadedModel) else model


def _vocab_size(model: torch.nn.Module) -> int:
    return model.get_output_embeddings().weight.shape[0]


def auto_batch_size(model, windows: Windows) -> int:
    """Windows per forward pass so that a batch's logits stay under ``LOGITS_BUDGET_BYTES``."""
    per_window = windows.seq_len * _vocab_size(_module(model)) * 4
    return max(1, min(MAX_AUTO_BATCH, windows.n, LOGITS_BUDGET_BYTES // per_window))


@torch.inference_mode()
def iter_logits(model, windows: Windows, batch_size: int | None = None) -> Iterator[tuple[slice, torch.Tensor]]:
    """Yield ``(slice of windows, logits [b, width, V] float32)`` on the model's device.

    ``width`` is the longest window of the batch; ``logits[:, t]`` predicts ``ids[:, t + 1]``.
    """
    module = _module(model)
    device = next(module.parameters()).device
    size = batch_size or auto_batch_size(module, windows)
    for start in range(0, windows.n, size):
        part = slice(start, min(start + size, windows.n))
        width = int(windows.lengths[part].max())
        logits = module(input_ids=windows.ids[part, :width].to(device), use_cache=False).logits
        yield part, logits.float()


def _batches(model, windows: Windows, batch_size: int | None, description: str):
    size = batch_size or auto_batch_size(model, windows)
    return track(iter_logits(model, windows, size), description, total=-(-windows.n // size))


def _scored(windows: Windows, part: slice, logits: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Per window of the batch: its scored logit rows [n, V] (a view) and their targets [n]."""
    for row, i in enumerate(range(part.start, part.stop)):
        n = int(windows.lengths[i]) - 1
        yield logits[row, :n], windows.ids[i, 1 : n + 1].to(logits.device)


def _timed(summary: dict, started: float) -> dict:
    seconds = time.perf_counter() - started
    return {**summary, "seconds": seconds, "tokens_per_s": summary["tokens"] / seconds}


@torch.inference_mode()
def evaluate_perplexity(model, windows: Windows, batch_size: int | None = None) -> dict:
    """Perplexity of one model: ``{tokens, ppl, ppl_unc, ln_ppl, ln_ppl_unc, seconds, tokens_per_s}``."""
    started = time.perf_counter()
    acc = PerplexityAccumulator()
    for part, logits in _batches(model, windows, batch_size, "perplexity"):
        for rows, targets in _scored(windows, part, logits):
            acc.update(rows, targets)
    return _timed(acc.summary(), started)


class _OutputLayerInput:
    """Captures, at every forward, the input and output of the model's output layer (lm_head)."""

    def __init__(self, module: torch.nn.Module):
        self.head = module.get_output_embeddings()
        self.hidden = self.output = None

    def __enter__(self) -> "_OutputLayerInput":
        self.handle = self.head.register_forward_hook(self._hook)
        return self

    def _hook(self, head, inputs, output) -> None:
        self.hidden, self.output = inputs[0], output

    def __exit__(self, *exc) -> None:
        self.handle.remove()
        self.hidden = self.output = None

    def reproduces(self, logits: torch.Tensor) -> bool:
        """True when the model's logits are exactly this layer's output (no soft-capping or scaling)."""
        return isinstance(self.head, torch.nn.Linear) and torch.equal(self.output.float(), logits)


@torch.inference_mode()
def build_baseline(loaded_model: LoadedModel, windows: Windows, k: int | None = None, use_cache: bool = True,
                   batch_size: int | None = None) -> Baseline:
    """The base model's cache on ``windows`` (read from disk when already built).

    ``k=None`` (default): exact, full-vocabulary statistics; windows are stored as output-layer
    inputs (see :mod:`quantaudit.baseline`). ``k``: top-K log-probs + tail bin, a lower bound.
    ``use_cache=False`` neither reads nor publishes a cached baseline: a private one is built.
    """
    if k is not None and k < 1:
        raise UserError(f"--top-k must be at least 1 (got {k})")
    vocab = _vocab_size(loaded_model.model)
    top_k = None if k is None or k >= vocab else k
    key = baseline_key(loaded_model.fingerprint, windows, top_k)
    target = baselines_root() / key
    if use_cache and (found := open_baseline(target)) is not None:
        return found
    meta = {"key": key, "model": loaded_model.name, "model_fingerprint": loaded_model.fingerprint,
            "windows": windows.describe(), "top_k": top_k, "vocab_size": vocab}
    with BaselineWriter(target if use_cache else None, meta) as writer, \
            _OutputLayerInput(loaded_model.model) as head:
        for part, logits in _batches(loaded_model, windows, batch_size, "baseline"):
            as_hidden = top_k is None and head.reproduces(logits)
            for row, (rows, targets) in enumerate(_scored(windows, part, logits)):
                if as_hidden:
                    hidden = head.hidden[row, : rows.shape[0]]
                    writer.add_hidden(head.head, hidden, targets, summarize_logits(rows, targets))
                else:
                    writer.add_chunk(summarize_logits(rows, targets, top_k))
        return writer.commit()


@torch.inference_mode()
def compare_to_baseline(baseline: Baseline, candidate_model, windows: Windows, batch_size: int | None = None,
                        acc: PairedAccumulator | None = None) -> dict:
    """llama.cpp-style KL-divergence summary of a candidate against a stored baseline, streamed.
    Pass ``acc`` to keep the per-token values afterwards (e.g. for :func:`metrics.paired_difference`)."""
    if baseline.meta["windows"]["fingerprint"] != windows.fingerprint:
        raise UserError("the baseline was built on other evaluation windows: rebuild it for this text and --seq-len")
    vocab = _vocab_size(_module(candidate_model))
    if vocab != baseline.meta["vocab_size"]:
        raise UserError(f"candidate vocabulary ({vocab}) differs from the baseline's ({baseline.meta['vocab_size']})")
    started = time.perf_counter()
    acc = PairedAccumulator() if acc is None else acc
    device = next(_module(candidate_model).parameters()).device
    chunks = baseline.chunks(device)
    for part, logits in _batches(candidate_model, windows, batch_size, "compare"):
        for rows, targets in _scored(windows, part, logits):
            acc.update(next(chunks), rows, targets)
    return _timed(acc.summary(), started)


@torch.inference_mode()
def compare_models(base_model, candidate_model, windows: Windows, k: int | None = None,
                   batch_size: int | None = None) -> dict:
    """Run base and candidate in lockstep; full-vocabulary KL by default (``k``: top-K + tail bin)."""
    vocab_b, vocab_c = _vocab_size(_module(base_model)), _vocab_size(_module(candidate_model))
    if vocab_b != vocab_c:
        raise UserError(f"the two models have different vocabularies ({vocab_b} vs {vocab_c}): they cannot be compared")
    started = time.perf_counter()
    acc = PairedAccumulator()
    size = batch_size or auto_batch_size(base_model, windows)
    pairs = zip(iter_logits(base_model, windows, size), iter_logits(candidate_model, windows, size))
    for (part, base_logits), (_, cand_logits) in track(pairs, "compare", total=-(-windows.n // size)):
        for (base_rows, targets), (cand_rows, _) in zip(_scored(windows, part, base_logits),
                                                        _scored(windows, part, cand_logits)):
            acc.update(summarize_logits(base_rows, targets, k).to(cand_rows.device), cand_rows, targets.to(cand_rows.device))
    return _timed(acc.summary(), started)
