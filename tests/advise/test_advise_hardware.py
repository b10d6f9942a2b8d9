"""The GPU table: datasheet figures, native-format rules, lookup and user hardware files."""

from __future__ import annotations

import re
from importlib import resources

import pytest

from quantaudit.advise.hardware import load_hardware
from quantaudit.errors import UserError
from quantaudit.quant.formats import FORMATS, KV_CACHE_FORMATS

ISSUE_GPUS = {"h100-sxm", "h100-pcie", "h200", "b200", "a100-40gb", "a100-80gb", "l40s", "l4", "rtx-4090", "rtx-5090"}


@pytest.fixture(scope="module")
def table():
    return load_hardware()


def test_table_has_every_gpu_the_issue_names(table):
    assert ISSUE_GPUS <= set(table.gpus)


@pytest.mark.parametrize("key, memory_gb, bandwidth_gbs, fp16, fp8, int8", [
    # dense = the datasheets' "with sparsity" figures halved
    ("h100-sxm", 80, 3350, 1979 / 2, 3958 / 2, 3958 / 2),
    ("h100-pcie", 80, 2000, 1513 / 2, 3026 / 2, 3026 / 2),
    ("h200", 141, 4800, 1979 / 2, 3958 / 2, 3958 / 2),
    ("a100-80gb", 80, 2039, 312, None, 624),
    ("a100-40gb", 40, 1555, 312, None, 624),
    ("l40s", 48, 864, 362.05, 733, 733),
    ("l4", 24, 300, 242 / 2, 485 / 2, 485 / 2),
    ("rtx-4090", 24, 1008, 165.2, 330.3, 660.6),
])
def test_datasheet_figures(table, key, memory_gb, bandwidth_gbs, fp16, fp8, int8):
    gpu = table.gpus[key]
    assert gpu.memory_bytes == memory_gb * 1e9
    assert gpu.bandwidth == bandwidth_gbs * 1e9
    assert gpu.flops["fp16"] == pytest.approx(fp16 * 1e12)
    assert gpu.flops.get("fp8") == (None if fp8 is None else pytest.approx(fp8 * 1e12))
    assert gpu.flops["int8"] == pytest.approx(int8 * 1e12)


def test_every_figure_cites_a_source():
    text = resources.files("quantaudit.advise").joinpath("gpus.toml").read_text()
    figures = [line for line in text.splitlines() if re.match(r"(memory_gb|bandwidth_gbs|tflops)\s*=", line)]
    assert len(figures) == 3 * len(ISSUE_GPUS)
    assert all("#" in line for line in figures), [line for line in figures if "#" not in line]


def test_fp4_only_on_blackwell(table):
    assert {k for k, g in table.gpus.items() if "fp4" in g.flops} == {"b200", "rtx-5090"}


def test_every_format_has_advisor_facts(table):
    assert set(table.formats) == set(FORMATS)


@pytest.mark.parametrize("fmt, native_on", [
    ("fp8", {"h100-sxm", "h100-pcie", "h200", "b200", "l40s", "l4", "rtx-4090", "rtx-5090"}),  # Ada/Hopper or newer
    ("w4a8_awq", {"h100-sxm", "h100-pcie", "h200", "l40s", "l4", "rtx-4090"}),  # Ada/Hopper only
    ("fp8_pc_pt", {"h100-sxm", "h100-pcie", "h200"}),  # FP8 rowwise: Hopper
    ("int8_sq", ISSUE_GPUS),  # Ampere and later
    ("int4_awq", ISSUE_GPUS - {"b200", "rtx-5090"}),  # not listed for Blackwell by TensorRT-LLM
    ("none", ISSUE_GPUS),
])
def test_native_formats_follow_the_support_matrix(table, fmt, native_on):
    runs = {k for k, g in table.gpus.items() if k in ISSUE_GPUS and g.runs(FORMATS[fmt], table.formats[fmt])}
    assert runs == native_on


def test_fp8_compute_never_native_without_fp8_tensor_cores(table):
    for gpu in table.gpus.values():
        for name, fmt in FORMATS.items():
            uses_fp8 = any(q is not None and q.kind == "fp8" for q in (fmt.act,)) or (
                fmt.weight is not None and fmt.weight.kind == "fp8")
            if uses_fp8 and "fp8" not in gpu.flops:
                assert not gpu.runs(fmt, table.formats[name]), (gpu.key, name)


def test_kv_cache_dtypes_are_known(table):
    for gpu in table.gpus.values():
        assert "none" in gpu.arch.kv_cache and gpu.arch.kv_cache <= set(KV_CACHE_FORMATS)


def test_lookup_by_alias_is_forgiving(table):
    assert table.gpu("H100").key == "h100-sxm"
    assert table.gpu("a100").key == "a100-80gb"
    assert table.gpu("RTX 4090").key == "rtx-4090"
    assert table.gpu("a100_40gb").key == "a100-40gb"


def test_unknown_gpu_lists_the_known_ones(table):
    with pytest.raises(UserError) as err:
        table.gpu("h900")
    message = str(err.value)
    assert "h900" in message
    assert all(key in message for key in table.gpus)


def test_user_hardware_file_adds_a_gpu(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text(
        '[architectures.future]\ntrtllm_quant_algos = ["FP8"]\nkv_cache = ["none", "fp8"]\n'
        '[gpus.my-card]\nname = "My Card"\narch = "future"\nmemory_gb = 12\nbandwidth_gbs = 500\n'
        'tflops = { fp16 = 100, fp8 = 200 }\n'
    )
    table = load_hardware(path)
    gpu = table.gpu("My_Card")
    assert (gpu.memory_bytes, gpu.bandwidth, gpu.flops["fp8"]) == (12e9, 500e9, 200e12)
    assert gpu.runs(FORMATS["fp8"], table.formats["fp8"])
    assert not gpu.runs(FORMATS["int8_sq"], table.formats["int8_sq"])  # neither the algorithm nor INT8 tensor cores
    assert "h100-sxm" in table.gpus  # built-in table kept


@pytest.mark.parametrize("body, expected", [
    ('[gpus.x]\nname = "X"\narch = "hopper"\nmemory_gb = 1\nbandwidth_gbs = 1\ntflops = { fp16 = 1 }\ncolour = 1\n',
     "unknown field 'colour'"),
    ('[gpus.x]\nname = "X"\narch = "volta"\nmemory_gb = 1\nbandwidth_gbs = 1\ntflops = { fp16 = 1 }\n', "unknown arch"),
    ('[gpus.x]\nname = "X"\narch = "hopper"\nmemory_gb = -1\nbandwidth_gbs = 1\ntflops = { fp16 = 1 }\n',
     "memory_gb must be a positive number"),
    ('[gpus.x]\nname = "X"\narch = "hopper"\nmemory_gb = 1\nbandwidth_gbs = 1\ntflops = { fp8 = 1 }\n', "tflops must"),
    ("[gpus.x\n", "not valid TOML"),
])
def test_bad_hardware_files_say_what_is_wrong(tmp_path, body, expected):
    path = tmp_path / "bad.toml"
    path.write_text(body)
    with pytest.raises(UserError, match=re.escape(expected)):
        load_hardware(path)


def test_missing_hardware_file(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_hardware(tmp_path / "nope.toml")
