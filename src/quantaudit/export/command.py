"""``quantaudit export``: quantize exactly as the audit did, then write the checkpoint.

The quantization flags default to ``quantaudit audit``'s (same calibration text, sample count,
sequence length, BOS policy and group size), so the exported numbers are the audited ones; the
calibration fingerprint is recorded in ``quantaudit_export.json`` to compare with report.json.
``--plan`` takes a plan file (:mod:`quantaudit.quant.plan`: autotune's ``plan.json``,
``{"format": DEFAULT, "layers": {module: format}}`` or a flat ``{module: format}``); modules it
does not name get ``--format``, else the plan's default, else stay unquantized.
"""

from __future__ import annotations

import argparse

from ..errors import UserError

EXAMPLE = ("example:\n  quantaudit export --model smollm2-135m --format fp8 --kv-cache fp8 --calib calib.txt "
           "--out smollm2-fp8-trtllm --target trtllm")


def add_export_arguments(p: argparse.ArgumentParser) -> None:
    from ..audit.settings import AuditSettings, add_algorithm_arguments
    from ..quant.formats import KV_CACHE_FORMATS, KV_SCALES
    from .build import BuildSettings

    d, b = AuditSettings(), BuildSettings()
    p.add_argument("--model", default=d.model, help="HF folder, .gguf file or short name (default: %(default)s)")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--format", help="the format to export (see `quantaudit formats`)")
    which.add_argument("--plan", metavar="PLAN", help="mixed-precision plan, JSON {module: format} (--target trtllm)")
    p.add_argument("--kv-cache", default=d.kv_cache, choices=list(KV_CACHE_FORMATS),
                   help="KV-cache quantization (default: %(default)s)")
    p.add_argument("--kv-scales", default=d.kv_scales, choices=list(KV_SCALES),
                   help="shared: one scale per layer for K and V from max(K, V amax), what a TensorRT-LLM checkpoint holds and its engines run; separate: K and V each their own (HF/vLLM k_scale, v_scale; --target hf only) (default: %(default)s)")
    p.add_argument("--calib", default=None, metavar="FILE", help="calibration text (default: embedded, calib half)")
    p.add_argument("--calib-size", type=int, default=d.calib_size, help="calibration samples (default: %(default)s)")
    p.add_argument("--calib-seq", type=int, default=d.calib_seq, help="tokens per sample (default: %(default)s)")
    p.add_argument("--bos", choices=["auto", "doc", "none"], default=d.bos, help="BOS policy (default: auto)")
    p.add_argument("--group-size", type=int, default=d.group_size, help="INT4 group size, 128 or 64 (default: %(default)s)")
    p.add_argument("--exclude", default="", help="fnmatch patterns of layers to keep unquantized, comma-separated")
    p.add_argument("--include-lm-head", action="store_true",
                   help="quantize lm_head too (refused where TensorRT-LLM keeps it unquantized)")
    add_algorithm_arguments(p)
    p.add_argument("--out", required=True, metavar="DIR", help="checkpoint folder to create")
    p.add_argument("--target", default="trtllm", choices=["trtllm", "hf"],
                   help="trtllm: TensorRT-LLM checkpoint; hf: ModelOpt unified HF folder (default: %(default)s)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks (trtllm; default: %(default)s)")
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"],
                   help="dtype of unquantized tensors (default: %(default)s)")
    p.add_argument("--max-batch-size", type=int, default=b.max_batch_size, help="trtllm-build (default: %(default)s)")
    p.add_argument("--max-input-len", type=int, default=b.max_input_len, help="trtllm-build (default: %(default)s)")
    p.add_argument("--max-output-len", type=int, default=b.max_output_len, help="trtllm-build (default: %(default)s)")
    p.add_argument("--build", action="store_true", help="run build.sh (needs tensorrt_llm and a CUDA GPU)")
    p.add_argument("--bench", action="store_true",
                   help="run build.sh --bench (trtllm-bench throughput; implies --build) and store the measured "
                        "throughput in quantaudit_export.json")
    p.add_argument("--force", action="store_true", help="replace an existing non-empty --out")
    p.add_argument("--device", default="cpu", help="torch device for quantization (default: %(default)s)")
    p.epilog = EXAMPLE
    p.formatter_class = argparse.RawDescriptionHelpFormatter


