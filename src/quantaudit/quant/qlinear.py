"""Stored quantized weights and the linear layer that runs them.

A :class:`QuantizedWeight` holds exactly what a TensorRT-LLM checkpoint stores for one linear
layer: the codes (``torch.int8`` for INT8/INT4, ``torch.float8_e4m3fn`` for FP8) and the scales.
``dequantize()`` is ``codes * scale`` and nothing else, so the simulated model and the exported
checkpoint hold the same numbers.

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
from .numerics import fake_quant, grouped, quant_codes, quant_scale

# Storage dtype of the weight scale per granularity (see the module docstring).
SCALE_DTYPE = {"tensor": torch.float32, "channel": torch.float32, "group": torch.float16}
# Smallest positive fp16 (subnormal): an all-zero group must not get a zero scale after the cast.
FP16_TINY = 2.0**-24
REQUANT_BITS = 8  # the second weight stage is an 8-bit type (FP8 for W4A8)

_WEIGHT_AMAX = {
    "tensor": lambda w, g: w.abs().amax(),
    "channel": lambda w, g: w.abs().amax(dim=1, keepdim=True),  # [out, 1]
    "group": lambda w, g: grouped(w, g).abs().amax(dim=-1),  # [out, in // g]
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

    codes: torch.Tensor  # [out, in] int8 or float8_e4m3fn
    scale: torch.Tensor  # [] per tensor, [out, 1] per channel, [out, in // group_size] per group
    group_size: int | None  # None unless per group
    requant: str | None = None  # kind of the second, per-tensor stage ("fp8" for W4A8)
    scale_2: torch.Tensor | None = None  # its scale: max |codes * scale| / 448

    def dequantize(self) -> torch.Tensor:
        weight = self.codes.float() * expand_scale(self.scale, self.group_size)
        return weight if self.requant is None else fake_quant(self.requant, weight, self.scale_2, REQUANT_BITS)


def expand_scale(scale: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """``scale`` in fp32, broadcastable to [out, in] (group scales repeated along the input dimension)."""
    scale = scale.float()
    return scale.repeat_interleave(group_size, dim=1) if group_size else scale


def weight_amax(w: torch.Tensor, wq: WeightQuant, group_size: int | None = None) -> torch.Tensor:
    """Max |w| per tensor, per output channel ([out, 1]) or per group ([out, in // group_size])."""
    return _WEIGHT_AMAX[wq.granularity](w.float(), group_size)


def stored_scale(wq: WeightQuant, amax: torch.Tensor) -> torch.Tensor:
    """The scale as stored (float32, or fp16 for groups) for a clip value ``amax``."""
    scale = quant_scale(wq.kind, amax, wq.bits)
    dtype = SCALE_DTYPE[wq.granularity]
    return scale.clamp_min(FP16_TINY).to(dtype) if dtype == torch.float16 else scale.to(dtype)


def quantize_weight(
    w: torch.Tensor, wq: WeightQuant, group_size: int | None = None, amax: torch.Tensor | None = None
) -> QuantizedWeight:
    """Round-to-nearest quantization of ``w`` [out, in]; ``amax`` overrides max|w| (clipping, shared scales)."""
    group_size = group_size if wq.granularity == "group" else None
    amax = weight_amax(w, wq, group_size) if amax is None else amax
    scale = stored_scale(wq, amax)
    codes = quant_codes(wq.kind, w.float(), expand_scale(scale, group_size), wq.bits)
    return stored_weight(codes, scale, group_size, wq)


def stored_weight(codes: torch.Tensor, scale: torch.Tensor, group_size: int | None, wq: WeightQuant) -> QuantizedWeight:
    """Codes and scales as stored, with the format's second stage calibrated if it has one.

    The second-stage amax is taken on the first stage's output, as ModelOpt's SequentialQuantizer does.
    """
    qw = QuantizedWeight(codes, scale, group_size)
    if wq.requant is not None:
        qw.scale_2 = quant_scale(wq.requant, qw.dequantize().abs().amax(), REQUANT_BITS)
        qw.requant = wq.requant
    return qw


def quantize_activation(x: torch.Tensor, act: ActQuant, static_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Fake-quantize an activation: per-token/per-tensor dynamic scale, or the calibrated static one."""
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
