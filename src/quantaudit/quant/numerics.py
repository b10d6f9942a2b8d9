"""Number formats: the rounding each TensorRT-LLM format applies, as plain tensor functions.

Every quantizer in quantaudit goes through these few functions so a format's arithmetic is
defined once. Conventions follow NVIDIA ModelOpt's ``TensorQuantizer`` (``narrow_range=False``):

* integer, symmetric: ``scale = amax / qmax`` with ``qmax = 2**(bits-1) - 1`` (127 for INT8,
  7 for INT4); codes are ``round(x / scale)`` (round half to even, as ``torch.round``) clamped
  to ``[-qmax - 1, qmax]``.
* FP8 E4M3: ``scale = amax / 448``; values are ``x / scale`` cast to ``torch.float8_e4m3fn``
  (round to nearest even on the real E4M3 grid), saturated at +-448 first because the cast
  itself does not saturate (it would produce NaN).
"""

from __future__ import annotations

import torch

E4M3_MAX = 448.0
# Smallest scale we allow: an all-zero channel must not divide by zero (ModelOpt uses the same idea).
MIN_SCALE = 1e-12


def int_qmax(bits: int) -> int:
    """Largest positive code of a signed ``bits``-bit integer (127 for 8, 7 for 4)."""
    return 2 ** (bits - 1) - 1


def int_scale(amax: torch.Tensor, bits: int) -> torch.Tensor:
    """Symmetric integer scale ``amax / qmax``, floored at ``MIN_SCALE``."""
    return (amax.float() / int_qmax(bits)).clamp_min(MIN_SCALE)


def int_codes(x: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes (as float tensor) of ``x`` on the grid ``scale * [-qmax-1, qmax]``."""
    qmax = int_qmax(bits)
    return torch.clamp(torch.round(x / scale), -qmax - 1, qmax)


def fake_int(x: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Quantize-dequantize ``x`` to signed ``bits``-bit integers with ``scale`` (broadcast)."""
    return (int_codes(x, scale, bits) * scale).to(x.dtype)


def fp8_scale(amax: torch.Tensor) -> torch.Tensor:
    """FP8 E4M3 scale ``amax / 448``, floored at ``MIN_SCALE``."""
    return (amax.float() / E4M3_MAX).clamp_min(MIN_SCALE)


def fp8_codes(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x / scale`` as real ``float8_e4m3fn`` values, saturating at +-448."""
    return (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)


def fake_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Quantize-dequantize ``x`` through FP8 E4M3 with ``scale`` (broadcast)."""
    return (fp8_codes(x, scale).float() * scale).to(x.dtype)


def grouped(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """View a ``[out, in]`` weight as ``[out, in // group_size, group_size]`` (in must divide)."""
    out_features, in_features = w.shape
    if in_features % group_size:
        raise ValueError(f"input size {in_features} is not a multiple of group size {group_size}")
    return w.reshape(out_features, in_features // group_size, group_size)


# The two number kinds of quant.formats (``WeightQuant.kind`` / ``ActQuant.kind``) as data: how an
# amax becomes a scale and how values become stored codes. Codes are kept in their storage dtype:
# ``torch.int8`` for INT8 and INT4 (range [-8, 7]), ``torch.float8_e4m3fn`` for FP8.
_SCALE_BY_KIND = {
    "int": int_scale,
    "fp8": lambda amax, bits: fp8_scale(amax),
}
_CODES_BY_KIND = {
    "int": lambda x, scale, bits: int_codes(x, scale, bits).to(torch.int8),
    "fp8": lambda x, scale, bits: fp8_codes(x, scale),
}


def quant_scale(kind: str, amax: torch.Tensor, bits: int) -> torch.Tensor:
    """Scale of a ``kind`` grid ("int" or "fp8") whose largest code represents ``amax``."""
    return _SCALE_BY_KIND[kind](amax, bits)


def quant_codes(kind: str, x: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Stored codes of ``x`` (int8 or float8_e4m3fn tensor); ``codes.float() * scale`` dequantizes."""
    return _CODES_BY_KIND[kind](x, scale, bits)


def fake_quant(kind: str, x: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Quantize-dequantize ``x`` on a ``kind`` grid with ``scale`` (broadcast)."""
    return (quant_codes(kind, x, scale, bits).float() * scale).to(x.dtype)
