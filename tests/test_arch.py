"""Every family of quantaudit.arch on a tiny random-weight model built from its transformers config.

Per family: the layer-by-layer calibration path reproduces the model's own forward (each layer's own mask and
rotary embedding); with the rounding undone, SmoothQuant and AWQ scaling leave the logits unchanged (a wrong
norm fold shows here); the KV hook with an identity quantizer changes nothing; every linear the table names is
quantized; the whole audit runs, in memory and streamed, with the same numbers.
"""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch
from tiny_models import TINY_FAMILIES
from torch import nn

from quantaudit.arch import architecture
from quantaudit.audit.run import run_audit
from quantaudit.audit.settings import AuditSettings
from quantaudit.cli import main
from quantaudit.data import load_windows
from quantaudit.errors import UserError
from quantaudit.models import load_model
from quantaudit.quant import AWQOptions, QuantSpec, quantize
from quantaudit.quant.calibrate import first_layer_inputs, propagate
from quantaudit.quant.formats import get_kv_cache_format
from quantaudit.quant.kvcache import install_kv_quantizers

FAMILIES = list(TINY_FAMILIES)
REL = 1e-5
AUDIT_FORMATS = ["int8_wo", "fp8", "int8_sq", "int4_awq", "int4_gptq", "nvfp4"]


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = load_model(str(tiny_model_dir(name)))
        return cache[name]

    return get


@pytest.fixture(scope="module")
def calib(shared_dir, loaded):
    """Five 64-token windows: longer than the Gemma models' 16-token sliding window."""
    return load_windows(shared_dir / "data/tinystories_sample.txt", loaded("llama").tokenizer, seq_len=64,
                        n_windows=5, role="calib")


def _relative(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got - expected).abs().max() / expected.abs().max())


@pytest.mark.parametrize("name", FAMILIES)
def test_calibration_path_reproduces_the_models_own_forward(name, loaded, calib):
    """Layer by layer with the recorded per-layer kwargs == the decoder layers' outputs in a plain forward."""
    model = loaded(name).model
    layers = architecture(model).check_layers(model)
    hooked: list[list[torch.Tensor]] = [[] for _ in layers]
    handles = [layer.register_forward_hook(lambda _m, _a, out, i=i: hooked[i].append(out)) for i, layer in enumerate(layers)]
    with torch.no_grad():
        for start in range(0, calib.n, 2):
            model(input_ids=calib.ids[start : start + 2], use_cache=False)
    for handle in handles:
        handle.remove()
    inputs = first_layer_inputs(model, layers, calib.ids, calib.lengths, batch=2)
    for i, layer in enumerate(layers):
        propagate(layer, i, inputs)
        for got, expected in zip(inputs.hidden, hooked[i], strict=True):
            assert _relative(got, expected) <= REL, (name, i)


class _PreScaled(nn.Module):
    """Test-side float reference of an explicit input multiplier: linear(x * scale)."""

    def __init__(self, scale: torch.Tensor, linear: nn.Module):
        super().__init__()
        self.scale, self.linear = scale, linear

    def forward(self, x):
        return self.linear(x * self.scale)


@pytest.mark.parametrize("fmt", ["int8_sq", "int4_awq"])
@pytest.mark.parametrize("name", FAMILIES)
def test_smoothing_and_awq_scaling_leave_the_float_model_unchanged(name, fmt, loaded, calib):
    """Undo only the rounding: float W * s in every scaled linear, behind the engine's folded norms and explicit
    multipliers. The logits equal the original model's (Gemma's (1 + w) norms included)."""
    model = loaded(name).model
    qm = quantize(model, QuantSpec(format=fmt, group_size=64, awq=AWQOptions(n_grid=4)), calib, progress=False)
    reference = copy.deepcopy(qm.model)
    for layer_name, record in qm.layers.items():
        if not record.quantized:
            continue
        pqs = record.pre_quant_scale
        s = record.details.get("smoothing_scale", None if pqs is None else 1.0 / pqs)
        original = model.get_submodule(layer_name)
        linear = nn.Linear(record.in_features, record.out_features, bias=original.bias is not None)
        linear.weight.data = original.weight.detach() * s
        if original.bias is not None:
            linear.bias.data = original.bias.detach().clone()
        reference.set_submodule(layer_name, linear if pqs is None else _PreScaled(pqs, linear))
    with torch.no_grad():
        expected = model(calib.ids[:3]).logits
        got = reference(calib.ids[:3]).logits
    assert _relative(got, expected) <= REL
    folded = [r.details["smoothed_into"] for r in qm.layers.values() if r.details.get("smoothed_into")]
    has_norm = any(g.norm for g in architecture(model).groups)
    assert bool(folded) == (fmt == "int8_sq" and has_norm)  # folded where the table has a norm, nowhere else


