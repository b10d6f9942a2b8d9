"""Layer streaming on stories260K: the streamed audit's numbers against the in-memory audit's.

The in-memory path (quantize() + evaluate.compare_to_baseline + audit.drift.layer_drift) is the
independent computation here: it holds the whole model and never touches quantaudit.stream.
"""

from __future__ import annotations

import pytest
import torch

from quantaudit.audit.streamed import stream_audit
from quantaudit.evaluate import build_baseline, compare_to_baseline
from quantaudit.measure.drift import layer_drift
from quantaudit.quant import AWQOptions, QuantSpec, quantize
from quantaudit.stream.source import CheckpointParts
from quantaudit.stream.spill import SpillStore

REL = 1e-5
FORMATS = ["int8_wo", "fp8", "int8_sq", "int4_awq", "int4_gptq", "w4a8_awq"]
STATS = ["ppl", "ppl_base", "ppl_ratio", "ln_ppl_ratio_unc", "top1", "logprob_correlation"]


def _spec(fmt: str, kv: str = "none") -> QuantSpec:
    # calib_batch 2: the 5 calibration windows take three batches, the last one partial
    return QuantSpec(format=fmt, kv_cache=kv, group_size=64, calib_batch=2, awq=AWQOptions(n_grid=5))


def _streamed(stories_dir, specs, calib, windows, budget=0, **kw):
    parts = CheckpointParts(stories_dir)
    with SpillStore(budget) as store:
        result = stream_audit(parts, specs, calib, windows, store, progress=False, **kw)
        spilled = store.spilled_bytes
    return result, spilled


def _assert_same_stats(streamed: dict, in_memory: dict) -> None:
    for key in STATS:
        assert streamed[key] == pytest.approx(in_memory[key], rel=REL), key
    for group in ("kld", "kld_reverse", "delta_p"):
        for name, value in in_memory[group].items():
            assert streamed[group][name] == pytest.approx(value, rel=REL, abs=1e-12), f"{group}.{name}"
    assert streamed["tokens"] == in_memory["tokens"]


@pytest.mark.parametrize("kv, formats", [("none", FORMATS), ("fp8", ["int8_wo", "int8_sq", "int4_gptq"])])
def test_streamed_statistics_equal_the_in_memory_audit(stories, stories_dir, calib, eval_windows, kv, formats):
    """Every hidden state spilled to disk (budget 0), three evaluation batches of unequal widths: KLD
    (mean and every percentile), PPL ratio, top-1, delta-p, byte counts and layer drift all equal."""
    specs = {f: _spec(f, kv) for f in formats}
    result, spilled = _streamed(stories_dir, specs, calib, eval_windows, batch_size=3, drift_windows=2)
    assert spilled > 0  # the spill path was used, not just the in-memory one
    baseline = build_baseline(stories, eval_windows, use_cache=False, batch_size=3)
    assert result.baseline["ppl"] == pytest.approx(baseline.ppl["ppl"], rel=REL)
    points = {f"decoder.{i}": f"model.layers.{i}" for i in range(5)}
    points.update({n: n for n in ("model.layers.0.self_attn.k_proj", "model.layers.3.mlp.down_proj", "lm_head")})
    klds = {}
    for fmt, spec in specs.items():
        qm = quantize(stories.model, spec, calib, progress=False)
        got = result.formats[fmt]
        _assert_same_stats(got.stats, compare_to_baseline(baseline, qm.model, eval_windows, batch_size=3))
        assert got.qm.weight_bytes() == qm.weight_bytes() and got.qm.kv_bytes_per_token() == qm.kv_bytes_per_token()
        assert got.qm.weight_bytes_breakdown() == qm.weight_bytes_breakdown()
        assert got.qm.calib_info == qm.calib_info
        assert got.qm.fallbacks() == qm.fallbacks()
        assert {n: r.group_size for n, r in got.qm.layers.items()} == {n: r.group_size for n, r in qm.layers.items()}
        assert sorted(got.qm.kv_scales) == sorted(qm.kv_scales) == ([0, 1, 2, 3, 4] if kv != "none" else [])
        for i, scales in qm.kv_scales.items():
            assert torch.equal(got.qm.kv_scales[i].k_scale, scales.k_scale)
        drift = layer_drift(stories.model, qm.model, eval_windows.subset(2), points)
        assert set(got.drift) == {f"decoder.{i}" for i in range(5)} | {n for n in qm.layers}
        for name, value in drift.items():
            assert got.drift[name]["drift_rel"] == pytest.approx(value["drift_rel"], rel=1e-4), (fmt, name)
            assert got.drift[name]["cosine"] == pytest.approx(value["cosine"], rel=1e-6), (fmt, name)
        klds[fmt] = got.stats["kld"]["mean"]
    assert all(v > 0 for v in klds.values())
    assert klds["int8_wo"] < klds["int4_gptq"]  # real, distinct numbers, not one stream reported N times


