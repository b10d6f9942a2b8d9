"""Decision engine: rank the formats a GPU runs natively for a model and workload, with reasons.

Every format of ``quant.formats.FORMATS`` is a candidate. A candidate is rejected, with the reason,
when (in this order) the advisor has no facts for it, the GPU does not run it natively, its expected
accuracy loss exceeds what the task risk accepts (:data:`RISK_CEILING`), the audit report says it
failed the budget, it does not fit the workload in memory with any native KV-cache dtype, or its
decode step misses the latency target. The feasible ones are ranked by :data:`RULES`, an ordered list
following NVIDIA ModelOpt's "Best practices to choose the right quantization methods": FP8 first
where it is native; otherwise the fastest low-loss format (weight-only INT4 AWQ while decode is
memory-bound, W8A8 once compute-bound); only very-low-loss 8-bit formats for high-risk tasks. The
audit reorders formats by measured KL divergence and removes failed ones; it never adds a format
the GPU cannot run.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import UserError
from ..quant.formats import FORMATS, KV_CACHE_FORMATS, QuantFormat
from .audit_report import FormatAudit
from .hardware import DEGRADATION_ORDER, GPU, FormatFacts, HardwareTable
from .model_shape import ModelShape
from .planner import ACT_BYTES, MemoryPlan, PlannerSettings, linear_weight_bytes, plan_memory
from .roofline import Efficiency, SpeedEstimate, estimate_speed

TASK_RISKS = ("low", "high")
RISK_CEILING = {"low": "medium", "high": "very_low"}  # worst expected degradation each task risk accepts
KV_PREFERENCE = {"low": ("fp8", "none", "int8"), "high": ("none", "fp8", "int8")}  # first native one that fits
KV_REASONS = {
    "fp8": "FP8 KV cache: half the bytes per token of FP16, so twice the sequences fit and decode reads half the KV",
    "int8": "INT8 KV cache: half the bytes per token of FP16 (per-tensor scales from calibration)",
    "none": "FP16 KV cache: cached keys and values stay unrounded",
}


@dataclass(frozen=True)
class Workload:
    batch: int = 1  # concurrent sequences
    context: int = 4096  # tokens each sequence holds (prompt + output)
    latency_target_ms: float | None = None  # longest acceptable decode step (time per output token)
    task_risk: str = "low"  # "high": only formats with very low expected accuracy loss

    def validate(self) -> None:
        if not isinstance(self.batch, int) or self.batch < 1:
            raise UserError(f"--batch must be a positive integer (got {self.batch!r})")
        if not isinstance(self.context, int) or self.context < 1:
            raise UserError(f"--context must be a positive integer (got {self.context!r})")
        if self.latency_target_ms is not None and not self.latency_target_ms > 0:
            raise UserError(f"--latency-target must be a positive number of milliseconds (got {self.latency_target_ms!r})")
        if self.task_risk not in TASK_RISKS:
            raise UserError(f"--task-risk must be one of {', '.join(TASK_RISKS)} (got {self.task_risk!r})")


@dataclass(frozen=True)
class Context:
    shape: ModelShape
    gpu: GPU
    gpus: int
    workload: Workload
    table: HardwareTable
    audits: dict[str, FormatAudit]
    settings: PlannerSettings
    efficiency: Efficiency

    def template_fields(self) -> dict:
        return {"gpu": self.gpu.name, "arch": self.gpu.arch.name, "batch": self.workload.batch,
                "context": self.workload.context, "risk": self.workload.task_risk,
                "ceiling": RISK_CEILING[self.workload.task_risk].replace("_", " ")}


@dataclass
class ServingOption:
    fmt: QuantFormat
    facts: FormatFacts | None
    kv_cache: str
    kv_reason: str
    plan: MemoryPlan
    kv_options: dict[str, MemoryPlan]  # every native KV dtype, for the comparison table
    speed: SpeedEstimate | None  # None when the GPU lacks the format's compute dtype
    audit: FormatAudit | None
    problem: str | None = None  # why it cannot be recommended
    problem_kind: str | None = None  # data | native | risk | audit | memory | latency

    @property
    def name(self) -> str:
        return self.fmt.name


def _speed_key(c: ServingOption) -> tuple[float, float]:
    return (-c.speed.tokens_per_s, c.speed.prefill_s)


def _measured_kld(c: ServingOption) -> float:
    return c.audit.kld_mean if c.audit is not None and c.audit.kld_mean is not None else math.inf


def _degradation(c: ServingOption) -> int:
    return DEGRADATION_ORDER.index(c.facts.degradation)


@dataclass(frozen=True)
class Rule:
    """One step of the ranking: when it applies, which feasible candidates it puts next, and why."""

    name: str
    applies: Callable[[Context], bool]
    choose: Callable[[list[ServingOption]], list[ServingOption]]  # feasible, not yet ranked -> in its order
    reason: str  # formatted with Context.template_fields()


RULES: tuple[Rule, ...] = (
    Rule(
        "high-risk-8-bit",
        lambda ctx: ctx.workload.task_risk == "high",
        lambda cands: sorted((c for c in cands if c.facts.degradation == "very_low"),
                             key=lambda c: (_measured_kld(c), _speed_key(c))),
        "high-risk task: only 8-bit formats with very low expected accuracy loss (ModelOpt rates FP8 'very low'; "
        "INT8 weight-only keeps activations in 16 bit); the lowest measured KL divergence first, then the fastest",
    ),
    Rule(
        "fp8-first",
        lambda ctx: ctx.workload.task_risk == "low",
        lambda cands: [c for c in cands if c.name == "fp8"],
        "FP8 runs natively on {gpu} ({arch}) and ModelOpt's guidance is to try it first: very low accuracy loss, "
        "half the weight bytes of FP16 for memory-bound decode and twice the FP16 tensor throughput for prefill "
        "and large batches",
    ),
    Rule(
        "fastest-within-risk",
        lambda ctx: ctx.workload.task_risk == "low",
        lambda cands: sorted((c for c in cands if c.facts.degradation != "none"),
                             key=lambda c: (_speed_key(c), _measured_kld(c), _degradation(c))),
        "the fastest quantized format {gpu} runs natively at batch {batch} within a low-risk task's tolerance "
        "(expected loss up to '{ceiling}'): ModelOpt recommends weight-only INT4 AWQ while decode is memory-bound "
        "and formats with 8-bit activations once it is compute-bound; the roofline decides which applies here",
    ),
    Rule(
        "remaining",
        lambda ctx: True,
        lambda cands: sorted(cands, key=lambda c: (_degradation(c), _measured_kld(c), _speed_key(c))),
        "also feasible: ranked by expected accuracy loss, then measured KL divergence, then speed",
    ),
)


def evaluate(fmt: QuantFormat, ctx: Context) -> ServingOption:
    """Memory, speed and audit facts of one format, and the first hard limit it breaks (if any)."""
    w, gpu = ctx.workload, ctx.gpu
    facts = ctx.table.facts(fmt.name)
    kv_cache, kv_reason, plan, options = _choose_kv_cache(fmt, ctx)
    runs = facts is not None and gpu.runs(fmt, facts)
    speed = estimate_speed(ctx.shape, facts.compute, plan, gpu, w.batch, w.context, ctx.efficiency) if runs else None
    c = ServingOption(fmt, facts, kv_cache, kv_reason, plan, options, speed, ctx.audits.get(fmt.name))
    if facts is None:
        c.problem_kind, c.problem = "data", f"no advisor facts for it (add [formats.{fmt.name}] to quantaudit/advise/gpus.toml)"
    elif not runs:
        missing = (f"no {fmt.trtllm_quant_algo} kernels on {gpu.arch.name}" if facts.compute in gpu.flops
                   else f"no {facts.compute.upper()} tensor cores")
        c.problem_kind, c.problem = "native", f"not native on {gpu.name}: {missing} (TensorRT-LLM support matrix)"
    elif DEGRADATION_ORDER.index(facts.degradation) > DEGRADATION_ORDER.index(RISK_CEILING[w.task_risk]):
        c.problem_kind = "risk"
        c.problem = (f"expected accuracy loss '{facts.degradation.replace('_', ' ')}' exceeds what a {w.task_risk}-risk "
                     f"task accepts ('{RISK_CEILING[w.task_risk].replace('_', ' ')}')")
        if c.audit is not None and c.audit.passed:
            c.problem += f", although the audit passed it (mean KL {c.audit.kld_mean:.4g})"
            if w.task_risk == "high" and _degradation(c) <= DEGRADATION_ORDER.index(RISK_CEILING["low"]):
                c.problem += "; --task-risk low would admit it"
    elif c.audit is not None and c.audit.passed is False:
        c.problem_kind, c.problem = "audit", f"failed the audit's accuracy budget (mean KL {c.audit.kld_mean:.4g})"
    elif not plan.weights_fit:
        c.problem_kind = "memory"
        c.problem = (f"weights need {plan.weight_bytes_per_gpu / 1e9:.1f} GB per GPU "
                     f"({plan.weight_bytes / 1e9:.1f} GB over {ctx.gpus}) + {plan.activation_bytes_per_gpu / 1e9:.1f} GB "
                     f"activation workspace, but one {gpu.name} holds {gpu.memory_bytes / 1e9:.0f} GB")
    elif not plan.fits:
        c.problem_kind = "memory"
        c.problem = (f"with {_kv_label(kv_cache)} KV cache, {ctx.gpus}x {gpu.name} hold at most {plan.max_batch} "
                     f"sequences of {w.context} tokens (need {w.batch}); at batch {w.batch} the longest context is "
                     f"{plan.max_context} tokens")
    elif w.latency_target_ms is not None and 1e3 * speed.decode_step_s > w.latency_target_ms:
        c.problem_kind = "latency"
        c.problem = f"decode step {1e3 * speed.decode_step_s:.1f} ms exceeds the latency target {w.latency_target_ms:g} ms"
    return c


def _kv_label(kv_cache: str) -> str:
    return "FP16" if kv_cache == "none" else kv_cache.upper()


def _choose_kv_cache(fmt: QuantFormat, ctx: Context) -> tuple[str, str, MemoryPlan, dict[str, MemoryPlan]]:
    """The task risk's first KV dtype that is native and fits, else the one holding the most sequences."""
    w = ctx.workload
    native = [kv for kv in KV_PREFERENCE[w.task_risk] if ctx.gpu.runs_kv(KV_CACHE_FORMATS[kv])]
    plans = {kv: plan_memory(ctx.shape, fmt, kv, ctx.gpu, ctx.gpus, w.batch, w.context, ctx.settings) for kv in native}
    chosen = next((kv for kv in native if plans[kv].fits), max(native, key=lambda kv: plans[kv].max_batch))
    reason = KV_REASONS[chosen]
    if chosen != "none":
        fp16, this = plans["none"], plans[chosen]
        reason += (f" ({fp16.kv_bytes_per_token:,.0f} -> {this.kv_bytes_per_token:,.0f} B/token; "
                   f"{fp16.max_batch} -> {this.max_batch} sequences of {w.context} tokens)")
    skipped = native[: native.index(chosen)]
    if skipped:
        first = plans[skipped[0]]
        reason += (f"; {_kv_label(skipped[0])} KV cache would hold only {first.max_batch} sequences of "
                   f"{w.context} tokens (need {w.batch})")
    return chosen, reason, plans[chosen], plans


