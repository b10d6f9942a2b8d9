"""Memory planner: weight bytes per format, KV bytes per token, capacity on N GPUs."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from quantaudit.advise.hardware import load_hardware
from quantaudit.advise.model_shape import ModelShape, reference_shape, shape_from_params
from quantaudit.advise.planner import (
    PlannerSettings,
    activation_bytes,
    kv_bytes_per_token,
    max_layers_that_fit,
    plan_memory,
    weight_bytes,
)
from quantaudit.quant.formats import FORMATS

STORIES_HF = Path(__file__).resolve().parents[2] / ".." / "shared" / "models" / "stories260K" / "hf"

# SmolLM2-135M as the issue states it: 30 layers, hidden 576, 9/3 heads, head_dim 64, intermediate 1536, vocab 49152
SMOLLM2 = ModelShape(name="smollm2", layers=30, hidden=576, heads=9, kv_heads=3, head_dim=64, intermediate=1536,
                     vocab=49152, tied_embeddings=True, source="hand")


@pytest.fixture(scope="module")
def h100():
    return load_hardware().gpu("h100")


def test_70b_weights_int4_about_35gb_fp16_about_140gb():
    shape = shape_from_params(70e9)
    fp16 = weight_bytes(shape, FORMATS["none"])
    int4 = weight_bytes(shape, FORMATS["int4_awq"], group_size=128)
    # independent arithmetic: every Llama-2-70B dimension divides 128, so INT4 costs 4 bits + one fp16 scale per
    # 128 weights; embeddings and lm_head (16 bit, separate in the TensorRT-LLM checkpoint) and norms at 2 bytes
    sixteen_bit = 2 * shape.vocab * shape.hidden + (2 * shape.layers + 1) * shape.hidden
    assert int4 == pytest.approx(shape.linear_params * (4 + 16 / 128) / 8 + 2 * sixteen_bit, rel=1e-12)
    assert fp16 == 2 * shape.total_params  # untied: every parameter at 2 bytes
    assert 139e9 <= fp16 <= 141e9
    assert 35e9 <= int4 <= 38e9


@pytest.mark.parametrize("fmt, bits_per_weight", [("fp8", 8), ("int8_wo", 8 + 32 / 4096), ("int4_awq", 4 + 16 / 128),
                                                  ("none", 16)])
def test_weight_bytes_per_format_llama2_7b(fmt, bits_per_weight):
    shape = reference_shape("Llama-2-7B")  # every linear has in_features 4096 or 11008
    linears = sum(o * i * (bits_per_weight if fmt != "int8_wo" else 8 + 32 / i) for _, o, i in shape.layer_linears())
    expected = shape.layers * linears / 8 + 2 * (2 * 32000 * 4096 + 65 * 4096)
    assert weight_bytes(shape, FORMATS[fmt]) == pytest.approx(expected, rel=1e-12)


def test_group_size_falls_back_like_the_engine():
    # SmolLM2's 576-wide inputs are not multiples of 128: the engine uses group 64 there; 1536 takes 128
    per_layer = 0.0
    for _, o, i in SMOLLM2.layer_linears():
        group = 128 if i % 128 == 0 else 64
        per_layer += o * i * (4 + 16 / group) / 8
    expected = 30 * per_layer + 2 * (2 * 49152 * 576 + 61 * 576)
    assert weight_bytes(SMOLLM2, FORMATS["int4_awq"], group_size=128) == pytest.approx(expected, rel=1e-12)


def test_kv_bytes_per_token_smollm2_by_hand():
    assert kv_bytes_per_token(SMOLLM2, "none") == 30 * 3 * 64 * 2 * 2 == 23040
    assert kv_bytes_per_token(SMOLLM2, "fp8") == 11520
    assert kv_bytes_per_token(SMOLLM2, "int8") == 11520


def test_weight_bytes_equal_the_engine_on_stories260k(stories):
    """The planner's arithmetic equals the bytes the quantization engine really stores (codes + scales)."""
    from quantaudit.advise.model_shape import load_model_shape
    from quantaudit.quant import QuantSpec, quantize

    shape = load_model_shape(str(STORIES_HF))
    for name in ("none", "int8_wo", "int4_wo"):  # round-to-nearest: no calibration needed
        qm = quantize(stories.model, QuantSpec(format=name, group_size=128), None, progress=False)
        assert weight_bytes(shape, FORMATS[name], 128) == qm.weight_bytes(), name


def test_capacity_max_batch_and_max_context(h100):
    shape = reference_shape("Llama-2-7B")
    settings = PlannerSettings()
    plan = plan_memory(shape, FORMATS["fp8"], "fp8", h100, gpus=1, batch=8, context=4096, settings=settings)
    free = h100.memory_bytes - plan.weight_bytes - activation_bytes(shape, 8, settings.max_num_tokens)
    tokens = int(0.9 * free // (32 * 32 * 128 * 2 * 1))
    assert plan.kv_capacity_tokens == tokens
    assert plan.max_batch == tokens // 4096  # 4096 is a whole number of 32-token blocks
    assert plan.max_context == tokens // 32 // 8 * 32
    assert plan.fits == (plan.max_batch >= 8)
    fp16_kv = plan_memory(shape, FORMATS["fp8"], "none", h100, gpus=1, batch=8, context=4096, settings=settings)
    assert fp16_kv.max_batch == int(0.9 * free // (32 * 32 * 128 * 2 * 2)) // 4096


def test_partial_blocks_are_reserved_whole(h100):
    shape = reference_shape("Llama-2-7B")
    plan = plan_memory(shape, FORMATS["fp8"], "fp8", h100, 1, 1, context=100)
    assert plan.max_batch == plan.kv_capacity_tokens // 128  # 100 tokens take four 32-token blocks


def test_tensor_parallel_splits_weights_and_kv_heads(h100):
    shape = shape_from_params(70e9)  # 8 KV heads
    one = plan_memory(shape, FORMATS["fp8"], "fp8", h100, 1, 1, 4096)
    four = plan_memory(shape, FORMATS["fp8"], "fp8", h100, 4, 1, 4096)
    sixteen = plan_memory(shape, FORMATS["fp8"], "fp8", h100, 16, 1, 4096)
    assert four.weight_bytes_per_gpu == one.weight_bytes / 4
    assert four.kv_bytes_per_token_per_gpu == one.kv_bytes_per_token / 4
    # 16 GPUs > 8 KV heads: each GPU still holds one whole head (TensorRT-LLM replicates them)
    assert sixteen.kv_bytes_per_token_per_gpu == one.kv_bytes_per_token / 8


def test_does_not_fit_when_weights_exceed_memory(h100):
    plan = plan_memory(shape_from_params(70e9), FORMATS["none"], "none", h100, 1, 1, 4096)
    assert not plan.weights_fit and not plan.fits and plan.kv_capacity_tokens == 0 and plan.max_batch == 0


def test_max_layers_that_fit_is_the_boundary(h100):
    shape = reference_shape("Llama-2-7B")
    layers = max_layers_that_fit(shape, FORMATS["fp8"], "fp8", h100, 1, 16, 4096)
    from dataclasses import replace

    assert plan_memory(replace(shape, layers=layers), FORMATS["fp8"], "fp8", h100, 1, 16, 4096).fits
    assert not plan_memory(replace(shape, layers=layers + 1), FORMATS["fp8"], "fp8", h100, 1, 16, 4096).fits
    assert layers > shape.layers and math.isfinite(layers)
