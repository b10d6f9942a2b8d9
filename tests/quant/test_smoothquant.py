"""SmoothQuant: the smoothing factor is the paper's formula, the float model is mathematically
unchanged by it, and it lowers W8A8 error where activations have outlier channels."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from quantaudit.data import load_windows
from quantaudit.quant import QuantSpec, quantize
from quantaudit.quant.formats import FORMATS
from quantaudit.quant.smoothquant import ALPHA_GRID, search_alpha, smoothed_output_error, smoothing_scale


@pytest.fixture(scope="module")
def calib(stories, shared_dir):
    return load_windows(shared_dir / "data" / "tinystories_sample.txt", stories.tokenizer, seq_len=128, role="calib")


@pytest.fixture(scope="module")
def smoothed(stories, calib):
    return quantize(stories.model, QuantSpec(format="int8_sq"), calib, progress=False)


def test_smoothing_scale_is_the_paper_formula():
    torch.manual_seed(0)
    act_amax = torch.rand(6) * 10
    w1, w2 = torch.randn(4, 6), torch.randn(3, 6) * 3
    s = smoothing_scale(act_amax, [w1, w2], alpha=0.3)
    for j in range(6):
        w_max = max(w1[:, j].abs().max(), w2[:, j].abs().max())  # over all linears sharing the input
        assert s[j].item() == pytest.approx((act_amax[j] ** 0.3 / w_max**0.7).item(), rel=1e-5)


class _PreScaled(nn.Module):
    """Test-side float reference of an explicit smoother: x * pre_quant_scale, then the linear."""

    def __init__(self, scale, linear):
        super().__init__()
        self.scale, self.linear = scale, linear

    def forward(self, x):
        return self.linear(x * self.scale)


def test_smoothing_leaves_the_float_model_unchanged(stories, smoothed, calib):
    """Undo only the rounding: float W * s in every smoothed linear, with the engine's folded norms
    and explicit smoothers. The logits must equal the original model's."""
    reference = copy.deepcopy(smoothed.model)
    for name, record in smoothed.layers.items():
        if not record.quantized:
            continue
        s = record.details["smoothing_scale"]
        linear = nn.Linear(record.in_features, record.out_features, bias=False)
        linear.weight.data = stories.model.get_submodule(name).weight.detach() * s
        module = linear if record.pre_quant_scale is None else _PreScaled(record.pre_quant_scale, linear)
        reference.set_submodule(name, module)
    with torch.no_grad():
        expected = stories.model(calib.ids[:4]).logits
        got = reference(calib.ids[:4]).logits
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()
    # ... and the smoothing really did something: norms were rescaled
    norm = smoothed.model.model.layers[0].input_layernorm.weight
    assert not torch.allclose(norm, stories.model.model.layers[0].input_layernorm.weight)


def test_norm_fold_for_qkv_and_mlp_explicit_smoother_for_o_and_down(smoothed):
    layer = "model.layers.2."
    for path in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"):
        record = smoothed.layers[layer + path]
        assert record.pre_quant_scale is None and record.details["smoothed_into"].startswith(layer)
    for path in ("self_attn.o_proj", "mlp.down_proj"):
        record = smoothed.layers[layer + path]
        assert "smoothed_into" not in record.details
        assert torch.allclose(record.pre_quant_scale * record.details["smoothing_scale"], torch.ones(record.in_features))
    # q, k and v share one smoothing factor (one input, one norm)
    q, v = smoothed.layers[layer + "self_attn.q_proj"], smoothed.layers[layer + "self_attn.v_proj"]
    assert torch.equal(q.details["smoothing_scale"], v.details["smoothing_scale"])


def test_stored_weights_are_the_smoothed_ones(stories, smoothed):
    record = smoothed.layers["model.layers.1.mlp.down_proj"]
    target = stories.model.get_submodule(record.name).weight.detach() * record.details["smoothing_scale"]
    step = record.weight_scale  # [out, 1] per channel
    assert ((record.dequantized_weight() - target).abs() <= step / 2 * (1 + 1e-6)).all()


def _outlier_layer():
    torch.manual_seed(3)
    x = torch.randn(512, 64)
    x[:, [3, 17, 40]] *= 60.0  # LLM-style outlier channels
    weights = [torch.randn(32, 64) * 0.05, torch.randn(48, 64) * 0.05]
    return x, weights, x.abs().amax(dim=0)


@pytest.mark.parametrize("name", ["int8_sq", "int8_sq_static"])
def test_smoothing_lowers_w8a8_error_on_outlier_channels(name):
    x, weights, act_amax = _outlier_layer()
    fmt = FORMATS[name]
    plain = smoothed_output_error(x, weights, act_amax, torch.ones(64), fmt)
    smooth = smoothed_output_error(x, weights, act_amax, smoothing_scale(act_amax, weights, 0.5), fmt)
    assert smooth < plain / 4


def test_alpha_search_returns_the_grid_minimum():
    x, weights, act_amax = _outlier_layer()
    fmt = FORMATS["int8_sq"]
    alpha, s = search_alpha(x, weights, act_amax, fmt)
    errors = {a: smoothed_output_error(x, weights, act_amax, smoothing_scale(act_amax, weights, a), fmt) for a in ALPHA_GRID}
    assert errors[alpha] == min(errors.values())
    assert torch.equal(s, smoothing_scale(act_amax, weights, alpha))
