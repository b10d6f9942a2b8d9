"""quantize(): the input model stays untouched, the quantized model computes exactly with the
recorded codes and scales, exclusions/fallbacks are recorded, storage is counted byte for byte."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from quantaudit.data import load_windows
from quantaudit.errors import UserError
from quantaudit.quant import QuantSpec, quantize
from quantaudit.quant.formats import FORMATS
from quantaudit.quant.qlinear import QuantLinear

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


@pytest.fixture(scope="module")
def calib(stories, shared_dir):
    return load_windows(shared_dir / "data" / "tinystories_sample.txt", stories.tokenizer, seq_len=64, n_windows=8, role="calib")


@pytest.fixture(scope="module")
def int4(stories, calib):
    return quantize(stories.model, QuantSpec(format="int4_wo"), calib, progress=False)


@pytest.fixture(scope="module")
def fp8(stories, calib):
    return quantize(stories.model, QuantSpec(format="fp8"), calib, progress=False)


def _kld(base, other, ids):
    with torch.no_grad():
        p, q = base(ids).logits.log_softmax(-1), other(ids).logits.log_softmax(-1)
    return (p.exp() * (p - q)).sum(-1).mean().item()


def test_input_model_is_not_modified(stories, calib):
    before = {k: v.clone() for k, v in stories.model.state_dict().items()}
    spec = QuantSpec(format="int8_sq", kv_cache="fp8", include_lm_head=True)
    quantized = quantize(stories.model, spec, calib, progress=False)
    after = stories.model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert stories.model.lm_head.weight is stories.model.model.embed_tokens.weight  # still tied
    assert stories.model.config._attn_implementation == "sdpa"
    assert all(type(m) is not QuantLinear for m in stories.model.modules())
    assert isinstance(quantized.model.lm_head, QuantLinear)


def _dequantized_by_hand(record) -> torch.Tensor:
    codes, scale = record.codes.float(), record.weight_scale.float()
    if record.group_size:
        out, n_groups = scale.shape
        weight = (codes.reshape(out, n_groups, record.group_size) * scale[:, :, None]).reshape(codes.shape)
    else:
        weight = codes * scale  # [out, 1] per channel or [] per tensor
    if record.weight_scale_2 is not None:  # W4A8: the kernel's FP8 weights
        weight = (weight / record.weight_scale_2).to(torch.float8_e4m3fn).float() * record.weight_scale_2
    return weight


@pytest.mark.parametrize("fmt", ["int4_wo", "int8_wo"])
def test_logits_equal_a_model_rebuilt_from_the_stored_codes(stories, calib, int4, fmt):
    quantized = int4 if fmt == "int4_wo" else quantize(stories.model, QuantSpec(format=fmt), calib, progress=False)
    import copy

    rebuilt = copy.deepcopy(stories.model)
    n_quantized = 0
    for name, record in quantized.layers.items():
        if record.quantized:
            rebuilt.get_submodule(name).weight.data = _dequantized_by_hand(record)
            n_quantized += 1
    assert n_quantized == (30 if fmt == "int4_wo" else 35)  # int4: the five down_proj (172 inputs) fall back
    ids = calib.ids[:4]
    with torch.no_grad():
        torch.testing.assert_close(quantized.model(ids).logits, rebuilt(ids).logits, rtol=0, atol=1e-5)
    assert 0 < _kld(stories.model, quantized.model, ids) < 0.5


def test_static_fp8_layer_recomputed_by_hand(fp8, calib):
    record = fp8.layers["model.layers.1.mlp.gate_proj"]
    module = fp8.model.get_submodule(record.name)
    seen = {}
    handle = module.register_forward_hook(lambda m, args, out: seen.update(x=args[0], y=out))
    with torch.no_grad():
        fp8.model(calib.ids[:2])
    handle.remove()
    scale = record.act_scale
    x = (seen["x"] / scale).clamp(-448, 448).to(torch.float8_e4m3fn).float() * scale
    weight = record.codes.float() * record.weight_scale  # one per-tensor scale
    torch.testing.assert_close(seen["y"], x @ weight.T, rtol=0, atol=1e-5)
    assert record.codes.dtype == torch.float8_e4m3fn and record.weight_scale.shape == ()


def test_static_activation_scales_are_the_full_precision_models_input_maxima(fp8, stories, calib):
    """ModelOpt's max calibration: per-tensor amax of each linear's input over the unquantized model."""
    amax: dict[str, float] = {}

    def watch(name):
        return lambda module, args: amax.__setitem__(name, max(amax.get(name, 0.0), float(args[0].abs().max())))

    names = [f"model.layers.{i}.{p}" for i in range(5) for p in LINEARS]
    hooks = [stories.model.get_submodule(n).register_forward_pre_hook(watch(n)) for n in names]
    with torch.no_grad():
        for ids, length in zip(calib.ids, calib.lengths):
            stories.model(ids[None, :length])
    for h in hooks:
        h.remove()
    for name in names:
        assert fp8.layers[name].act_scale.item() == pytest.approx(amax[name] / 448, rel=1e-6), name


@pytest.mark.parametrize("parts", [("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                                   ("mlp.gate_proj", "mlp.up_proj")])
def test_fused_linears_share_their_per_tensor_scales(parts, fp8, stories):
    """q/k/v and gate/up are one GEMM in TensorRT-LLM: one weight scale (the largest amax, ModelOpt's
    preprocess_linear_fusion) with every weight re-quantized by it, and one activation scale."""
    records = [fp8.layers[f"model.layers.3.{p}"] for p in parts]
    weights = [stories.model.get_submodule(r.name).weight.detach() for r in records]
    own = [w.abs().max() / 448 for w in weights]
    assert len(set(s.item() for s in own)) > 1  # their own scales would differ
    shared = max(own)
    for record, w in zip(records, weights):
        assert record.weight_scale == shared and record.act_scale == records[0].act_scale
        codes = (w / shared).clamp(-448, 448).to(torch.float8_e4m3fn)  # re-quantized with the shared scale
        assert torch.equal(record.codes.view(torch.uint8), codes.view(torch.uint8))


def test_w4a8_fused_linears_share_the_fp8_stage_and_activation_scale(stories, calib):
    from quantaudit.quant import AWQOptions

    qm = quantize(stories.model, QuantSpec(format="w4a8_awq", group_size=64, awq=AWQOptions(n_grid=2)), calib, progress=False)
    for parts in (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj")):
        records = [qm.layers[f"model.layers.2.{p}"] for p in parts]
        first_stage = [r.codes.float() * r.weight_scale.float().repeat_interleave(64, dim=1) for r in records]
        shared = max(f.abs().max() for f in first_stage) / 448
        for record, first in zip(records, first_stage):
            assert record.weight_scale_2 == shared and record.act_scale == records[0].act_scale
            assert torch.equal(record.dequantized_weight(), (first / shared).to(torch.float8_e4m3fn).float() * shared)


def test_group_size_fallback_is_recorded(int4):
    down = int4.layers["model.layers.0.mlp.down_proj"]
    assert not down.quantized and "172" in down.fallback_reason and down.codes is None
    assert isinstance(int4.model.model.layers[0].mlp.down_proj, nn.Linear)
    assert int4.layers["model.layers.0.self_attn.q_proj"].group_size == 64  # 64 inputs: 128 does not divide
    assert set(int4.fallbacks()) == {f"model.layers.{i}.mlp.down_proj" for i in range(5)} | {"lm_head"}


def test_exclude_patterns(stories, calib):
    spec = QuantSpec(format="int8_wo", exclude=("*.mlp.*", "model.layers.0.self_attn.q_proj"))
    quantized = quantize(stories.model, spec, calib, progress=False)
    for name, record in quantized.layers.items():
        excluded = ".mlp." in name or name in ("model.layers.0.self_attn.q_proj", "lm_head")
        assert record.quantized != excluded, name
    assert quantized.layers["model.layers.2.mlp.up_proj"].fallback_reason == "excluded by pattern '*.mlp.*'"
    kept = quantized.model.model.layers[0].self_attn.q_proj
    assert torch.equal(kept.weight, stories.model.model.layers[0].self_attn.q_proj.weight)


def test_include_lm_head_unties_it_and_keeps_the_embedding(stories, calib):
    quantized = quantize(stories.model, QuantSpec(format="int8_wo", include_lm_head=True), calib, progress=False)
    head = quantized.layers["lm_head"]
    embedding = quantized.model.model.embed_tokens.weight
    assert head.quantized and quantized.model.config.tie_word_embeddings is False
    assert torch.equal(embedding, stories.model.model.embed_tokens.weight)
    source = embedding.detach().to(torch.bfloat16).float()  # int8_wo quantizes the 16-bit weight (quant.weightonly)
    step = torch.where(head.codes == 127, 1.0, 0.5)  # TensorRT-LLM's grid: a row's +max (128 steps) clamps to 127
    assert ((head.dequantized_weight() - source).abs() <= head.weight_scale * step * (1 + 1e-6)).all()


def test_weight_bytes_count_codes_scales_and_16_bit_rest(int4, stories):
    cfg = stories.model.config
    hidden, inter, vocab, layers = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.num_hidden_layers
    kv = cfg.num_key_value_heads * cfg.head_dim
    shapes = [(hidden, hidden), (kv, hidden), (kv, hidden), (hidden, hidden), (inter, hidden), (inter, hidden)]
    per_layer = sum(o * i // 2 + o * (i // 64) * 2 for o, i in shapes)  # 4-bit codes + fp16 group-64 scales
    per_layer += hidden * inter * 2  # down_proj (172 inputs) kept at 16 bit
    expected = layers * per_layer + vocab * hidden * 2 * 2  # lm_head and embedding, both stored
    expected += (2 * layers + 1) * hidden * 2  # RMSNorm weights
    assert int4.weight_bytes() == expected
    assert int4.weight_bytes_breakdown()["unquantized_linears"] == layers * hidden * inter * 2 + vocab * hidden * 2


def test_calibration_is_recorded(int4, fp8, calib):
    assert fp8.calib_info["used"] and fp8.calib_info["samples"] == 8
    assert fp8.calib_info["tokens"] == int(calib.lengths.sum()) and fp8.calib_info["source"] == calib.source
    assert int4.calib_info["used"] is False  # RTN weight-only: nothing depends on the calibration text


@pytest.mark.parametrize("name", [n for n, f in FORMATS.items() if f.algorithm in ("awq", "gptq", "smoothquant")])
def test_calibrated_formats_store_what_they_compute(stories, calib, name):
    quantized = quantize(stories.model, QuantSpec(format=name), calib, progress=False)
    records = [r for r in quantized.layers.values() if r.quantized]
    assert records
    for record in records:
        module = quantized.model.get_submodule(record.name)
        assert module.codes is record.codes and torch.equal(module.weight, _dequantized_by_hand(record))
        assert (record.pre_quant_scale is None) == (module.pre_quant_scale is None)
    q, k, v = (quantized.layers[f"model.layers.0.self_attn.{p}_proj"] for p in "qkv")
    assert (q.weight_scale_2 is None) == (FORMATS[name].weight.requant is None)
    if q.weight_scale_2 is not None:  # W4A8: one FP8 weight range for the fused qkv GEMM
        assert q.weight_scale_2 == k.weight_scale_2 == v.weight_scale_2
    assert 0 < _kld(stories.model, quantized.model, calib.ids[:4]) < 0.5


def test_gptq_and_awq_beat_round_to_nearest(stories, calib, int4):
    ids = calib.ids
    rtn = _kld(stories.model, int4.model, ids)
    for name in ("int4_gptq", "int4_awq"):
        better = quantize(stories.model, QuantSpec(format=name), calib, progress=False)
        assert _kld(stories.model, better.model, ids) < rtn, name


def test_plan_sets_formats_per_layer(stories, calib):
    plan = {"model.layers.0.self_attn.q_proj": "int8_wo", "model.layers.1.mlp.up_proj": "none"}
    quantized = quantize(stories.model, QuantSpec(format="int4_wo", plan=plan), calib, progress=False)
    assert quantized.layers["model.layers.0.self_attn.q_proj"].bits == 8
    assert quantized.layers["model.layers.0.self_attn.k_proj"].bits == 4
    assert not quantized.layers["model.layers.1.mlp.up_proj"].quantized
    with pytest.raises(UserError, match="unknown layer"):
        quantize(stories.model, QuantSpec(plan={"model.layers.9.q": "int8_wo"}), calib, progress=False)


class _NotALlama(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([nn.ModuleDict({"fc_in": nn.Linear(4, 4), "fc_out": nn.Linear(4, 4)})])


@pytest.mark.parametrize(
    "spec, message",
    [
        (QuantSpec(format="int9"), "unknown format"),
        (QuantSpec(kv_cache="fp4"), "unknown KV-cache format"),
        (QuantSpec(format="int4_wo", group_size=32), "group size 32"),
        (QuantSpec(format="int8_sq", smoothquant_alpha=1.5), "alpha"),
    ],
)
def test_bad_specs_are_user_errors(stories, calib, spec, message):
    with pytest.raises(UserError, match=message):
        quantize(stories.model, spec, calib, progress=False)


def test_unknown_architecture_names_the_supported_ones(calib):
    with pytest.raises(UserError, match=r"not supported; supported: llama, mistral, qwen2"):
        quantize(_NotALlama(), QuantSpec(), calib, progress=False)


def test_missing_or_short_calibration_is_a_user_error(stories, tmp_path):
    with pytest.raises(UserError, match="needs calibration text"):
        quantize(stories.model, QuantSpec(format="fp8"), None, progress=False)
    short = tmp_path / "short.txt"
    short.write_text("Once upon a time.")
    with pytest.raises(UserError, match=r"fewer than one window of 512.*--calib-seq"):
        load_windows(short, stories.tokenizer, seq_len=512, role="calib")
