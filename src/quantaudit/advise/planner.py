"""Memory planner: weights, KV cache and activation workspace on N GPUs, as TensorRT-LLM lays them out.

* Weights: every decoder linear at ``formats.weight_bits`` of its shape (codes plus scales), with the
  group size each layer really gets (quant.engine: 128, else 64, else kept 16-bit; block formats stay
  16-bit where their block does not divide the input size); embeddings,
  lm_head and norms at 16 bit. A tied lm_head is counted separately, as the TensorRT-LLM checkpoint
  stores it (``share_embedding_table: false`` in ModelOpt's export, ../shared/reference).
* KV cache: layers x KV heads x head_dim x 2 (K and V) x bytes of the KV dtype per token. With
  tensor parallelism each GPU holds ceil(KV heads / N) heads (TensorRT-LLM replicates KV heads
  when N exceeds them); TensorRT-LLM's paged cache allocates ``tokens_per_block``-token blocks.
* KV capacity: TensorRT-LLM gives the KV cache ``kv_free_fraction`` of the memory left after
  weights and activations (``KvCacheConfig.free_gpu_memory_fraction``, default 0.9).
* Activation workspace: TensorRT-LLM sizes it at build time for ``max_num_tokens`` tokens in flight
  (default 8192) and reuses it across layers; we estimate one layer's live tensors for that many
  tokens (residual and normed input, q/k/v, attention output, gate/up/activation) at 16 bit, plus
  fp16 logits for the batch. Weights and KV cache are split over the N GPUs; the workspace is
  counted in full on each.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from ..quant.formats import QuantFormat, get_kv_cache_format, weight_bits
from .hardware import GPU
from .model_shape import ModelShape

ACT_BYTES = 2  # fp16/bf16 activations, logits and unquantized weights


@dataclass(frozen=True)
class PlannerSettings:
    group_size: int = 128  # ModelOpt INT4 AWQ block size (INT4_AWQ_CFG block_sizes {-1: 128})
    kv_free_fraction: float = 0.9  # TensorRT-LLM KvCacheConfig.free_gpu_memory_fraction default
    max_num_tokens: int = 8192  # TensorRT-LLM build default
    tokens_per_block: int = 32  # TensorRT-LLM KvCacheConfig.tokens_per_block default


@dataclass(frozen=True)
class MemoryPlan:
    weight_bytes: float  # whole model
    kv_bytes_per_token: float  # whole model
    activation_bytes_per_gpu: float
    gpu_bytes: float  # memory of one GPU
    gpus: int
    weight_bytes_per_gpu: float
    kv_bytes_per_token_per_gpu: float
    kv_capacity_bytes_per_gpu: float  # 0 when weights and workspace do not fit
    kv_capacity_tokens: int
    tokens_per_block: int
    context: int
    batch: int

    @property
    def weights_fit(self) -> bool:
        return self.weight_bytes_per_gpu + self.activation_bytes_per_gpu <= self.gpu_bytes

    def tokens_reserved(self, context: int) -> int:
        return math.ceil(context / self.tokens_per_block) * self.tokens_per_block

    @property
    def max_batch(self) -> int:
        """Concurrent sequences of ``context`` tokens that fit."""
        return self.kv_capacity_tokens // self.tokens_reserved(self.context)

    @property
    def max_context(self) -> int:
        """Longest context each of ``batch`` sequences can hold (whole blocks)."""
        blocks = self.kv_capacity_tokens // self.tokens_per_block // self.batch
        return blocks * self.tokens_per_block

    @property
    def fits(self) -> bool:
        return self.weights_fit and self.max_batch >= self.batch

    def describe(self) -> dict:
        return {
            "weight_bytes": self.weight_bytes,
            "kv_bytes_per_token": self.kv_bytes_per_token,
            "activation_bytes_per_gpu": self.activation_bytes_per_gpu,
            "weight_bytes_per_gpu": self.weight_bytes_per_gpu,
            "kv_capacity_bytes_per_gpu": self.kv_capacity_bytes_per_gpu,
            "kv_capacity_tokens": self.kv_capacity_tokens,
            "max_batch_at_context": self.max_batch,
            "max_context_at_batch": self.max_context,
            "fits": self.fits,
        }


def linear_weight_bytes(fmt: QuantFormat, out_features: int, in_features: int, group_size: int) -> float:
    """Bytes of one linear in ``fmt``: codes and scales, or 16 bit where the engine keeps it unquantized."""
    from ..quant.engine import block_size_for, group_size_for

    if fmt.weight is not None and fmt.weight.granularity == "group":
        group, _ = group_size_for(in_features, group_size)
        if group is None:
            return out_features * in_features * ACT_BYTES
        group_size = group
    elif fmt.weight is not None and fmt.weight.block is not None and block_size_for(in_features, fmt)[0] is None:
        return out_features * in_features * ACT_BYTES
    return out_features * in_features * weight_bits(fmt, in_features, group_size) / 8


def weight_bytes(shape: ModelShape, fmt: QuantFormat, group_size: int = 128) -> float:
    """Weight bytes of the TensorRT-LLM checkpoint in ``fmt`` (see the module docstring)."""
    per_layer = sum(linear_weight_bytes(fmt, o, i, group_size) for _, o, i in shape.layer_linears())
    sixteen_bit = 2 * shape.embedding_params + shape.norm_params  # vocab embedding, lm_head, norms
    return shape.layers * per_layer + sixteen_bit * ACT_BYTES


def kv_bytes_per_token(shape: ModelShape, kv_cache: str, kv_heads: int | None = None) -> float:
    """Bytes one token occupies in the KV cache over all layers, K and V."""
    heads = shape.kv_heads if kv_heads is None else kv_heads
    return shape.layers * heads * shape.head_dim * 2 * get_kv_cache_format(kv_cache).storage_bits / 8


def activation_bytes(shape: ModelShape, batch: int, max_num_tokens: int) -> float:
    """Workspace estimate of one GPU (see the module docstring)."""
    q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    live_per_token = 2 * shape.hidden + (q + 2 * kv) + q + 3 * shape.intermediate
    return (max_num_tokens * live_per_token + batch * shape.vocab) * ACT_BYTES


def plan_memory(shape: ModelShape, fmt: QuantFormat, kv_cache: str, gpu: GPU, gpus: int, batch: int,
                context: int, settings: PlannerSettings = PlannerSettings(),
                extra_weight_bytes: float = 0.0) -> MemoryPlan:
    """Where the memory of ``gpus`` x ``gpu`` goes for ``batch`` sequences of ``context`` tokens.

    ``extra_weight_bytes`` adds weights held alongside (a speculative-decoding draft model).
    """
    weights = weight_bytes(shape, fmt, settings.group_size) + extra_weight_bytes
    per_gpu_weights = weights / gpus
    act = activation_bytes(shape, batch, settings.max_num_tokens)
    kv_per_gpu = kv_bytes_per_token(shape, kv_cache, math.ceil(shape.kv_heads / gpus))
    capacity = max(0.0, settings.kv_free_fraction * (gpu.memory_bytes - per_gpu_weights - act))
    return MemoryPlan(
        weight_bytes=weights,
        kv_bytes_per_token=kv_bytes_per_token(shape, kv_cache),
        activation_bytes_per_gpu=act,
        gpu_bytes=gpu.memory_bytes,
        gpus=gpus,
        weight_bytes_per_gpu=per_gpu_weights,
        kv_bytes_per_token_per_gpu=kv_per_gpu,
        kv_capacity_bytes_per_gpu=capacity,
        kv_capacity_tokens=int(capacity // kv_per_gpu),
        tokens_per_block=settings.tokens_per_block,
        context=context,
        batch=batch,
    )


def max_layers_that_fit(shape: ModelShape, fmt: QuantFormat, kv_cache: str, gpu: GPU, gpus: int, batch: int,
                        context: int, settings: PlannerSettings = PlannerSettings()) -> int:
    """How many decoder layers of this width fit with the workload's KV cache (0 if none).

    Memory is linear in the layer count, so this solves
    ``fixed + L * (layer weights / N + KV of batch x context / fraction) <= GPU memory - workspace``.
    """
    one = plan_memory(replace(shape, layers=1), fmt, kv_cache, gpu, gpus, batch, context, settings)
    two = plan_memory(replace(shape, layers=2), fmt, kv_cache, gpu, gpus, batch, context, settings)
    per_layer_weights = two.weight_bytes_per_gpu - one.weight_bytes_per_gpu
    fixed_weights = one.weight_bytes_per_gpu - per_layer_weights
    kv_per_layer = batch * one.tokens_reserved(context) * one.kv_bytes_per_token_per_gpu / settings.kv_free_fraction
    room = gpu.memory_bytes - one.activation_bytes_per_gpu - fixed_weights
    return max(0, math.floor(room / (per_layer_weights + kv_per_layer)))
