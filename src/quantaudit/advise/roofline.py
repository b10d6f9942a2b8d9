"""Speed estimate by the roofline: a kernel takes max(bytes moved / bandwidth, FLOPs / throughput).

A decode step at batch B (each sequence holding ``context`` tokens of KV cache) is two rooflines,
summed because the kernels run one after the other, per GPU of N:

* the weight GEMMs: the weights streamed once per step (every linear, lm_head and norms; the
  embedding table is only gathered row by row) against 2 x linear params x B FLOPs in the
  format's GEMM dtype plus the lm_head's 2 x vocab x hidden x B in fp16;
* attention: B x context x KV bytes per token read against 4 x layers x heads x head_dim x context
  x B FLOPs (QK^T and PV) in fp16. Every cached byte is used once per step, so this part is
  memory-bound at any batch.

Prefill of one ``context``-token prompt: the weights once and the KV written, against
2 x linear params x context + causal attention (2 x layers x heads x head_dim x context^2) FLOPs,
with the logits of the last token only.

Peak bandwidth and tensor throughput come from the datasheet table, scaled by the stated
efficiencies (:class:`Efficiency`): real kernels reach a fraction of peak. Tensor-parallel
all-reduce time and the dequantization work of weight-only kernels are not modelled, so the
estimates are upper bounds on speed; they rank formats, they do not replace a benchmark.

The crossover batch of a format is where its weight GEMMs turn from memory- to compute-bound:
``B* = weight streaming time / GEMM time per token``. Fewer weight bytes (INT4) move it down,
faster GEMMs (FP8/INT8 activations) move it up — which is why weight-only INT4 wins at batch 1
and W8A8/FP8 at large batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .hardware import GPU
from .model_shape import ModelShape
from .planner import ACT_BYTES, MemoryPlan


@dataclass(frozen=True)
class Efficiency:
    """Fractions of datasheet peak that real kernels sustain (assumptions; tune them to your measurements)."""

    bandwidth: float = 0.8  # decode GEMV / attention kernels stream memory at roughly 70-90% of peak
    flops: float = 0.6  # large GEMMs reach roughly 50-70% of dense tensor peak


@dataclass(frozen=True)
class SpeedEstimate:
    batch: int
    context: int
    weight_s: float  # streaming the weights once
    gemm_s: float  # GEMM FLOPs of one token per sequence at this batch
    kv_s: float  # reading the batch's KV cache once
    attn_s: float  # attention FLOPs of one token per sequence at this batch
    prefill_s: float

    def step_s(self, tokens_per_sequence: int = 1) -> float:
        """One forward pass processing ``tokens_per_sequence`` new tokens of every sequence."""
        return max(self.weight_s, tokens_per_sequence * self.gemm_s) + max(self.kv_s, tokens_per_sequence * self.attn_s)

    @property
    def decode_step_s(self) -> float:
        return self.step_s(1)

    @property
    def memory_bound(self) -> bool:
        """Whether the weight GEMMs are memory-bound at this batch."""
        return self.weight_s > self.gemm_s

    @property
    def crossover_batch(self) -> int:
        """First batch at which the weight GEMMs are compute-bound."""
        return max(1, math.ceil(self.weight_s / (self.gemm_s / self.batch)))

    @property
    def tokens_per_s_per_user(self) -> float:
        return 1.0 / self.decode_step_s

    @property
    def tokens_per_s(self) -> float:
        return self.batch / self.decode_step_s

    def describe(self) -> dict:
        return {
            "decode_tokens_per_s_per_user": self.tokens_per_s_per_user,
            "decode_tokens_per_s": self.tokens_per_s,
            "decode_step_ms": 1e3 * self.decode_step_s,
            "decode_bound": "memory" if self.memory_bound else "compute",
            "crossover_batch": self.crossover_batch,
            "prefill_s": self.prefill_s,
        }


def estimate_speed(shape: ModelShape, compute: str, plan: MemoryPlan, gpu: GPU, batch: int, context: int,
                   eff: Efficiency = Efficiency()) -> SpeedEstimate:
    """Decode and prefill time of ``plan``'s weights and KV cache for a format whose GEMMs run in ``compute``."""
    bandwidth = gpu.bandwidth * eff.bandwidth

    def flops(dtype: str) -> float:
        return gpu.flops[dtype] * eff.flops * plan.gpus

    weight_s = (plan.weight_bytes - shape.embedding_params * ACT_BYTES) / plan.gpus / bandwidth
    gemm_per_token = 2 * shape.linear_params / flops(compute) + 2 * shape.embedding_params / flops("fp16")
    kv_per_token = plan.kv_bytes_per_token_per_gpu / bandwidth
    attn_per_pair = 4 * shape.layers * shape.heads * shape.head_dim / flops("fp16")
    prefill_compute = (context * 2 * shape.linear_params / flops(compute) + 2 * shape.embedding_params / flops("fp16")
                       + context * context * attn_per_pair / 2)
    return SpeedEstimate(
        batch=batch,
        context=context,
        weight_s=weight_s,
        gemm_s=batch * gemm_per_token,
        kv_s=batch * context * kv_per_token,
        attn_s=batch * context * attn_per_pair,
        prefill_s=max(weight_s + context * kv_per_token, prefill_compute),
    )
