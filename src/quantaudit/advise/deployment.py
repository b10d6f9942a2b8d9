"""Advice beyond the format: in-flight batching, speculative decoding, model size and distillation.

Each function returns ``{"topic", "advice", ...the numbers behind it}`` for the top recommendation.
"""

from __future__ import annotations

from dataclasses import replace

from .planner import max_layers_that_fit, plan_memory
from .recommend import Context, ServingOption

MAX_DRAFT_TOKENS = 8  # draft lengths tried for speculative decoding
WORTHWHILE_SPEEDUP = 1.05  # below this, speculative decoding is not worth its complexity
VERDICTS = {True: "passed the budget", False: "failed the budget", None: "no budget verdict"}


def inflight_batching(top: ServingOption, ctx: Context) -> dict:
    """How many sequences the paged KV pool serves, at full and at a quarter of the context."""
    w, p = ctx.workload, top.plan
    quarter = max(1, w.context // 4)
    at_quarter = p.kv_capacity_tokens // p.tokens_reserved(quarter)
    return {
        "topic": "inflight_batching",
        "kv_capacity_tokens": p.kv_capacity_tokens,
        "max_batch_at_context": p.max_batch,
        "max_batch_at_quarter_context": at_quarter,
        "advice": (
            f"serve with in-flight batching and the paged KV cache (TensorRT-LLM's executor and trtllm-serve "
            f"default): a finished request frees its KV blocks at once and a waiting one joins the running batch, "
            f"so mixed request lengths share a pool of {p.kv_capacity_tokens:,} tokens: "
            f"{p.max_batch} concurrent sequences of {w.context} tokens, {at_quarter} of {quarter} tokens"
        ),
    }


def _speedup(alpha: float, draft_tokens: int, draft_step: float, target) -> float:
    """Leviathan et al. 2023 (Fast inference from transformers via speculative decoding), i.i.d. acceptance
    ``alpha``: expected tokens per iteration (1 - alpha^(k+1)) / (1 - alpha), over the iteration's time
    (k draft steps plus one target pass verifying k+1 tokens per sequence), relative to one target step."""
    accepted = draft_tokens + 1 if alpha >= 1 else (1 - alpha ** (draft_tokens + 1)) / (1 - alpha)
    return accepted * target.decode_step_s / (draft_tokens * draft_step + target.step_s(draft_tokens + 1))


def speculative_decoding(top: ServingOption, candidates: list[ServingOption], ctx: Context) -> dict:
    """Whether a quantized copy of the model, as greedy draft, would speed up decoding of ``top``.

    The draft's acceptance rate is estimated by its audited top-1 agreement with the baseline. Draft
    and target must fit together: the draft's weights on top, and its KV cache (assumed in the
    target's KV dtype) doubling the KV per sequence.
    """
    w, s = ctx.workload, top.speed
    if not s.memory_bound:
        return {"topic": "speculative_decoding", "recommended": False,
                "advice": f"decode GEMMs are compute-bound at batch {w.batch}: verifying draft tokens costs compute "
                          "the GPU does not have spare, so speculative decoding does not pay off here"}
    options = []
    for d in candidates:
        if d is top or d.speed is None or d.audit is None or d.audit.top1 is None:
            continue
        if d.speed.decode_step_s >= s.decode_step_s:
            continue
        both = plan_memory(ctx.shape, top.fmt, top.kv_cache, ctx.gpu, ctx.gpus, w.batch, w.context, ctx.settings,
                           extra_weight_bytes=d.plan.weight_bytes)
        if both.max_batch < 2 * w.batch:
            continue
        best_k = max(range(1, MAX_DRAFT_TOKENS + 1),
                     key=lambda k: _speedup(d.audit.top1, k, d.speed.decode_step_s, s))
        options.append((_speedup(d.audit.top1, best_k, d.speed.decode_step_s, s), best_k, d))
    if not options:
        why = ("no audited format that is faster than it fits alongside it" if ctx.audits
               else "give --report from `quantaudit audit` to estimate a quantized draft's acceptance rate from its "
                    "top-1 agreement")
        return {"topic": "speculative_decoding", "recommended": None,
                "advice": f"decode is memory-bound at batch {w.batch}, so spare compute can verify draft tokens: "
                          f"speculative decoding (a small draft model, Medusa/EAGLE heads) can cut per-user latency; {why}"}
    speedup, k, d = max(options, key=lambda o: o[0])
    return {
        "topic": "speculative_decoding",
        "recommended": speedup >= WORTHWHILE_SPEEDUP,
        "draft_format": d.name,
        "acceptance_rate_estimate": d.audit.top1,
        "draft_tokens": k,
        "estimated_speedup": speedup,
        "advice": (
            f"{'use' if speedup >= WORTHWHILE_SPEEDUP else 'skip'} speculative decoding with the {d.name} model as greedy "
            f"draft: its audited top-1 agreement {d.audit.top1:.1%} estimates the acceptance rate; with {k} draft "
            f"tokens per step (draft step {1e3 * d.speed.decode_step_s:.2f} ms, target {1e3 * s.decode_step_s:.2f} ms) "
            f"the expected speed-up is {speedup:.2f}x (Leviathan et al. 2023, independent acceptances)"
        ),
    }


def model_size(top: ServingOption, candidates: list[ServingOption], ctx: Context) -> dict:
    """The largest model of this width the GPUs hold at the workload, at the top and the most compact format."""
    w = ctx.workload
    native = [c for c in candidates if c.speed is not None]
    compact = min(native, key=lambda c: c.plan.weight_bytes)

    def largest(c: ServingOption) -> int:
        layers = max_layers_that_fit(ctx.shape, c.fmt, c.kv_cache, ctx.gpu, ctx.gpus, w.batch, w.context, ctx.settings)
        return replace(ctx.shape, layers=layers).total_params if layers else 0

    at_top, at_compact = largest(top), largest(compact)
    low_bit = [c for c in candidates if c.audit is not None and c.fmt.weight is not None and c.fmt.weight.bits == 4]
    measured = "; ".join(f"the audit measured {c.name} at mean KL {c.audit.kld_mean:.3g}"
                         f" ({VERDICTS[c.audit.passed]})" for c in low_bit)
    return {
        "topic": "model_size",
        "max_params_at_top_format": at_top,
        "compact_format": compact.name,
        "max_params_at_compact_format": at_compact,
        "advice": (
            f"at {top.name} these {ctx.gpus}x {ctx.gpu.name} hold up to {at_top / 1e9:.2f}B parameters of this width at "
            f"this workload"
            + (f", at {compact.name} up to {at_compact / 1e9:.2f}B" if compact is not top else "")
            + ": for a fixed memory budget a larger model "
            "at 4 bit usually beats a smaller one at 8 or 16 bit (Dettmers & Zettlemoyer 2023, 'The case for 4-bit "
            "precision'); when post-training 4-bit loses too much, quantization-aware training or distillation "
            "(ModelOpt QAT/QAD) recovers it at training cost"
            + (f"; {measured}" if measured else "")
        ),
    }
