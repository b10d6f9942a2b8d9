"""AWQ (Lin et al., 2023): activation-aware per-channel scaling and clipping for group-wise INT4.

Two searches, as tensor functions the engine calls per layer on captured calibration inputs:

* :func:`search_scale` picks one per-input-channel scale ``s`` for the linears that read the same
  input (q/k/v; gate/up; o; down). Convention, exactly: the engine stores ``W' = W * s``
  (column ``j`` of every sharing linear multiplied by ``s[j]``), quantizes ``W'``, and feeds the
  linear ``x / s``, so the model computes ``y = (x / s) @ Q(W * s)^T``. TensorRT-LLM's
  ``W4A16_AWQ`` checkpoint stores ``prequant_scaling_factor = 1 / s`` (ModelOpt's
  ``input_quantizer.pre_quant_scale``), one per fused linear, which is why sharing linears get one
  scale.
* :func:`search_clip` then picks, per output row and group, the clipping ``amax`` of ``W'``
  minimising that group's output error. Call it with the scaled operands ``search_clip(x / s,
  W * s)`` as llm-awq does (``apply_scale`` divides the cached inputs before ``auto_clip``).
  llm-awq skips clipping for q/k projections ("due to qk bmm, it is hard to clip precisely");
  ModelOpt clips every linear. The engine follows llm-awq and skips q_proj/k_proj.

Matches NVIDIA ModelOpt ``awq_lite`` + ``awq_clip`` (``modelopt/torch/quantization/model_calib.py``,
the TensorRT-LLM export path), read side by side with mit-han-lab/llm-awq ``auto_scale``/
``auto_clip`` and llm-compressor's ``AWQModifier``; each function lists where it differs.

Both objectives are evaluated exactly through Gram matrices of the calibration inputs:
``||x D^T||^2 = sum_o D_o (x^T x) D_o^T`` for an error ``D = W - W_hat``, so every candidate costs
one ``[out, in] x [in, in]`` product instead of a pass over all tokens (the references subsample
tokens in the clip search to bound memory; we need not).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from quantaudit.quant.numerics import fake_int, grouped, int_scale

# ModelOpt's get_scale bounds the raw scales to [1e-4, 1e4] before normalising.
SCALE_MIN, SCALE_MAX = 1e-4, 1e4
# Bound on the elements of one [candidates, rows, in] working tensor in search_clip (16 MB in fp32).
CLIP_CHUNK_ELEMENTS = 1 << 22


def search_scale(
    x: torch.Tensor,
    weights: list[torch.Tensor],
    *,
    bits: int = 4,
    group_size: int = 128,
    n_grid: int = 20,
    quantizer: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Activation-aware scale ``s`` ``[in]`` (float32) for the linears ``weights`` sharing input ``x``.

    ``x`` is ``[n, in]`` calibration inputs (real tokens only), ``weights`` a list of ``[out_i, in]``.
    Candidates come from :func:`scale_candidates`; the winner minimises the summed squared error
    of the concatenated outputs, ``||x W^T - (x / s) Q(W * s)^T||^2`` over all linears, with ``Q``
    symmetric group-wise round-to-nearest (``amax / qmax`` per group of ``group_size``). Ties keep
    the earlier candidate, and the first is ``s = 1`` (plain RTN), so the result is never worse
    than RTN on this objective. ``quantizer`` replaces ``Q`` (quantize-dequantize of the scaled,
    concatenated weights) for other formats: NVFP4 AWQ passes NVFP4 rounding, as ModelOpt's awq_lite
    searches with the layer's own weight quantizer; the concatenation then shares one NVFP4 global
    scale, as q/k/v do in TensorRT-LLM (gate/up keep their own in the stored weights).

    Differs from ModelOpt ``awq_lite``, which searches each linear on its own output and, at
    TensorRT-LLM export, averages the ``pre_quant_scale`` of fused q/k/v or gate/up linears and
    re-smooths (``preprocess_linear_fusion``): we search the shared scale directly, as llm-awq and
    llm-compressor group them, so the exported scale is the one that was optimised. llm-awq and
    llm-compressor measure the error at the parent module's output (the whole attention or MLP);
    we, like ModelOpt, measure it at the linears' outputs.
    """
    x = _tokens(x)
    w = torch.cat([wi.detach().to(device=x.device, dtype=torch.float32) for wi in weights])
    if w.shape[1] != x.shape[1]:
        raise ValueError(f"weights have {w.shape[1]} input features, activations have {x.shape[1]}")
    gram = x.T @ x
    candidates = scale_candidates(x.abs().mean(dim=0), w, group_size=group_size, n_grid=n_grid)
    losses = torch.stack([_output_error(w, s, gram, bits, group_size, quantizer) for s in candidates])
    return candidates[torch.argmin(losses)].clone()