def candidate_facts(c: ServingOption, ctx: Context, sensitive_factor: float) -> list[str]:
    """The measured and estimated facts behind a recommendation, one line each."""
    w, p, s = ctx.workload, c.plan, c.speed
    fp16_bytes = 2 * ctx.shape.total_params
    lines = [
        f"weights {p.weight_bytes / 1e9:.2f} GB ({p.weight_bytes / fp16_bytes:.2f}x an all-FP16 model); "
        f"{ctx.gpus}x {ctx.gpu.name} hold {p.max_batch} sequences of {w.context} tokens (need {w.batch})",
        c.kv_reason,
        f"decode ~{s.tokens_per_s_per_user:,.0f} tokens/s per user, {s.tokens_per_s:,.0f} tokens/s in total at batch "
        f"{w.batch}; its weight GEMMs are {'memory' if s.memory_bound else 'compute'}-bound here "
        f"(compute-bound from batch {s.crossover_batch} on {c.facts.compute.upper()} tensor cores); "
        f"prefill of {w.context} tokens ~{s.prefill_s * 1e3:,.0f} ms",
    ]
    if c.audit is None:
        lines.append("not audited: run `quantaudit audit` on your data before deploying it" if ctx.audits
                     else "no audit report given: the accuracy class is ModelOpt's expectation, not a measurement")
    else:
        top1 = f", top-1 agreement {c.audit.top1:.1%}" if c.audit.top1 is not None else ""
        lines.append(f"audit: mean KL {c.audit.kld_mean:.4g}{top1}, "
                     f"{'passed' if c.audit.passed else 'no verdict on'} the budget")
        keep = c.audit.sensitive_layers(sensitive_factor)
        if keep:
            extra = _extra_bytes_at_16_bit(c, ctx, [name for name, _ in keep])
            cost = f" (+{extra / 1e6:,.1f} MB)" if extra is not None else ""
            lines.append(
                f"audit: keep {len(keep)} layer(s) in 16 bit{cost}, each at least {sensitive_factor:g}x the median "
                f"layer's sensitivity: {', '.join(f'{n} ({v:.3g})' for n, v in keep[:5])}"
                + (" ..." if len(keep) > 5 else "")
                + " (TensorRT-LLM checkpoint exclude_modules)"
            )
    return lines


