"""Mixture-of-Experts models (Mixtral, Qwen3-MoE with a dense layer, GPT-OSS) on tiny random-weight models.

The per-expert linears compute what transformers' 3-D experts compute; calibration gives every expert every
token (ModelOpt's ``_QuantSparseMoe``); the fused-MoE kernel's single input scale per projection is what the
audit uses; checkpoints carry the family's own per-expert names; the router stays in 16 bit.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors import safe_open

from quantaudit.arch import architecture
from quantaudit.cli import main
from quantaudit.data import load_windows
from quantaudit.models import load_model
from quantaudit.moe import LinearExperts, linearize_experts, set_all_tokens
from quantaudit.quant import QuantSpec, quantize
from quantaudit.quant.calibrate import InputStats, collect, first_layer_inputs
from quantaudit.quant.qlinear import activation_scale

MOE = ["mixtral", "qwen3_moe", "gpt_oss"]


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return {name: load_model(str(tiny_model_dir(name))) for name in MOE}


@pytest.fixture(scope="module")
def calib(shared_dir, loaded):
    return load_windows(shared_dir / "data/tinystories_sample.txt", loaded["mixtral"].tokenizer, seq_len=48,
                        n_windows=4, role="calib")


@pytest.mark.parametrize("name", MOE)
def test_per_expert_linears_compute_what_the_3d_experts_compute(name, tiny_model_dir, calib):
    """transformers' own model (3-D experts) and the linearized one give the same logits bit for bit; routing every
    token to every expert (calibration) leaves the block's output the routed one."""
    from transformers import AutoModelForCausalLM

    original = AutoModelForCausalLM.from_pretrained(tiny_model_dir(name), dtype=torch.float32).eval()
    linear = linearize_experts(copy.deepcopy(original))
    assert not any(p.dim() == 3 for p in linear.parameters())
    with torch.no_grad():
        expected = original(calib.ids).logits
        assert torch.equal(linear(calib.ids).logits, expected)
        set_all_tokens(linear, True)
        all_tokens = linear(calib.ids).logits
    assert float((all_tokens - expected).abs().max() / expected.abs().max()) <= 1e-6


def test_qwen3_moe_dense_layers_keep_the_dense_mlp(loaded):
    """``mlp_only_layers=[0]``: layer 0 has gate/up/down, layer 1 has 4 experts and a router."""
    model = loaded["qwen3_moe"].model
    arch = architecture(model)
    names = arch.linear_names(model.model.layers)
    assert "model.layers.0.mlp.gate_proj" in names and not any(n.startswith("model.layers.0.mlp.experts") for n in names)
    assert [n for n in names if n.startswith("model.layers.1.mlp.experts.3.")] == [
        f"model.layers.1.mlp.experts.3.{p}" for p in ("gate_proj", "up_proj", "down_proj")]
    assert arch.router_names(model.model.layers) == ["model.layers.1.mlp.gate"]


def test_every_expert_is_calibrated_on_every_token(loaded, calib):
    """Calibration's statistics of every expert projection count all real calibration tokens, although top-2
    routing sends each expert only part of them; after calibration the layer routes again."""
    model = copy.deepcopy(loaded["mixtral"].model)
    layers = model.model.layers
    inputs = first_layer_inputs(model, layers, calib.ids, calib.lengths, batch=2)
    experts = layers[0].mlp.experts
    stats = {m: InputStats(m.in_features, {"amax"}, 0) for e in experts for m in (e.gate_proj, e.down_proj)}
    collect(layers[0], 0, stats, inputs)
    assert {s.tokens for s in stats.values()} == {int(calib.lengths.sum())}
    assert not experts.all_tokens


