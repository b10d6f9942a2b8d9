"""Sensitivity replay, drift and outlier statistics against independent computations."""

from __future__ import annotations

import copy

import pytest
import torch

from quantaudit.data import load_windows
from quantaudit.evaluate import compare_models
from quantaudit.measure.drift import layer_drift
from quantaudit.measure.outliers import activation_outliers
from quantaudit.measure.sensitivity import sensitivity_kld


@pytest.fixture(scope="module")
def windows(stories, shared_dir):
    return load_windows(shared_dir / "data" / "tinystories_sample.txt", stories.tokenizer).subset(2)


def _noisy(module, scale=0.05, seed=0):
    out = copy.deepcopy(module)
    g = torch.Generator().manual_seed(seed)
    out.weight.data += scale * torch.randn(out.weight.shape, generator=g)
    return out


def test_sensitivity_replay_equals_a_full_forward(stories, windows):
    """Replaying from the swapped layer gives the KLD of a whole model with just that layer changed."""
    paths = ["model.layers.0.self_attn.q_proj", "model.layers.2.mlp.up_proj", "model.layers.4.mlp.down_proj"]
    swaps = {p: {p: _noisy(stories.model.get_submodule(p))} for p in paths}
    got = sensitivity_kld(stories.model, swaps, windows)
    for p in paths:
        full = copy.deepcopy(stories.model)
        parent, _, attr = p.rpartition(".")
        setattr(full.get_submodule(parent), attr, swaps[p][p])
        expected = compare_models(stories.model, full, windows)["kld"]["mean"]
        assert got[p] == pytest.approx(expected, rel=1e-4), p
        assert got[p] > 0
    # the base model is restored after the sweep
    assert stories.model.get_submodule(paths[0]) is not swaps[paths[0]][paths[0]]


def test_drift_is_zero_for_identical_models_and_grows_where_the_error_enters(stories, windows):
    layers = {f"decoder.{i}": f"model.layers.{i}" for i in range(5)}
    same = layer_drift(stories.model, copy.deepcopy(stories.model), windows, layers)
    assert all(v["drift_rel"] == 0 and v["cosine"] == pytest.approx(1.0) for v in same.values())
    changed = copy.deepcopy(stories.model)
    changed.model.layers[2].mlp.up_proj = _noisy(changed.model.layers[2].mlp.up_proj, 0.2)
    drift = layer_drift(stories.model, changed, windows, layers)
    assert drift["decoder.0"]["drift_rel"] == 0 and drift["decoder.1"]["drift_rel"] == 0
    assert drift["decoder.2"]["drift_rel"] > 0 and drift["decoder.2"]["cosine"] < 1
    # independent check of layer 2's number from hooks written here
    outs = {}
    for name, model in (("b", stories.model), ("q", changed)):
        h = model.model.layers[2].register_forward_hook(lambda m, a, o, name=name: outs.setdefault(name, []).append(o[0] if isinstance(o, tuple) else o))
        for i in range(windows.n):
            model(input_ids=windows.ids[i : i + 1, : windows.lengths[i]], use_cache=False)
        h.remove()
    b = torch.cat([x[0] for x in outs["b"]]).double()
    q = torch.cat([x[0] for x in outs["q"]]).double()
    assert drift["decoder.2"]["drift_rel"] == pytest.approx(float((q - b).norm() / b.norm()), rel=1e-6)


def test_outliers_match_direct_statistics(stories, shared_dir):
    calib = load_windows(shared_dir / "data" / "tinystories_sample.txt", stories.tokenizer, seq_len=256, role="calib")
    linears = {n: m for n, m in stories.model.named_modules() if isinstance(m, torch.nn.Linear) and "layers" in n}
    report = activation_outliers(stories.model, linears, calib)
    assert len(report) == len(linears) == 35
    assert [r["ratio"] for r in report] == sorted((r["ratio"] for r in report), reverse=True)
    entry = next(r for r in report if r["name"] == "model.layers.1.mlp.down_proj")
    seen = []
    h = stories.model.model.layers[1].mlp.down_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    with torch.inference_mode():
        stories.model(input_ids=calib.ids, use_cache=False)
    h.remove()
    x = torch.cat(seen).reshape(-1, 172).double()
    cmax = x.abs().amax(0)
    assert entry["max_abs"] == pytest.approx(float(cmax.max()), rel=1e-6)
    assert entry["ratio"] == pytest.approx(float(cmax.max() / cmax.median()), rel=1e-5)
    centred = x.reshape(-1) - x.mean()
    kurt = float((centred**4).mean() / (centred**2).mean() ** 2)
    assert entry["kurtosis"] == pytest.approx(kurt, rel=1e-6)
    assert entry["top_channels"][0][0] == int(cmax.argmax())
