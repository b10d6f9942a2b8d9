"""`quantaudit export --build/--bench` where TensorRT-LLM is present: build.sh runs trtllm-build and
trtllm-bench, and the throughput trtllm-bench reports is stored in quantaudit_export.json.

No GPU here, so stand-ins for `trtllm-build` and `trtllm-bench` go first on PATH. They take the
arguments build.sh passes and write what the real tools write: an engine folder whose config.json holds
the checkpoint's quantization, and a --report_json file with trtllm-bench's report_json layout
(tensorrt_llm/bench/dataclasses/reporting.py, get_statistics_dict).
"""

from __future__ import annotations

import json
import os
import sys

import pytest
from export_helpers import parse

from quantaudit.errors import UserError
from quantaudit.export import build as build_module
from quantaudit.export.build import BENCH_FIGURES, BENCH_REPORT, EXPORT_RECORD, read_bench_report, record_bench
from quantaudit.export.command import run_export

PERFORMANCE = {
    "total_latency_ms": 8123.4, "avg_request_latency_ms": 5012.5, "request_throughput_req_s": 12.31,
    "system_output_throughput_tok_s": 12605.4, "system_total_throughput_tok_s": 25210.8,
    "output_throughput_per_user_tok_s": 204.3, "output_throughput_per_gpu_tok_s": 12605.4,
    "request_latency_percentiles_ms": {"p50": 5000.0, "p99": 7900.0},
}

FAKE_BUILD = f"""#!{sys.executable}
import json, os, pathlib, sys
args = sys.argv[1:]
pathlib.Path("calls.log").open("a").write("trtllm-build " + " ".join(args) + "\\n")
if os.environ.get("FAKE_BUILD_FAILS"):
    sys.exit(7)
out = pathlib.Path(args[args.index("--output_dir") + 1])
out.mkdir(exist_ok=True)
cfg = json.loads(pathlib.Path(args[args.index("--checkpoint_dir") + 1], "config.json").read_text())
(out / "config.json").write_text(json.dumps({{"pretrained_config": cfg, "build_config": {{"max_input_len": 1024}}}}))
"""

FAKE_BENCH = f"""#!{sys.executable}
import json, pathlib, sys
args = sys.argv[1:]
pathlib.Path("calls.log").open("a").write("trtllm-bench " + " ".join(args) + "\\n")
if "prepare-dataset" in args:
    pathlib.Path(args[args.index("--output") + 1]).write_text("{{}}\\n")
else:
    engine = json.loads(pathlib.Path(args[args.index("--engine_dir") + 1], "config.json").read_text())
    quant = engine["pretrained_config"]["quantization"]
    report = {{"engine": {{"backend": "TRT", "quantization": quant["quant_algo"],
                          "kv_cache_dtype": quant["kv_cache_quant_algo"], "dtype": "float16", "version": "1.0.0"}},
              "machine": {{"name": "NVIDIA H100 80GB HBM3"}},
              "request_info": {{"num_requests": 100, "avg_input_length": 1024.0, "avg_output_length": 1024.0}},
              "performance": {json.dumps(PERFORMANCE)}}}
    pathlib.Path(args[args.index("--report_json") + 1]).write_text(json.dumps(report))
"""


@pytest.fixture
def fake_tensorrt_llm(tmp_path, monkeypatch):
    tools = tmp_path / "bin"
    tools.mkdir()
    for name, text in (("trtllm-build", FAKE_BUILD), ("trtllm-bench", FAKE_BENCH)):
        (tools / name).write_text(text)
        (tools / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{tools}:{os.environ['PATH']}")
    monkeypatch.setattr(build_module, "runtime_missing", lambda: None)


def test_bench_stores_trtllm_bench_throughput_in_the_export_record(fake_tensorrt_llm, common, tmp_path, capsys):
    out = tmp_path / "ckpt"
    assert run(common, "--format", "fp8", "--kv-cache", "fp8", "--out", str(out), "--bench") == 0
    calls = (out / "calls.log").read_text().splitlines()
    assert [c.split()[:2] for c in calls] == [["trtllm-build", "--checkpoint_dir"], ["trtllm-bench", "--model"],
                                             ["trtllm-bench", "--model"]]
    assert "--use_fp8_context_fmha enable" in calls[0]
    assert f"throughput --dataset dataset.txt --backend tensorrt --report_json {BENCH_REPORT} --engine_dir engine" in calls[2]
    record = json.loads((out / EXPORT_RECORD).read_text())
    bench = record["trtllm_bench"]
    assert bench["performance"] == {key: PERFORMANCE[key] for key in BENCH_FIGURES}
    assert bench["engine"]["quantization"] == record["quant_algo"] == "FP8"
    assert bench["engine"]["kv_cache_dtype"] == "FP8" and bench["gpu"] == "NVIDIA H100 80GB HBM3"
    assert bench["requests"]["num_requests"] == 100
    printed = capsys.readouterr().out
    assert "12,605.4" in printed and "output tokens / s" in printed and "trtllm_bench" in printed


def test_a_failed_build_is_one_line_and_its_exit_code(fake_tensorrt_llm, common, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FAKE_BUILD_FAILS", "1")
    out = tmp_path / "ckpt"
    assert run(common, "--format", "int8_wo", "--out", str(out), "--bench") == 7
    assert "build.sh failed with exit code 7" in capsys.readouterr().out
    assert "trtllm_bench" not in json.loads((out / EXPORT_RECORD).read_text())
    assert not (out / BENCH_REPORT).exists()


def test_a_report_of_another_engine_or_not_a_report_is_refused(tmp_path):
    (tmp_path / EXPORT_RECORD).write_text(json.dumps({"quant_algo": "FP8"}))
    report = {"engine": {"quantization": "W8A16"}, "performance": {key: 1.0 for key in BENCH_FIGURES}}
    (tmp_path / BENCH_REPORT).write_text(json.dumps(report))
    with pytest.raises(UserError, match="benchmarked quant_algo W8A16, but this checkpoint is FP8"):
        record_bench(tmp_path)
    assert "trtllm_bench" not in json.loads((tmp_path / EXPORT_RECORD).read_text())
    del report["performance"]["system_output_throughput_tok_s"]
    (tmp_path / BENCH_REPORT).write_text(json.dumps(report))
    with pytest.raises(UserError, match="not a trtllm-bench throughput report .*system_output_throughput_tok_s"):
        read_bench_report(tmp_path / BENCH_REPORT)
    with pytest.raises(UserError, match="not a trtllm-bench throughput report"):
        read_bench_report(tmp_path / "missing.json")


def run(common, *argv):
    return run_export(parse(*common, *argv))
