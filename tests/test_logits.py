"""Logits in token chunks (quantaudit.logits).

Every family's head, applied chunk by chunk to the final hidden states, gives the model's own logits; and with
chunks of 37 tokens (smaller than a window, edges anywhere) every statistic equals what the model's forward
logits of whole windows, in the same batches, give (the computation before chunking, written out here): paired
statistics against a cached baseline (exact and top-K) and in lockstep, perplexity, sensitivity, layer drift at
lm_head, task scores.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from test_metrics import assert_summary_close
from tiny_models import TINY_FAMILIES

import quantaudit.logits as logits_module
from quantaudit.data import load_windows
from quantaudit.evaluate import (
    build_baseline,
    compare_models,
    compare_to_baseline,
    evaluate_perplexity,
)
from quantaudit.logits import OutputHead, chunk_rows, final_hidden
from quantaudit.measure.drift import DriftAccumulator, layer_drift
from quantaudit.measure.sensitivity import sensitivity_kld, swapped
from quantaudit.metrics import (
    PairedAccumulator,
    PerplexityAccumulator,
    summarize_logits,
    token_statistics,
)
from quantaudit.models import load_model
from quantaudit.quant import QuantSpec, quantize
from quantaudit.tasks.scoring import score_sequences

CHUNK = 37  # tokens a chunk in these tests
REL = 1e-6
BATCH = 2  # windows a forward pass, in the code and in the references


# Differences between the two models' values on the same tokens cancel most of their digits: a rounding of
# 1e-7 in the operands can move ln PPL(q) − ln PPL(b) or the mean Δp by far more than 1e-6 of itself. They
# are held to 1e-6 of what they are differences of (the base's ln PPL and PPL, Δp's RMS), the rest to 1e-6
# of itself.
DIFFERENCES = {("ln_ppl_ratio",): lambda s: math.log(s["ppl_base"]), ("ppl_diff",): lambda s: s["ppl_base"],
               ("delta_p", "mean"): lambda s: s["delta_p"]["rms"]}


def assert_same_statistics(got: dict, want: dict) -> None:
    """``got`` (a paired summary, or part of one) equals ``want`` to float rounding (``DIFFERENCES``)."""
    got, rest = copy.deepcopy(got), copy.deepcopy(want)
    for path, scale in DIFFERENCES.items():
        if path[0] in got:
            *parents, key = path
            g, w = got, rest
            for name in parents:
                g, w = g[name], w[name]
            assert g.pop(key) == pytest.approx(w.pop(key), rel=0, abs=REL * scale(want)), path
    assert_summary_close(got, {k: v for k, v in rest.items() if k in got}, rel=REL, abs_=0)


def small_chunks(monkeypatch, vocab: int) -> None:
    monkeypatch.setattr(logits_module, "LOGIT_CHUNK_BYTES", CHUNK * vocab * 4)
    assert chunk_rows(vocab) == CHUNK


@pytest.mark.parametrize("name", list(TINY_FAMILIES))
def test_every_familys_head_in_chunks_is_its_forward(name, tiny_model_dir, shared_dir, monkeypatch):
    """What follows lm_head (Gemma 2/3's soft-capping, Granite's logits_scaling) is the family's, from the table."""
    lm = load_model(str(tiny_model_dir(name)))
    small_chunks(monkeypatch, 512)
    ids = load_windows(shared_dir / "data/tinystories_sample.txt", lm.tokenizer, seq_len=64, n_windows=2).ids
    with torch.no_grad():
        want = lm.model(ids).logits
        hidden = final_hidden(lm.model, ids).reshape(-1, lm.config.hidden_size)
        head = OutputHead.of(lm.model)
        pieces = list(head.chunks(hidden))
        raw = head.layer(hidden)
    assert len(pieces) == -(-ids.numel() // CHUNK)
    got = torch.cat([logits for _, logits in pieces]).view_as(want)
    torch.testing.assert_close(got, want, rtol=REL, atol=1e-6)
    transformed = name in ("granite", "gemma2")  # the tiny gemma3_text has no final soft-cap in its config
    assert transformed == (not torch.allclose(raw.view_as(want), want))


@pytest.fixture(scope="module", params=["stories260K", "gemma2"])
def case(request, stories, tiny_model_dir, shared_dir):
    """A model, a quantized copy (lm_head included), windows of up to 100 tokens, and what the whole-window
    logits of both models give."""
    lm = stories if request.param == "stories260K" else load_model(str(tiny_model_dir(request.param)))
    windows = load_windows(shared_dir / "data/tinystories_sample.txt", lm.tokenizer, seq_len=100, n_windows=4)
    qm = quantize(lm.model, QuantSpec(format="int8_wo", include_lm_head=True), None, progress=False)
    assert type(qm.model.lm_head).__name__ == "QuantLinear"
    base, cand = whole_window_logits(lm.model, windows), whole_window_logits(qm.model, windows)
    targets = [windows.ids[i, 1 : int(windows.lengths[i])] for i in range(windows.n)]
    assert max(t.numel() for t in targets) > 2 * CHUNK
    return lm, qm, windows, base, cand, targets


@torch.no_grad()
def whole_window_logits(model, windows) -> list[torch.Tensor]:
    """Each window's scored logits [n, V] from the model's forward, ``BATCH`` windows cut to the longest a pass."""
    out = []
    for start in range(0, windows.n, BATCH):
        part = slice(start, min(start + BATCH, windows.n))
        logits = model(windows.ids[part, : int(windows.lengths[part].max())]).logits.float()
        out += [logits[row, : int(windows.lengths[i]) - 1] for row, i in enumerate(range(part.start, part.stop))]
    return out


def test_paired_statistics_and_perplexity_in_chunks(case, monkeypatch):
    lm, qm, windows, base, cand, targets = case
    small_chunks(monkeypatch, 512)
    for k in (None, 16):
        want = PairedAccumulator()
        for b, c, t in zip(base, cand, targets):
            want.update(summarize_logits(b, t, k), c, t)
        want = want.summary()
        assert want["kld"]["mean"] > 1e-5
        baseline = build_baseline(lm, windows, k=k, use_cache=False, batch_size=BATCH)
        assert_same_statistics(compare_to_baseline(baseline, qm.model, windows, BATCH), want)
        assert_same_statistics(compare_models(lm, qm.model, windows, k, BATCH), want)
    ppl = PerplexityAccumulator()
    for b, t in zip(base, targets):
        ppl.update(b, t)
    assert evaluate_perplexity(lm, windows, BATCH)["ppl"] == pytest.approx(ppl.summary()["ppl"], rel=REL)


def test_sensitivity_in_chunks(case, monkeypatch):
    """Sensitivity runs one window a pass: so does its reference."""
    lm, qm, windows, _, _, targets = case
    small_chunks(monkeypatch, 512)
    swaps = {"model.layers.1": {"model.layers.1": qm.model.model.layers[1]}, "lm_head": {"lm_head": qm.model.lm_head}}
    got = sensitivity_kld(lm.model, swaps, windows)
    ids = [windows.ids[i : i + 1, : t.numel() + 1] for i, t in enumerate(targets)]
    with torch.no_grad():
        base = [lm.model(x).logits[0, :-1] for x in ids]
    for name, replacements in swaps.items():
        total = 0.0
        with swapped(lm.model, replacements), torch.no_grad():
            for x, b, t in zip(ids, base, targets):
                total += float(token_statistics(summarize_logits(b, t), lm.model(x).logits[0, :-1], t)["kld"].double().sum())
        want = total / sum(t.numel() for t in targets)
        assert want > 0 and got[name] == pytest.approx(want, rel=REL), name


def test_layer_drift_at_lm_head_in_chunks(case, monkeypatch):
    lm, qm, windows, *_ = case
    small_chunks(monkeypatch, 512)
    got = layer_drift(lm.model, qm.model, windows, {"lm_head": "lm_head", "decoder.1": "model.layers.1"})
    want = DriftAccumulator()
    outputs = []
    handles = [m.lm_head.register_forward_hook(lambda _m, _a, out: outputs.append(out[0])) for m in (lm.model, qm.model)]
    try:
        with torch.no_grad():
            for i in range(windows.n):
                ids = windows.ids[i : i + 1, : int(windows.lengths[i])]
                lm.model(ids), qm.model(ids)
                base_out, quant_out = outputs[-2:]
                want.add(quant_out, base_out)
    finally:
        for handle in handles:
            handle.remove()
    want = want.result()
    assert want["drift_rel"] > 0
    assert got["lm_head"]["drift_rel"] == pytest.approx(want["drift_rel"], rel=REL)
    assert got["lm_head"]["cosine"] == pytest.approx(want["cosine"], rel=REL)


def test_task_scores_in_chunks(case, monkeypatch):
    lm, _, windows, *_ = case
    small_chunks(monkeypatch, 512)
    seqs = [windows.ids[i, : int(windows.lengths[i])].tolist() for i in range(windows.n)]
    cont_lens = [len(s) - 3 for s in seqs]  # continuations longer than a chunk, across chunk edges
    got = score_sequences(lm.model, seqs, cont_lens, batch_size=1)  # as the reference: one sequence a pass
    for total, seq, c in zip(got.tolist(), seqs, cont_lens):
        with torch.no_grad():
            logp = torch.log_softmax(lm.model(torch.tensor([seq[:-1]])).logits[0].float(), -1)
        want = float(logp[-c:].gather(1, torch.tensor(seq[-c:])[:, None]).double().sum())
        assert total == pytest.approx(want, rel=REL)
