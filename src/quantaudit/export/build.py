"""BUILD.md and build.sh next to a checkpoint, and running them where TensorRT-LLM is present.

The commands are TensorRT-LLM's documented ones (``docs/source/architecture/checkpoint.md``,
``examples/models/core/llama/README.md``, the trtllm-bench docs): ``trtllm-build --checkpoint_dir
--output_dir --max_batch_size --max_input_len --max_seq_len --gemm_plugin auto`` (``auto`` takes the
checkpoint dtype; the quantized GEMMs - FP8, weight-only, SmoothQuant - pick their plugins from the
checkpoint's quant_algo), ``--use_fp8_context_fmha enable`` only for FP8 with an FP8 KV cache (the KV
dtype itself comes from the checkpoint's ``kv_cache_quant_algo``). trtllm-build's default fused gate MLP
re-quantizes nothing: the engine gives FP8 gate/up one weight and activation scale (quant.engine._run_jobs).
``trtllm-bench prepare-dataset`` + ``throughput --report_json`` measure it; :func:`record_bench` reads
that report's performance block (``tensorrt_llm/bench/dataclasses/reporting.py``,
``get_statistics_dict``) into ``quantaudit_export.json``, so the speed sits next to the audit's provenance.
An HF checkpoint needs no build: TensorRT-LLM's PyTorch backend (``trtllm-serve``, LLM API) and
vLLM load the folder. Nothing here pretends: without ``tensorrt_llm`` and a CUDA GPU,
:func:`runtime_missing` says which is absent and nothing is run.
"""

from __future__ import annotations

import importlib.util
import json
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .. import __version__
from ..errors import UserError
from ..fileio import atomic_write_json
from .layout import BUILD_OPTIONS

BENCH_REPORT = "trtllm_bench.json"
EXPORT_RECORD = "quantaudit_export.json"

# trtllm-bench's report_json "performance" keys kept in the export record, with what each measures.
BENCH_FIGURES = {
    "request_throughput_req_s": "requests / s",
    "system_output_throughput_tok_s": "output tokens / s",
    "system_total_throughput_tok_s": "input + output tokens / s",
    "output_throughput_per_gpu_tok_s": "output tokens / s per GPU",
    "output_throughput_per_user_tok_s": "output tokens / s per request",
    "avg_request_latency_ms": "mean request latency, ms",
    "total_latency_ms": "whole benchmark, ms",
}


@dataclass(frozen=True)
class BuildSettings:
    max_batch_size: int = 8
    max_input_len: int = 1024
    max_output_len: int = 1024
    bench_requests: int = 100

    @property
    def max_seq_len(self) -> int:
        """trtllm-build's --max_seq_len: the longest sequence (prompt and output) the engine holds."""
        return self.max_input_len + self.max_output_len


def trtllm_build_command(quant_algo: str, kv_algo: str | None, tp: int, settings: BuildSettings) -> list[str]:
    options = BUILD_OPTIONS[quant_algo]
    cmd = ["trtllm-build", "--checkpoint_dir", ".", "--output_dir", "engine",
           "--max_batch_size", str(settings.max_batch_size), "--max_input_len", str(settings.max_input_len),
           "--max_seq_len", str(settings.max_seq_len),
           "--gemm_plugin", options["gemm_plugin"]]
    if options.get("fp8_context_fmha") and kv_algo == "FP8":
        cmd += ["--use_fp8_context_fmha", "enable"]
    if tp > 1:
        cmd += ["--workers", str(tp)]
    return cmd


def _bench_commands(settings: BuildSettings, backend: str, model_path: str) -> list[list[str]]:
    tokenizer = "tokenizer" if backend == "tensorrt" else "."
    prepare = ["trtllm-bench", "--model", tokenizer, "prepare-dataset", "--output", "dataset.txt", "token-norm-dist",
               f"--num-requests={settings.bench_requests}", f"--input-mean={settings.max_input_len}",
               f"--output-mean={settings.max_output_len}", "--input-stdev=0", "--output-stdev=0"]
    run = ["trtllm-bench", "--model", tokenizer, "--model_path", model_path, "throughput",
           "--dataset", "dataset.txt", "--backend", backend, "--report_json", BENCH_REPORT]
    if backend == "tensorrt":
        run += ["--engine_dir", "engine"]
    return [prepare, run]


def _sh(cmd: list[str]) -> str:
    return " ".join(shlex.quote(c) for c in cmd)


