"""Stored quantized weights and the linear layer that runs them.

A :class:`QuantizedWeight` holds exactly what a TensorRT-LLM checkpoint stores for one linear
layer: the codes (``torch.int8`` for INT8/INT4, ``torch.float8_e4m3fn`` for FP8, ``torch.uint8`` E2M1
patterns for FP4) and the scales. ``dequantize()`` is ``codes * scale`` and nothing else, so the
simulated model and the exported checkpoint hold the same numbers.

Block-scaled formats (``WeightQuant.block``) store one scale per block as the format does (E4M3 for
NVFP4, with the FP32 global scale in ``scale_2``; E8M0 for MX; FP32 for FP8 128x128 blocks), and codes
``x / (block scale value)`` exactly as ModelOpt's exporter computes them (``NVFP4QTensor.quantize``:
``weight / (e4m3_scale.float() * weights_scaling_factor_2)``, then ``_cast_fp4``).

Scale storage follows the TensorRT-LLM checkpoint: per-tensor and per-channel scales are float32
(``weights_scaling_factor`` / ``per_channel_scale``); per-group INT4 scales are held in the
activation dtype, fp16 here (``weights_scaling_factor`` of W4A16/W4A16_AWQ/W4A8_AWQ). Group
scales are therefore rounded to fp16 *before* the codes are computed, so the codes are optimal for
the scale really stored. ModelOpt computes codes with the fp32 scale and casts the scale to fp16
when exporting; we differ by at most one fp16 rounding of the scale (2^-11 relative) and are exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .formats import ActQuant, QuantFormat, WeightQuant
from .numerics import (
    GRID_MAX,
    block_amax,
    block_scale_values,
    block_scales,
    calibrated_scale,
    code_values,
    expand_blocks,
    fake_block_quant,
    fake_quant,
    global_scale,
    grouped,
    nonzero,
    quant_codes,
    quant_scale,
)
from .weightonly import quantize_at_load

# Storage dtype of the weight scale per granularity (see the module docstring).
SCALE_DTYPE = {"tensor": torch.float32, "channel": torch.float32, "group": torch.float16}
# Smallest positive fp16 (subnormal): an all-zero group must not get a zero scale after the cast.
FP16_TINY = 2.0**-24
REQUANT_BITS = 8  # the second weight stage is an 8-bit type (FP8 for W4A8)

_WEIGHT_AMAX = {
    "tensor": lambda w, wq, g: w.abs().amax(),
    "channel": lambda w, wq, g: w.abs().amax(dim=1, keepdim=True),  # [out, 1]
    "group": lambda w, wq, g: grouped(w, g).abs().amax(dim=-1),  # [out, in // g]
    "block": lambda w, wq, g: block_amax(w, wq.block.size, wq.block.rows),  # [ceil(out / rows), ceil(in / size)]
}

_ACT_AMAX = {
    "token": lambda x: x.abs().amax(dim=-1, keepdim=True),
    "tensor": lambda x: x.abs().amax(),
}


@dataclass
class QuantizedWeight:
    """Codes and scales of one weight; ``dequantize()`` gives ``codes * scale`` in fp32.

    With a second stage (``requant``, W4A8) the kernel converts ``codes * scale`` to FP8 with the
    per-tensor ``scale_2`` before its FP8 GEMM, so the weight it computes with is
    ``fp8(codes * scale / scale_2) * scale_2`` — what ``dequantize()`` returns then.
    """

    codes: torch.Tensor  # [out, in] int8, float8_e4m3fn or uint8 (E2M1)
    scale: torch.Tensor  # [] per tensor, [out, 1] per channel, [out, in // group_size] per group or block
    group_size: int | None  # inputs per group or block; None for per-tensor / per-channel scales
    requant: str | None = None  # kind of the second, per-tensor stage ("fp8" for W4A8)
    scale_2: torch.Tensor | None = None  # W4A8: its scale, max |codes * scale| / 448; NVFP4: the global scale
    block_rows: int = 1  # output rows sharing a scale (128 for FP8 2-D blocks)

    def dequantize(self) -> torch.Tensor:
        scale = block_scale_values(self.scale, self.scale_2)
        weight = code_values(self.codes) * expand_scale(scale, self.group_size, self.block_rows, self.codes.shape)
        return weight if self.requant is None else fake_quant(self.requant, weight, self.scale_2, REQUANT_BITS)


def expand_scale(scale: torch.Tensor, group_size: int | None, rows: int = 1, shape=None) -> torch.Tensor:
    """``scale`` in fp32, broadcastable to [out, in] = ``shape`` (group/block scales repeated over their
    inputs and ``rows`` outputs; ``shape`` defaults to whole groups)."""
    scale = scale.float()
    if not group_size:
        return scale
    return expand_blocks(scale, shape or (scale.shape[0] * rows, scale.shape[1] * group_size), group_size, rows)


def weight_amax(w: torch.Tensor, wq: WeightQuant, group_size: int | None = None) -> torch.Tensor:
    """Max |w| per tensor, per output channel ([out, 1]), per group ([out, in // group_size]) or per block."""
    return _WEIGHT_AMAX[wq.granularity](w.float(), wq, group_size)


def weight_global_scale(w: torch.Tensor, wq: WeightQuant, global_amax: torch.Tensor | None = None) -> torch.Tensor | None:
    """The per-tensor global scale of a two-level block format (``amax / global_max``; ``global_amax``
    defaults to max |w|), None for every other format."""
    if wq.block is None or not wq.block.global_max:
        return None
    return global_scale(w.float().abs().amax() if global_amax is None else global_amax, wq.block.global_max)


def stored_scale(wq: WeightQuant, amax: torch.Tensor, scale_2: torch.Tensor | None = None) -> torch.Tensor:
    """The scale as stored (float32, fp16 for groups, the block format's own type for blocks) for a clip
    value ``amax``; ``scale_2`` is the global scale E4M3 block scales are relative to."""
    if wq.block is not None:
        return block_scales(wq.block.scale, amax, GRID_MAX[wq.kind](wq.bits), scale_2)
    scale = quant_scale(wq.kind, amax, wq.bits)
    dtype = SCALE_DTYPE[wq.granularity]
    return scale.clamp_min(FP16_TINY).to(dtype) if dtype == torch.float16 else scale.to(dtype)


def quantize_weight(
    w: torch.Tensor, wq: WeightQuant, group_size: int | None = None, amax: torch.Tensor | None = None,
    global_amax: torch.Tensor | None = None,
) -> QuantizedWeight:
    """Round-to-nearest quantization of ``w`` [out, in]; ``amax`` overrides max|w| (clipping, shared
    scales); ``global_amax`` sets a two-level block format's global scale (fused q/k/v share one).
    A weight TensorRT-LLM quantizes at load gets exactly its quantization (:mod:`.weightonly`)."""
    if wq.quantized_at_load:
        if amax is not None:
            raise ValueError("a weight TensorRT-LLM quantizes at load takes its own max|w|; no amax override")
        return QuantizedWeight(*quantize_at_load(w, wq.bits), None)
    group_size = wq.block.size if wq.block else (group_size if wq.granularity == "group" else None)
    rows = wq.block.rows if wq.block else 1
    amax = weight_amax(w, wq, group_size) if amax is None else amax
    scale_2 = weight_global_scale(w, wq, global_amax)
    scale = stored_scale(wq, amax, scale_2)
    values = expand_scale(block_scale_values(scale, scale_2), group_size, rows, w.shape)
    codes = quant_codes(wq.kind, w.float(), nonzero(values), wq.bits)
    return stored_weight(codes, scale, group_size, wq, scale_2)


def stored_weight(codes: torch.Tensor, scale: torch.Tensor, group_size: int | None, wq: WeightQuant,
                  scale_2: torch.Tensor | None = None) -> QuantizedWeight:
    """Codes and scales as stored, with the format's second stage calibrated if it has one.

    The second-stage amax is taken on the first stage's output, as ModelOpt's SequentialQuantizer does.
    """
    qw = QuantizedWeight(codes, scale, group_size, scale_2=scale_2, block_rows=wq.block.rows if wq.block else 1)
    if wq.requant is not None:
        qw.scale_2 = quant_scale(wq.requant, qw.dequantize().abs().amax(), REQUANT_BITS)
        qw.requant = wq.requant
    return qw


def activation_scale(act: ActQuant, amax: torch.Tensor) -> torch.Tensor:
    """The static activation scale stored for a calibrated max |x| (a block format's global scale)."""
    return calibrated_scale(act.kind, act.bits, amax, act.block)


def quantize_activation(x: torch.Tensor, act: ActQuant, static_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Fake-quantize an activation: per-token/per-tensor dynamic scale, the calibrated static one, or
    dynamic per-block scales (under the calibrated global scale for NVFP4)."""
    if act.block is not None:
        return fake_block_quant(x, act.kind, act.bits, act.block, static_scale)
    scale = quant_scale(act.kind, _ACT_AMAX[act.granularity](x), act.bits) if act.dynamic else static_scale
    return fake_quant(act.kind, x, scale, act.bits)


class QuantLinear(nn.Module):
    """``y = quant_act(x * pre_quant_scale) @ (codes * scale).T + bias``, simulated in fp32.

    ``pre_quant_scale`` multiplies the input before activation quantization (AWQ's
    ``prequant_scaling_factor``; SmoothQuant's explicit smoother is its reciprocal). The
    dequantized weight is cached in the non-persistent buffer ``weight``; it is computed once
    from the stored codes and scales and equals ``codes * scale`` exactly.
    """

    def __init__(
        self,
        qweight: QuantizedWeight,
        fmt: QuantFormat,
        bias: torch.Tensor | None = None,
        act_scale: torch.Tensor | None = None,
        pre_quant_scale: torch.Tensor | None = None,
    ):
        super().__init__()
        self.out_features, self.in_features = qweight.codes.shape
        self.format_name = fmt.name
        self.act = fmt.act
        self.group_size = qweight.group_size
        self.block_rows = qweight.block_rows
        if self.act is not None and not self.act.dynamic and act_scale is None:
            raise ValueError(f"format {fmt.name} needs a static activation scale")
        self.register_buffer("codes", qweight.codes)
        self.register_buffer("weight_scale", qweight.scale)
        self.register_buffer("weight_scale_2", qweight.scale_2)
        self.requant = qweight.requant
        self.register_buffer("act_scale", act_scale)
        self.register_buffer("pre_quant_scale", pre_quant_scale)
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self.register_buffer("weight", qweight.dequantize(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        if self.pre_quant_scale is not None:
            h = h * self.pre_quant_scale
        if self.act is not None:
            h = quantize_activation(h, self.act, self.act_scale)
        return F.linear(h, self.weight, self.bias).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, format={self.format_name}, group_size={self.group_size}"
