"""TensorRT-LLM checkpoint export of the block-scaled formats on stories260K: the NVFP4 family's tensors
against a layout written here from ModelOpt's exporter (quant_utils.get_weight_scaling_factor / _2,
get_activation_scaling_factor, NVFP4QTensor.quantize packing, process_layer_quant_config) and
TensorRT-LLM's FP4Linear / preprocess_weights, independently of quantaudit.export.layout; the same
against that table; logits identical after the round trip; MX and FP8 2-D blocks refused with a reason."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from export_helpers import logits, quant_linears
from safetensors.torch import load_file
from tiny_llama import random_windows, tiny_llama

from quantaudit.errors import UserError
from quantaudit.export import export_checkpoint
from quantaudit.export.hf import check_hf_request
from quantaudit.export.layout import TRTLLM, Dims
from quantaudit.export.packing import pack_fp4, unpack_fp4
from quantaudit.export.reader import load_trtllm_checkpoint
from quantaudit.export.trtllm import check_trtllm_formats
from quantaudit.quant import QuantSpec, quantize

F32, F8, U8 = torch.float32, torch.float8_e4m3fn, torch.uint8
NVFP4_FAMILY = ("nvfp4", "nvfp4_awq", "w4a8_nvfp4_fp8")
BLOCK = {"nvfp4": 16, "nvfp4_awq": 16, "w4a8_nvfp4_fp8": 32}
CONFIG = {  # ModelOpt process_layer_quant_config, single-format checkpoint
    "nvfp4": {"quant_algo": "NVFP4", "group_size": 16},
    "nvfp4_awq": {"quant_algo": "NVFP4_AWQ", "group_size": 16, "has_zero_point": False, "pre_quant_scale": True},
    "w4a8_nvfp4_fp8": {"quant_algo": "W4A8_NVFP4_FP8", "group_size": 32, "has_zero_point": False,
                       "pre_quant_scale": True},
}
# stories260K: hidden 64, qkv 64 + 32 + 32 rows, intermediate 172 (down_proj's 172 inputs: no whole FP4 blocks).
LINEARS = {"attention.qkv": (128, 64), "attention.dense": (64, 64), "mlp.fc": (172, 64), "mlp.gate": (172, 64)}


def expected_layout(fmt: str, dtype: torch.dtype) -> dict[str, tuple[torch.dtype, tuple]]:
    b = BLOCK[fmt]
    out = {"transformer.vocab_embedding.weight": (dtype, (512, 64)), "transformer.ln_f.weight": (dtype, (64,)),
           "lm_head.weight": (dtype, (512, 64))}
    for n in range(5):
        p = f"transformer.layers.{n}."
        out[p + "input_layernorm.weight"] = out[p + "post_layernorm.weight"] = (dtype, (64,))
        out[p + "mlp.proj.weight"] = (dtype, (64, 172))  # unquantized
        for name, (o, i) in LINEARS.items():
            out[p + name + ".weight"] = (U8, (o, i // 2))  # two E2M1 codes per byte
            out[p + name + ".weights_scaling_factor"] = (F8, (o, i // b))  # E4M3 per block
            out[p + name + ".weights_scaling_factor_2"] = (F32, (1,))
            out[p + name + ".activation_scaling_factor"] = (F32, (1,))
            if fmt == "nvfp4_awq":
                out[p + name + ".prequant_scaling_factor"] = (dtype, (i,))
    return out


def table_layout(fmt: str, dtype: torch.dtype) -> dict[str, tuple[torch.dtype, tuple]]:
    """The same tensors as quantaudit.export.layout's TRTLLM table describes them."""
    storage = TRTLLM[fmt]
    out = {k: v for k, v in expected_layout(fmt, dtype).items() if not any(f".{name}." in k for name in LINEARS)}
    for n in range(5):
        for name, (o, i) in LINEARS.items():
            dims = Dims(o, i, BLOCK[fmt])
            for spec in storage.tensors:
                out[f"transformer.layers.{n}.{name}.{spec.suffix}"] = (spec.dtype or dtype, dims.shape(spec.shape))
    return out


def export(qm, stories, tmp_path, name="ckpt", **kw):
    path = tmp_path / name
    return path, export_checkpoint(qm, stories.config, path, **kw)


@pytest.mark.parametrize("fmt", NVFP4_FAMILY)
def test_tensors_are_those_modelopt_writes_and_the_layout_table_lists(fmt, quantized, stories, tmp_path):
    path, result = export(quantized(fmt), stories, tmp_path)
    tensors = load_file(path / "rank0.safetensors")
    got = {k: (v.dtype, tuple(v.shape)) for k, v in tensors.items()}
    assert got == expected_layout(fmt, torch.float16) == table_layout(fmt, torch.float16)
    quant = json.loads((path / "config.json").read_text())["quantization"]
    assert quant == {**CONFIG[fmt], "kv_cache_quant_algo": None,
                     "exclude_modules": ["lm_head"] + [f"transformer.layers.{n}.mlp.proj" for n in range(5)]}
    assert list(quant)[:2] == ["quant_algo", "kv_cache_quant_algo"] and result.quant_algo == CONFIG[fmt]["quant_algo"]
    # only NVFP4 is read by TensorRT-LLM's engine loader; the other two say so
    assert bool(result.warnings) == (fmt != "nvfp4")


