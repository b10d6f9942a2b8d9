"""KV-cache quantization: per-layer K/V scales from calibration (shared by default, as TensorRT-LLM runs
them, or separate), keys rounded after RoPE (checked
against a hand-written attention for one layer), a small but real change of the logits."""

from __future__ import annotations

import math

import pytest
import torch

from quantaudit.data import load_windows
from quantaudit.errors import UserError
from quantaudit.quant import QuantSpec, quantize
from quantaudit.quant.formats import KV_CACHE_FORMATS
from quantaudit.quant.kvcache import install_kv_quantizers

HEAD_DIM, HEADS, KV_HEADS = 8, 8, 4  # stories260K


@pytest.fixture(scope="module")
def calib(stories, shared_dir):
    return load_windows(shared_dir / "data" / "tinystories_sample.txt", stories.tokenizer, seq_len=128, role="calib")


@pytest.fixture(scope="module")
def kv_fp8(stories, calib):
    return quantize(stories.model, QuantSpec(format="none", kv_cache="fp8"), calib, progress=False)


def _rope(t, positions):
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, HEAD_DIM, 2).float() / HEAD_DIM))
    freqs = positions[:, None].float() * inv_freq
    cos, sin = torch.cat([freqs, freqs], -1).cos(), torch.cat([freqs, freqs], -1).sin()
    rotated = torch.cat([-t[..., HEAD_DIM // 2 :], t[..., : HEAD_DIM // 2]], dim=-1)
    return t * cos + rotated * sin


def _fp8(t, scale):
    return (t / scale).clamp(-448, 448).to(torch.float8_e4m3fn).float() * scale


def _heads(x, weight, n):
    b, t, _ = x.shape
    return (x @ weight.T).view(b, t, n, HEAD_DIM).transpose(1, 2)


def _attention_layer0(model, h, k_scale, v_scale, round_before_rope=False):
    """Layer 0's attention written out by hand: K/V rounded with the recorded scales."""
    attn = model.model.layers[0].self_attn
    x = model.model.layers[0].input_layernorm(h)
    positions = torch.arange(h.shape[1])
    q = _rope(_heads(x, attn.q_proj.weight, HEADS), positions)
    k = _heads(x, attn.k_proj.weight, KV_HEADS)
    k = _rope(_fp8(k, k_scale), positions) if round_before_rope else _fp8(_rope(k, positions), k_scale)
    v = _fp8(_heads(x, attn.v_proj.weight, KV_HEADS), v_scale)
    k, v = k.repeat_interleave(HEADS // KV_HEADS, dim=1), v.repeat_interleave(HEADS // KV_HEADS, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(HEAD_DIM)
    causal = torch.ones(h.shape[1], h.shape[1], dtype=torch.bool).triu(1)
    out = scores.masked_fill(causal, float("-inf")).softmax(-1) @ v
    return out.transpose(1, 2).reshape(h.shape[0], h.shape[1], -1) @ attn.o_proj.weight.T


def test_keys_are_rounded_after_rope(kv_fp8, calib):
    model = kv_fp8.model
    seen = {}
    layer = model.model.layers[0]
    hooks = [
        layer.register_forward_pre_hook(lambda m, args: seen.update(h=args[0])),
        layer.self_attn.register_forward_hook(lambda m, args, out: seen.update(out=out[0])),
    ]
    with torch.no_grad():
        model(calib.ids[:2, :40])
        for handle in hooks:
            handle.remove()
        scales = kv_fp8.kv_scales[0]
        after = _attention_layer0(model, seen["h"], scales.k_scale, scales.v_scale)
        before = _attention_layer0(model, seen["h"], scales.k_scale, scales.v_scale, round_before_rope=True)
    torch.testing.assert_close(seen["out"], after, rtol=0, atol=2e-6)
    assert (seen["out"] - before).abs().max() > 100 * 2e-6  # the check can tell the two apart


def test_scales_per_layer_from_calibration_amax(stories, kv_fp8, calib):
    """Default ("shared"): one scale for K and V from the larger amax, as TensorRT-LLM runs the cache; both
    amaxes are kept."""
    assert sorted(kv_fp8.kv_scales) == list(range(5)) and kv_fp8.spec.kv_scales == "shared"
    for scales in kv_fp8.kv_scales.values():
        assert scales.format == "fp8" and scales.k_amax > 0 and scales.v_amax > 0 and scales.k_amax != scales.v_amax
        assert scales.k_scale == scales.v_scale == max(scales.k_amax, scales.v_amax) / 448
    # layer 0's amax, brute force over the real tokens of every calibration window (padding excluded)
    model = stories.model
    attn = model.model.layers[0].self_attn
    k_amax = v_amax = 0.0
    with torch.no_grad():
        for ids, length in zip(calib.ids, calib.lengths):
            h = model.model.embed_tokens(ids[None, :length])
            x = model.model.layers[0].input_layernorm(h)
            k = _rope(_heads(x, attn.k_proj.weight, KV_HEADS), torch.arange(int(length)))
            k_amax = max(k_amax, k.abs().max().item())
            v_amax = max(v_amax, _heads(x, attn.v_proj.weight, KV_HEADS).abs().max().item())
    assert kv_fp8.kv_scales[0].k_amax.item() == pytest.approx(k_amax, rel=1e-5)
    assert kv_fp8.kv_scales[0].v_amax.item() == pytest.approx(v_amax, rel=1e-5)


def _kld(base, other, ids):
    with torch.no_grad():
        p, q = base(ids).logits.log_softmax(-1), other(ids).logits.log_softmax(-1)
    return (p.exp() * (p - q)).sum(-1).mean().item()


def test_separate_scales_are_each_from_their_own_amax(stories, kv_fp8, calib):
    separate = quantize(stories.model, QuantSpec(format="none", kv_cache="fp8", kv_scales="separate"), calib, progress=False)
    for i, scales in separate.kv_scales.items():
        shared = kv_fp8.kv_scales[i]
        assert torch.equal(scales.k_amax, shared.k_amax) and torch.equal(scales.v_amax, shared.v_amax)  # same calibration
        assert scales.k_scale == scales.k_amax / 448 and scales.v_scale == scales.v_amax / 448
    ids = calib.ids[:4, :100]  # stories260K's values are ~10x smaller than its keys: V rounds differently
    with torch.no_grad():
        assert not torch.equal(separate.model(ids).logits, kv_fp8.model(ids).logits)


def test_unknown_kv_scales_mode_is_refused(stories, calib):
    with pytest.raises(UserError, match="--kv-scales must be shared or separate"):
        quantize(stories.model, QuantSpec(format="none", kv_cache="fp8", kv_scales="per_head"), calib, progress=False)


def test_kv_quantizers_install_on_attention_whose_linears_are_all_quantized(stories, calib):
    """An attention module whose q/k/v/o are all QuantLinear (buffers only, no parameter) still gets its
    quantizer, on the device of its tensors (this used to raise StopIteration)."""
    quantized = quantize(stories.model, QuantSpec(format="int8_wo"), calib, progress=False)
    attentions = [layer.self_attn for layer in quantized.model.model.layers]
    assert not any(True for a in attentions for _ in a.parameters())
    quantizers = install_kv_quantizers(quantized.model, attentions, KV_CACHE_FORMATS["fp8"])
    assert all(q.calibrating and q.k_amax.device == a.q_proj.codes.device for q, a in zip(quantizers, attentions))
    with torch.no_grad():
        quantized.model(calib.ids[:2, :40])
    for q in quantizers:
        q.finish_calibration()
        assert q.k_amax > 0 and q.k_scale == q.v_scale == max(q.k_amax, q.v_amax) / 448


@pytest.mark.parametrize("kv", ["fp8", "int8"])
def test_kv_quantization_changes_logits_slightly(stories, calib, kv, kv_fp8):
    quantized = kv_fp8 if kv == "fp8" else quantize(stories.model, QuantSpec(format="none", kv_cache=kv), calib, progress=False)
    kld = _kld(stories.model, quantized.model, calib.ids[:4, :100])
    assert 1e-6 < kld < 0.05
    assert quantized.kv_bytes_per_token() == 5 * 2 * KV_HEADS * HEAD_DIM * 1  # one byte per cached element
    qmax = {"fp8": 448, "int8": 127}[kv]
    assert all(s.k_scale == s.v_scale == max(s.k_amax, s.v_amax) / qmax for s in quantized.kv_scales.values())
    assert stories.model.config._attn_implementation == "sdpa"  # the input model is untouched


def test_kv_bytes_without_quantization_are_16_bit(stories, calib):
    plain = quantize(stories.model, QuantSpec(format="int8_wo"), calib, progress=False)
    assert plain.kv_scales == {} and plain.kv_bytes_per_token() == 5 * 2 * KV_HEADS * HEAD_DIM * 2
