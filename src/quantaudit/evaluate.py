"""Forward loops: perplexity of one model, baselines, and candidate-vs-baseline comparisons.

Every loop runs the model's decoder stack over :class:`~quantaudit.data.Windows` in batches under
``torch.inference_mode()`` (``use_cache=False``: no KV cache is built for a single full pass) up to the
final hidden states, then makes each window's logits in token chunks (:mod:`quantaudit.logits`) and
streams them into an accumulator from :mod:`quantaudit.metrics`: memory holds one batch of hidden states
and one chunk of logits, whatever the vocabulary. A batch is cut to its longest window: under causal
attention the trailing padding cannot affect real positions, so it need not be computed. Window ``i``
scores its first ``lengths[i] - 1`` positions, a contiguous prefix, so its rows are taken as a view.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import torch

from .baseline import (
    Baseline,
    BaselineWriter,
    baseline_key,
    baselines_root,
    open_baseline,
)
from .data import Windows
from .errors import UserError
from .logits import OutputHead, final_hidden
from .metrics import (
    BaselineChunk,
    PairedAccumulator,
    PerplexityAccumulator,
    summarize_logits,
    target_nll,
)
from .models import LoadedModel
from .progress import track

# Default batch: as many windows as would keep one batch of float32 logits under this size (SmolLM2, 512
# tokens: 2 windows; stories260K: all of them, up to MAX_AUTO_BATCH). Logits are made in chunks now
# (quantaudit.logits); the rule still sizes batches, so their float rounding, and every figure measured
# with them, stays as it was.
LOGITS_BUDGET_BYTES = 256 * 2**20
MAX_AUTO_BATCH = 64


def _module(model) -> torch.nn.Module:
    return model.model if isinstance(model, LoadedModel) else model


def _vocab_size(model: torch.nn.Module) -> int:
    return model.get_output_embeddings().weight.shape[0]


def auto_batch_size(model, windows: Windows) -> int:
    """Windows per forward pass (``LOGITS_BUDGET_BYTES``)."""
    per_window = windows.seq_len * _vocab_size(_module(model)) * 4
    return max(1, min(MAX_AUTO_BATCH, windows.n, LOGITS_BUDGET_BYTES // per_window))


@torch.inference_mode()
def iter_hidden(model, windows: Windows, batch_size: int | None = None) -> Iterator[tuple[slice, torch.Tensor]]:
    """Yield ``(slice of windows, final hidden states [b, width, d])`` on the model's device.

    ``width`` is the longest window of the batch; the logits of ``hidden[:, t]`` predict ``ids[:, t + 1]``.
    """
    module = _module(model)
    device = next(module.parameters()).device
    size = batch_size or auto_batch_size(module, windows)
    for start in range(0, windows.n, size):
        part = slice(start, min(start + size, windows.n))
        width = int(windows.lengths[part].max())
        yield part, final_hidden(module, windows.ids[part, :width].to(device))


def _batches(model, windows: Windows, batch_size: int | None, description: str):
    size = batch_size or auto_batch_size(model, windows)
    return track(iter_hidden(model, windows, size), description, total=-(-windows.n // size))


def _scored(windows: Windows, part: slice, hidden: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Per window of the batch: its scored rows [n, d] (a view) and their targets [n]."""
    for row, i in enumerate(range(part.start, part.stop)):
        n = int(windows.lengths[i]) - 1
        yield hidden[row, :n], windows.ids[i, 1 : n + 1].to(hidden.device)


def _timed(summary: dict, started: float) -> dict:
    seconds = time.perf_counter() - started
    return {**summary, "seconds": seconds, "tokens_per_s": summary["tokens"] / seconds}


@torch.inference_mode()
def evaluate_perplexity(model, windows: Windows, batch_size: int | None = None) -> dict:
    """Perplexity of one model: ``{tokens, ppl, ppl_unc, ln_ppl, ln_ppl_unc, seconds, tokens_per_s}``."""
    started = time.perf_counter()
    acc = PerplexityAccumulator()
    head = OutputHead.of(_module(model))
    for part, hidden in _batches(model, windows, batch_size, "perplexity"):
        for rows_hidden, targets in _scored(windows, part, hidden):
            for rows, logits in head.chunks(rows_hidden):
                acc.update(logits, targets[rows])
    return _timed(acc.summary(), started)


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
    head = OutputHead.of(loaded_model.model)
    top_k = None if k is None or k >= head.vocab else k
    key = baseline_key(loaded_model.fingerprint, windows, top_k)
    target = baselines_root() / key
    if use_cache and (found := open_baseline(target)) is not None:
        return found
    meta = {"key": key, "model": loaded_model.name, "model_fingerprint": loaded_model.fingerprint,
            "windows": windows.describe(), "top_k": top_k, "vocab_size": head.vocab}
    with BaselineWriter(target if use_cache else None, meta) as writer:
        for part, hidden in _batches(loaded_model, windows, batch_size, "baseline"):
            for rows_hidden, targets in _scored(windows, part, hidden):
                if top_k is None:
                    nll = torch.cat([target_nll(logits, targets[rows]) for rows, logits in head.chunks(rows_hidden)])
                    writer.add_hidden(head, rows_hidden, targets, -nll)
                else:
                    writer.add_chunk(BaselineChunk.cat([summarize_logits(logits, targets[rows], top_k)
                                                        for rows, logits in head.chunks(rows_hidden)]))
        return writer.commit()


@torch.inference_mode()
def compare_to_baseline(baseline: Baseline, candidate_model, windows: Windows, batch_size: int | None = None,
                        acc: PairedAccumulator | None = None) -> dict:
    """llama.cpp-style KL-divergence summary of a candidate against a stored baseline, streamed.
    Pass ``acc`` to keep the per-token values afterwards (e.g. for :func:`metrics.paired_difference`)."""
    if baseline.meta["windows"]["fingerprint"] != windows.fingerprint:
        raise UserError("the baseline was built on other evaluation windows: rebuild it for this text and --seq-len")
    head = OutputHead.of(_module(candidate_model))
    if head.vocab != baseline.meta["vocab_size"]:
        raise UserError(f"candidate vocabulary ({head.vocab}) differs from the baseline's ({baseline.meta['vocab_size']})")
    started = time.perf_counter()
    acc = PairedAccumulator() if acc is None else acc
    device = next(_module(candidate_model).parameters()).device
    bases = baseline.windows(device)
    for part, hidden in _batches(candidate_model, windows, batch_size, "compare"):
        for rows_hidden, targets in _scored(windows, part, hidden):
            base = next(bases)
            for rows, logits in head.chunks(rows_hidden):
                acc.update(base.chunk(rows), logits, targets[rows])
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
    base_head, head = OutputHead.of(_module(base_model)), OutputHead.of(_module(candidate_model))
    size = batch_size or auto_batch_size(base_model, windows)
    pairs = zip(iter_hidden(base_model, windows, size), iter_hidden(candidate_model, windows, size))
    for (part, base_hidden), (_, cand_hidden) in track(pairs, "compare", total=-(-windows.n // size)):
        for (base_rows, targets), (cand_rows, _) in zip(_scored(windows, part, base_hidden),
                                                        _scored(windows, part, cand_hidden)):
            for rows, logits in head.chunks(cand_rows):
                base = summarize_logits(base_head(base_rows[rows]), targets[rows], k)
                acc.update(base.to(logits.device), logits, targets[rows].to(logits.device))
    return _timed(acc.summary(), started)