@pytest.mark.parametrize("fmt", NVFP4_FAMILY)
@pytest.mark.parametrize("tp", [1, 2])
def test_reader_reproduces_the_audited_logits_exactly(fmt, tp, quantized, stories, ids, tmp_path):
    qm = quantized(fmt)
    path, result = export(qm, stories, tmp_path, dtype="float32", tp=tp)
    assert result.notes == []  # float32, no KV cache: the files hold the audited numbers
    rebuilt = load_trtllm_checkpoint(path)
    assert torch.equal(logits(rebuilt, ids), logits(qm.model, ids))
    for name, module in quant_linears(rebuilt).items():
        record = qm.layers[name]
        assert torch.equal(module.codes, record.codes)
        assert torch.equal(module.weight_scale.view(U8), record.weight_scale.view(U8))  # E4M3 bits
        assert torch.equal(module.weight_scale_2, record.weight_scale_2) and torch.equal(module.act_scale, record.act_scale)


def test_fp4_bytes_hold_adjacent_inputs_low_nibble_first(quantized, stories, tmp_path):
    qm = quantized("nvfp4")
    path, _ = export(qm, stories, tmp_path)
    tensors = load_file(path / "rank0.safetensors")
    stored = tensors["transformer.layers.2.mlp.gate.weight"]
    codes = qm.layers["model.layers.2.mlp.up_proj"].codes
    assert torch.equal(stored & 0xF, codes[:, 0::2]) and torch.equal(stored >> 4, codes[:, 1::2])
    assert torch.equal(stored, (codes[..., 1::2] << 4) | codes[..., 0::2])  # NVFP4QTensor.quantize's packing
    assert torch.equal(unpack_fp4(pack_fp4(codes)), codes)
    record = qm.layers["model.layers.2.mlp.up_proj"]
    assert torch.equal(tensors["transformer.layers.2.mlp.gate.weights_scaling_factor"].view(U8), record.weight_scale.view(U8))
    qkv = [qm.layers[f"model.layers.2.self_attn.{p}_proj"] for p in "qkv"]
    assert tensors["transformer.layers.2.attention.qkv.weights_scaling_factor_2"].item() == qkv[0].weight_scale_2.item()
    assert tensors["transformer.layers.2.attention.qkv.activation_scaling_factor"].item() == qkv[0].act_scale.item()


def test_float16_export_rounds_only_the_tensors_stored_in_float16(quantized, stories, ids, tmp_path):
    qm = quantized("nvfp4")
    path, _ = export(qm, stories, tmp_path, dtype="float16")
    expected = copy.deepcopy(qm.model)
    for _, p in expected.named_parameters():  # embeddings, norms, lm_head, down_proj: the float parameters
        p.data = p.data.half().float()
    assert torch.equal(logits(load_trtllm_checkpoint(path), ids), logits(expected, ids))


def test_nvfp4_kv_cache_scales_round_trip(tmp_path):
    model, calib = tiny_llama(), random_windows()
    qm = quantize(model, QuantSpec(format="nvfp4", kv_cache="nvfp4"), calib, progress=False)
    path = tmp_path / "kv"
    result = export_checkpoint(qm, model.config, path, dtype="float32")
    assert result.kv_cache_quant_algo == "NVFP4"
    tensors = load_file(path / "rank0.safetensors")
    for n, s in qm.kv_scales.items():
        assert tensors[f"transformer.layers.{n}.attention.kv_cache_scaling_factor"].item() == max(s.k_scale, s.v_scale).item()
    ids = calib.ids
    assert torch.equal(logits(load_trtllm_checkpoint(path), ids), logits(qm.model, ids))  # one K/V scale, as audited


@pytest.mark.parametrize("fmt, why", [("mxfp4", "QuantAlgo"), ("mxfp8", "no MXFP8 layout"), ("fp8_pb_wo", "fp8_pb_wo")])
def test_formats_without_a_checkpoint_layout_are_refused_with_the_reason(fmt, why, quantized, stories, tmp_path):
    with pytest.raises(UserError, match=f"{fmt} cannot be exported as a TensorRT-LLM checkpoint: .*{why}"):
        check_trtllm_formats({fmt})  # what `quantaudit export` checks before quantizing
    with pytest.raises(UserError, match=f"{fmt} cannot be exported"):
        export(quantized(fmt), stories, tmp_path)
    assert not (tmp_path / "ckpt").exists()
    with pytest.raises(UserError, match=f"quantaudit does not write {fmt}"):
        check_hf_request({fmt}, None, 1)
