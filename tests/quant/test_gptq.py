"""GPTQ: exactness on a fine grid, gains over RTN, act-order groups, and equality with a slow reference."""

from __future__ import annotations

import pytest
import torch

from quantaudit.quant.algorithms import ALGORITHMS, GroupJob
from quantaudit.quant.calibrate import InputStats
from quantaudit.quant.engine import QuantSpec
from quantaudit.quant.formats import get_format
from quantaudit.quant.gptq import HessianAccumulator, gptq_quantize, group_scales
from quantaudit.quant.numerics import MIN_SCALE, grouped, int_codes, int_scale


def correlated_inputs(n: int, in_features: int, seed: int) -> torch.Tensor:
    """Tokens with correlated channels and uneven channel scales, like real activations."""
    gen = torch.Generator().manual_seed(seed)
    mixing = torch.randn(in_features, in_features, generator=gen) / in_features**0.5 + torch.eye(in_features)
    channel_scale = torch.rand(in_features, generator=gen) * 3 + 0.2
    return (torch.randn(n, in_features, generator=gen) @ mixing) * channel_scale


def hessian_of(x: torch.Tensor) -> torch.Tensor:
    acc = HessianAccumulator(x.shape[-1])
    acc.add(x)
    return acc.hessian()


def dequant(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    group_size = codes.shape[1] // scales.shape[1]
    return codes.float() * scales.repeat_interleave(group_size, dim=1)


def rtn(w: torch.Tensor, group_size: int, bits: int = 4) -> torch.Tensor:
    scales = int_scale(grouped(w, group_size).abs().amax(dim=-1), bits)
    return dequant(int_codes(w, scales.repeat_interleave(group_size, dim=1), bits), scales)


def output_error(x: torch.Tensor, w: torch.Tensor, w_hat: torch.Tensor) -> float:
    x = x.double()
    return torch.linalg.norm(x @ w.double().T - x @ w_hat.double().T).item()


def mse_scale(x: torch.Tensor, bits: int = 4) -> float:
    """One group's scale as the reference's ``Quantizer(mse=True)`` with llm-compressor's observer grid picks it,
    written out element by element: amax shrunk by 0 to 19 %, the smallest sum |x - q(x)|^2.4 wins."""
    qmax = 2 ** (bits - 1) - 1
    amax = float(x.abs().max())
    best_err, best_scale = None, None
    for i in range(20):
        scale = max(amax * (1 - i / 100) / qmax, MIN_SCALE)
        err = sum(abs(v - min(max(round(v / scale), -qmax - 1), qmax) * scale) ** 2.4 for v in x.tolist())
        if best_err is None or err < best_err:
            best_err, best_scale = err, scale
    return best_scale


def reference_scales(w: torch.Tensor, bits: int, search: str) -> torch.Tensor:
    """[rows, groups] scales of ``w`` ``[rows, groups, group]``."""
    if search == "amax":
        return int_scale(w.abs().amax(dim=-1), bits).to(w.dtype)
    return torch.tensor([[mse_scale(g.float(), bits) for g in row] for row in w], dtype=w.dtype)


def slow_gptq(w, h, group_size, bits=4, percdamp=0.01, act_order=False, scale_search="amax"):
    """Textbook OBS/GPTQ in float64: one column at a time, no blocks, no Cholesky trick.

    After rounding column j, the remaining columns F = j.. move by -(w_j - q_j) / [H_F^-1]_00 times
    the first row of H_F^-1, with H_F^-1 the explicit inverse of the damped H restricted to F.
    """
    w, h = w.double().clone(), h.double().clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    h.diagonal().add_(percdamp * h.diagonal().mean())
    n = w.shape[1]
    scales = torch.zeros(w.shape[0], n // group_size, dtype=torch.float64)
    if act_order:
        scales[:] = reference_scales(grouped(w, group_size), bits, scale_search)
        perm = torch.argsort(h.diagonal(), descending=True, stable=True)
    else:
        perm = torch.arange(n)
    w, h = w[:, perm], h[perm][:, perm]
    codes = torch.zeros_like(w)
    for j in range(n):
        if not act_order and j % group_size == 0:
            scales[:, j // group_size] = reference_scales(w[:, None, j : j + group_size], bits, scale_search)[:, 0]
        scale = scales[:, perm[j] // group_size]
        codes[:, j] = int_codes(w[:, j], scale, bits)
        hinv_remaining = torch.linalg.inv(h[j:, j:])
        w[:, j:] -= torch.outer((w[:, j] - codes[:, j] * scale) / hinv_remaining[0, 0], hinv_remaining[0])
    return codes[:, torch.argsort(perm)], scales


def test_hessian_accumulator_is_the_running_mean_of_2xxT():
    x = correlated_inputs(300, 24, seed=1)
    acc = HessianAccumulator(24)
    acc.add(x[:17])
    acc.add(x[17:217].reshape(4, 50, 24))  # leading dims are tokens
    acc.add(x[217:])
    expected = 2 / 300 * x.double().T @ x.double()
    assert acc.n_samples == 300
    assert acc.hessian().dtype == torch.float32
    torch.testing.assert_close(acc.hessian().double(), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError):
        HessianAccumulator(24).hessian()
    with pytest.raises(ValueError):
        acc.add(torch.zeros(3, 23))


def test_16_bit_grid_reproduces_the_weights():
    # One 16-bit step is amax/32767. GPTQ's compensation shifts later columns by a few earlier
    # rounding errors (measured: at most 6.3 steps, 7.7e-5 of max|W|, over 5 seeds), so every
    # weight stays within 8 steps of the original and 1.5e-4 of max|W|.
    x = correlated_inputs(512, 64, seed=2)
    w = torch.randn(32, 64)
    codes, scales = gptq_quantize(w, hessian_of(x), bits=16, group_size=16, block_size=32)
    assert codes.dtype == torch.int16
    diff = (dequant(codes, scales) - w).abs()
    assert (diff <= 8 * scales.repeat_interleave(16, dim=1)).all()
    assert diff.max() < 1.5e-4 * w.abs().max()


def test_diagonal_hessian_has_nothing_to_compensate_and_equals_rtn():
    h = torch.diag(torch.rand(64) + 0.1)
    w = torch.randn(32, 64)
    for act_order in (False, True):
        codes, scales = gptq_quantize(w, h, group_size=16, act_order=act_order, scale_search="amax")
        assert torch.equal(dequant(codes, scales), rtn(w, 16))
        codes, scales = gptq_quantize(w, h, group_size=16, act_order=act_order)  # MSE scales, then plain rounding
        mse = group_scales(grouped(w, 16), 4)
        assert torch.equal(scales, mse)
        assert torch.equal(codes.float(), int_codes(w, mse.repeat_interleave(16, dim=1), 4))


@pytest.mark.parametrize("act_order", [False, True])
def test_4_bit_gptq_beats_rtn_on_correlated_inputs(act_order):
    for seed in range(3):
        x = correlated_inputs(1024, 128, seed=seed)
        w = torch.randn(48, 128, generator=torch.Generator().manual_seed(100 + seed))
        codes, scales = gptq_quantize(w, hessian_of(x), group_size=32, act_order=act_order)
        assert codes.dtype == torch.int8 and codes.shape == w.shape
        assert int(codes.min()) >= -8 and int(codes.max()) <= 7
        assert scales.dtype == torch.float32 and scales.shape == (48, 4) and (scales > 0).all()
        w_hat = dequant(codes, scales)
        # codes sit on the grid of the returned scales: re-quantizing the dequant gives them back
        assert torch.equal(int_codes(w_hat, scales.repeat_interleave(32, dim=1), 4), codes.float())
        assert output_error(x, w, w_hat) < 0.8 * output_error(x, w, rtn(w, 32))


def test_act_order_keeps_groups_contiguous_with_static_scales():
    x = correlated_inputs(512, 64, seed=4)
    w = torch.randn(16, 64)
    h = hessian_of(x)
    assert not torch.equal(torch.argsort(h.diagonal(), descending=True), torch.arange(64))
    # group k is original columns 16k..16k+15, scaled from the original weights (no g_idx needed)
    _, scales = gptq_quantize(w, h, group_size=16, act_order=True, scale_search="amax")
    assert torch.equal(scales, int_scale(grouped(w, 16).abs().amax(dim=-1), 4))
    _, scales = gptq_quantize(w, h, group_size=16)  # the default: act-order, MSE-searched static scales
    torch.testing.assert_close(scales.double(), reference_scales(grouped(w, 16).double(), 4, "mse"), rtol=1e-6, atol=0)
    assert (scales < int_scale(grouped(w, 16).abs().amax(dim=-1), 4)).any()  # some groups do clip


@pytest.mark.parametrize(
    ("group_size", "block_size", "act_order", "scale_search"),
    [(16, 32, False, "amax"), (8, 32, False, "amax"), (32, 16, False, "amax"), (16, 32, True, "amax"),
     (16, 32, True, "mse"), (16, 32, False, "mse")],
)
def test_blocked_gptq_equals_the_slow_column_by_column_reference(group_size, block_size, act_order, scale_search):
    x = correlated_inputs(400, 64, seed=5)
    x[:, 9] = 0  # a dead input channel: H_99 == 0
    w = torch.randn(24, 64, generator=torch.Generator().manual_seed(6))
    codes, scales = gptq_quantize(
        w, hessian_of(x), group_size=group_size, block_size=block_size, act_order=act_order, scale_search=scale_search
    )
    ref_codes, ref_scales = slow_gptq(w, hessian_of(x), group_size, act_order=act_order, scale_search=scale_search)
    # float32 blocked vs float64 unblocked: identical codes unless a value lands within rounding
    # noise of a grid midpoint, which this fixed seed does not produce
    assert torch.equal(codes.double(), ref_codes)
    torch.testing.assert_close(scales.double(), ref_scales, rtol=1e-5, atol=0)
    assert (codes[:, 9] == 0).all()


def test_damping_is_raised_until_the_hessian_factorises():
    # eigenvalues 2.01 and -0.01: positive definite only once damping exceeds 1 % of the diagonal
    # (0.0105 after seven 0.0015 steps from 0); [[1, 3], [3, 1]] never is below 100 %
    h = torch.tensor([[1.0, 1.01], [1.01, 1.0]])
    w = torch.tensor([[0.3, -0.7], [1.2, 0.1]])
    codes, scales = gptq_quantize(w, h, group_size=2, percdamp=0.0)
    expected_codes, expected_scales = gptq_quantize(w, h, group_size=2, percdamp=0.0105)
    assert torch.equal(codes, expected_codes)
    torch.testing.assert_close(scales, expected_scales)
    with pytest.raises(ValueError, match="not positive definite"):
        gptq_quantize(w, torch.tensor([[1.0, 3.0], [3.0, 1.0]]), group_size=2)


def test_bad_arguments_raise():
    w, h = torch.randn(4, 12), torch.eye(12)
    with pytest.raises(ValueError, match="group size"):
        gptq_quantize(w, h, group_size=5)
    with pytest.raises(ValueError, match="bits"):
        gptq_quantize(w, h, bits=17, group_size=4)
    with pytest.raises(ValueError, match="hessian shape"):
        gptq_quantize(w, torch.eye(8), group_size=4)
    with pytest.raises(ValueError, match="NaN"):
        gptq_quantize(w, torch.full((12, 12), float("nan")), group_size=4)


def test_one_sweep_over_a_fused_groups_rows_gives_each_linear_its_own_codes():
    """q/k/v read one input and share one Hessian: the engine's single sweep over their concatenated rows gives
    exactly the codes and scales of one sweep per linear."""
    x = correlated_inputs(300, 64, seed=7)
    linears = [torch.nn.Linear(64, n, bias=False) for n in (32, 16, 16)]
    stats = InputStats(64, {"hessian"}, 300)
    stats.add(x)
    job = GroupJob(fmt=get_format("int4_gptq"), spec=QuantSpec(format="int4_gptq"), names=["q", "k", "v"],
                   linears=linears, group_size=16, fused=True, stats=stats)
    results = ALGORITHMS["gptq"].run(job)
    for linear, result in zip(linears, results):
        codes, scales = gptq_quantize(linear.weight.detach(), stats.hessian.hessian(), group_size=16)
        assert torch.equal(result.qweight.codes, codes)
        assert torch.equal(result.qweight.scale.float(), scales.to(result.qweight.scale.dtype).float())
