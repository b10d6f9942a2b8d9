"""Number formats: every format's rounding stays inside its theoretical error bound, FP8 values lie
on the real E4M3 grid, and QuantLinear computes exactly codes x scales on the rounded input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from quantaudit.quant.engine import group_size_for
from quantaudit.quant.formats import FORMATS, ActQuant, WeightQuant
from quantaudit.quant.qlinear import QuantLinear, quantize_activation, quantize_weight

# blocks: test_block_formats.py; TensorRT-LLM's own load-time quantization: test_int8_wo_is_what_tensorrt_llm_computes_at_load
WEIGHT_FORMATS = [name for name, f in FORMATS.items()
                  if f.weight is not None and f.weight.block is None and not f.weight.quantized_at_load]


def e4m3_grid() -> torch.Tensor:
    """Every finite float8_e4m3fn value, from its 256 bit patterns."""
    values = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).float()
    return values[torch.isfinite(values)].unique()


def test_e4m3_grid_is_the_real_format():
    grid = e4m3_grid()
    positive = grid[grid > 0]
    assert positive.max() == 448 and positive.min() == 2.0**-9  # largest normal, smallest subnormal
    assert len(positive) == 126  # bit patterns 0x01..0x7E: 7 subnormals + 119 normals (0x7F is NaN)
    assert (torch.flip(-positive, [0]) == grid[grid < 0]).all()


def brute_force_scale(w: torch.Tensor, wq: WeightQuant, group_size: int) -> torch.Tensor:
    """The scale every element of ``w`` should see, written without the library's helpers."""
    qmax = 448.0 if wq.kind == "fp8" else 2 ** (wq.bits - 1) - 1
    out = torch.empty_like(w)
    for r in range(w.shape[0]):
        if wq.granularity == "tensor":
            out[r] = w.abs().max() / qmax
        elif wq.granularity == "channel":
            out[r] = w[r].abs().max() / qmax
        else:
            for g0 in range(0, w.shape[1], group_size):
                # group scales are stored in fp16, as TensorRT-LLM holds them
                out[r, g0 : g0 + group_size] = (w[r, g0 : g0 + group_size].abs().max() / qmax).half().float()
    return out


@pytest.mark.parametrize("name", WEIGHT_FORMATS)
def test_weight_rounding_error_within_bound(name):
    wq = FORMATS[name].weight
    torch.manual_seed(0)
    w = torch.randn(24, 192) * torch.logspace(-2, 1, 192)  # columns of very different magnitudes
    qw = quantize_weight(w, wq, group_size=64)
    scale = brute_force_scale(w, wq, 64)
    deq = qw.codes.float() * scale
    if wq.requant is None:
        assert torch.equal(qw.dequantize(), deq)  # dequantization is codes x the stored scale
    err = (w - deq).abs()
    if wq.kind == "int":
        qmax = 2 ** (wq.bits - 1) - 1
        assert qw.codes.dtype == torch.int8
        assert qw.codes.min() >= -qmax - 1 and qw.codes.max() <= qmax
        assert (err <= scale / 2 * (1 + 1e-6)).all()  # round to nearest: half a step at most
    else:
        assert qw.codes.dtype == torch.float8_e4m3fn
        assert torch.isin(qw.codes.float(), e4m3_grid()).all()
        normal = (w / scale).abs() >= 2.0**-6
        assert (err[normal] <= 2.0**-4 * w.abs()[normal] * (1 + 1e-6)).all()  # 3 mantissa bits
        assert (err[~normal] <= 2.0**-10 * scale[~normal] * (1 + 1e-6)).all()  # subnormal step 2^-9


def test_w4a8_weights_pass_through_fp8_per_tensor():
    """W4A8_AWQ: the kernel converts codes x group scale to FP8 with one per-tensor scale."""
    wq = FORMATS["w4a8_awq"].weight
    torch.manual_seed(4)
    qw = quantize_weight(torch.randn(32, 128), wq, group_size=64)
    first = qw.codes.float() * qw.scale.float().repeat_interleave(64, dim=1)
    assert qw.scale_2 == first.abs().max() / 448
    second = qw.dequantize()
    assert torch.isin(second / qw.scale_2, e4m3_grid()).all()
    assert torch.equal(second, (first / qw.scale_2).to(torch.float8_e4m3fn).float() * qw.scale_2)
    assert (second - first).abs().max() <= 2.0**-4 * first.abs().max()


