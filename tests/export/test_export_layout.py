"""INT4 packing against ModelOpt's pack_int4_in_uint8 semantics, sharding, and the layout table's coverage."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from quantaudit.export.layout import HF, TRTLLM, TRTLLM_REFUSED, Dims, split_axis
from quantaudit.export.packing import pack_int4, shard, unpack_int4, unshard
from quantaudit.quant.formats import FORMATS

# TensorRT-LLM's QuantAlgo names (tensorrt_llm/quantization/mode.py) that a checkpoint may declare.
TRTLLM_QUANT_ALGOS = {"W8A16", "W4A16", "W4A16_AWQ", "W4A8_AWQ", "W8A16_GPTQ", "W4A16_GPTQ", "W8A8_SQ_PER_CHANNEL",
                      "W8A8_SQ_PER_TENSOR_PLUGIN", "W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN",
                      "W8A8_SQ_PER_CHANNEL_PER_TENSOR_PLUGIN", "W8A8_SQ_PER_TENSOR_PER_TOKEN_PLUGIN", "FP8",
                      "FP8_PER_CHANNEL_PER_TOKEN", "MIXED_PRECISION", "NVFP4", "W4A8_NVFP4_FP8"}


def test_pack_puts_adjacent_output_channels_in_one_byte_low_nibble_first():
    codes = torch.tensor([[-8, 1], [7, -1], [0, 3], [-2, -3]], dtype=torch.int8)  # [out=4, in=2]
    packed = pack_int4(codes)
    # byte (j, i) = (code[2j, i] & 0xF) | (code[2j+1, i] & 0xF) << 4
    assert packed.tolist() == [[0x78, 0xF1], [0xE0, 0xD3]]
    assert packed.dtype == torch.uint8 and torch.equal(unpack_int4(packed.view(torch.int8)), codes)


def test_pack_equals_modelopt_transpose_reshape_formulation():
    codes = torch.randint(-8, 8, (6, 10), dtype=torch.int8)
    t = codes.numpy().T.reshape(10, 3, 2)  # ModelOpt: int8_tensor.T.reshape(in, out // 2, 2)
    expected = ((t[..., 0] & 0x0F) | ((t[..., 1] & 0x0F) << 4)).T.astype(np.uint8)
    assert np.array_equal(pack_int4(codes).numpy(), expected)
    assert torch.equal(unpack_int4(pack_int4(codes)), codes)


def test_odd_output_channels_cannot_be_packed():
    with pytest.raises(ValueError, match="cannot pack 3"):
        pack_int4(torch.zeros(3, 4, dtype=torch.int8))


def test_shard_and_unshard_are_inverse():
    t = torch.arange(24.0).reshape(4, 6)
    parts = [shard(t, 1, 3, r) for r in range(3)]
    assert [p.tolist() for p in parts][1] == [[2, 3], [8, 9], [14, 15], [20, 21]]
    assert torch.equal(unshard(parts, 1), t) and shard(t, None, 3, 2) is t


def test_split_axis_and_rank_shapes():
    assert split_axis(("out", "in"), "column") == 0 and split_axis(("out", "in"), "row") == 1
    assert split_axis(("1", "out"), "column") == 1 and split_axis(("1",), "row") is None
    dims = Dims(out=128, inp=64, group=32)
    assert dims.shape(("out/2", "in"), "column", 2) == (32, 64)
    assert dims.shape(("out", "in/g"), "row", 2) == (128, 1)


def test_every_quantized_format_has_a_trtllm_layout_tensorrt_llm_knows():
    quantized = {n for n, f in FORMATS.items() if f.weight is not None}
    assert set(TRTLLM) | set(TRTLLM_REFUSED) == quantized and not set(TRTLLM) & set(TRTLLM_REFUSED)
    assert set(TRTLLM_REFUSED) == {"mxfp4", "mxfp8", "fp8_pb_wo"}
    # ModelOpt's NVFP4_AWQ is no TensorRT-LLM QuantAlgo: only a layout that says so (a caveat) may declare it
    assert all(s.quant_algo in TRTLLM_QUANT_ALGOS or s.caveat for s in TRTLLM.values())
    assert {n for n, s in TRTLLM.items() if s.quant_algo not in TRTLLM_QUANT_ALGOS} == {"nvfp4_awq"}
    block = {n for n, f in FORMATS.items() if f.weight is not None and f.weight.block is not None}
    assert set(HF) == quantized - {"int8_sq", "int8_sq_static", "int8_w8a8_nosmooth"} - block


def test_layouts_declare_the_registry_quant_algo():
    """The exporter writes quant.formats' trtllm_quant_algo, not a mapping of its own, and the registry names the
    TensorRT-LLM layout that runs what the engine computes (tensorrt_llm/quantization/mode.py QuantAlgo)."""
    for table in (TRTLLM, HF):
        for name, storage in table.items():
            assert storage.quant_algo == FORMATS[name].trtllm_quant_algo == FORMATS[storage.reader_format].trtllm_quant_algo
    algos = {n: f.trtllm_quant_algo for n, f in FORMATS.items()}
    assert algos["int8_sq"] == algos["int8_w8a8_nosmooth"] == "W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN"  # per-token dynamic
    assert algos["int8_sq_static"] == "W8A8_SQ_PER_CHANNEL"  # one static activation scale
    assert algos["int4_wo"] == algos["int4_gptq"] == algos["int4_awq"] == "W4A16_AWQ"  # per group, TensorRT-LLM-loadable
    assert (algos["int8_wo"], algos["w4a8_awq"], algos["fp8_pc_pt"]) == ("W8A16", "W4A8_AWQ", "FP8_PER_CHANNEL_PER_TOKEN")
    assert {a for n, a in algos.items() if n in TRTLLM and a not in TRTLLM_QUANT_ALGOS} == {"NVFP4_AWQ"}
