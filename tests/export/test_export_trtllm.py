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
from export_helpers import FORMATS, logits, quant_linears, with_shared_kv_scale, with_trtllm_w8a16
from safetensors.torch import load_file

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


@pytest.mark.parametrize("fmt", [f for f in FORMATS if f != "int8_wo"])
def test_reader_reproduces_the_audited_logits_exactly(fmt, quantized, stories, ids, tmp_path):
    qm = quantized(fmt)
    path, result = export(qm, stories, tmp_path, dtype="float32")
    # float32, no KV cache: only W4A8's kernel-side FP8 rounding of the weights differs from the audit
    assert [n.split(":")[0] for n in result.notes] == (["W4A8_AWQ"] if fmt == "w4a8_awq" else [])
    rebuilt = load_trtllm_checkpoint(path)
    assert torch.equal(logits(rebuilt, ids), logits(qm.model, ids))
    for name, module in quant_linears(rebuilt).items():
        record = qm.layers[name]
        assert torch.equal(module.codes, record.codes) and torch.equal(module.weight_scale.float(), record.weight_scale.float())


def test_w8a16_is_what_tensorrt_llm_requantizes_and_the_export_says_it_differs(quantized, stories, ids, tmp_path):
    qm = quantized("int8_wo")
    path, result = export(qm, stories, tmp_path, dtype="float32")
    assert any("W8A16" in n and "/128" in n for n in result.notes)
    expected = with_trtllm_w8a16(qm.model)
    changed = sum(not torch.equal(a.weight, b.weight) for a, b in zip(quant_linears(expected).values(),
                                                                        quant_linears(qm.model).values()))
    assert changed > 0  # the audited max/127 grid is not TensorRT-LLM's max/128 one
    assert torch.equal(logits(load_trtllm_checkpoint(path), ids), logits(expected, ids))


def test_kv_cache_scales_are_written_as_tensorrt_llm_uses_them(quantized, stories, ids, tmp_path):
    qm = quantized("fp8", kv="fp8")
    path, result = export(qm, stories, tmp_path, dtype="float32")
    (tensors,) = ranks(path)
    assert {k: (v.dtype, tuple(v.shape)) for k, v in tensors.items()} == expected_layout("fp8", F32, kv=True)
    for n, s in qm.kv_scales.items():
        p = f"transformer.layers.{n}.attention."
        assert tensors[p + "k_cache_scaling_factor"].item() == s.k_scale.item()
        assert tensors[p + "v_cache_scaling_factor"].item() == s.v_scale.item()
        assert tensors[p + "kv_cache_scaling_factor"].item() == max(s.k_scale.item(), s.v_scale.item())
    assert json.loads((path / "config.json").read_text())["quantization"]["kv_cache_quant_algo"] == "FP8"
    assert any("max(K, V)" in n for n in result.notes)
    rebuilt = load_trtllm_checkpoint(path)
    assert torch.equal(logits(rebuilt, ids), logits(with_shared_kv_scale(qm.model), ids))


@pytest.mark.parametrize("fmt", ["fp8", "int4_awq", "int8_sq_static", "int8_sq"])
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
