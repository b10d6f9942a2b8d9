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
    from ..session import QuantSettings, add_arguments
    from .build import BuildSettings

    b = BuildSettings()
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--format", help="the format to export (see `quantaudit formats`)")
    which.add_argument("--plan", metavar="PLAN", help="mixed-precision plan, JSON {module: format} (--target trtllm)")
    add_arguments(p, QuantSettings)
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
    p.epilog = EXAMPLE
    p.formatter_class = argparse.RawDescriptionHelpFormatter


def run_export(args: argparse.Namespace) -> int:
    from ..fileio import check_out_dir, out_lock
    from ..progress import console
    from ..quant import quantize
    from ..quant.formats import get_format, get_kv_cache_format
    from ..quant.plan import check_fused_plan, check_layers, read_plan
    from ..session import QuantSettings, at_least, open_session
    from . import TARGETS, export_checkpoint
    from .build import BuildSettings, record_bench, run_build_script, runtime_missing
    from .hf import check_hf_request, hf_architecture
    from .trtllm import check_trtllm_formats, check_trtllm_kv, check_trtllm_request

    out = check_out_dir(args.out, args.force)
    quant = QuantSettings.from_args(args)
    quant.check()
    for flag in ("--tp", "--max-batch-size", "--max-input-len", "--max-output-len"):
        at_least(flag, getattr(args, flag[2:].replace("-", "_")), 1)
    mixed = read_plan(args.plan) if args.plan else None
    plan = mixed.layers if mixed else None
    fmt = args.format or (mixed.default if mixed else "none")
    for name in [fmt, *(plan or {}).values()]:
        get_format(name)
    if fmt == "none" and not any(f != "none" for f in (plan or {}).values()):
        raise UserError("nothing to export: give --format (see `quantaudit formats`) or a --plan that quantizes layers")
    kv_algo = get_kv_cache_format(args.kv_cache).trtllm_kv_cache_quant_algo
    if args.target not in TARGETS:
        raise UserError(f"--target must be one of {', '.join(TARGETS)}")
    if args.target == "hf":
        check_hf_request({fmt, *(plan or {}).values()}, kv_algo, args.tp)
    else:
        check_trtllm_formats({fmt, *(plan or {}).values()})
        check_trtllm_kv(args.kv_cache, args.kv_scales)
    spec = quant.quant_spec(fmt, plan)
    session = open_session(quant)
    lm = session.lm
    if mixed:
        check_layers(mixed, lm.model, f"plan file {args.plan}")
        check_fused_plan(mixed.layers, fmt, lm.model, f"plan file {args.plan}")
    session.check_spec(spec)
    settings = BuildSettings(args.max_batch_size, args.max_input_len, args.max_output_len)
    if args.target == "trtllm":
        check_trtllm_request(lm.config, args.tp, settings.max_seq_len, {fmt, *(plan or {}).values()})
    else:
        hf_architecture(lm.model).check_layers(lm.model)  # ModelOpt's unified HF layout
    with out_lock(out):  # every input checked: --out is this run's until the checkpoint is written
        qm = quantize(lm.model, spec, session.calib)
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