def test_int_codes_use_the_whole_range():
    w = torch.tensor([[-1.0, -0.4, 0.0, 0.4, 1.0, 0.93]])
    qw = quantize_weight(w, WeightQuant("int", 8, "channel"))
    assert qw.codes.tolist() == [[-127, -51, 0, 51, 127, 118]]  # 0.4 * 127 = 50.8, 0.93 * 127 = 118.1
    qw = quantize_weight(w, WeightQuant("int", 4, "channel"))
    assert qw.codes.tolist() == [[-7, -3, 0, 3, 7, 7]]  # 0.4 * 7 = 2.8, 0.93 * 7 = 6.51


def test_fp8_saturates_instead_of_overflowing():
    act = ActQuant("fp8", 8, "tensor", dynamic=False)
    x = torch.tensor([1.0, -3.0, 1000.0, -1e6])
    y = quantize_activation(x, act, torch.tensor(1.0))
    assert y.tolist() == [1.0, -3.0, 448.0, -448.0]


def test_per_token_dynamic_int8_activation():
    torch.manual_seed(1)
    x = torch.randn(3, 7, 32)
    x[1, 2] *= 100  # an outlier token must not coarsen the others
    act = ActQuant("int", 8, "token", dynamic=True)
    y = quantize_activation(x, act)
    scale = x.abs().amax(dim=-1, keepdim=True) / 127
    assert ((x - y).abs() <= scale / 2 * (1 + 1e-6)).all()
    assert torch.allclose(y / scale, (y / scale).round(), atol=1e-4)
    assert ((x - y).abs()[0] < x[1, 2].abs().max() / 127 / 4).all()


def test_quant_linear_is_codes_times_scales_on_rounded_input():
    """w4a8_awq: INT4 group weights (through FP8), FP8 static input after a pre-quant scale; by hand."""
    fmt = FORMATS["w4a8_awq"]
    torch.manual_seed(2)
    w, bias = torch.randn(16, 128), torch.randn(16)
    x = torch.randn(2, 5, 128)
    pre_quant_scale = torch.rand(128) + 0.5
    act_scale = torch.tensor(0.01)
    qw = quantize_weight(w, fmt.weight, group_size=64)
    layer = QuantLinear(qw, fmt, bias, act_scale, pre_quant_scale)

    weight = (qw.codes.float().reshape(16, 2, 64) * qw.scale.float()[:, :, None]).reshape(16, 128)
    weight = (weight / qw.scale_2).to(torch.float8_e4m3fn).float() * qw.scale_2  # the kernel's FP8 weight
    xs = x * pre_quant_scale
    xq = (xs / act_scale).clamp(-448, 448).to(torch.float8_e4m3fn).float() * act_scale
    expected = xq @ weight.T + bias
    assert torch.equal(layer.weight, weight)
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-5)
    assert qw.scale.dtype == torch.float16 and qw.codes.dtype == torch.int8


@pytest.mark.parametrize(
    "in_features, requested, used",
    [(1536, 128, 128), (576, 128, 64), (64, 128, 64), (576, 64, 64), (172, 128, None), (96, 64, None)],
)
def test_group_size_falls_back_to_64_then_to_unquantized(in_features, requested, used):
    group_size, reason = group_size_for(in_features, requested)
    assert group_size == used
    assert (reason is None) == (used is not None)
    if reason:
        assert str(in_features) in reason and "unquantized" in reason


