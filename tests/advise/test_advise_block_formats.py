"""The advisor and the block-scaled formats: NVFP4 and MX need Blackwell, FP8 block scales Hopper or
Blackwell sm100 (TensorRT-LLM docs/source/features/quantization.md, "Hardware Support Matrix"), and none of
them is ever recommended on a GPU that lacks the kernels."""

from __future__ import annotations

import pytest

from quantaudit.advise import Workload, advise
from quantaudit.advise.hardware import load_hardware
from quantaudit.advise.model_shape import reference_shape
from quantaudit.advise.planner import kv_bytes_per_token, linear_weight_bytes
from quantaudit.quant.formats import FORMATS

BLACKWELL = {"b200", "rtx-5090"}
HOPPER = {"h100-sxm", "h100-pcie", "h200"}
ALL = {"h100-sxm", "h100-pcie", "h200", "b200", "a100-40gb", "a100-80gb", "l40s", "l4", "rtx-4090", "rtx-5090"}
NATIVE_ON = {
    "nvfp4": BLACKWELL,  # NVFP4: Blackwell sm120 and sm100
    "nvfp4_awq": BLACKWELL,
    "mxfp4": BLACKWELL,  # MXFP4: Blackwell sm120 and sm100
    "w4a8_nvfp4_fp8": {"b200"},  # sm100-family TRTLLM-Gen kernels
    "mxfp8": {"b200"},
    "fp8_pb_wo": HOPPER | {"b200"},  # FP8 block scaling: Hopper and sm100/103, not sm120
}
BLOCK_FORMATS = set(NATIVE_ON)


@pytest.fixture(scope="module")
def table():
    return load_hardware()


def test_the_block_formats_are_all_covered():
    assert BLOCK_FORMATS == {n for n, f in FORMATS.items() if f.weight is not None and f.weight.block is not None}


@pytest.mark.parametrize("fmt", sorted(NATIVE_ON))
def test_native_only_where_tensorrt_llm_has_the_kernels(table, fmt):
    runs = {k for k, g in table.gpus.items() if g.runs(FORMATS[fmt], table.formats[fmt])}
    assert runs == NATIVE_ON[fmt]


@pytest.mark.parametrize("gpu", sorted(ALL))
def test_never_recommended_where_not_native(gpu):
    result = advise(params=8e9, gpu=gpu, workload=Workload(batch=4, context=2048))
    recommended = {r["format"] for r in result["recommendations"]}
    allowed = {f for f, on in NATIVE_ON.items() if gpu in on}
    assert recommended & BLOCK_FORMATS <= allowed
    native_rejections = {r["format"] for r in result["rejected"] if r["kind"] == "native"}
    assert BLOCK_FORMATS - allowed <= native_rejections


def test_b200_ranks_nvfp4_and_h100_never_does():
    b200 = advise(params=70e9, gpu="b200", workload=Workload(batch=1, context=4096))
    ranked = [r["format"] for r in b200["recommendations"]]
    assert "nvfp4" in ranked and "fp8_pb_wo" in ranked
    nvfp4 = next(r for r in b200["recommendations"] if r["format"] == "nvfp4")
    assert nvfp4["compute_dtype"] == "fp4" and nvfp4["trtllm_quant_algo"] == "NVFP4"
    h100 = advise(params=70e9, gpu="h100", workload=Workload(batch=1, context=4096))
    assert not {"nvfp4", "nvfp4_awq", "mxfp4", "mxfp8", "w4a8_nvfp4_fp8"} & {r["format"] for r in h100["recommendations"]}
    assert any("NVFP4" in n for n in b200["notes"]) and not any("NVFP4" in n for n in h100["notes"])


def test_weight_bytes_count_codes_and_block_scales():
    nvfp4, mxfp4, fp8_pb = FORMATS["nvfp4"], FORMATS["mxfp4"], FORMATS["fp8_pb_wo"]
    assert linear_weight_bytes(nvfp4, 4096, 4096, 128) == 4096 * 4096 * (4 + 8 / 16) / 8
    assert linear_weight_bytes(mxfp4, 4096, 4096, 128) == 4096 * 4096 * (4 + 8 / 32) / 8
    assert linear_weight_bytes(nvfp4, 64, 172, 128) == 64 * 172 * 2  # no whole blocks: kept 16-bit, as the engine does
    assert linear_weight_bytes(fp8_pb, 64, 172, 128) == 64 * 172 * (8 + 32 / 128**2) / 8  # partial tiles are fine


def test_nvfp4_kv_cache_bytes_include_its_block_scales():
    shape = reference_shape("Llama-3.2-1B")
    assert kv_bytes_per_token(shape, "nvfp4") == kv_bytes_per_token(shape, "fp8") * 4.5 / 8