def scale_candidates(
    act_mean: torch.Tensor, weight: torch.Tensor, *, group_size: int = 128, n_grid: int = 20
) -> torch.Tensor:
    """The scales :func:`search_scale` tries, ``[n_grid + 2, in]``: row 0 is ``s = 1``, row
    ``1 + i`` is ``alpha = i / n_grid`` for ``i = 0..n_grid``.

    ModelOpt ``awq_lite.get_scale``: ``s = (act^alpha / (w^(1-alpha) + tiny)).clamp(1e-4, 1e4)``
    then ``s / sqrt(max(s) * min(s))``, with ``act`` the mean ``|x|`` per input channel and ``w``
    the mean over output rows of ``|W|`` divided by its group's amax. ModelOpt steps alpha by 0.1
    over [0, 1]; llm-awq and llm-compressor use ``i / 20`` for ``i < 20``; we take ``i / n_grid``
    for ``i = 0..n_grid`` (llm-awq's grid plus ModelOpt's ``alpha = 1``). With the weight term
    (ModelOpt, llm-compressor ``duo_scaling``) ``alpha = 0`` gives ``s ~ 1 / w``, not plain RTN as
    in llm-awq (``s = act^alpha``), hence the explicit ``s = 1`` candidate.
    """
    normalised = grouped(weight.abs(), group_size)
    normalised = normalised / (normalised.amax(dim=-1, keepdim=True) + torch.finfo(torch.float32).tiny)
    weight_mean = normalised.reshape(weight.shape).mean(dim=0)
    alphas = torch.arange(n_grid + 1, device=weight.device, dtype=torch.float32)[:, None] / n_grid
    raw = act_mean.float().pow(alphas) / (weight_mean.pow(1 - alphas) + torch.finfo(torch.float32).tiny)
    raw = raw.clamp(SCALE_MIN, SCALE_MAX)
    scaled = raw / (raw.amax(dim=1, keepdim=True) * raw.amin(dim=1, keepdim=True)).sqrt()
    return torch.cat([torch.ones_like(scaled[:1]), scaled])


def search_clip(
    x: torch.Tensor,
    weight: torch.Tensor,
    *,
    bits: int = 4,
    group_size: int = 128,
    n_grid: int = 20,
    max_shrink: float = 0.5,
    n_sample_tokens: int | None = None,
) -> torch.Tensor:
    """Per-group clipping ``amax`` ``[out, in // group_size]`` (float32) for ``weight`` ``[out, in]``.

    For every output row and group, tries ``amax = group_max * r`` for ``r = 1 - i / n_grid``,
    ``i = 0..round(max_shrink * n_grid)`` (1.0, 0.95, ..., 0.5 by default: ModelOpt's
    ``awq_clip`` set; llm-awq stops at 0.55), quantizes the group symmetrically with
    ``scale = amax / qmax`` (codes clamped, as ModelOpt; llm-awq clamps then quantizes with a zero
    point), and keeps the ``amax`` minimising the group's partial-output error
    ``sum_t (x_t,g . (w_g - q_g))^2`` over calibration tokens ``t`` (both references' objective).
    Ratio 1.0 is tried first and ties keep it, so clipping never increases the objective.

    Tokens: by default all of ``x`` (exact per-group Gram blocks: memory ``in * group_size``,
    time ``n * in * group_size``). llm-awq subsamples 512 tokens with a stride, ModelOpt 64 per
    forward call (4,096 when 64 windows go one per call); ``n_sample_tokens`` applies that stride,
    ``x[::n // n_sample_tokens]``, if a caller wants to reproduce that. Output rows are processed in
    chunks so the working set stays near ``CLIP_CHUNK_ELEMENTS`` floats.
    """
    if not 0 <= max_shrink < 1:
        raise ValueError(f"max_shrink must be in [0, 1), got {max_shrink}")
    x = _tokens(x)
    if n_sample_tokens is not None:
        x = x[:: max(1, x.shape[0] // n_sample_tokens)]
    w = grouped(weight.detach().to(device=x.device, dtype=torch.float32), group_size)
    if w.shape[1] * group_size != x.shape[1]:
        raise ValueError(
            f"weight has {w.shape[1] * group_size} input features, activations have {x.shape[1]}"
        )
    x_groups = x.reshape(x.shape[0], -1, group_size)
    gram_blocks = torch.einsum("ngi,ngj->gij", x_groups, x_groups)
    ratios = 1 - torch.arange(round(max_shrink * n_grid) + 1, device=x.device, dtype=torch.float32) / n_grid
    group_amax = w.abs().amax(dim=-1)
    best = torch.empty_like(group_amax)
    rows_per_chunk = max(1, CLIP_CHUNK_ELEMENTS // (len(ratios) * x.shape[1]))
    for r1 in range(0, w.shape[0], rows_per_chunk):
        w_rows = w[r1 : r1 + rows_per_chunk]
        amax = group_amax[r1 : r1 + rows_per_chunk] * ratios[:, None, None]
        delta = w_rows - fake_int(w_rows, int_scale(amax, bits)[..., None], bits)
        loss = (torch.einsum("krgi,gij->krgj", delta, gram_blocks) * delta).sum(dim=-1)
        best[r1 : r1 + rows_per_chunk] = amax.gather(0, loss.argmin(dim=0, keepdim=True))[0]
    return best


def _tokens(x: torch.Tensor) -> torch.Tensor:
    """``x`` as float32 ``[tokens, in]``; non-finite activations are rejected."""
    x = x.detach().reshape(-1, x.shape[-1]).to(torch.float32)
    if not torch.isfinite(x).all():
        raise ValueError("AWQ calibration activations contain NaN or inf")
    return x


def _output_error(
    w: torch.Tensor, s: torch.Tensor, gram: torch.Tensor, bits: int, group_size: int, quantizer=None
) -> torch.Tensor:
    """``||x W^T - (x / s) Q(W * s)^T||^2`` from ``gram = x^T x``, ``Q`` group-wise RTN or ``quantizer``."""
    if quantizer is None:
        scaled = grouped(w * s, group_size)
        quantized = fake_int(scaled, int_scale(scaled.abs().amax(dim=-1, keepdim=True), bits), bits).reshape(w.shape)
    else:
        quantized = quantizer(w * s)
    delta = w - quantized / s
    return ((delta @ gram) * delta).sum()