def _extra_bytes_at_16_bit(c: ServingOption, ctx: Context, modules: list[str]) -> float | None:
    """Extra weight bytes of keeping ``modules`` in 16 bit; None when a name matches no decoder linear."""
    total = 0.0
    for module in modules:
        shapes = ctx.shape.linears_under(module)
        if not shapes:
            return None
        total += sum(o * i * ACT_BYTES - linear_weight_bytes(c.fmt, o, i, ctx.settings.group_size) for o, i in shapes)
    return total


def rank(candidates: list[ServingOption], ctx: Context) -> list[tuple[ServingOption, Rule]]:
    """Feasible candidates in recommendation order, each with the rule that placed it."""
    pending = [c for c in candidates if c.problem is None]
    ranked = []
    for rule in RULES:
        if not rule.applies(ctx):
            continue
        for c in rule.choose(pending):
            ranked.append((c, rule))
        chosen = {c.name for c, _ in ranked}
        pending = [c for c in pending if c.name not in chosen]
    return ranked


def explain_infeasible(candidates: list[ServingOption], ctx: Context, model: str) -> UserError:
    """One line saying why nothing can be recommended, with the numbers of the closest candidates."""
    gpu, n = ctx.gpu, ctx.gpus
    runnable = [c for c in candidates if c.problem_kind not in ("data", "native")]
    if runnable and not any(c.plan.weights_fit for c in runnable):
        smallest = min(runnable, key=lambda c: (c.plan.weight_bytes, _degradation(c)))
        p = smallest.plan
        return UserError(
            f"{model} does not fit on {n}x {gpu.name}: even at {smallest.name}, the smallest format it runs natively, "
            f"the weights take {p.weight_bytes / 1e9:.1f} GB ({p.weight_bytes_per_gpu / 1e9:.1f} GB per GPU) plus "
            f"{p.activation_bytes_per_gpu / 1e9:.1f} GB activation workspace, and one GPU holds "
            f"{gpu.memory_bytes / 1e9:.0f} GB: use more --gpus or a larger GPU"
        )
    closest = {
        "memory": lambda cs: max(cs, key=lambda c: (c.plan.weights_fit, c.plan.max_batch, -_degradation(c))),
        "latency": lambda cs: min(cs, key=lambda c: c.speed.decode_step_s),
        "audit": lambda cs: cs[0],
        "risk": lambda cs: cs[0],
    }
    parts = []
    for kind, pick in closest.items():
        of_kind = [c for c in candidates if c.problem_kind == kind]
        if of_kind:
            c = pick(of_kind)
            parts.append(f"{c.name}: {c.problem}")
    return UserError(f"no format can serve this workload on {n}x {gpu.name} ({'; '.join(parts)})")


