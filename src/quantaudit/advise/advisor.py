"""``advise()``: the whole advisor as one call returning a JSON-ready dict."""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from .audit_report import load_audit_report
from .deployment import inflight_batching, model_size, speculative_decoding
from .hardware import load_hardware
from .model_shape import ModelShape, load_model_shape, shape_from_params
from .planner import PlannerSettings
from .recommend import Context, Workload, rank_serving_options
from .roofline import Efficiency, estimate_speed

SCHEMA_VERSION = 1


def _validate(gpus: int, efficiency: Efficiency, settings: PlannerSettings, sensitive_factor: float) -> None:
    from ..quant.formats import GROUP_SIZES

    if not isinstance(gpus, int) or gpus < 1:
        raise UserError(f"--gpus must be a positive integer (got {gpus!r})")
    for flag, value in (("--bw-efficiency", efficiency.bandwidth), ("--flops-efficiency", efficiency.flops),
                        ("--kv-free-fraction", settings.kv_free_fraction)):
        if not 0 < value <= 1:
            raise UserError(f"{flag} must be in (0, 1] (got {value})")
    if settings.group_size not in GROUP_SIZES:
        raise UserError(f"--group-size must be one of {', '.join(map(str, GROUP_SIZES))} (TensorRT-LLM's INT4 group sizes)")
    if settings.max_num_tokens < 1:
        raise UserError(f"--max-num-tokens must be positive (got {settings.max_num_tokens})")
    if not sensitive_factor >= 1:
        raise UserError(f"--sensitive-factor must be at least 1 (got {sensitive_factor})")


def _model_shape(model: str | None, params: float | None, shape: ModelShape | None) -> ModelShape:
    given = [x is not None for x in (model, params, shape)]
    if sum(given) != 1:
        raise UserError("give exactly one of --model (a Hugging Face folder, .gguf file or short name) or --params")
    if shape is not None:
        return shape
    return load_model_shape(model) if model is not None else shape_from_params(params)


def advise(
    model: str | None = None,
    params: float | None = None,
    gpu: str = "h100",
    gpus: int = 1,
    workload: Workload = Workload(),
    report: str | Path | None = None,
    hardware_file: str | Path | None = None,
    efficiency: Efficiency = Efficiency(),
    settings: PlannerSettings = PlannerSettings(),
    sensitive_factor: float = 4.0,
    shape: ModelShape | None = None,
) -> dict:
    """Ranked format recommendations for ``model`` (or ``params``, or an explicit ``shape``) on ``gpus`` x ``gpu``.

    ``sensitive_factor``: layers whose audited sensitivity is at least this multiple of the median
    layer's are advised to stay in 16 bit. Raises UserError for bad input and for workloads that no
    format can serve (with the numbers).
    """
    workload.validate()
    _validate(gpus, efficiency, settings, sensitive_factor)
    table = load_hardware(hardware_file)
    the_gpu = table.gpu(gpu)
    the_shape = _model_shape(model, params, shape)
    audits = load_audit_report(report) if report is not None else {}
    ctx = Context(the_shape, the_gpu, gpus, workload, table, audits, settings, efficiency)
    recommendations, ranked, rejected = rank_serving_options(ctx, the_shape.name, sensitive_factor)
    top = ranked[0]
    candidates = ranked + rejected
    return {
        "schema_version": SCHEMA_VERSION,
        "model": the_shape.describe(),
        "gpu": the_gpu.describe(),
        "gpus": gpus,
        "workload": {"batch": workload.batch, "context": workload.context,
                     "latency_target_ms": workload.latency_target_ms, "task_risk": workload.task_risk},
        "assumptions": {
            "bw_efficiency": efficiency.bandwidth, "flops_efficiency": efficiency.flops,
            "group_size": settings.group_size, "kv_free_fraction": settings.kv_free_fraction,
            "max_num_tokens": settings.max_num_tokens, "tokens_per_block": settings.tokens_per_block,
            "sensitive_factor": sensitive_factor,
            "memory": "datasheet GB taken as 1e9 bytes; weights and KV cache split over the GPUs, activation "
                      "workspace counted on each",
            "speed": "roofline upper bound: tensor-parallel all-reduce and weight-only dequantization not modelled",
        },
        "audit_report": str(report) if report is not None else None,
        "recommendations": recommendations,
        "kv_cache_comparison": [
            {"format": top.name, "kv_cache": kv, **plan.describe(),
             **estimate_speed(the_shape, top.facts.compute, plan, the_gpu, workload.batch, workload.context,
                              efficiency).describe()}
            for kv, plan in top.kv_options.items()
        ],
        "deployment": [inflight_batching(top, ctx), speculative_decoding(top, candidates, ctx),
                       model_size(top, candidates, ctx)],
        "rejected": [{"format": c.name, "kind": c.problem_kind, "reason": c.problem, "kv_cache": c.kv_cache,
                      "weight_bytes": c.plan.weight_bytes, "max_batch_at_context": c.plan.max_batch,
                      **(c.speed.describe() if c.speed is not None else {}),  # where the GPU runs it
                      "audit": c.audit.describe() if c.audit is not None else None}
                     for c in rejected],
        "notes": _notes(the_shape, the_gpu),
    }


def _notes(shape: ModelShape, gpu) -> list[str]:
    notes = [f"model shape from {shape.source}"]
    if "fp4" in gpu.flops:
        notes.append(f"{gpu.name} has native FP4 tensor cores: NVFP4 (and, where TensorRT-LLM has the kernels, MXFP4) "
                     "formats are among the candidates; audit them before deploying, 4-bit activations cost accuracy")
    return notes