@pytest.mark.parametrize(
    "in_features, outs, pad_multiple, used",
    [
        (1536, (576,), 64, 64),  # SmolLM2's down_proj: 576 outputs, which 128 would make TensorRT-LLM pad to 640
        (1536, (1536,), 64, 128),  # nothing to pad at 128
        (4096, (4096, 1024, 1024), 64, 128),  # a fused qkv GEMM checks every part
        (4096, (4096, 1024, 960), 64, 64),  # one part of the GEMM decides for all of them
        (576, (576,), 128, 64),  # W4A8 pads 576 whatever the group: the input rule alone decides
        (1536, (576,), 128, 128),
    ],
)
def test_group_size_avoids_tensorrt_llm_padding(in_features, outs, pad_multiple, used):
    """WeightOnlyGroupwiseQuantLinear pads in/out features that are not multiples of max(64 or 128 (W4A8), group)
    and then cannot load unpadded checkpoint tensors: 64 is taken where 128 would pad and 64 does not."""
    assert group_size_for(in_features, 128, outs, pad_multiple) == (used, None)


def _c_round_symmetric_quantize(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """cutlass_preprocessors.cpp symmetric_quantize for 8 bits, written out: per output channel (a row here)
    scale = max|w| * (1/128) in float32, codes = C round() (ties away from zero) of w / scale, clamped."""
    codes = np.zeros(w.shape, dtype=np.int8)
    scales = np.zeros((w.shape[0], 1), dtype=np.float32)
    for r in range(w.shape[0]):
        scale = np.float32(np.abs(w[r]).max()) * np.float32(1 / 128)
        scales[r] = scale
        for c in range(w.shape[1]):
            x = np.float32(w[r, c]) / scale if scale != 0 else np.float32(0)
            nearest = math.floor(abs(float(x))) + (1 if abs(float(x)) - math.floor(abs(float(x))) >= 0.5 else 0)
            codes[r, c] = max(-128, min(127, int(math.copysign(nearest, float(x)))))
    return codes, scales


def test_int8_wo_is_what_tensorrt_llm_computes_at_load():
    """TensorRT-LLM quantizes W8A16 weights itself (scale max|w|/128, ties away from zero): the engine's
    codes and scales are exactly that, of the weight rounded to bfloat16 (what a 16-bit checkpoint holds)."""
    wq = FORMATS["int8_wo"].weight
    torch.manual_seed(3)
    w = torch.randn(12, 40) * torch.logspace(-2, 0, 12)[:, None]
    w[0, 5] = -w[0].abs().max() * 1.5  # a row whose max is negative: code -128
    w[1] = 0.0  # an all-zero row: scale 0, codes 0
    w[2] = torch.randn(40) * 0.01
    w[2, :4] = torch.tensor([0.5, 1.5, -2.5, 128.0]) / 128  # max 1, scale 2^-7: exact ties (bfloat16 holds them)
    qw = quantize_weight(w, wq)
    source = w.to(torch.bfloat16).float().numpy()
    codes, scales = _c_round_symmetric_quantize(source)
    assert np.array_equal(qw.codes.numpy(), codes) and np.array_equal(qw.scale.numpy(), scales)
    assert qw.codes[0].min() == -128 and qw.codes[1].abs().sum() == 0 and qw.scale[1] == 0
    assert qw.codes[2, :3].tolist() == [1, 2, -3]  # ties away from zero, not to even
    assert torch.equal(qw.dequantize(), qw.codes.float() * qw.scale)


def test_int8_wo_load_source_quantizes_back_to_the_audited_codes():
    """What the exporter writes for W8A16: TensorRT-LLM's load-time quantization of it, in every checkpoint
    dtype, is the engine's codes and scales again (including rows whose largest code is 127, not -128)."""
    from quantaudit.quant.weightonly import load_source

    torch.manual_seed(5)
    qw = quantize_weight(torch.randn(64, 96) * torch.logspace(-3, 1, 64)[:, None], FORMATS["int8_wo"].weight)
    assert ((qw.codes == -128).any(dim=1)).any() and (~(qw.codes == -128).any(dim=1)).any()  # both kinds of rows
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        written = load_source(qw.codes, qw.scale).to(dtype).float().numpy()
        codes, scales = _c_round_symmetric_quantize(written)
        assert np.array_equal(codes, qw.codes.numpy()), dtype
        assert np.array_equal(scales, qw.scale.numpy()), dtype
        assert torch.equal(torch.from_numpy(scales).to(dtype).float(), qw.scale)  # the kernel's scale dtype holds it
