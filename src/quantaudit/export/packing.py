"""INT4 and FP4 packing and tensor-parallel sharding of checkpoint tensors.

INT4 packing follows ModelOpt's ``quant_utils.pack_int4_in_uint8``: codes [out, in] in [-8, 7] become
[out/2, in] bytes, byte (j, i) = (code[2j, i] & 0xF) | (code[2j+1, i] & 0xF) << 4 - two adjacent
*output* channels per byte, the even one in the low nibble. The TensorRT-LLM checkpoint views the
bytes as int8 (``pack_linear_weights``), the unified HF checkpoint keeps uint8.

FP4 (E2M1) packing follows ModelOpt's ``NVFP4QTensor.quantize``: ``(q[..., 1::2] << 4) | q[..., 0::2]``,
codes [out, in] (4-bit patterns) become [out, in/2] uint8 - two adjacent *input* elements per byte, the
even one in the low nibble - kept uint8 in the TensorRT-LLM checkpoint too.
"""

from __future__ import annotations

import torch


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """[out, in] int8 codes in [-8, 7] -> [out/2, in] uint8."""
    if codes.shape[0] % 2:
        raise ValueError(f"cannot pack {codes.shape[0]} output channels two per byte")
    nibbles = codes.to(torch.int16) & 0xF
    return (nibbles[0::2] | (nibbles[1::2] << 4)).to(torch.uint8)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """[out/2, in] uint8 or int8 bytes -> [out, in] int8 codes in [-8, 7]."""
    b = packed.view(torch.uint8).to(torch.int16)
    nibbles = torch.stack([b & 0xF, b >> 4], dim=1)  # [out/2, 2, in]
    signed = nibbles - 16 * (nibbles >= 8)
    return signed.reshape(-1, packed.shape[1]).to(torch.int8)


def pack_fp4(codes: torch.Tensor) -> torch.Tensor:
    """[out, in] uint8 E2M1 codes (0-15) -> [out, in/2] uint8."""
    if codes.shape[1] % 2:
        raise ValueError(f"cannot pack {codes.shape[1]} inputs two per byte")
    nibbles = codes.to(torch.uint8) & 0xF
    return nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    """[out, in/2] uint8 bytes -> [out, in] uint8 E2M1 codes."""
    b = packed.view(torch.uint8)
    return torch.stack([b & 0xF, b >> 4], dim=-1).reshape(packed.shape[0], -1)


# TensorSpec.pack_axis -> (pack, unpack): which dimension's neighbours share a byte.
PACKINGS = {"out": (pack_int4, unpack_int4), "in": (pack_fp4, unpack_fp4)}


def shard(t: torch.Tensor, axis: int | None, tp: int, rank: int) -> torch.Tensor:
    """Rank ``rank``'s equal part of ``t`` along ``axis`` (the whole tensor if ``axis`` is None)."""
    if axis is None or tp == 1:
        return t
    return torch.chunk(t, tp, dim=axis)[rank]


def unshard(parts: list[torch.Tensor], axis: int | None) -> torch.Tensor:
    """Inverse of :func:`shard`: ranks' parts concatenated (replicated tensors: rank 0's)."""
    return parts[0] if axis is None or len(parts) == 1 else torch.cat(parts, dim=axis)
