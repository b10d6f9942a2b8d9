"""Roofline speed estimates: bandwidth limits, format ordering and crossover batches."""

from __future__ import annotations

import math

import pytest

from quantaudit.advise.hardware import load_hardware
from quantaudit.advise.model_shape import reference_shape
from quantaudit.advise.planner import plan_memory
from quantaudit.advise.roofline import Efficiency, estimate_speed
from quantaudit.quant.formats import FORMATS

SHAPE = reference_shape("Llama-2-7B")


@pytest.fixture(scope="module")
def table():
    return load_hardware()


def speed(table, fmt, batch, context, gpu="h100", kv="none", eff=Efficiency()):
    g = table.gpu(gpu)
    plan = plan_memory(SHAPE, FORMATS[fmt], kv, g, 1, batch, context)
    return estimate_speed(SHAPE, table.formats[fmt].compute, plan, g, batch, context, eff), plan


def test_batch1_decode_within_bandwidth_and_int4_beats_fp8_beats_fp16(table):
    h100 = table.gpu("h100")
    rates = {}
    for fmt in ("none", "fp8", "int4_awq"):
        s, plan = speed(table, fmt, 1, 2048)
        assert s.tokens_per_s_per_user <= h100.bandwidth / plan.weight_bytes, fmt  # never above bandwidth/weights
        rates[fmt] = s.tokens_per_s_per_user
    assert rates["int4_awq"] > rates["fp8"] > rates["none"]


def test_batch1_decode_by_hand(table):
    """Memory-bound at batch 1: weights streamed (no embedding table) plus the KV read, at 80% of 3.35 TB/s."""
    s, plan = speed(table, "fp8", 1, 1000)
    streamed = plan.weight_bytes - 32000 * 4096 * 2
    kv = 1000 * 32 * 32 * 128 * 2 * 2
    assert s.decode_step_s == pytest.approx((streamed + kv) / (0.8 * 3.35e12), rel=1e-12)


def test_crossover_equals_brute_force(table):
    """First batch at which the weight GEMMs are compute-bound, recomputed from the datasheet by hand."""
    h100 = table.gpu("h100")
    for fmt, dtype in (("none", "fp16"), ("fp8", "fp8"), ("int4_awq", "fp16"), ("w4a8_awq", "fp8"), ("int8_sq", "int8")):
        s, plan = speed(table, fmt, 1, 512)
        weight_time = (plan.weight_bytes - 32000 * 4096 * 2) / (0.8 * h100.bandwidth)
        per_token = 2 * SHAPE.linear_params / (0.6 * h100.flops[dtype]) + 2 * 32000 * 4096 / (0.6 * h100.flops["fp16"])
        brute = next(b for b in range(1, 100_000) if b * per_token >= weight_time)
        assert s.crossover_batch == brute, fmt
        assert speed(table, fmt, brute, 512)[0].memory_bound is False
        assert brute > 1 and speed(table, fmt, brute - 1, 512)[0].memory_bound is True


def test_int4_stops_being_memory_bound_first_and_fp8_wins_large_batches(table):
    crossover = {fmt: speed(table, fmt, 1, 256)[0].crossover_batch for fmt in ("none", "fp8", "int4_awq")}
    assert crossover["int4_awq"] < crossover["fp8"]
    # FP16 and FP8 cross at the same batch: half the bytes, twice the FLOP rate
    assert crossover["fp8"] == pytest.approx(crossover["none"], abs=1)
    small = {f: speed(table, f, 1, 256, kv="fp8")[0].tokens_per_s for f in ("fp8", "int4_awq")}
    large = {f: speed(table, f, 512, 256, kv="fp8")[0].tokens_per_s for f in ("fp8", "int4_awq")}
    assert small["int4_awq"] > small["fp8"]
    assert large["fp8"] > large["int4_awq"]


def test_efficiency_factors_scale_the_estimate(table):
    slow, _ = speed(table, "fp8", 1, 512, eff=Efficiency(bandwidth=0.4, flops=0.6))
    fast, _ = speed(table, "fp8", 1, 512, eff=Efficiency(bandwidth=0.8, flops=0.6))
    assert slow.decode_step_s == pytest.approx(2 * fast.decode_step_s, rel=1e-12)  # memory-bound: bandwidth only


def test_prefill_is_compute_bound_and_fp8_halves_it(table):
    fp16, _ = speed(table, "none", 1, 4096)
    fp8, _ = speed(table, "fp8", 1, 4096)
    flops_fp16 = 0.6 * 989.5e12
    expected_fp16 = (4096 * 2 * SHAPE.linear_params + 2 * 32000 * 4096) / flops_fp16 \
        + 4096 ** 2 * 2 * 32 * 32 * 128 / flops_fp16
    assert fp16.prefill_s == pytest.approx(expected_fp16, rel=1e-12)
    gemm_share = 4096 * 2 * SHAPE.linear_params / flops_fp16
    assert fp16.prefill_s - fp8.prefill_s == pytest.approx(gemm_share / 2, rel=1e-12)


def test_long_context_attention_stays_memory_bound(table):
    s, _ = speed(table, "fp8", 64, 32768, kv="fp8")
    assert s.kv_s > s.attn_s
    assert math.isclose(s.decode_step_s, max(s.weight_s, s.gemm_s) + s.kv_s)
