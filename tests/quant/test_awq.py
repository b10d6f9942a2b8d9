"""AWQ scale and clip searches, checked against token-by-token brute force in float64."""

from __future__ import annotations

import pytest
import torch

from quantaudit.quant.awq import scale_candidates, search_clip, search_scale
from quantaudit.quant.numerics import fake_int, grouped, int_scale

G = 32  # group size used throughout


def rtn(w: torch.Tensor, amax: torch.Tensor | None = None) -> torch.Tensor:
    """Group-wise symmetric INT4 round-to-nearest of ``w`` (group amax unless given)."""
    wg = grouped(w, G)
    amax = wg.abs().amax(dim=-1) if amax is None else amax
    return fake_int(wg, int_scale(amax, 4)[..., None], 4).reshape(w.shape)


def awq_output_error(x, weights, s) -> float:
    """The engine's model, token by token: ``sum ||x W^T - (x / s) Q(W * s)^T||^2`` in float64."""
    x64 = x.double()
    return sum(
        (x64 @ w.double().T - (x64 / s.double()) @ rtn(w * s).double().T).pow(2).sum().item() for w in weights
    )


def group_errors(x, w, amax) -> torch.Tensor:
    """``[out, groups]`` partial-output errors ``sum_t (x_t,g . (w_g - q_g))^2`` in float64."""
    xg = x.double().reshape(x.shape[0], -1, G)
    delta = grouped(w - rtn(w, amax), G).double()
    return torch.einsum("ngi,ogi->nog", xg, delta).pow(2).sum(dim=0)


def activations(n=1024, in_features=128, seed=0, outliers=()):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, in_features, generator=gen) + 0.3
    x[:, list(outliers)] *= 50
    return x


def weights(*outs, in_features=128, seed=0):
    gen = torch.Generator().manual_seed(1000 + seed)
    return [torch.randn(out, in_features, generator=gen) for out in outs]


def test_outlier_channels_get_large_scales_and_beat_rtn():
    outliers = [3, 70, 100]
    x = activations(outliers=outliers)
    ws = weights(96, 32)  # two linears sharing the input, like k/v
    s = search_scale(x, ws, group_size=G)
    assert s.shape == (128,) and s.dtype == torch.float32 and (s > 0).all()
    assert set(torch.topk(s, 3).indices.tolist()) == set(outliers)
    assert awq_output_error(x, ws, s) < 0.3 * awq_output_error(x, ws, torch.ones(128))
    candidates = scale_candidates(x.abs().mean(dim=0), torch.cat(ws), group_size=G)
    chosen = [k for k in range(len(candidates)) if torch.equal(candidates[k], s)]
    assert chosen and chosen[0] >= 2  # row 1 + i is alpha = i / 20: chosen alpha > 0, not RTN


def test_chosen_scale_minimises_the_token_by_token_objective():
    x = activations(seed=1, outliers=[5, 6])
    ws = weights(64, seed=1)
    s = search_scale(x, ws, group_size=G)
    candidates = scale_candidates(x.abs().mean(dim=0), ws[0], group_size=G)
    errors = [awq_output_error(x, ws, c) for c in candidates]
    assert awq_output_error(x, ws, s) <= min(errors) * (1 + 1e-6)


@pytest.mark.parametrize("seed", range(4))
def test_scale_search_is_never_worse_than_rtn(seed):
    x = activations(n=256, seed=seed)
    ws = weights(48, 16, seed=seed)
    s = search_scale(x, ws, group_size=G, n_grid=10)
    assert awq_output_error(x, ws, s) <= awq_output_error(x, ws, torch.ones(128)) * (1 + 1e-6)


def test_scale_candidates_follow_modelopt_get_scale():
    act = torch.rand(64) + 0.1
    w = torch.randn(16, 64)
    c = scale_candidates(act, w, group_size=G, n_grid=4)
    assert c.shape == (6, 64)
    assert torch.equal(c[0], torch.ones(64))
    torch.testing.assert_close(c[1:].amax(dim=1) * c[1:].amin(dim=1), torch.ones(5))  # normalised
    wn = grouped(w.abs(), G)
    w_mean = (wn / wn.amax(dim=-1, keepdim=True)).reshape(16, 64).mean(dim=0)
    for row, alpha in ((1, 0.0), (3, 0.5), (5, 1.0)):
        raw = act**alpha / w_mean ** (1 - alpha)
        torch.testing.assert_close(c[row], raw / (raw.max() * raw.min()).sqrt())


def test_clip_never_increases_any_group_error_and_helps_with_weight_outliers():
    x = activations(n=512, seed=2)
    (w,) = weights(40, seed=2)
    w[torch.arange(40), torch.randint(0, 128, (40,), generator=torch.Generator().manual_seed(3))] *= 6
    amax = search_clip(x, w, group_size=G)
    assert amax.shape == (40, 4) and amax.dtype == torch.float32
    group_max = grouped(w, G).abs().amax(dim=-1)
    ratios = amax / group_max
    grid = 1 - torch.arange(11) / 20
    assert ((ratios[..., None] - grid).abs().amin(dim=-1) < 1e-6).all()
    clipped, unclipped = group_errors(x, w, amax), group_errors(x, w, group_max)
    assert (clipped <= unclipped * (1 + 1e-6)).all()
    assert clipped.sum() < 0.9 * unclipped.sum()
    # brute force: every group's choice is the best of the 11 ratios
    best = torch.stack([group_errors(x, w, group_max * r) for r in grid.tolist()]).amin(dim=0)
    assert (clipped <= best * (1 + 1e-5)).all()


def test_clip_token_subsampling_uses_the_reference_stride():
    x = activations(n=1000, seed=3)
    (w,) = weights(8, seed=3)
    subsampled = search_clip(x, w, group_size=G, n_sample_tokens=64)  # stride 1000 // 64 = 15
    assert torch.equal(subsampled, search_clip(x[::15], w, group_size=G))


def test_bad_inputs_raise():
    x = activations(n=16)
    with pytest.raises(ValueError, match="input features"):
        search_scale(x, [torch.randn(8, 64)], group_size=G)
    with pytest.raises(ValueError, match="group size"):
        search_clip(x, torch.randn(8, 128), group_size=48)
    with pytest.raises(ValueError, match="NaN"):
        search_scale(torch.full((4, 128), float("nan")), [torch.randn(8, 128)], group_size=G)
    with pytest.raises(ValueError, match="max_shrink"):
        search_clip(x, torch.randn(8, 128), group_size=G, max_shrink=1.0)