def test_top_k_baseline_is_the_in_memory_lower_bound(stories, stories_dir, calib, eval_windows):
    result, _ = _streamed(stories_dir, {"int4_awq": _spec("int4_awq")}, calib, eval_windows, budget=2**30, top_k=16)
    baseline = build_baseline(stories, eval_windows, k=16, use_cache=False)
    qm = quantize(stories.model, _spec("int4_awq"), calib, progress=False)
    in_memory = compare_to_baseline(baseline, qm.model, eval_windows)
    assert result.formats["int4_awq"].stats["baseline_top_k"] == 16
    _assert_same_stats(result.formats["int4_awq"].stats, in_memory)


def test_rtn_needs_no_calibration_stream(stories_dir, calib, eval_windows):
    """int8_wo alone: no calibration states are ever computed or stored, only the two evaluation streams."""
    parts = CheckpointParts(stories_dir)
    with SpillStore(2**30) as store:
        stream_audit(parts, {"int8_wo": _spec("int8_wo")}, calib, eval_windows, store, progress=False)
        assert {key[0] for key in store._ram} == {"eval/baseline", "eval/int8_wo"}
        assert store.folder is None  # everything fitted in the budget: nothing spilled


def test_logits_in_chunks_of_tokens(stories, stories_dir, calib, eval_windows, monkeypatch):
    """Large vocabularies take a window's logits in chunks of tokens (quantaudit.logits); 29 tokens of 512 in the
    streamed final stage, 37 in the in-memory path, so that chunk edges fall anywhere, including on a window's
    unscored last position."""
    import quantaudit.logits
    from quantaudit.audit import streamed as stream_module

    monkeypatch.setattr(quantaudit.logits, "LOGIT_CHUNK_BYTES", 37 * 512 * 4)
    monkeypatch.setattr(stream_module, "LOGIT_BLOCK_BYTES", 29 * 512 * 4)
    specs = {f: _spec(f) for f in ("int8_wo", "int4_awq")}
    result, _ = _streamed(stories_dir, specs, calib, eval_windows, batch_size=4, drift_windows=1)
    baseline = build_baseline(stories, eval_windows, use_cache=False, batch_size=4)
    for fmt, spec in specs.items():
        qm = quantize(stories.model, spec, calib, progress=False)
        _assert_same_stats(result.formats[fmt].stats, compare_to_baseline(baseline, qm.model, eval_windows, batch_size=4))
        lm_head = layer_drift(stories.model, qm.model, eval_windows.subset(1), {"lm_head": "lm_head"})["lm_head"]
        assert result.formats[fmt].drift["lm_head"]["drift_rel"] == pytest.approx(lm_head["drift_rel"], rel=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_cuda_follows_the_same_path(stories_dir, calib, eval_windows):
    specs = {"int4_gptq": _spec("int4_gptq")}
    cpu, _ = _streamed(stories_dir, specs, calib, eval_windows)
    parts = CheckpointParts(stories_dir, "cuda")
    with SpillStore(0) as store:
        gpu = stream_audit(parts, specs, calib, eval_windows, store, progress=False)
    assert gpu.formats["int4_gptq"].stats["kld"]["mean"] == pytest.approx(cpu.formats["int4_gptq"].stats["kld"]["mean"], rel=1e-3)


@pytest.mark.slow
def test_streamed_smollm2_equals_the_in_memory_audit(smollm2, shared_dir):
    """SmolLM2 (30 layers, 49k vocabulary, tied lm_head), read from its cached safetensors: mean KLD, PPL,
    PPL ratio and top-1 equal the in-memory path's to 1e-5 relative, for a weight-only, a static-activation
    and an AWQ format. Per-token values differ by float32 rounding through 30 layers (batches are summed in
    another order), so the KLD percentiles, small numbers near 0.01 at the low end, agree to 1e-5 absolute."""
    from quantaudit.data import load_windows

    windows = load_windows(shared_dir / "data" / "wikitext2_raw_test.txt", smollm2.tokenizer, 128, 3)
    calib = load_windows(shared_dir / "data" / "wikitext2_valid_tokens.txt", smollm2.tokenizer, 128, 3, role="calib")
    specs = {f: QuantSpec(format=f, group_size=64, calib_batch=2, awq=AWQOptions(n_grid=3))
             for f in ("int8_wo", "fp8", "int4_awq")}
    result, _ = _streamed(smollm2.source, specs, calib, windows, budget=2**40, batch_size=2)
    baseline = build_baseline(smollm2, windows, use_cache=False, batch_size=2)
    assert result.baseline["ppl"] == pytest.approx(baseline.ppl["ppl"], rel=REL)
    for fmt, spec in specs.items():
        qm = quantize(smollm2.model, spec, calib, progress=False)
        streamed, in_memory = result.formats[fmt].stats, compare_to_baseline(baseline, qm.model, windows, batch_size=2)
        for key in ("ppl", "ppl_ratio", "top1"):
            assert streamed[key] == pytest.approx(in_memory[key], rel=REL), (fmt, key)
        assert streamed["kld"]["mean"] == pytest.approx(in_memory["kld"]["mean"], rel=REL), fmt
        for name, value in in_memory["kld"].items():
            assert streamed["kld"][name] == pytest.approx(value, abs=1e-5), (fmt, name)
        assert streamed["tokens"] == in_memory["tokens"]
        assert result.formats[fmt].qm.weight_bytes() == qm.weight_bytes()
