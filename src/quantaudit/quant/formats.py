"""The quantization formats TensorRT-LLM runs, as data.

Names follow NVIDIA ModelOpt / TensorRT-LLM ``--qformat`` so users recognise them; each entry
says how weights and activations are rounded, which calibration algorithm prepares the
weights, and which TensorRT-LLM ``quant_algo`` the exported checkpoint declares. Code reads
these fields; it never branches on a format's name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..errors import UserError

Kind = Literal["int", "fp8"]


@dataclass(frozen=True)
class WeightQuant:
    """How a linear layer's weight is stored."""

    kind: Kind
    bits: int
    granularity: Literal["tensor", "channel", "group"]  # channel = per output channel
    # W4A8: the kernel converts the dequantized INT4 weight to FP8 with one more per-tensor scale
    # (ModelOpt's SequentialQuantizer [INT4 block, FP8 tensor]; ``weights_scaling_factor_2``).
    requant: Kind | None = None


@dataclass(frozen=True)
class ActQuant:
    """How a linear layer's input activation is rounded at run time."""

    kind: Kind
    bits: int
    granularity: Literal["tensor", "token"]
    dynamic: bool  # False: one static scale from calibration; True: computed per call


@dataclass(frozen=True)
class QuantFormat:
    name: str
    weight: WeightQuant | None
    act: ActQuant | None
    algorithm: Literal["none", "rtn", "smoothquant", "awq", "gptq"]
    trtllm_quant_algo: str | None
    description: str


FP8 = dict(kind="fp8", bits=8)
INT8 = dict(kind="int", bits=8)
INT4 = dict(kind="int", bits=4)

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
            WeightQuant(**INT8, granularity="channel"),
            None,
            "rtn",
            "W8A16",
            "INT8 weight-only, symmetric per output channel",
        ),
        QuantFormat(
            "int4_wo",
            WeightQuant(**INT4, granularity="group"),
            None,
            "rtn",
            "W4A16",
            "INT4 weight-only, symmetric per group, round-to-nearest",
        ),
        QuantFormat(
            "int8_sq",
            WeightQuant(**INT8, granularity="channel"),
            ActQuant(**INT8, granularity="token", dynamic=True),
            "smoothquant",
            "W8A8_SQ_PER_CHANNEL",
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
            "W8A8_SQ_PER_CHANNEL",
            "INT8 W8A8 per-channel/per-token without smoothing (the control for int8_sq)",
        ),
        QuantFormat(
            "int4_awq",
            WeightQuant(**INT4, granularity="group"),
            None,
            "awq",
            "W4A16_AWQ",
            "INT4 weight-only per group after AWQ scale and clip search",
        ),
        QuantFormat(
            "int4_gptq",
            WeightQuant(**INT4, granularity="group"),
            None,
            "gptq",
            "W4A16_GPTQ",
            "INT4 weight-only per group by GPTQ",
        ),
        QuantFormat(
            "w4a8_awq",
            WeightQuant(**INT4, granularity="group", requant="fp8"),
            ActQuant(**FP8, granularity="tensor", dynamic=False),
            "awq",
            "W4A8_AWQ",
            "INT4 AWQ weights, FP8 per-tensor static activations",
        ),
    ]
}


@dataclass(frozen=True)
class KVCacheFormat:
    name: str
    kind: Kind | None
    bits: int  # bits per cached element
    trtllm_kv_cache_quant_algo: str | None


KV_CACHE_FORMATS: dict[str, KVCacheFormat] = {
    "none": KVCacheFormat("none", None, 16, None),  # fp16/bf16 cache in the engine
    "fp8": KVCacheFormat("fp8", "fp8", 8, "FP8"),
    "int8": KVCacheFormat("int8", "int", 8, "INT8"),
}


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
    Per-channel scale cost is amortised over ``in_features``.
    """
    w = fmt.weight
    if w is None:
        return float(fallback_bits)
    if w.granularity == "group":
        return w.bits + 16.0 / group_size
    if w.granularity == "channel":
        return w.bits + 32.0 / in_features
    return float(w.bits)  # one scale per tensor: negligible
