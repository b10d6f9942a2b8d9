"""Weight-preparation algorithms behind one interface, chosen by ``QuantFormat.algorithm``.

Like llm-compressor's modifiers, each algorithm declares the calibration statistics it needs
(``needs(spec)``) and turns one :class:`GroupJob` — the linears of a layer that read the same input
and share a format — into stored codes and scales. The registry :data:`ALGORITHMS` is keyed by
the format's ``algorithm`` field; no code branches on a format's name.

``sequential`` says where the next layer's calibration inputs come from. GPTQ's reference code
(IST-DASLab/gptq ``llama_sequential``) re-runs each layer after quantizing it, so later layers are
calibrated on the error of the earlier ones (llm-compressor's sequential pipeline does this for
every modifier). ModelOpt's ``max`` calibration and llm-awq's ``run_awq`` instead calibrate on the
full-precision model's activations; the formats TensorRT-LLM's reference exporter (ModelOpt)
produces are calibrated that way here, which also takes one forward pass per layer, not two.

* ``rtn``: round-to-nearest from max |w| (ModelOpt's ``max`` calibration of weights).
* ``smoothquant``: :mod:`quantaudit.quant.smoothquant`, then RTN.
* ``awq``: AWQ scale search, then per-group clip search, then RTN with the clipped amax
  (llm-awq ``auto_scale`` + ``auto_clip``; :mod:`quantaudit.quant.awq`).
* ``awq_lite``: the AWQ scale search alone, then RTN (ModelOpt's ``awq_lite``, which
  ``NVFP4_AWQ_LITE_CFG`` - ``--qformat nvfp4_awq`` - uses), the search rounding with the format itself.
* ``gptq``: GPTQ on the layer's input Hessian (:mod:`quantaudit.quant.gptq`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from . import awq, gptq, smoothquant
from .calibrate import InputStats
from .formats import QuantFormat
from .qlinear import FP16_TINY, SCALE_DTYPE, QuantizedWeight, quantize_weight, stored_weight, weight_amax


@dataclass
class GroupJob:
    """Linears of one layer reading the same input, all to be quantized to ``fmt``."""

    fmt: QuantFormat
    spec: object  # engine.QuantSpec (options of the algorithms)
    names: list[str]
    linears: list[nn.Linear]
    group_size: int | None  # the group size used (None unless the format is per group)
    fused: bool  # TensorRT-LLM runs them as one GEMM: they share per-tensor scales (engine._run_jobs)
    stats: InputStats | None
    norm: nn.Module | None = None  # set when the job covers the whole group and a norm feeds it
    norm_name: str | None = None
    arch: object = None  # arch.Architecture: how a scale folds into ``norm``
    no_clip: tuple[str, ...] = ()  # linears the AWQ clip search skips (Architecture.no_clip)


@dataclass
class LinearResult:
    qweight: QuantizedWeight
    pre_quant_scale: torch.Tensor | None = None  # multiplies the input at run time
    input_multiplier: torch.Tensor | None = None  # x seen by the activation quantizer = x * this
    details: dict = field(default_factory=dict)


def _weights(job: GroupJob) -> list[torch.Tensor]:
    return [linear.weight.detach().float() for linear in job.linears]


def _shared_global_amax(job: GroupJob, weights: list[torch.Tensor]) -> torch.Tensor | None:
    """A fused group's one global amax for two-level block formats: TensorRT-LLM's qkv FP4 linear holds one
    ``weights_scaling_factor_2`` (ModelOpt's export takes the max over q, k, v: ``preprocess_linear_fusion``)."""
    block = job.fmt.weight.block
    if not (job.fused and block is not None and block.global_max):
        return None
    return torch.stack([w.abs().amax() for w in weights]).amax()


def _round_to_nearest(job: GroupJob, weights: list[torch.Tensor]) -> list[QuantizedWeight]:
    """RTN of each weight; a fused group with per-tensor scales shares the largest amax (TensorRT-LLM's qkv
    and gate/up GEMMs; ModelOpt ``preprocess_linear_fusion``), and so does the global scale of a two-level
    block format."""
    wq = job.fmt.weight
    shared = None
    if job.fused and wq.granularity == "tensor":
        shared = torch.stack([weight_amax(w, wq) for w in weights]).amax()
    global_amax = _shared_global_amax(job, weights)
    return [quantize_weight(w, wq, job.group_size, shared, global_amax) for w in weights]


class RoundToNearest:
    sequential = False

    def needs(self, spec) -> set[str]:
        return set()

    def run(self, job: GroupJob) -> list[LinearResult]:
        return [LinearResult(qw) for qw in _round_to_nearest(job, _weights(job))]


class SmoothQuant:
    sequential = False

    def needs(self, spec) -> set[str]:
        return {"amax", "inputs"} if spec.smoothquant_alpha == "search" else {"amax"}

    def run(self, job: GroupJob) -> list[LinearResult]:
        weights = _weights(job)
        if job.spec.smoothquant_alpha == "search":
            alpha, s = smoothquant.search_alpha(job.stats.inputs(), weights, job.stats.amax, job.fmt)
        else:
            alpha = job.spec.smoothquant_alpha
            s = smoothquant.smoothing_scale(job.stats.amax, weights, alpha)
        details = {"alpha": alpha, "smoothing_scale": s}  # s: x / s feeds W * s
        if job.norm is not None:
            job.norm.weight.data = job.arch.divided_norm_weight(job.norm.weight.data, s)
            pre_quant_scale = None
            details["smoothed_into"] = job.norm_name
        else:
            pre_quant_scale = 1.0 / s
        smoothed = [w * s for w in weights]
        return [
            LinearResult(qw, pre_quant_scale, 1.0 / s, dict(details)) for qw in _round_to_nearest(job, smoothed)
        ]


def _search_quantizer(job: GroupJob):
    """Block formats: the AWQ search rounds with the format itself (None: awq's own INT group RTN)."""
    wq = job.fmt.weight
    return None if wq.block is None else lambda w: quantize_weight(w, wq).dequantize()


class AWQ:
    """``clip=False`` is ModelOpt's awq_lite (scale search only)."""

    sequential = False

    def __init__(self, clip: bool = True):
        self.clip = clip

    def needs(self, spec) -> set[str]:
        return {"inputs"}

    def run(self, job: GroupJob) -> list[LinearResult]:
        wq, opts = job.fmt.weight, job.spec.awq
        x = job.stats.inputs()
        weights = _weights(job)
        s = awq.search_scale(x, weights, bits=wq.bits, group_size=job.group_size, n_grid=opts.n_grid,
                             quantizer=_search_quantizer(job))
        xs = x / s
        global_amax = _shared_global_amax(job, [w * s for w in weights])
        results = []
        for name, w in zip(job.names, weights):
            scaled = w * s
            clip = self.clip and name not in job.no_clip
            amax = (
                awq.search_clip(xs, scaled, bits=wq.bits, group_size=job.group_size, n_grid=opts.n_grid, max_shrink=opts.max_shrink)
                if clip
                else None
            )
            qw = quantize_weight(scaled, wq, job.group_size, amax, global_amax)
            results.append(LinearResult(qw, 1.0 / s, 1.0 / s, {"awq_tokens": x.shape[0], "clipped": clip}))
        return results


class GPTQ:
    sequential = True

    def needs(self, spec) -> set[str]:
        return {"hessian"}

    def run(self, job: GroupJob) -> list[LinearResult]:
        """The linears of a group share one Hessian (one input), and GPTQ treats rows independently: one sweep
        over their concatenated rows gives each the codes of its own sweep, at one sweep's overhead."""
        wq, opts = job.fmt.weight, job.spec.gptq
        weights = _weights(job)
        codes, scales = gptq.gptq_quantize(
            torch.cat(weights), job.stats.hessian.hessian(), bits=wq.bits, group_size=job.group_size,
            block_size=opts.block_size, percdamp=opts.percdamp, act_order=opts.act_order,
            scale_search=opts.scale_search,
        )
        results = []
        rows = [w.shape[0] for w in weights]
        for c, s in zip(codes.split(rows), scales.split(rows)):
            # Stored as TensorRT-LLM holds group scales (fp16): see quant.qlinear.
            qw = stored_weight(c.to(torch.int8), s.clamp_min(FP16_TINY).to(SCALE_DTYPE[wq.granularity]), job.group_size, wq)
            results.append(LinearResult(qw, details={"hessian_tokens": job.stats.hessian.n_samples}))
        return results


ALGORITHMS = {
    "rtn": RoundToNearest(),
    "smoothquant": SmoothQuant(),
    "awq": AWQ(),
    "awq_lite": AWQ(clip=False),
    "gptq": GPTQ(),
}