@pytest.mark.parametrize("name", FAMILIES)
def test_kv_hook_with_an_identity_quantizer_changes_nothing(name, loaded, calib):
    """A calibrating KV quantizer passes K and V through: the wrapped attention (SDPA, or the family's own eager
    attention with Gemma 2's soft-capping) gives the same logits bit for bit, and K/V maxima were recorded."""
    model = loaded(name).model
    hooked = copy.deepcopy(model)
    arch = architecture(hooked)
    quantizers = install_kv_quantizers(hooked, [layer.get_submodule(arch.attention) for layer in hooked.model.layers],
                                       get_kv_cache_format("fp8"))
    with torch.no_grad():
        expected = model(calib.ids[:3]).logits
        got = hooked(calib.ids[:3]).logits
    assert torch.equal(got, expected)
    assert all(q.k_amax > 0 and q.v_amax > 0 for q in quantizers)


@pytest.mark.parametrize("name", FAMILIES)
def test_every_linear_the_table_names_is_quantized(name, loaded, calib):
    model = loaded(name).model
    arch = architecture(model)
    qm = quantize(model, QuantSpec(format="int8_wo"), calib, progress=False)
    quantized = [n for n, r in qm.layers.items() if r.quantized]
    expected = arch.linear_names(model.model.layers)
    assert quantized == expected
    n_linears = sum(isinstance(m, nn.Linear) for n, m in model.named_modules() if ".layers." in n)
    assert len(quantized) == n_linears  # nothing in the decoder left out of the table
    fallbacks = qm.fallbacks()
    assert "excluded by default" in fallbacks.pop("lm_head")
    routers = {n for n, _ in model.named_modules() if n.endswith((".mlp.gate", ".mlp.router"))}
    assert set(fallbacks) == routers  # MoE routers stay in 16 bit, listed as such
    assert all("router" in reason for reason in fallbacks.values())


def _audit(model_dir, shared_dir, out, streaming: str) -> dict:
    settings = AuditSettings(
        model=str(model_dir), formats=AUDIT_FORMATS, kv_cache="fp8", group_size=64,
        calib=str(shared_dir / "data/tinystories_sample.txt"), calib_size=4, calib_seq=64,
        eval=str(shared_dir / "data/tinystories_sample.txt"), windows=4, seq_len=64,
        drift_windows=1, sensitivity="decoder" if streaming == "off" else "none", sensitivity_windows=1,
        streaming=streaming, budget="kld<=10",
    )
    run_audit(settings, out, force=True)
    return json.loads((out / "report.json").read_text())


@pytest.mark.parametrize("name", FAMILIES)
def test_audit_in_memory_and_streamed(name, tiny_model_dir, shared_dir, tmp_path):
    """``audit --formats int8_wo,fp8,int8_sq,int4_awq,int4_gptq,nvfp4 --kv-cache fp8`` completes; KLDs are real
    (> 0, INT4 above INT8 weight-only), and the layer-streamed audit gives the same numbers."""
    in_memory = _audit(tiny_model_dir(name), shared_dir, tmp_path / "mem", "off")
    streamed = _audit(tiny_model_dir(name), shared_dir, tmp_path / "stream", "on")
    kld = {f["name"]: f["kld"]["mean"] for f in in_memory["formats"]}
    assert set(kld) == set(AUDIT_FORMATS)
    assert all(v > 0 for v in kld.values()), kld
    assert kld["int4_awq"] > kld["int8_wo"] and kld["int4_gptq"] > kld["int8_wo"], kld
    for entry in streamed["formats"]:
        assert entry["kld"]["mean"] == pytest.approx(kld[entry["name"]], rel=REL), entry["name"]
    # the outlier audit, streamed from the calibration states (MoE experts on every token, as in memory)
    outliers = {o["name"]: o for o in in_memory["outliers"]}
    assert outliers and {o["name"] for o in streamed["outliers"]} == set(outliers)
    for o in streamed["outliers"]:
        assert o["max_abs"] == pytest.approx(outliers[o["name"]]["max_abs"], rel=REL), o["name"]
        assert o["ratio"] == pytest.approx(outliers[o["name"]]["ratio"], rel=REL), o["name"]
    sensitivity = in_memory["formats"][0].get("decoder_sensitivity") or {}
    assert all(v >= 0 for v in sensitivity.values())


