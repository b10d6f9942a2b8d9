"""Number formats: the rounding each TensorRT-LLM format applies, as plain tensor functions.

Every quantizer in quantaudit goes through these few functions so a format's arithmetic is
defined once. Conventions follow NVIDIA ModelOpt's ``TensorQuantizer`` (``narrow_range=False``):

* integer, symmetric: ``scale = amax / qmax`` with ``qmax = 2**(bits-1) - 1`` (127 for INT8,
  7 for INT4); codes are ``round(x / scale)`` (round half to even, as ``torch.round``) clamped
  to ``[-qmax - 1, qmax]``.
* FP8 E4M3: ``scale = amax / 448``; values are ``x / scale`` cast to ``torch.float8_e4m3fn``
  (round to nearest even on the real E4M3 grid), saturated at +-448 first because the cast
  itself does not saturate (it would produce NaN).
* FP4 E2M1 (OCP Microscaling spec v1.0, "FP4 E2M1"): magnitudes {0, 0.5, 1, 1.5, 2, 3, 4, 6};
  ``scale = amax / 6``; codes are 4-bit patterns (sign in bit 3, magnitude index in bits 0-2) kept
  as ``torch.uint8``, rounded to nearest with ties to the even mantissa and saturated at +-6 -
  exactly ModelOpt's ``NVFP4QTensor._cast_fp4`` (bounds 0.25, 0.75, ..., 5; the odd bounds 0.75,
  1.75, 3.5 round up) and its Triton fake-quant thresholds (``fp4_kernel.py``).

Block scales (one scale per block of elements, :func:`block_scales`) are stored as the formats
store them: ``"e4m3"`` (NVFP4: ``float8_e4m3fn`` relative to a per-tensor FP32 global scale),
``"e8m0"`` (MX: a power of two kept as its biased exponent in ``torch.uint8``), ``"fp32"`` (FP8 2-D
blocks). :func:`block_scale_values` turns a stored scale back into the FP32 multiplier; it reads the
kind from the storage dtype, so a stored tensor carries its own meaning.
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


def block_amax(w: torch.Tensor, cols: int, rows: int = 1) -> torch.Tensor:
    """max |w| per block of ``rows`` x ``cols`` of a ``[out, in]`` weight: ``[ceil(out / rows), ceil(in /
    cols)]``. A partial edge block takes the elements it has (zero padding, ModelOpt's
    ``reduce_block_padding``; TensorRT-LLM's FP8 block scales are ``ceil(out / 128) x ceil(in / 128)``)."""
    padded = torch.nn.functional.pad(w.abs(), (0, -w.shape[1] % cols, 0, -w.shape[0] % rows))
    return padded.reshape(padded.shape[0] // rows, rows, padded.shape[1] // cols, cols).amax(dim=(1, 3))


def expand_blocks(scale: torch.Tensor, shape: tuple[int, int], cols: int, rows: int = 1) -> torch.Tensor:
    """Per-block values ``[ceil(out / rows), ceil(in / cols)]`` repeated over a ``shape`` = (out, in) weight."""
    return scale.repeat_interleave(rows, dim=0)[: shape[0]].repeat_interleave(cols, dim=1)[:, : shape[1]]


E2M1_MAX = 6.0
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # magnitude by 3-bit index
_E2M1_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)  # between index i and i + 1
_E2M1_SIGN = 8  # bit 3


def fp4_scale(amax: torch.Tensor) -> torch.Tensor:
    """FP4 E2M1 scale ``amax / 6``, floored at ``MIN_SCALE``."""
    return (amax.float() / E2M1_MAX).clamp_min(MIN_SCALE)


def fp4_codes(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """E2M1 codes (``torch.uint8``, 0-15) of ``x / scale``: nearest magnitude, ties to the even
    mantissa (index), saturating at 6; a negative value keeps its sign bit even when it rounds to 0,
    as ModelOpt's ``_cast_fp4`` (sign = ``x < 0``)."""
    y = x.float() / scale
    magnitude = y.abs()
    midpoints = torch.tensor(_E2M1_MIDPOINTS, device=y.device)
    index = torch.bucketize(magnitude, midpoints)  # a tie lands on the lower neighbour ...
    on_midpoint = magnitude == midpoints[index.clamp(max=len(_E2M1_MIDPOINTS) - 1)]
    index = index + (on_midpoint & (index % 2 == 1))  # ... and moves up when that one is odd
    return (index + _E2M1_SIGN * (y < 0)).to(torch.uint8)


def fp4_values(codes: torch.Tensor) -> torch.Tensor:
    """The float32 values of E2M1 codes (inverse of :func:`fp4_codes` up to the scale)."""
    table = torch.tensor([*E2M1_VALUES, *(-v for v in E2M1_VALUES)], device=codes.device)
    return table[codes.long()]


def code_values(codes: torch.Tensor) -> torch.Tensor:
    """Stored codes as float32 values on their grid: INT and FP8 codes are their own values, E2M1
    codes (``uint8``) go through the E2M1 table."""
    return fp4_values(codes) if codes.dtype == torch.uint8 else codes.float()


# Largest magnitude of each element grid (the code that represents amax).
GRID_MAX = {"int": lambda bits: float(int_qmax(bits)), "fp8": lambda bits: E4M3_MAX, "fp4": lambda bits: E2M1_MAX}

E8M0_BIAS = 127
E8M0_MIN_EXP, E8M0_MAX_EXP = -127, 127  # 255 (all ones) is NaN in E8M0


def e4m3_block_scales(block_amax: torch.Tensor, elem_max: float, global_scale: torch.Tensor) -> torch.Tensor:
    """NVFP4 two-level scale, second level: ``e4m3(block_amax / (elem_max * global_scale))``, an
    all-zero block stored as 1.0 (ModelOpt ``NVFP4QTensor.get_weights_scaling_factor``: ``per_block_amax
    / (6 * weights_scaling_factor_2)``, zeros set to 1, cast to ``float8_e4m3fn``). Saturates at 448,
    which only a value above the calibrated global amax reaches (the Triton fake quant clamps there too)."""
    ratio = block_amax.float() / (elem_max * global_scale)
    return fp8_codes(torch.where(ratio == 0, torch.ones_like(ratio), ratio), 1.0)


def e8m0_block_scales(block_amax: torch.Tensor, elem_max: float) -> torch.Tensor:
    """MX scale ``2**ceil(log2(block_amax / elem_max))`` as its biased exponent (``uint8``), clamped to
    [-127, 127]; an all-zero block gets 2**0.

    ModelOpt rounds the exponent *up* (its fake quant ``compute_scale_e8m0_NV`` and its exporter
    ``MXFP4QTensor.quantize``: ``ceil(log2(amax / 6))``), so the block maximum never saturates. The OCP
    MX spec v1.0 instead takes ``floor(log2(amax)) - emax_elem`` (emax 2 for E2M1, 8 for
    E4M3), which can clip the largest values of a block to the grid maximum; we follow ModelOpt. The
    exponent is computed exactly from ``frexp`` (no ``log2`` rounding at powers of two).
    """
    ratio = block_amax.float() / elem_max
    mantissa, exponent = torch.frexp(ratio)  # ratio = mantissa * 2**exponent, mantissa in [0.5, 1)
    ceil_log2 = exponent - (mantissa == 0.5).to(exponent.dtype)
    ceil_log2 = torch.where(ratio > 0, ceil_log2, torch.zeros_like(ceil_log2)).clamp(E8M0_MIN_EXP, E8M0_MAX_EXP)
    return (ceil_log2 + E8M0_BIAS).to(torch.uint8)


_BLOCK_SCALES = {
    "e4m3": lambda amax, elem_max, global_scale: e4m3_block_scales(amax, elem_max, global_scale),
    "e8m0": lambda amax, elem_max, global_scale: e8m0_block_scales(amax, elem_max),
    "fp32": lambda amax, elem_max, global_scale: (amax.float() / elem_max).clamp_min(MIN_SCALE),
}
# Stored block scale -> float32 multiplier, by storage dtype.
_BLOCK_SCALE_VALUES = {
    torch.float8_e4m3fn: lambda s, global_scale: s.float() * global_scale,
    torch.uint8: lambda s, global_scale: torch.exp2(s.float() - E8M0_BIAS),
}


def block_scales(scale_kind: str, block_amax: torch.Tensor, elem_max: float,
                 global_scale: torch.Tensor | None = None) -> torch.Tensor:
    """One stored scale per block (``scale_kind``: "e4m3", "e8m0" or "fp32") for blocks whose largest
    magnitude is ``block_amax`` on a grid whose largest value is ``elem_max``."""
    return _BLOCK_SCALES[scale_kind](block_amax, elem_max, global_scale)


def block_scale_values(stored: torch.Tensor, global_scale: torch.Tensor | None = None) -> torch.Tensor:
    """The float32 multiplier of stored scales: E4M3 times the global scale, E8M0 ``2**(e - 127)``,
    anything else (float32 / float16 per-tensor, channel, group or block scales) as it is."""
    return _BLOCK_SCALE_VALUES.get(stored.dtype, lambda s, g: s.float())(stored, global_scale)


def global_scale(amax: torch.Tensor, global_max: float) -> torch.Tensor:
    """Per-tensor FP32 scale of a two-level format: ``amax / global_max`` (NVFP4: 6 * 448, ModelOpt
    ``get_weights_scaling_factor_2``; W4A8_NVFP4_FP8 weights: 448), floored at ``MIN_SCALE``."""
    return (amax.float() / global_max).clamp_min(MIN_SCALE)


def nonzero(scale: torch.Tensor) -> torch.Tensor:
    """``scale`` with zeros replaced by 1, to divide by: a block whose E4M3 scale underflowed to 0
    dequantizes to 0 whatever its codes (TensorRT-LLM's FP4 quantizer writes 0 codes there)."""
    return torch.where(scale == 0, torch.ones_like(scale), scale)


# The number kinds of quant.formats (``WeightQuant.kind`` / ``ActQuant.kind``) as data: how an
# amax becomes a scale and how values become stored codes. Codes are kept in their storage dtype:
# ``torch.int8`` for INT8 and INT4 (range [-8, 7]), ``torch.float8_e4m3fn`` for FP8, ``torch.uint8``
# E2M1 bit patterns for FP4.
_SCALE_BY_KIND = {
    "int": int_scale,
    "fp8": lambda amax, bits: fp8_scale(amax),
    "fp4": lambda amax, bits: fp4_scale(amax),
}
_CODES_BY_KIND = {
    "int": lambda x, scale, bits: int_codes(x, scale, bits).to(torch.int8),
    "fp8": lambda x, scale, bits: fp8_codes(x, scale),
    "fp4": lambda x, scale, bits: fp4_codes(x, scale),
}


def quant_scale(kind: str, amax: torch.Tensor, bits: int) -> torch.Tensor:
    """Scale of a ``kind`` grid ("int" or "fp8") whose largest code represents ``amax``."""
    return _SCALE_BY_KIND[kind](amax, bits)


def quant_codes(kind: str, x: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Stored codes of ``x`` (int8, float8_e4m3fn or uint8 E2M1 tensor); ``code_values(codes) * scale``
    dequantizes."""
    return _CODES_BY_KIND[kind](x, scale, bits)


def fake_quant(kind: str, x: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Quantize-dequantize ``x`` on a ``kind`` grid with ``scale`` (broadcast)."""
    return (code_values(quant_codes(kind, x, scale, bits)) * scale).to(x.dtype)


def fake_block_quant(x: torch.Tensor, kind: str, bits: int, block, global_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Quantize-dequantize ``x`` with dynamic scales per block of ``block.size`` along its last
    dimension (which it must divide), stored as ``block.scale`` ("e4m3" under ``global_scale``, "e8m0"):
    what NVFP4 / MXFP8 activations and an NVFP4 KV cache get at run time (ModelOpt ``dynamic`` block
    quantizers; TensorRT-LLM ``fp4_quantize`` / MX quantize kernels).

    ``block`` is a :class:`quantaudit.quant.formats.BlockScale`. Differs from ModelOpt's Triton fake
    quant in one corner only: a block whose scale times the global is below 1e-5 is quantized there with
    scale 1 (so rounds to zero); here it keeps its real scale, as TensorRT-LLM's quantizer does.
    """
    blocks = x.float().reshape(*x.shape[:-1], x.shape[-1] // block.size, block.size)
    stored = block_scales(block.scale, blocks.abs().amax(dim=-1, keepdim=True), GRID_MAX[kind](bits), global_scale)
    scale = block_scale_values(stored, global_scale)
    codes = quant_codes(kind, blocks, nonzero(scale), bits)
    return (code_values(codes) * scale).reshape(x.shape).to(x.dtype)


def calibrated_scale(kind: str, bits: int, amax: torch.Tensor, block=None) -> torch.Tensor:
    """The one scale calibrated from ``amax``: a grid scale (:func:`quant_scale`), or, for a two-level
    block format, its global scale ``amax / block.global_max`` (ModelOpt: NVFP4 activation and KV-cache
    ``amax / (6 * 448)``, ``NVFP4QTensor.get_activation_scaling_factor``)."""
    if block is not None and block.global_max:
        return global_scale(amax, block.global_max)
    return quant_scale(kind, amax, bits)


def fake_quant_static(kind: str, bits: int, x: torch.Tensor, scale: torch.Tensor, block=None) -> torch.Tensor:
    """Rounding with a calibrated ``scale``: one scale for all of ``x``, or, for a block format, dynamic
    block scales under the global ``scale``."""
    return fake_quant(kind, x, scale, bits) if block is None else fake_block_quant(x, kind, bits, block, scale)
