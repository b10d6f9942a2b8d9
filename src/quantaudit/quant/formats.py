"""The quantization formats TensorRT-LLM runs, as data.

Names follow NVIDIA ModelOpt / TensorRT-LLM ``--qformat`` so users recognise them; each entry
says how weights and activations are rounded, which calibration algorithm prepares the
weights, and which TensorRT-LLM ``quant_algo`` the exported checkpoint declares. Code reads
these fields; it never branches on a format's name.

``trtllm_quant_algo`` names the TensorRT-LLM layout that runs what the engine computes, which is not
always ModelOpt's name for the ``--qformat``: ``int8_sq`` (dynamic per-token activations) is
``W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN`` (TensorRT-LLM's ``models/llama/convert.py`` SmoothQuant
layout); ModelOpt's ``int8_sq`` is our ``int8_sq_static`` (one static activation scale,
``W8A8_SQ_PER_CHANNEL``). TensorRT-LLM's ``W4A16`` is per-channel INT4 that TensorRT-LLM quantizes
itself, and ``W4A16_GPTQ`` checkpoints need weights preprocessed by its compiled ops, so the per-group
``int4_wo`` and ``int4_gptq`` are ``W4A16_AWQ`` without a pre-quant scale (``pre_quant_scale: false``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..errors import UserError

GROUP_SIZES = (128, 64)  # the INT4 group sizes TensorRT-LLM's kernels take
SCALE_SEARCHES = ("mse", "amax")  # GPTQ group scales (quant.gptq): MSE-searched shrink of amax, or plain amax

Kind = Literal["int", "fp8", "fp4"]  # fp4 = E2M1 (quant.numerics)


@dataclass(frozen=True)
class BlockScale:
    """One scale per block of ``size`` consecutive inputs (``rows`` output rows), the block-scaled formats.

    ``scale``: how a block scale is stored - ``"e4m3"`` (NVFP4: FP8 E4M3, relative to one FP32 global
    scale per tensor, ``amax / global_max``), ``"e8m0"`` (OCP MX: a power of two) or ``"fp32"``.
    ``partial``: TensorRT-LLM accepts a partial last block (FP8 block scales are ceil(out/128) x
    ceil(in/128)); otherwise a layer whose input size the block does not divide stays unquantized
    (TensorRT-LLM's FP4 linears assert ``in_features % 16 == 0``).
    """

    size: int
    scale: Literal["e4m3", "e8m0", "fp32"]
    global_max: float | None = None
    rows: int = 1
    partial: bool = False

    @property
    def scale_bits(self) -> int:
        return 32 if self.scale == "fp32" else 8


@dataclass(frozen=True)
class WeightQuant:
    """How a linear layer's weight is stored."""

    kind: Kind
    bits: int
    granularity: Literal["tensor", "channel", "group", "block"]  # channel = per output channel
    # W4A8: the kernel converts the dequantized INT4 weight to FP8 with one more per-tensor scale
    # (ModelOpt's SequentialQuantizer [INT4 block, FP8 tensor]; ``weights_scaling_factor_2``).
    requant: Kind | None = None
    block: BlockScale | None = None  # granularity "block"
    # TensorRT-LLM quantizes the weight itself when it loads the checkpoint (W8A16): the engine computes
    # exactly that (quant.weightonly), not ModelOpt's amax / 127 grid, which never reaches the kernel.
    quantized_at_load: bool = False
    # TensorRT-LLM's groupwise INT4 layers (quantization/layers.py WeightOnlyGroupwiseQuantLinear) pad in and
    # out features to a multiple of max(this, group size) x tp and then need checkpoint tensors of that shape.
    pad_multiple: int | None = None


@dataclass(frozen=True)
class ActQuant:
    """How a linear layer's input activation is rounded at run time."""

    kind: Kind
    bits: int
    granularity: Literal["tensor", "token", "block"]
    dynamic: bool  # False: one static scale from calibration (a block format's global); True: computed per call
    block: BlockScale | None = None  # granularity "block": per-block scales computed per call


@dataclass(frozen=True)
class QuantFormat:
    name: str
    weight: WeightQuant | None
    act: ActQuant | None
    algorithm: Literal["none", "rtn", "smoothquant", "awq", "awq_lite", "gptq"]
    # What the exported TensorRT-LLM checkpoint declares (tensorrt_llm/quantization/mode.py QuantAlgo), i.e. the
    # kernels that run it; the exporter writes this value (export.layout reads it from here).
    trtllm_quant_algo: str | None
    description: str


FP8 = dict(kind="fp8", bits=8)
INT8 = dict(kind="int", bits=8)
INT4 = dict(kind="int", bits=4)
FP4 = dict(kind="fp4", bits=4)

# The block-scaled formats, as ModelOpt's configs define them (modelopt/torch/quantization/config.py):
# NVFP4_DEFAULT_CFG / NVFP4_AWQ_LITE_CFG: E2M1, blocks of 16, E4M3 block scales ("scale_bits": (4, 3)),
# global scale amax / (6 * 448) (NVFP4QTensor); W4A8_NVFP4_FP8_CFG: the same weights in blocks of 32
# with global amax / 448 ("the kernel dequantizes weight to fp8", quant_utils.get_weight_scaling_factor);
# MXFP4_DEFAULT_CFG / MXFP8_DEFAULT_CFG: E2M1 / E4M3 in blocks of 32 with E8M0 scales ("scale_bits":
# (8, 0)); FP8_2D_BLOCKWISE_WEIGHT_ONLY_CFG: E4M3 with one scale per 128 x 128 block.
# Where we differ: W4A8_NVFP4_FP8's kernel converts code x block scale to FP8 before its GEMM; that
# rounding is not simulated (the product is kept exact). MXFP4 is weight-only here, TensorRT-LLM's dense
# W4A16_MXFP4 (ModelOpt's MXFP4_DEFAULT_CFG also rounds activations). fp8_pb_wo keeps activations
# unquantized as ModelOpt's weight-only config does; TensorRT-LLM's FP8_BLOCK_SCALES GEMMs also round
# activations to FP8 per 1x128 block at run time, which the audit does not include.
NVFP4_BLOCK = BlockScale(16, "e4m3", global_max=6 * 448.0)
W4A8_NVFP4_BLOCK = BlockScale(32, "e4m3", global_max=448.0)
MX_BLOCK = BlockScale(32, "e8m0")
FP8_2D_BLOCK = BlockScale(128, "fp32", rows=128, partial=True)

FORMATS: dict[str, QuantFormat] = {
    f.name: f
    for f in [
        QuantFormat("none", None, None, "none", None, "baseline, unquantized"),
        QuantFormat(
            "fp8",
            WeightQuant(**FP8, granularity="tensor"),
            ActQuant(**FP8, granularity="tensor", dynamic=False),
            "rtn",
            "FP8",
            "FP8 E4M3 weights and activations, per-tensor scales (activation scale from calibration)",
        ),
        QuantFormat(
            "fp8_pc_pt",
            WeightQuant(**FP8, granularity="channel"),
            ActQuant(**FP8, granularity="token", dynamic=True),
            "rtn",
            "FP8_PER_CHANNEL_PER_TOKEN",
            "FP8 E4M3 weights per output channel, activations per token (dynamic)",
        ),
        QuantFormat(
            "int8_wo",
            WeightQuant(**INT8, granularity="channel", quantized_at_load=True),
            None,
            "rtn",
            "W8A16",
            "INT8 weight-only per output channel, as TensorRT-LLM quantizes it at load (max|w|/128, round half away)",
        ),
        QuantFormat(
            "int4_wo",
            WeightQuant(**INT4, granularity="group", pad_multiple=64),
            None,
            "rtn",
            "W4A16_AWQ",  # TensorRT-LLM's W4A16 is per channel, quantized by itself at load; per group is the AWQ layout
            "INT4 weight-only, symmetric per group, round-to-nearest",
        ),
        QuantFormat(
            "int8_sq",
            WeightQuant(**INT8, granularity="channel"),
            ActQuant(**INT8, granularity="token", dynamic=True),
            "smoothquant",
            "W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN",  # W8A8_SQ_PER_CHANNEL has one static activation scale
            "SmoothQuant: INT8 weights per channel, INT8 activations per token (dynamic)",
        ),
        QuantFormat(
            "int8_sq_static",
            WeightQuant(**INT8, granularity="channel"),
            ActQuant(**INT8, granularity="tensor", dynamic=False),
            "smoothquant",
            "W8A8_SQ_PER_CHANNEL",
            "SmoothQuant with one static per-tensor activation scale",
        ),
        QuantFormat(
            "int8_w8a8_nosmooth",
            WeightQuant(**INT8, granularity="channel"),
            ActQuant(**INT8, granularity="token", dynamic=True),
            "rtn",
            "W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN",
            "INT8 W8A8 per-channel/per-token without smoothing (the control for int8_sq)",
        ),
        QuantFormat(
            "int4_awq",
            WeightQuant(**INT4, granularity="group", pad_multiple=64),
            None,
            "awq",
            "W4A16_AWQ",
            "INT4 weight-only per group after AWQ scale and clip search",
        ),
        QuantFormat(
            "int4_gptq",
            WeightQuant(**INT4, granularity="group", pad_multiple=64),
            None,
            "gptq",
            "W4A16_AWQ",  # W4A16_GPTQ checkpoints hold weights preprocessed by TensorRT-LLM's compiled ops
            "INT4 weight-only per group by GPTQ",
        ),
        QuantFormat(
            "w4a8_awq",
            WeightQuant(**INT4, granularity="group", requant="fp8", pad_multiple=128),
            ActQuant(**FP8, granularity="tensor", dynamic=False),
            "awq",
            "W4A8_AWQ",
            "INT4 AWQ weights, FP8 per-tensor static activations",
        ),
        QuantFormat(
            "nvfp4",
            WeightQuant(**FP4, granularity="block", block=NVFP4_BLOCK),
            ActQuant(**FP4, granularity="block", dynamic=False, block=NVFP4_BLOCK),
            "rtn",
            "NVFP4",
            "NVFP4: E2M1 weights and activations, E4M3 scale per 16 inputs x FP32 global (activation global calibrated)",
        ),
        QuantFormat(
            "nvfp4_awq",
            WeightQuant(**FP4, granularity="block", block=NVFP4_BLOCK),
            ActQuant(**FP4, granularity="block", dynamic=False, block=NVFP4_BLOCK),
            "awq_lite",
            "NVFP4_AWQ",
            "NVFP4 after an AWQ scale search (ModelOpt awq_lite: no clip search); pre-quant scale on the input",
        ),
        QuantFormat(
            "w4a8_nvfp4_fp8",
            WeightQuant(**FP4, granularity="block", block=W4A8_NVFP4_BLOCK),
            ActQuant(**FP8, granularity="tensor", dynamic=False),
            "rtn",
            "W4A8_NVFP4_FP8",
            "E2M1 weights, E4M3 scale per 32 inputs x FP32 global (amax/448); FP8 per-tensor static activations",
        ),
        QuantFormat(
            "mxfp4",
            WeightQuant(**FP4, granularity="block", block=MX_BLOCK),
            None,
            "rtn",
            "W4A16_MXFP4",
            "MXFP4 weight-only: E2M1 with a power-of-two (E8M0) scale per 32 inputs",
        ),
        QuantFormat(
            "mxfp8",
            WeightQuant(**FP8, granularity="block", block=MX_BLOCK),
            ActQuant(**FP8, granularity="block", dynamic=True, block=MX_BLOCK),
            "rtn",
            "MXFP8",
            "MXFP8: E4M3 weights and activations with a power-of-two (E8M0) scale per 32 inputs",
        ),
        QuantFormat(
            "fp8_pb_wo",
            WeightQuant(**FP8, granularity="block", block=FP8_2D_BLOCK),
            None,
            "rtn",
            "FP8_BLOCK_SCALES",
            "FP8 E4M3 weights with one FP32 scale per 128x128 block; activations unquantized",
        ),
    ]
}


@dataclass(frozen=True)
class KVCacheFormat:
    name: str
    kind: Kind | None
    bits: int  # bits per cached element code
    trtllm_kv_cache_quant_algo: str | None
    block: BlockScale | None = None  # NVFP4: E4M3 scale per 16 head_dim elements under the calibrated global

    @property
    def storage_bits(self) -> float:
        """Bits per cached element including block scales."""
        return self.bits + (self.block.scale_bits / self.block.size if self.block else 0)


KV_CACHE_FORMATS: dict[str, KVCacheFormat] = {
    "none": KVCacheFormat("none", None, 16, None),  # fp16/bf16 cache in the engine
    "fp8": KVCacheFormat("fp8", "fp8", 8, "FP8"),
    "int8": KVCacheFormat("int8", "int", 8, "INT8"),
    # ModelOpt NVFP4_KV_CFG: k/v_bmm_quantizer E2M1 in blocks of 16 along head_dim, dynamic E4M3 block
    # scales, global amax / (6 * 448) from max calibration.
    "nvfp4": KVCacheFormat("nvfp4", "fp4", 4, "NVFP4", NVFP4_BLOCK),
}
# How a quantized KV cache's K and V are scaled per layer (quant.kvcache): "shared", one scale from
# max(K amax, V amax) as TensorRT-LLM checkpoints hold it (the default), or "separate".
KV_SCALES = ("shared", "separate")


def get_format(name: str) -> QuantFormat:
    """Look a format up by name; an unknown name lists the valid ones."""
    try:
        return FORMATS[name]
    except KeyError:
        raise UserError(f"unknown format {name!r}; valid formats: {', '.join(FORMATS)}") from None


def get_kv_cache_format(name: str) -> KVCacheFormat:
    try:
        return KV_CACHE_FORMATS[name]
    except KeyError:
        raise UserError(
            f"unknown KV-cache format {name!r}; valid: {', '.join(KV_CACHE_FORMATS)}"
        ) from None


def weight_bits(fmt: QuantFormat, in_features: int, group_size: int, fallback_bits: int = 16) -> float:
    """Storage bits per weight element including scales, as the TensorRT-LLM checkpoint holds them.

    Scales are float32 for per-tensor/per-channel formats and fp16 per group for INT4 (TensorRT-LLM
    keeps group scales in the activation dtype); an unquantized weight costs ``fallback_bits``.
    Per-channel scale cost is amortised over ``in_features``; block scales (8-bit E4M3/E8M0, FP32 for
    FP8 2-D blocks) over their block, the NVFP4 global scale is negligible.
    """
    w = fmt.weight
    if w is None:
        return float(fallback_bits)
    if w.block is not None:
        return w.bits + w.block.scale_bits / (w.block.size * w.block.rows)
    if w.granularity == "group":
        return w.bits + 16.0 / group_size
    if w.granularity == "channel":
        return w.bits + 32.0 / in_features
    return float(w.bits)  # one scale per tensor: negligible