def build_files(target: str, quant_algo: str, kv_algo: str | None, tp: int, dtype: str,
                notes: list[str], warnings: list[str], settings: BuildSettings, summary: str) -> tuple[str, str]:
    """(BUILD.md, build.sh) for a checkpoint."""
    if target == "trtllm":
        build = [trtllm_build_command(quant_algo, kv_algo, tp, settings)]
        bench = _bench_commands(settings, "tensorrt", ".")
        run = "python3 $TENSORRT_LLM/examples/run.py --engine_dir engine --tokenizer_dir tokenizer --max_output_len 64"
        serve = f"mpirun -n {tp} {run}" if tp > 1 else run
        how = "Build a TensorRT engine (needs TensorRT-LLM and an NVIDIA GPU):"
    else:
        build = []
        bench = _bench_commands(settings, "pytorch", ".")
        serve = "trtllm-serve .    # TensorRT-LLM PyTorch backend" + (
            "\nvllm serve .      # vLLM (ModelOpt FP8)" if quant_algo.startswith("FP8") else "")
        how = "No engine build: TensorRT-LLM's PyTorch backend loads this folder directly."
    dtype_line = (" float32 is for verifying the export; TensorRT-LLM's quantized kernels run float16/bfloat16."
                  if dtype == "float32" else "")
    md = [f"# {summary}", "", f"Written by quantaudit {__version__}. quant_algo {quant_algo}, KV cache "
          f"{kv_algo or 'not quantized'}, dtype {dtype}, tensor parallel {tp}.{dtype_line}", "", how, ""]
    if build:
        md += ["```bash", "./build.sh            # runs:", *(_sh(c) for c in build), "```", ""]
    md += ["Run:", "", "```bash", serve, "```", "",
           f"Benchmark (`./build.sh --bench`; `quantaudit export --bench` stores {BENCH_REPORT}'s throughput "
           f"in {EXPORT_RECORD}):", "", "```bash", *(_sh(c) for c in bench), "```", ""]
    md += ["## Where the deployed model differs from the audited one", ""]
    md += [f"- {n}" for n in notes] or ["- nothing: the files hold the audited codes and scales"]
    if warnings:
        md += ["", "## Caveats", "", *(f"- {w}" for w in warnings)]
    sh = ["#!/usr/bin/env bash", f"# {summary} - written by quantaudit {__version__}", "set -euo pipefail",
          'cd "$(dirname "$0")"', *(_sh(c) for c in build), 'if [ "${1:-}" = "--bench" ]; then',
          *("  " + _sh(c) for c in bench), "fi", ""]
    return "\n".join(md) + "\n", "\n".join(sh)


def runtime_missing() -> str | None:
    """Why this machine cannot build or benchmark (None: tensorrt_llm importable and a CUDA GPU visible)."""
    if importlib.util.find_spec("tensorrt_llm") is None or shutil.which("trtllm-build") is None:
        return "tensorrt_llm is not installed here"
    import torch

    if not torch.cuda.is_available():
        return "no CUDA GPU is visible"
    return None


def run_build_script(checkpoint: Path, bench: bool) -> int:
    """Run build.sh (with --bench) in the checkpoint folder; returns its exit code."""
    args = ["bash", str(checkpoint / "build.sh")] + (["--bench"] if bench else [])
    return subprocess.run(args, cwd=checkpoint, check=False).returncode


def read_bench_report(path: Path) -> dict:
    """The throughput figures of a ``trtllm-bench throughput --report_json`` file, and what was run."""
    try:
        report = json.loads(path.read_text())
        performance = report["performance"]
        figures = {key: float(performance[key]) for key in BENCH_FIGURES}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path} is not a trtllm-bench throughput report ({type(e).__name__}: {e}); "
                        "rerun ./build.sh --bench there") from None
    engine, requests = report.get("engine") or {}, report.get("request_info") or {}
    return {"performance": figures,
            "engine": {k: engine.get(k) for k in ("backend", "quantization", "kv_cache_dtype", "dtype", "version")},
            "gpu": (report.get("machine") or {}).get("name"),
            "requests": {k: requests.get(k) for k in ("num_requests", "avg_input_length", "avg_output_length")},
            "report": path.name}


def record_bench(checkpoint: Path) -> dict:
    """Store build.sh --bench's measured throughput in the checkpoint's quantaudit_export.json.

    A report whose engine ran another quant_algo than the one exported is refused: its speed would
    not be this checkpoint's.
    """
    bench = read_bench_report(checkpoint / BENCH_REPORT)
    record = json.loads((checkpoint / EXPORT_RECORD).read_text())
    ran = bench["engine"]["quantization"]
    if ran is not None and str(ran) != str(record["quant_algo"]):
        raise UserError(f"{checkpoint / BENCH_REPORT} benchmarked quant_algo {ran}, but this checkpoint is "
                        f"{record['quant_algo']}; rerun ./build.sh --bench in {checkpoint}")
    record["trtllm_bench"] = bench
    atomic_write_json(checkpoint / EXPORT_RECORD, record)
    return bench
