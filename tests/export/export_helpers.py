"""Helpers shared by the export tests (imported by name: pytest puts this folder on sys.path)."""

from __future__ import annotations

import copy

import numpy as np
import torch

from quantaudit.quant.qlinear import QuantLinear

FORMATS = ("fp8", "fp8_pc_pt", "int8_wo", "int4_wo", "int8_sq", "int8_sq_static", "int8_w8a8_nosmooth",
           "int4_awq", "int4_gptq", "w4a8_awq")


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def with_shared_kv_scale(model):
    """A copy of ``model`` whose KV quantizers use max(k_scale, v_scale) for both, as TensorRT-LLM does."""
    model = copy.deepcopy(model)
    for layer in model.model.layers:
        q = layer.self_attn.kv_quantizer
        both = torch.maximum(q.k_scale, q.v_scale)
        q.k_scale, q.v_scale = both.clone(), both.clone()
    return model


def quant_linears(model) -> dict[str, QuantLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def trtllm_w8a16_weight(w: torch.Tensor) -> torch.Tensor:
    """TensorRT-LLM's load-time W8A16 quantization, written out (cutlass_preprocessors.cpp symmetric_quantize)."""
    w = w.numpy().astype(np.float32)
    out = np.empty_like(w)
    for row in range(w.shape[0]):
        scale = np.float32(np.abs(w[row]).max()) * np.float32(1 / 128)
        scaled = w[row] / scale
        q = np.clip(np.trunc(scaled + np.copysign(np.float32(0.5), scaled)), -128, 127)
        out[row] = q * scale
    return torch.from_numpy(out)


def with_trtllm_w8a16(model):
    """A copy of ``model`` whose W8A16 weights are what TensorRT-LLM re-quantizes the stored ones to."""
    model = copy.deepcopy(model)
    for module in quant_linears(model).values():
        module.weight = trtllm_w8a16_weight(module.weight)
    return model