@pytest.mark.parametrize("model_type, expected", [
    ("gpt2", r"model type 'gpt2' is not supported; supported: llama, mistral"),
    ("qwen2_moe", r"'qwen2_moe' is a Mixture-of-Experts layout.*supported: llama"),
])
def test_unsupported_families_are_refused_in_one_line(model_type, expected, shared_dir, tmp_path, capsys):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, vocab_size=512, hidden_size=64, num_hidden_layers=1,
                                  num_attention_heads=2, intermediate_size=64, n_embd=64, n_layer=1, n_head=2)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "model")
    for file in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"):
        (tmp_path / "model" / file).write_bytes((shared_dir / "models/stories260K/hf" / file).read_bytes())
    capsys.readouterr()
    code = main(["audit", "--model", str(tmp_path / "model"), "--formats", "int8_wo", "--windows", "1",
                 "--seq-len", "32", "--calib-seq", "32", "--calib-size", "1", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert re.search(expected, err), err


def test_a_layer_that_disagrees_with_the_table_is_named(loaded, calib):
    model = copy.deepcopy(loaded("llama").model)
    model.model.layers[1].mlp.up_proj = nn.Identity()
    with pytest.raises(UserError, match=r"model\.layers\.1\.mlp\.up_proj is not a linear layer"):
        quantize(model, QuantSpec(format="int8_wo"), calib, progress=False)


HF_EXPORT_FORMATS = ["int8_wo", "fp8", "int4_awq", "int4_gptq"]


@pytest.mark.parametrize("name", [f for f in FAMILIES if f != "gpt_oss"])  # 3-D experts on disk: refused (test_moe)
def test_hf_export_reloads_to_the_audited_logits(name, loaded, calib, tmp_path):
    """``export --target hf`` (ModelOpt's unified checkpoint) of every family, tied or untied lm_head, biases,
    the model's own RoPE scaling, Gemma's (1 + w) norms with AWQ's pre-quant scales folded in: the checkpoint
    read back computes the audited logits bit for bit (float32 checkpoint; FP8 KV cache with its scales)."""
    from quantaudit.export import export_checkpoint
    from quantaudit.export.reader import load_hf_checkpoint

    lm = loaded(name)
    for fmt in HF_EXPORT_FORMATS:
        qm = quantize(lm.model, QuantSpec(format=fmt, kv_cache="fp8", group_size=64, awq=AWQOptions(n_grid=4)), calib,
                      progress=False)
        path = tmp_path / fmt
        export_checkpoint(qm, lm.config, path, target="hf", dtype="float32")
        config = json.loads((path / "config.json").read_text())
        assert config["model_type"] == lm.config.model_type
        assert config.get("rope_parameters") == lm.config.to_dict().get("rope_parameters")
        folded = _with_norm_folds(qm.model)  # what the checkpoint defines (ModelOpt folds AWQ scales into norms too)
        with torch.no_grad():
            audited = qm.model(calib.ids[:3]).logits
            expected = folded(calib.ids[:3]).logits
            got = load_hf_checkpoint(path)(calib.ids[:3]).logits
        assert torch.equal(got, expected), (name, fmt, float((got - expected).abs().max()))
        # norm * scale rounded once more, the export's stated difference (an FP8 KV value on a rounding boundary
        # can flip, so the bound is loose)
        assert _relative(got, audited) <= 1e-3


def _with_norm_folds(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with the pre-quant scale of every norm-fed group multiplied into its norm (the
    family's fold rule, independently written here: w * m, or (1 + w) * m - 1 for Gemma)."""
    folded = copy.deepcopy(model)
    arch = architecture(model)
    for layer in folded.model.layers:
        for group in (g for g in arch.layer_groups(layer) if g.norm):
            linears = [layer.get_submodule(p) for p in group.linears]
            pqs = getattr(linears[0], "pre_quant_scale", None)
            if pqs is not None:
                norm = layer.get_submodule(group.norm)
                offset = arch.norm_offset
                norm.weight.data = (norm.weight.data + offset) * pqs - offset
                for linear in linears:
                    linear.pre_quant_scale = None
    return folded
