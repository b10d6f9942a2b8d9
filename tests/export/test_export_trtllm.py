"""TensorRT-LLM checkpoint export of stories260K: every tensor against the documented layout and
the round trip through the reader for every format. The expected layout below is written from TensorRT-LLM's checkpoint docs and loaders
(models/modeling_utils.preprocess_weights, quantization/layers.py, models/llama/convert.py) and
ModelOpt's exporter, independently of quantaudit.export.layout."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from export_helpers import FORMATS, logits, quant_linears, trtllm_w8a16_weight
from safetensors.torch import load_file

from quantaudit.errors import UserError
from quantaudit.export import export_checkpoint
from quantaudit.export.reader import load_trtllm_checkpoint

F16, F32, I8, F8 = torch.float16, torch.float32, torch.int8, torch.float8_e4m3fn
CKPT = "checkpoint dtype"

# quant_algo -> {suffix: (dtype, shape(out, in, group))}; "row" entries only on dense/proj.
DOCUMENTED = {
    "FP8": {"weight": (F8, lambda o, i, g: (o, i)), "weights_scaling_factor": (F32, lambda o, i, g: (1,)),
            "activation_scaling_factor": (F32, lambda o, i, g: (1,))},
    "FP8_PER_CHANNEL_PER_TOKEN": {"weight": (F8, lambda o, i, g: (o, i)), "per_channel_scale": (F32, lambda o, i, g: (o,))},
    "W8A16": {"weight": (CKPT, lambda o, i, g: (o, i))},
    "W4A16_AWQ": {"weight": (I8, lambda o, i, g: (o // 2, i)), "weights_scaling_factor": (F32, lambda o, i, g: (o, i // g))},
    "W4A16_AWQ+pqs": {"weight": (I8, lambda o, i, g: (o // 2, i)), "weights_scaling_factor": (F32, lambda o, i, g: (o, i // g)),
                      "prequant_scaling_factor": (CKPT, lambda o, i, g: (i,))},
    "W4A8_AWQ": {"weight": (I8, lambda o, i, g: (o // 2, i)), "weights_scaling_factor": (F32, lambda o, i, g: (o, i // g)),
                 "weights_scaling_factor_2": (F32, lambda o, i, g: (1,)), "activation_scaling_factor": (F32, lambda o, i, g: (1,)),
                 "prequant_scaling_factor": (CKPT, lambda o, i, g: (i,))},
    "W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN": {"weight": (I8, lambda o, i, g: (o, i)),
                                             "per_channel_scale": (F32, lambda o, i, g: (1, o)),
                                             "row:smoother": (F32, lambda o, i, g: (1, i))},
    "W8A8_SQ_PER_CHANNEL": {"weight": (I8, lambda o, i, g: (o, i)), "weights_scaling_factor": (F32, lambda o, i, g: (o,)),
                            "activation_scaling_factor": (F32, lambda o, i, g: (1,)),
                            "prequant_scaling_factor": (CKPT, lambda o, i, g: (i,))},
}
ALGO = {"fp8": "FP8", "fp8_pc_pt": "FP8_PER_CHANNEL_PER_TOKEN", "int8_wo": "W8A16", "int4_wo": "W4A16_AWQ",
        "int4_gptq": "W4A16_AWQ", "int4_awq": "W4A16_AWQ+pqs", "w4a8_awq": "W4A8_AWQ",
        "int8_sq": "W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN", "int8_w8a8_nosmooth": "W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN",
        "int8_sq_static": "W8A8_SQ_PER_CHANNEL"}
# stories260K: hidden 64, 8 heads / 4 KV heads of 8, intermediate 172, vocab 512, 5 layers.
LINEARS = {"attention.qkv": (64 + 32 + 32, 64, "column"), "attention.dense": (64, 64, "row"),
           "mlp.fc": (172, 64, "column"), "mlp.gate": (172, 64, "column"), "mlp.proj": (64, 172, "row")}


def expected_layout(fmt: str, dtype: torch.dtype, kv: bool) -> dict[str, tuple[torch.dtype, tuple]]:
    algo = ALGO[fmt]
    grouped = algo.startswith("W4")
    out = {"transformer.vocab_embedding.weight": (dtype, (512, 64)), "transformer.ln_f.weight": (dtype, (64,)),
           "lm_head.weight": (dtype, (512, 64))}
    for n in range(5):
        p = f"transformer.layers.{n}."
        out[p + "input_layernorm.weight"] = out[p + "post_layernorm.weight"] = (dtype, (64,))
        if algo.startswith("W8A8_SQ_PER_CHANNEL_PER"):
            out[p + "input_layernorm.scale_to_int"] = out[p + "post_layernorm.scale_to_int"] = (F32, (1,))
        if kv:
            for s in ("kv_cache_scaling_factor", "k_cache_scaling_factor", "v_cache_scaling_factor"):
                out[p + "attention." + s] = (F32, (1,))
        for name, (o, i, parallel) in LINEARS.items():
            if grouped and i % 64:  # 172 inputs: no INT4 group size divides them, kept unquantized
                out[p + name + ".weight"] = (dtype, (o, i))
                continue
            for suffix, (dt, shape) in DOCUMENTED[algo].items():
                if suffix.startswith("row:"):
                    if parallel != "row":
                        continue
                    suffix = suffix[4:]
                out[p + name + "." + suffix] = (dtype if dt == CKPT else dt, shape(o, i, 64))
    return out


def export(qm, stories, tmp_path, name="ckpt", **kw):
    path = tmp_path / name
    result = export_checkpoint(qm, stories.config, path, **kw)
    return path, result


def ranks(path, tp=1):
    return [load_file(path / f"rank{r}.safetensors") for r in range(tp)]


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_tensor_name_dtype_and_shape_is_the_documented_one(fmt, quantized, stories, tmp_path):
    path, result = export(quantized(fmt), stories, tmp_path)
    (tensors,) = ranks(path)
    got = {k: (v.dtype, tuple(v.shape)) for k, v in tensors.items()}
    assert got == expected_layout(fmt, F16, kv=False)
    quant = json.loads((path / "config.json").read_text())["quantization"]
    assert quant["quant_algo"] == ALGO[fmt].split("+")[0] == result.quant_algo
    excluded = ["lm_head"] + ([f"transformer.layers.{n}.mlp.proj" for n in range(5)] if ALGO[fmt].startswith("W4") else [])
    assert quant["exclude_modules"] == sorted(excluded)
    if ALGO[fmt].startswith("W4"):
        assert (quant["group_size"], quant["has_zero_point"], quant["pre_quant_scale"]) == (64, False, "pqs" in ALGO[fmt] or fmt == "w4a8_awq")


@pytest.mark.parametrize("fmt", FORMATS)
def test_reader_reproduces_the_audited_logits_exactly(fmt, quantized, stories, ids, tmp_path):
    qm = quantized(fmt)
    path, result = export(qm, stories, tmp_path, dtype="float32")
    # float32, no KV cache: only W4A8's kernel-side FP8 rounding of the weights differs from the audit
    assert [n.split(":")[0] for n in result.notes] == (["W4A8_AWQ"] if fmt == "w4a8_awq" else [])
    rebuilt = load_trtllm_checkpoint(path)  # W8A16: quantized from the written weights as TensorRT-LLM does it
    assert torch.equal(logits(rebuilt, ids), logits(qm.model, ids))
    for name, module in quant_linears(rebuilt).items():
        record = qm.layers[name]
        assert torch.equal(module.codes, record.codes) and torch.equal(module.weight_scale.float(), record.weight_scale.float())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_w8a16_weights_quantize_at_load_to_exactly_the_audited_ones(dtype, quantized, stories, tmp_path):
    """TensorRT-LLM quantizes a W8A16 checkpoint's 16-bit weights itself: what it computes from the written
    tensors (written out independently in export_helpers) is the audited weight, in either 16-bit dtype."""
    qm = quantized("int8_wo")
    path, result = export(qm, stories, tmp_path, dtype=str(dtype).split(".")[1])
    assert not any("W8A16" in n for n in result.notes)
    (tensors,) = ranks(path)
    for n in range(5):
        for slot, parts in (("attention.qkv", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
                            ("mlp.proj", ("mlp.down_proj",))):
            written = tensors[f"transformer.layers.{n}.{slot}.weight"]
            assert written.dtype == dtype
            audited = torch.cat([qm.layers[f"model.layers.{n}.{p}"].dequantized_weight() for p in parts])
            assert torch.equal(trtllm_w8a16_weight(written), audited)


def test_w8a16_with_tp_says_where_per_rank_scales_change_the_weights(quantized, stories, tmp_path):
    """Each rank quantizes its own shard: a row-parallel shard's per-channel scale is its own max, which the
    audit (one scale per whole row) does not have; the export counts the rows that change."""
    qm = quantized("int8_wo")
    path, result = export(qm, stories, tmp_path, dtype="float32", tp=2)
    shards = ranks(path, tp=2)
    changed = 0
    for n in range(5):
        audited = qm.layers[f"model.layers.{n}.self_attn.o_proj"].dequantized_weight()
        loaded = torch.cat([trtllm_w8a16_weight(s[f"transformer.layers.{n}.attention.dense.weight"]) for s in shards], 1)
        changed += int((loaded != audited).any(dim=1).sum())
        down = qm.layers[f"model.layers.{n}.mlp.down_proj"].dequantized_weight()
        loaded = torch.cat([trtllm_w8a16_weight(s[f"transformer.layers.{n}.mlp.proj.weight"]) for s in shards], 1)
        changed += int((loaded != down).any(dim=1).sum())
    assert changed > 0
    (note,) = [n for n in result.notes if n.startswith("W8A16")]
    assert f"changes {changed} of " in note and "--tp 2" in note


def _kv_amax_by_hand(model, calib) -> list[tuple[float, float]]:
    """max |K| (after RoPE) and max |V| per layer over the real tokens of the calibration windows, from the
    float model's layer inputs (fp8 calibrates on full-precision activations)."""
    layers, seen = model.model.layers, {}
    hooks = [layer.register_forward_pre_hook(lambda m, args, i=i: seen.__setitem__(i, args[0]))
             for i, layer in enumerate(layers)]
    amax = [[0.0, 0.0] for _ in layers]
    cfg = model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    inv_freq = 1.0 / (cfg.rope_parameters["rope_theta"] ** (torch.arange(0, head_dim, 2).float() / head_dim))
    with torch.no_grad():
        for window, length in zip(calib.ids, calib.lengths):
            model(window[None, :length])
            freqs = torch.arange(int(length))[:, None].float() * inv_freq
            cos, sin = torch.cat([freqs, freqs], -1).cos(), torch.cat([freqs, freqs], -1).sin()
            for i, layer in enumerate(layers):
                x = layer.input_layernorm(seen[i])[0]
                k = (x @ layer.self_attn.k_proj.weight.T).view(int(length), -1, head_dim)
                k = k * cos[:, None] + torch.cat([-k[..., head_dim // 2:], k[..., :head_dim // 2]], -1) * sin[:, None]
                v = x @ layer.self_attn.v_proj.weight.T
                amax[i] = [max(amax[i][0], k.abs().max().item()), max(amax[i][1], v.abs().max().item())]
    for h in hooks:
        h.remove()
    return amax


def test_kv_cache_scale_is_the_one_scale_of_max_k_and_v_amax(quantized, stories, calib, ids, tmp_path):
    qm = quantized("fp8", kv="fp8")
    path, result = export(qm, stories, tmp_path, dtype="float32")
    (tensors,) = ranks(path)
    assert {k: (v.dtype, tuple(v.shape)) for k, v in tensors.items()} == expected_layout("fp8", F32, kv=True)
    by_hand = _kv_amax_by_hand(stories.model, calib)
    for n, (k_amax, v_amax) in enumerate(by_hand):
        p = f"transformer.layers.{n}.attention."
        kv = tensors[p + "kv_cache_scaling_factor"].item()
        assert kv == pytest.approx(max(k_amax, v_amax) / 448, rel=1e-5)
        assert kv == tensors[p + "k_cache_scaling_factor"].item() == tensors[p + "v_cache_scaling_factor"].item()
        assert kv == qm.kv_scales[n].k_scale.item() == qm.kv_scales[n].v_scale.item()  # what the audit ran
    assert json.loads((path / "config.json").read_text())["quantization"]["kv_cache_quant_algo"] == "FP8"
    assert result.notes == []
    assert torch.equal(logits(load_trtllm_checkpoint(path), ids), logits(qm.model, ids))


def test_separate_kv_scales_are_refused_naming_the_flag(quantized, stories, tmp_path):
    qm = quantized("fp8", kv="fp8", kv_scales="separate")
    assert any(s.k_scale != s.v_scale for s in qm.kv_scales.values())
    with pytest.raises(UserError, match="--kv-scales separate: a TensorRT-LLM checkpoint holds one KV-cache scale"):
        export(qm, stories, tmp_path)
    assert not (tmp_path / "ckpt").exists()


@pytest.mark.parametrize("fmt", ["fp8", "int4_awq", "int8_sq_static", "int8_sq", "int8_wo"])
def test_float16_export_rounds_exactly_the_tensors_stored_in_float16(fmt, quantized, stories, ids, tmp_path):
    qm = quantized(fmt)
    path, _ = export(qm, stories, tmp_path, dtype="float16")
    expected = copy.deepcopy(qm.model)
    for name, p in expected.named_parameters():  # embeddings, norms, lm_head: the only float parameters left
        p.data = p.data.half().float()
    for module in quant_linears(expected).values():
        if module.pre_quant_scale is not None and fmt != "int8_sq":  # SmoothQuant's smoother stays float32
            module.pre_quant_scale = module.pre_quant_scale.half().float()
    assert torch.equal(logits(load_trtllm_checkpoint(path), ids), logits(expected, ids))


def test_int4_bytes_hold_adjacent_output_channels_low_nibble_first(quantized, stories, tmp_path):
    qm = quantized("int4_gptq")
    path, _ = export(qm, stories, tmp_path)
    (tensors,) = ranks(path)
    stored = tensors["transformer.layers.2.mlp.gate.weight"].numpy().view(np.uint8)
    codes = qm.layers["model.layers.2.mlp.up_proj"].codes.numpy()
    low, high = stored & 0xF, stored >> 4
    assert np.array_equal(np.where(low > 7, low.astype(int) - 16, low), codes[0::2])
    assert np.array_equal(np.where(high > 7, high.astype(int) - 16, high), codes[1::2])
    scales = tensors["transformer.layers.2.mlp.gate.weights_scaling_factor"]
    assert torch.equal(scales, qm.layers["model.layers.2.mlp.up_proj"].weight_scale.float())


def test_fused_qkv_holds_one_scale_equal_to_each_audited_projection(quantized, stories, tmp_path):
    qm = quantized("fp8")
    path, _ = export(qm, stories, tmp_path)
    (tensors,) = ranks(path)
    for n in range(5):
        records = [qm.layers[f"model.layers.{n}.self_attn.{p}_proj"] for p in "qkv"]
        p = f"transformer.layers.{n}.attention.qkv."
        assert all(tensors[p + "weights_scaling_factor"].item() == r.weight_scale.item() for r in records)
        assert all(tensors[p + "activation_scaling_factor"].item() == r.act_scale.item() for r in records)
        assert torch.equal(tensors[p + "weight"].float(), torch.cat([r.codes.float() for r in records]))


@pytest.mark.parametrize("fmt, multiple, padded", [
    ("int4_awq", 64, ("mlp.fc", "mlp.gate")),  # 172 outputs
    ("w4a8_awq", 128, ("attention.qkv", "attention.dense", "mlp.fc", "mlp.gate")),  # 64 inputs, 128 outputs
])
def test_int4_padding_caveat_names_exactly_the_linears_tensorrt_llm_pads(fmt, multiple, padded, quantized, stories,
                                                                      tmp_path):
    """WeightOnlyGroupwiseQuantLinear pads in/out features that are not multiples of max(64 (128 for W4A8), group)
    and then cannot load unpadded tensors: the caveat counts those linears, checked here against the sizes."""
    _, result = export(quantized(fmt), stories, tmp_path)
    expected = [f"transformer.layers.{n}.{s}" for n in range(5) for s in padded]
    for name in expected:
        o, i, _ = LINEARS[name.split(".", 3)[3]]
        assert o % max(multiple, 64) or i % max(multiple, 64)
    for name, (o, i, _) in LINEARS.items():
        if name not in padded and not (i % 64):  # quantized and not padded
            assert not (o % multiple or i % multiple)
    (caveat,) = result.warnings
    assert caveat.startswith(f"{len(expected)} INT4 linears") and expected[0] in caveat