def run_export(args: argparse.Namespace) -> int:
    from ..audit.settings import at_least, check_text_flags
    from ..data import load_windows
    from ..fileio import check_out_dir, out_lock
    from ..models import load_model
    from ..progress import console
    from ..quant import GPTQOptions, QuantSpec, quantize
    from ..quant.engine import GROUP_SIZES
    from ..quant.formats import get_format, get_kv_cache_format
    from ..quant.plan import check_fused_plan, check_layers, read_plan
    from ..stream.source import check_model_files
    from . import TARGETS, export_checkpoint
    from .build import BuildSettings, record_bench, run_build_script, runtime_missing
    from .hf import check_hf_request, hf_architecture
    from .trtllm import check_trtllm_formats, check_trtllm_kv, check_trtllm_request

    out = check_out_dir(args.out, args.force)
    check_text_flags(args)
    for flag in ("--tp", "--max-batch-size", "--max-input-len", "--max-output-len"):
        at_least(flag, getattr(args, flag[2:].replace("-", "_")), 1)
    mixed = read_plan(args.plan) if args.plan else None
    plan = mixed.layers if mixed else None
    fmt = args.format or (mixed.default if mixed else "none")
    for name in [fmt, *(plan or {}).values()]:
        get_format(name)
    if fmt == "none" and not any(f != "none" for f in (plan or {}).values()):
        raise UserError("nothing to export: give --format (see `quantaudit formats`) or a --plan that quantizes layers")
    if args.group_size not in GROUP_SIZES:
        raise UserError(f"--group-size must be {' or '.join(map(str, GROUP_SIZES))} (what TensorRT-LLM supports)")
    kv_algo = get_kv_cache_format(args.kv_cache).trtllm_kv_cache_quant_algo
    if args.target not in TARGETS:
        raise UserError(f"--target must be one of {', '.join(TARGETS)}")
    if args.target == "hf":
        check_hf_request({fmt, *(plan or {}).values()}, kv_algo, args.tp)
    else:
        check_trtllm_formats({fmt, *(plan or {}).values()})
        check_trtllm_kv(args.kv_cache, args.kv_scales)
    spec = QuantSpec(format=fmt, kv_cache=args.kv_cache, kv_scales=args.kv_scales, group_size=args.group_size, plan=plan,
                     exclude=tuple(p.strip() for p in args.exclude.split(",") if p.strip()),
                     include_lm_head=args.include_lm_head, smoothquant_alpha=args.smoothquant_alpha,
                     gptq=GPTQOptions(act_order=args.act_order, scale_search=args.gptq_scale))
    check_model_files(args.model)
    lm = load_model(args.model, device=args.device)
    if mixed:
        check_layers(mixed, lm.model, f"plan file {args.plan}")
        check_fused_plan(mixed.layers, fmt, lm.model, f"plan file {args.plan}")
    settings = BuildSettings(args.max_batch_size, args.max_input_len, args.max_output_len)
    if args.target == "trtllm":
        check_trtllm_request(lm.config, args.tp, settings.max_seq_len, {fmt, *(plan or {}).values()})
    else:
        hf_architecture(lm.model).check_layers(lm.model)  # ModelOpt's unified HF layout
    calib = load_windows(args.calib, lm.tokenizer, args.calib_seq, args.calib_size, args.bos, role="calib")
    with out_lock(out):  # every input checked: --out is this run's until the checkpoint is written
        qm = quantize(lm.model, spec, calib)
        result = export_checkpoint(qm, lm.config, out, target=args.target, tp=args.tp, dtype=args.dtype,
                                   force=args.force, tokenizer=lm.tokenizer, build=settings,
                                   source={"model": lm.name, "path": lm.source, "fingerprint": lm.fingerprint})
    console.print(f"wrote {result.path} ({result.target}, quant_algo {result.quant_algo}, KV cache "
                  f"{result.kv_cache_quant_algo or 'not quantized'}): {', '.join(result.files)}")
    for note in result.notes:
        console.print(f"[yellow]differs from the audit:[/yellow] {note}")
    for warning in result.warnings:
        console.print(f"[red]caveat:[/red] {warning}")
    if args.target == "hf" and args.build and not args.bench:
        console.print("--build: nothing to build for --target hf; TensorRT-LLM's PyTorch backend and vLLM load the folder")
        return 0
    if args.build or args.bench:
        missing = runtime_missing()
        if missing:
            console.print(f"--build/--bench skipped: {missing}; run {result.path}/build.sh where TensorRT-LLM and a GPU are")
            return 0
        code = run_build_script(result.path, bench=args.bench)
        if code:
            console.print(f"[red]{result.path}/build.sh failed with exit code {code}[/red]: its output is above")
            return code
        if args.bench:
            print_bench(record_bench(result.path), result.path)
    return 0


def print_bench(bench: dict, path) -> None:
    """The trtllm-bench figures as a terminal table."""
    from rich.table import Table

    from ..progress import console
    from .build import BENCH_FIGURES, EXPORT_RECORD

    engine, requests = bench["engine"], bench["requests"]
    table = Table(title=f"trtllm-bench throughput: {engine['backend'] or '?'} backend, {engine['quantization']}, "
                        f"KV {engine['kv_cache_dtype']}, {bench['gpu'] or 'GPU not reported'}, "
                        f"{requests['num_requests']} requests")
    table.add_column("measure")
    table.add_column("value", justify="right")
    for key, what in BENCH_FIGURES.items():
        table.add_row(what, f"{bench['performance'][key]:,.1f}")
    console.print(table)
    console.print(f"stored in {path}/{EXPORT_RECORD} under trtllm_bench")
