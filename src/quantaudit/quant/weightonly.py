"""TensorRT-LLM's own INT8 weight-only quantization (W8A16), which it applies when it loads a checkpoint.

A W8A16 checkpoint holds 16-bit weights: TensorRT-LLM quantizes them itself (``models/modeling_utils.py``
``preprocess_weights`` -> ``weight_only_quantize_dict`` -> ``torch.ops.trtllm.symmetric_quantize_last_axis_of_batched_matrix``,
i.e. ``cutlass_preprocessors.cpp`` ``symmetric_quantize``): per output channel ``scale = max|w| * (1 / 128)``
in float32, codes ``round(w / scale)`` (C ``round``: ties away from zero) clamped to [-128, 127], the scale
kept in the weight's dtype for the kernel, and an all-zero channel scale 0 with codes 0. ModelOpt's
TensorRT-LLM flow therefore exports ``int8_wo`` unquantized (``quantize_by_modelopt``); its own amax / 127
grid never reaches the kernel. The engine computes exactly TensorRT-LLM's result (:func:`quantize_at_load`).

TensorRT-LLM only ever sees a 16-bit weight, so the engine quantizes the weight rounded to bfloat16
(SmolLM2's weights are bfloat16 already). Its channel scales ``max / 128`` then have 8 significant bits:
bfloat16 and float32 hold them exactly, float16 for channel maxima from 2^-10 up, so the kernel's scale is
the audited one whatever the checkpoint dtype. The exporter writes :func:`load_source` of the codes, a
weight whose load-time quantization gives back exactly these codes and scales in every checkpoint dtype,
and re-checks that on the tensors it writes (``export.trtllm``; with ``--tp`` each rank quantizes its own
shard, which it reports).
"""

from __future__ import annotations

import torch

SOURCE_DTYPE = torch.bfloat16  # what the engine rounds the float weight to before quantizing (see above)


def round_half_away(x: torch.Tensor) -> torch.Tensor:
    """C's ``round``: to the nearest integer, ties away from zero (exact, unlike ``floor(|x| + 0.5)``)."""
    whole = x.trunc()
    return torch.where((x - whole).abs() == 0.5, whole + x.sign(), x.round())


def trtllm_weight_only_quantize(w: torch.Tensor, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """``symmetric_quantize`` of a [out, in] weight: int8 codes and the float32 per-channel scale [out, 1]."""
    w = w.float()
    scale = w.abs().amax(dim=1, keepdim=True) * (1.0 / 2 ** (bits - 1))
    scaled = torch.where(scale == 0, torch.zeros_like(w), w / torch.where(scale == 0, torch.ones_like(scale), scale))
    codes = round_half_away(scaled).clamp(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    return codes.to(torch.int8), scale


def quantize_at_load(w: torch.Tensor, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """What TensorRT-LLM computes from ``w`` held as a 16-bit checkpoint weight (:data:`SOURCE_DTYPE`)."""
    return trtllm_weight_only_quantize(w.to(SOURCE_DTYPE), bits)


def load_source(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """An INT8 (W8A16) weight whose :func:`trtllm_weight_only_quantize` is ``codes`` and ``scale`` again.

    ``codes * scale``, except that a channel without a -128 code gets its first 127 raised to 128: the
    channel's max |w| must be ``128 * scale`` for TensorRT-LLM to derive the same scale, and
    ``round(128)`` clamps back to 127.
    """
    top = codes == 127
    raise_one = top & (top.cumsum(dim=1) == 1) & ~(codes == -128).any(dim=1, keepdim=True)
    return torch.where(raise_one, 128.0, codes.float()) * scale.float()
