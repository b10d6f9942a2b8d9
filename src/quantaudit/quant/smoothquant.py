"""SmoothQuant (Xiao et al., 2022): move activation outliers into the weights before W8A8 rounding.

For linears reading the same input X, per input channel j::

    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)      (max over the weights of all those linears)

then ``X' = X / s`` and ``W' = W * s`` leave ``X' W'^T = X W^T`` unchanged. As TensorRT-LLM's
``smooth_gemm`` / the paper's ``smooth_ln_fcs``: both maxima floored at 1e-5, ``s`` floored at 1e-5.
Where the input is an RMSNorm output (q/k/v, gate/up) the ``1/s`` is folded into the norm weight,
so the float model is mathematically unchanged. o_proj and down_proj keep an explicit per-channel
input scale, TensorRT-LLM's ``smoother`` (``attention.dense.smoother`` / ``mlp.proj.smoother``,
applied as ``x / smoother`` before the INT8 GEMM); folding o_proj into v_proj would need one scale
per KV head shared by its query-head group (GQA), which TensorRT-LLM does not do either.

alpha: 0.5 by default, the paper's and llm-compressor's default and TensorRT-LLM's "good first
try"; ModelOpt's ``smoothquant()`` defaults to 1.0 (it drops to 0.5 for Gemma). ``"search"``
picks per linear group the alpha of :data:`ALPHA_GRID` with the smallest output error on the
calibration inputs, in the spirit of Intel Neural Compressor's alpha auto-tuning.
"""

from __future__ import annotations

import torch

from .formats import QuantFormat
from .numerics import quant_scale
from .qlinear import quantize_activation, quantize_weight

FLOOR = 1e-5  # TensorRT-LLM smooth_gemm / paper: clamp(min=1e-5) on weight maxima and on s
ALPHA_GRID = tuple(round(0.1 * i, 1) for i in range(11))
SEARCH_TOKENS = 4096  # tokens on which the alpha search measures output error (11 candidates each)


def smoothing_scale(act_amax: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """Per-input-channel smoothing factor ``s`` [in] for linears sharing one input."""
    w_amax = torch.stack([w.detach().float().abs().amax(dim=0) for w in weights]).amax(dim=0).clamp_min(FLOOR)
    return (act_amax.float().pow(alpha) / w_amax.pow(1 - alpha)).clamp_min(FLOOR)


def smoothed_output_error(
    x: torch.Tensor, weights: list[torch.Tensor], act_amax: torch.Tensor, s: torch.Tensor, fmt: QuantFormat
) -> float:
    """Sum of squared output errors of the linears on inputs ``x`` [n, in] after smoothing by ``s``
    and rounding weights and activations as ``fmt`` does (static scale from ``act_amax / s``)."""
    x = x.float()
    xs = x / s
    static = None
    if fmt.act is not None and not fmt.act.dynamic:
        static = quant_scale(fmt.act.kind, (act_amax / s).amax(), fmt.act.bits)
    xq = quantize_activation(xs, fmt.act, static) if fmt.act is not None else xs
    error = 0.0
    for w in weights:
        wq = quantize_weight(w.float() * s, fmt.weight).dequantize()
        error += (x @ w.float().T - xq @ wq.T).pow(2).sum().item()
    return error


def search_alpha(
    x: torch.Tensor, weights: list[torch.Tensor], act_amax: torch.Tensor, fmt: QuantFormat
) -> tuple[float, torch.Tensor]:
    """The alpha of :data:`ALPHA_GRID` minimising :func:`smoothed_output_error`, and its ``s``.

    The error is measured on at most :data:`SEARCH_TOKENS` of the calibration tokens (a regular
    stride); ``act_amax`` still covers them all.
    """
    x = x[:: max(1, -(-x.shape[0] // SEARCH_TOKENS))]
    best = None
    for alpha in ALPHA_GRID:
        s = smoothing_scale(act_amax, weights, alpha)
        error = smoothed_output_error(x, weights, act_amax, s, fmt)
        if best is None or error < best[0]:
            best = (error, alpha, s)
    return best[1], best[2]
