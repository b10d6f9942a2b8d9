"""Block-scaled formats (NVFP4, W4A8_NVFP4_FP8, MXFP4, MXFP8, FP8 128x128 blocks, NVFP4 KV cache):
every value on its grid, block scales of the right count and dtype computed as ModelOpt computes them,
and rounding errors inside bounds derived here. The expected values are written out by brute force
(grids enumerated, nearest point searched), not with the library's helpers."""

from __future__ import annotations

import pytest
import torch
from tiny_llama import random_windows, tiny_llama

from quantaudit.errors import UserError
from quantaudit.quant import QuantSpec, quantize
from quantaudit.quant.awq import search_scale
from quantaudit.quant.formats import FORMATS, KV_CACHE_FORMATS, get_format, weight_bits
from quantaudit.quant.kvcache import KVQuantizer
from quantaudit.quant.numerics import fp4_codes
from quantaudit.quant.qlinear import QuantLinear, quantize_activation, quantize_weight

E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=torch.float64)
F8 = torch.float8_e4m3fn




def e4m3_grid() -> torch.Tensor:
    values = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(F8).float()
    return values[torch.isfinite(values)].unique()


def nearest_e2m1(y: torch.Tensor) -> torch.Tensor:
    """The E2M1 value nearest to each element (ties to the even mantissa = even index; beyond 6: 6)."""
    d = (y.double().abs().reshape(-1, 1) - E2M1).abs()
    odd = (torch.arange(8) % 2).double()
    index = (d + 1e-9 * odd * (d == d.min(dim=1, keepdim=True).values)).argmin(dim=1)
    return (E2M1[index].reshape(y.shape) * torch.sign(y.double())).float()


def decode_e2m1(codes: torch.Tensor) -> torch.Tensor:
    """Bit 3 sign, bits 0-2 index: the OCP MX spec's E2M1 encoding."""
    c = codes.long()
    return (E2M1[c & 7] * torch.where(c & 8 > 0, -1.0, 1.0)).float()


def blocks_of(t: torch.Tensor, size: int) -> torch.Tensor:
    return t.reshape(*t.shape[:-1], t.shape[-1] // size, size)


def spread_weight(out=24, inp=192, seed=0) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.randn(out, inp) * torch.logspace(-2, 1, inp)  # columns of very different magnitudes


def smallest_power_of_two_exponent(amax: torch.Tensor, elem_max: float) -> torch.Tensor:
    """min e with amax <= elem_max * 2**e, by search (ModelOpt's ceil rule for E8M0)."""
    out = torch.full_like(amax, 999.0)
    for e in range(127, -128, -1):
        out = torch.where(amax <= elem_max * 2.0**e, torch.full_like(amax, e), out)
    return out


def test_e2m1_rounding_is_nearest_with_ties_to_even_and_saturates():
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])  # exact midpoints, then values beyond 6
    got = decode_e2m1(fp4_codes(torch.cat([ties, -ties, torch.tensor([6.5, 100.0, -7.0, 0.0])]), torch.tensor(1.0)))
    assert got.tolist() == [0, 1, 1, 2, 2, 4, 4, -0.0, -1, -1, -2, -2, -4, -4, 6, 6, -6, 0]
    y = torch.linspace(-7, 7, 20001)
    assert torch.equal(decode_e2m1(fp4_codes(y, torch.tensor(1.0))), nearest_e2m1(y))