def test_experts_share_one_input_scale_per_projection(loaded, calib):
    """FP8: every expert's gate/up input scale is one value, every down one; each the scale of the largest input
    any expert saw, measured here independently on the float model with every expert given every token."""
    model = loaded["mixtral"].model
    qm = quantize(model, QuantSpec(format="fp8"), calib, progress=False)
    float_model = copy.deepcopy(model)
    seen: dict[str, torch.Tensor] = {}
    handles = []
    for name, module in float_model.named_modules():
        if ".experts." in name and isinstance(module, torch.nn.Linear):
            def hook(_m, args, name=name):
                x = args[0].reshape(-1, args[0].shape[-1])[mask.reshape(-1)]
                seen[name] = torch.maximum(seen.get(name, torch.zeros(())), x.abs().amax())
            handles.append(module.register_forward_pre_hook(hook))
    set_all_tokens(float_model, True)
    with torch.no_grad():
        mask = torch.arange(calib.ids.shape[1])[None, :] < calib.lengths[:, None]
        float_model(calib.ids)
    for handle in handles:
        handle.remove()
    act = qm.layers["model.layers.0.mlp.experts.0.down_proj"]
    from quantaudit.quant.formats import get_format

    act_format = get_format("fp8").act
    for layer in range(2):
        for projections in (("gate_proj", "up_proj"), ("down_proj",)):
            names = [f"model.layers.{layer}.mlp.experts.{e}.{p}" for e in range(4) for p in projections]
            scales = {float(qm.layers[n].act_scale) for n in names}
            assert len(scales) == 1, (layer, projections, scales)
            expected = activation_scale(act_format, torch.stack([seen[n] for n in names]).amax())
            assert scales.pop() == pytest.approx(float(expected), rel=1e-6)
    assert act.act_scale is not None
    down_amax = [float(seen[f"model.layers.0.mlp.experts.{e}.down_proj"]) for e in range(4)]
    assert len(set(down_amax)) > 1  # the experts' own ranges differ: the shared scale is a real choice


@pytest.mark.parametrize("name", ["mixtral", "qwen3_moe"])
def test_hf_export_uses_the_familys_checkpoint_names(name, loaded, calib, tmp_path, tiny_model_dir):
    """The exported tensors, scales aside, are named exactly as transformers saved the full-precision model (Mixtral:
    block_sparse_moe.experts.{e}.w1/w3/w2 and block_sparse_moe.gate); the routers are listed as excluded."""
    from quantaudit.export import export_checkpoint

    lm = loaded[name]
    qm = quantize(lm.model, QuantSpec(format="fp8"), calib, progress=False)
    export_checkpoint(qm, lm.config, tmp_path / "out", target="hf", dtype="float32")
    with safe_open(tmp_path / "out/model.safetensors", "pt") as f:
        exported = set(f.keys())
    with safe_open(tiny_model_dir(name) / "model.safetensors", "pt") as f:
        saved = set(f.keys())
    scale_suffixes = (".weight_scale", ".input_scale", ".k_scale", ".v_scale")
    assert {n for n in exported if not n.endswith(scale_suffixes)} == saved
    quant = json.loads((tmp_path / "out/hf_quant_config.json").read_text())["quantization"]
    router = "model.layers.1.block_sparse_moe.gate" if name == "mixtral" else "model.layers.1.mlp.gate"
    assert router in quant["exclude_modules"] and f"{router}.weight_scale" not in exported


def test_gpt_oss_export_is_refused_in_one_line_before_writing(tiny_model_dir, shared_dir, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["export", "--model", str(tiny_model_dir("gpt_oss")), "--format", "fp8", "--target", "hf",
                 "--calib", str(shared_dir / "data/tinystories_sample.txt"), "--calib-size", "1", "--calib-seq", "32",
                 "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "3-D tensors" in err, err
    assert not out.exists()


def test_routers_stay_in_16_bit_and_are_reported(loaded, calib):
    model = loaded["gpt_oss"].model
    qm = quantize(model, QuantSpec(format="int8_wo"), calib, progress=False)
    routers = {n: r for n, r in qm.layers.items() if n.endswith(".mlp.router")}
    assert sorted(routers) == ["model.layers.0.mlp.router", "model.layers.1.mlp.router"]
    for name, record in routers.items():
        assert not record.quantized and "router" in record.fallback_reason
        assert torch.equal(qm.model.get_submodule(name).weight, model.get_submodule(name).weight)
        assert record.storage_bytes() == (4 * 128 + 4) * 2  # weight and bias at 16 bit
    assert isinstance(qm.model.model.layers[1].mlp.experts, LinearExperts)