def rank_serving_options(ctx: Context, model: str, sensitive_factor: float) -> tuple[list[dict], list[ServingOption], list[ServingOption]]:
    """(recommendation dicts in rank order, the ranked candidates, the rejected ones)."""
    candidates = [evaluate(fmt, ctx) for fmt in FORMATS.values()]
    ranked = rank(candidates, ctx)
    if not ranked:
        raise explain_infeasible(candidates, ctx, model)
    fields = ctx.template_fields()
    recommendations = []
    for i, (c, rule) in enumerate(ranked, start=1):
        keep = c.audit.sensitive_layers(sensitive_factor) if c.audit is not None else []
        recommendations.append({
            "rank": i,
            "format": c.name,
            "kv_cache": c.kv_cache,
            "rule": rule.name,
            "reasons": [rule.reason.format(**fields), *candidate_facts(c, ctx, sensitive_factor)],
            "trtllm_quant_algo": c.fmt.trtllm_quant_algo,
            "compute_dtype": c.facts.compute,
            "expected_degradation": c.facts.degradation,
            **c.plan.describe(),
            **c.speed.describe(),
            "audit": c.audit.describe() if c.audit is not None else None,
            "keep_high_precision": [{"name": n, "sensitivity_kld": v} for n, v in keep],
        })
    rejected = [c for c in candidates if c.problem is not None]
    return recommendations, [c for c, _ in ranked], rejected