@pytest.mark.parametrize("name, global_max, block", [("nvfp4", 6 * 448.0, 16), ("w4a8_nvfp4_fp8", 448.0, 32)])
def test_nvfp4_two_level_scales_and_codes_as_modelopt_computes_them(name, global_max, block):
    wq = FORMATS[name].weight
    w = spread_weight()
    qw = quantize_weight(w, wq)
    g = w.abs().max() / global_max  # NVFP4QTensor.get_weights_scaling_factor_2 (W4A8: amax / 448)
    assert qw.scale_2.dtype == torch.float32 and torch.equal(qw.scale_2, g)
    block_amax = blocks_of(w, block).abs().amax(dim=-1)
    assert qw.scale.dtype == F8 and qw.scale.shape == (24, 192 // block)  # one E4M3 scale per block of inputs
    assert torch.equal(qw.scale.float(), (block_amax / (6 * g)).to(F8).float())  # per_block_amax / (6 * wsf2)
    assert torch.isin(qw.scale.float(), e4m3_grid()).all()
    s = (qw.scale.float() * g).repeat_interleave(block, dim=1)
    assert qw.codes.dtype == torch.uint8 and qw.codes.shape == w.shape and int(qw.codes.max()) <= 15
    assert torch.equal(decode_e2m1(qw.codes), nearest_e2m1(w / s))  # every code the nearest E2M1 point
    assert torch.equal(qw.dequantize(), decode_e2m1(qw.codes) * s)
    # bound: half the widest E2M1 gap (1 scale) with the E4M3 scale rounded up by at most 2^-4, or the
    # saturation of a block max the rounded-down scale pushes past 6 (< 2^-4 of it): (1 + 2^-4) amax / 6
    bound = (1 + 2.0**-4) * block_amax.repeat_interleave(block, dim=1) / 6
    assert ((w - qw.dequantize()).abs() <= bound * (1 + 1e-6)).all()


@pytest.mark.parametrize("name, elem_max", [("mxfp4", 6.0), ("mxfp8", 448.0)])
def test_mx_scales_are_powers_of_two_rounded_up(name, elem_max):
    wq = FORMATS[name].weight
    w = spread_weight(seed=1)
    w[3, :32] = 0  # an all-zero block
    qw = quantize_weight(w, wq)
    block_amax = blocks_of(w, 32).abs().amax(dim=-1)
    assert qw.scale.dtype == torch.uint8 and qw.scale.shape == (24, 6)  # E8M0: biased exponent per 32 inputs
    exponent = qw.scale.float() - 127
    nonzero = block_amax > 0
    assert torch.equal(exponent[nonzero], smallest_power_of_two_exponent(block_amax, elem_max)[nonzero])
    assert exponent[3, 0] == 0  # the zero block: 2**0
    s = torch.exp2(exponent).repeat_interleave(32, dim=1)
    mantissa, _ = torch.frexp(s)
    assert (mantissa == 0.5).all()  # powers of two
    deq = qw.dequantize()
    err = (w - deq).abs()
    if wq.kind == "fp4":
        assert torch.equal(decode_e2m1(qw.codes), nearest_e2m1(w / s))
        # s < 2 amax / 6 (rounded-up exponent) and half the widest gap is 1 scale; no block saturates
        assert (err <= (block_amax / 3).repeat_interleave(32, dim=1) * (1 + 1e-6)).all()
    else:
        assert qw.codes.dtype == F8 and torch.isin(qw.codes.float(), e4m3_grid()).all()
        assert torch.equal(qw.codes.float(), (w / s).to(F8).float())  # no clamp needed: |w / s| <= 448
        normal = (w / s).abs() >= 2.0**-6
        assert (err[normal] <= 2.0**-4 * w.abs()[normal] * (1 + 1e-6)).all()
        assert (err[~normal] <= 2.0**-10 * s[~normal] * (1 + 1e-6)).all()


def test_fp8_2d_blocks_cover_partial_edges():
    """fp8_pb_wo: one FP32 scale amax / 448 per 128x128 tile, ceil(out/128) x ceil(in/128) of them."""
    wq = FORMATS["fp8_pb_wo"].weight
    w = spread_weight(200, 300, seed=2)
    qw = quantize_weight(w, wq)
    assert qw.scale.dtype == torch.float32 and qw.scale.shape == (2, 3) and qw.block_rows == 128
    s = torch.empty_like(w)
    for r in range(0, 200, 128):
        for c in range(0, 300, 128):
            tile = w[r:r + 128, c:c + 128]
            assert qw.scale[r // 128, c // 128] == tile.abs().max() / 448
            s[r:r + 128, c:c + 128] = tile.abs().max() / 448
    assert qw.codes.dtype == F8 and torch.equal(qw.codes.float(), (w / s).to(F8).float())
    assert torch.equal(qw.dequantize(), qw.codes.float() * s)
    normal = (w / s).abs() >= 2.0**-6
    err = (w - qw.dequantize()).abs()
    assert (err[normal] <= 2.0**-4 * w.abs()[normal] * (1 + 1e-6)).all()
    assert (err[~normal] <= 2.0**-10 * s[~normal] * (1 + 1e-6)).all()


def test_nvfp4_activation_blocks_under_the_calibrated_global():
    act = FORMATS["nvfp4"].act
    torch.manual_seed(3)
    x = torch.randn(3, 5, 64)
    x[1, 2, 7] = 40.0  # above the calibrated amax: its block scale saturates at 448, the value at 6
    g = torch.tensor(8.0) / (6 * 448)  # calibrated amax 8
    y = quantize_activation(x, act, g)
    block_amax = blocks_of(x, 16).abs().amax(dim=-1, keepdim=True)
    s = ((block_amax / (6 * g)).clamp(max=448).to(F8).float() * g).expand(-1, -1, -1, 16).reshape(x.shape)
    assert torch.equal(y, nearest_e2m1(x / s) * s)
    assert y[1, 2, 7] == 6 * 448 * g  # saturated


def test_mxfp8_activation_blocks_are_dynamic():
    act = FORMATS["mxfp8"].act
    assert act.dynamic and act.block.size == 32
    torch.manual_seed(4)
    x = torch.randn(2, 3, 64) * 5
    y = quantize_activation(x, act)
    block_amax = blocks_of(x, 32).abs().amax(dim=-1)
    s = torch.exp2(smallest_power_of_two_exponent(block_amax, 448.0)).repeat_interleave(32, dim=-1)
    assert torch.equal(y, (x / s).to(F8).float() * s)


def test_nvfp4_linear_is_the_dequantized_weight_on_the_rounded_input():
    fmt = FORMATS["nvfp4"]
    w, x = spread_weight(16, 64, seed=5), torch.randn(2, 4, 64)
    qw = quantize_weight(w, fmt.weight)
    g = x.abs().max() / (6 * 448)
    layer = QuantLinear(qw, fmt, None, g, None)
    expected = torch.nn.functional.linear(quantize_activation(x, fmt.act, g), qw.dequantize())
    assert torch.equal(layer(x), expected)


def test_storage_bits_count_the_block_scales():
    assert weight_bits(get_format("nvfp4"), 4096, 128) == 4 + 8 / 16
    assert weight_bits(get_format("w4a8_nvfp4_fp8"), 4096, 128) == 4 + 8 / 32
    assert weight_bits(get_format("mxfp4"), 4096, 128) == 4 + 8 / 32
    assert weight_bits(get_format("mxfp8"), 4096, 128) == 8 + 8 / 32
    assert weight_bits(get_format("fp8_pb_wo"), 4096, 128) == 8 + 32 / (128 * 128)
    assert KV_CACHE_FORMATS["nvfp4"].storage_bits == 4.5


def test_awq_search_with_nvfp4_rounding_never_loses_to_plain_rtn():
    torch.manual_seed(6)
    x = torch.randn(256, 64) * torch.linspace(0.1, 4, 64)
    w = spread_weight(32, 64, seed=6)
    wq = get_format("nvfp4_awq").weight
    quantizer = lambda t: quantize_weight(t, wq).dequantize()  # noqa: E731
    s = search_scale(x, [w], group_size=16, n_grid=8, quantizer=quantizer)

    def error(scale):
        return ((x @ w.T - (x / scale) @ quantizer(w * scale).T) ** 2).sum()

    assert error(s) <= error(torch.ones(64))


# ------------------------------------------------------------------ engine on stories260K


@pytest.fixture(scope="module")
def calib(stories, shared_dir):
    from quantaudit.data import load_windows

    return load_windows(shared_dir / "data" / "tinystories_sample.txt", stories.tokenizer, seq_len=32, n_windows=2,
                        role="calib")


def first_q_proj_input_amax(stories, calib, multiplier=None) -> torch.Tensor:
    """max |x| (x * multiplier) at layer 0's q_proj input over the real calibration tokens, by a hook."""
    seen = []
    layer = stories.model.model.layers[0].self_attn.q_proj
    handle = layer.register_forward_hook(lambda m, inp, out: seen.append(inp[0].detach()))
    with torch.no_grad():
        stories.model(calib.ids)
    handle.remove()
    x = seen[0][torch.arange(calib.seq_len)[None, :] < calib.lengths[:, None]]
    return (x if multiplier is None else x * multiplier).abs().amax()


def test_nvfp4_on_stories260k_falls_back_where_the_block_does_not_divide(stories, calib):
    qm = quantize(stories.model, QuantSpec(format="nvfp4"), calib, progress=False)
    fallbacks = qm.fallbacks()
    assert set(fallbacks) == {f"model.layers.{i}.mlp.down_proj" for i in range(5)} | {"lm_head"}
    assert "input size 172 is not a multiple of the nvfp4 block of 16" in fallbacks["model.layers.0.mlp.down_proj"]
    q, k, v = (qm.layers[f"model.layers.0.self_attn.{p}_proj"] for p in "qkv")
    assert torch.equal(q.weight_scale_2, k.weight_scale_2) and torch.equal(q.weight_scale_2, v.weight_scale_2)
    qkv_amax = max(stories.model.model.layers[0].self_attn.get_submodule(f"{p}_proj").weight.abs().max() for p in "qkv")
    assert torch.equal(q.weight_scale_2, qkv_amax / (6 * 448))  # one global for the fused qkv GEMM
    assert torch.equal(q.act_scale, first_q_proj_input_amax(stories, calib) / (6 * 448))
    assert q.group_size == 16 and q.weight_scale.shape == (64, 4) and q.weight_scale.dtype == F8
    # bytes: packed codes + E4M3 block scales + the FP32 global and activation scales
    assert q.storage_bytes() == 64 * 64 // 2 + 64 * 4 + 4 + 4


def test_nvfp4_awq_shares_the_pre_quant_scale_and_calibrates_the_scaled_input(stories, calib):
    from quantaudit.quant import AWQOptions

    qm = quantize(stories.model, QuantSpec(format="nvfp4_awq", awq=AWQOptions(n_grid=4)), calib, progress=False)
    q, k, v = (qm.layers[f"model.layers.0.self_attn.{p}_proj"] for p in "qkv")
    assert torch.equal(q.pre_quant_scale, k.pre_quant_scale) and torch.equal(q.pre_quant_scale, v.pre_quant_scale)
    assert torch.equal(q.act_scale, first_q_proj_input_amax(stories, calib, q.pre_quant_scale) / (6 * 448))
    assert not q.details["clipped"]  # awq_lite: no clip search


def test_fp8_2d_blocks_quantize_every_decoder_linear(stories, calib):
    qm = quantize(stories.model, QuantSpec(format="fp8_pb_wo"), calib, progress=False)
    assert set(qm.fallbacks()) == {"lm_head"}
    down = qm.layers["model.layers.0.mlp.down_proj"]  # 64 x 172: one partial tile row, two tile columns
    assert down.weight_scale.shape == (1, 2) and down.block_rows == 128 and down.act_scale is None


def test_mx_formats_need_no_calibration(stories):
    qm = quantize(stories.model, QuantSpec(format="mxfp8"), None, progress=False)
    assert not qm.calib_info["used"]
    assert qm.layers["model.layers.0.self_attn.q_proj"].weight_scale.dtype == torch.uint8


# ------------------------------------------------------------------ NVFP4 KV cache


def test_nvfp4_kv_cache_rounds_blocks_of_head_dim_under_calibrated_globals():
    qm = quantize(tiny_llama(), QuantSpec(format="none", kv_cache="nvfp4", kv_scales="separate"), random_windows(),
                  progress=False)
    for scales in qm.kv_scales.values():
        assert torch.equal(scales.k_scale, scales.k_amax / (6 * 448))
        assert torch.equal(scales.v_scale, scales.v_amax / (6 * 448))
    quantizer = qm.model.model.layers[1].self_attn.kv_quantizer
    assert isinstance(quantizer, KVQuantizer)
    torch.manual_seed(9)
    key, value = torch.randn(1, 2, 5, 16), torch.randn(1, 2, 5, 16)
    k, _ = quantizer(key, value)
    g = quantizer.k_scale
    s = ((key.abs().amax(dim=-1, keepdim=True) / (6 * g)).clamp(max=448).to(F8).float() * g).expand_as(key)
    assert torch.equal(k, nearest_e2m1(key / s) * s)
    assert qm.kv_bytes_per_token() == 2 * 2 * 2 * 16 * 4.5 / 8  # layers x K,V x kv heads x head_dim x 4.5 bits


def test_nvfp4_kv_cache_needs_whole_blocks_per_head(stories, calib):
    with pytest.raises(UserError, match="head_dim is 8"):
        quantize(stories.model, QuantSpec(format="none", kv_cache="nvfp4"), calib, progress=False)
