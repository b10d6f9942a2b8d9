"""Helpers shared by the export tests (imported by name: pytest puts this folder on sys.path)."""

from __future__ import annotations

import argparse

import numpy as np
import torch

from quantaudit.quant.qlinear import QuantLinear

FORMATS = ("fp8", "fp8_pc_pt", "int8_wo", "int4_wo", "int8_sq", "int8_sq_static", "int8_w8a8_nosmooth",
           "int4_awq", "int4_gptq", "w4a8_awq")


def parse(*argv) -> argparse.Namespace:
    """`quantaudit export` arguments, parsed as the CLI does."""
    from quantaudit.export.command import add_export_arguments

    parser = argparse.ArgumentParser(prog="quantaudit export")
    add_export_arguments(parser)
    return parser.parse_args(list(argv))


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def quant_linears(model) -> dict[str, QuantLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def trtllm_w8a16_weight(w: torch.Tensor) -> torch.Tensor:
    """The weight TensorRT-LLM's W8A16 kernel computes with for a checkpoint weight ``w`` (float32/16 or bfloat16),
    written out from cutlass_preprocessors.cpp symmetric_quantize: per output channel scale = max|w| * (1/128) in
    float32, codes = round half away from zero of w / scale clamped to [-128, 127], the scale kept in w's dtype."""
    kept = w.dtype
    w = w.float().numpy()
    out = np.zeros_like(w)
    for row in range(w.shape[0]):
        scale = np.float32(np.abs(w[row]).max()) * np.float32(1 / 128)
        if scale == 0:
            continue
        scaled = w[row] / scale
        q = np.clip(np.trunc(scaled + np.copysign(np.float32(0.5), scaled)), -128, 127)
        out[row] = q * torch.tensor(float(scale)).to(kept).float().item()
    return torch.from_numpy(out)

