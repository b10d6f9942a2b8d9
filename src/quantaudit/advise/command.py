"""``quantaudit advise``: flags, tables and the JSON file; the CLI mounts it as a subcommand.

    p = sub.add_parser("advise", help=HELP, description=DESCRIPTION)
    add_advise_arguments(p)
    p.set_defaults(func=run_advise)
"""

from __future__ import annotations

import argparse
import re

from rich.table import Table

from ..fileio import atomic_write_json
from ..progress import console
from .advisor import advise
from .planner import PlannerSettings
from .recommend import TASK_RISKS, Workload
from .roofline import Efficiency

HELP = "recommend a format, KV cache and serving setup for a GPU and workload"
DESCRIPTION = (
    "Rank the quantization formats a GPU runs natively for a model and workload: weight and KV-cache "
    "memory, roofline speed estimates, and rules following NVIDIA ModelOpt's guidance, adjusted by an "
    "audit report when given. Reads the model's config only, never its weights."
)
_SUFFIXES = {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "t": 1e12}


def parse_param_count(text: str) -> float:
    """``70e9``, ``70B``, ``7.5b``, ``135M`` -> number of parameters."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kmbt]?)\s*", text.lower())
    if not match:
        raise argparse.ArgumentTypeError(f"not a parameter count: {text!r} (e.g. 70e9, 70B, 135M)")
    return float(match.group(1)) * _SUFFIXES[match.group(2)]


def add_advise_arguments(p: argparse.ArgumentParser) -> None:
    eff, plan = Efficiency(), PlannerSettings()
    model = p.add_mutually_exclusive_group(required=True)
    model.add_argument("--model", help="HF folder (config.json only), .gguf file or short name such as smollm2-135m")
    model.add_argument("--params", type=parse_param_count, metavar="N",
                       help="parameter count (70e9, 70B) for a Llama-like shape: the nearest published Llama "
                            "config with its layer count rescaled")
    p.add_argument("--gpu", required=True, help="GPU name, e.g. h100, h100-pcie, h200, b200, a100, a100-40gb, l40s, "
                                                "l4, rtx-4090, rtx-5090")
    p.add_argument("--gpus", type=int, default=1, help="GPUs in tensor parallel (default: %(default)s)")
    p.add_argument("--batch", type=int, default=Workload.batch, help="concurrent sequences (default: %(default)s)")
    p.add_argument("--context", type=int, default=Workload.context,
                   help="tokens per sequence, prompt + output (default: %(default)s)")
    p.add_argument("--latency-target", type=float, default=None, metavar="MS",
                   help="longest acceptable time per output token, in ms")
    p.add_argument("--task-risk", choices=TASK_RISKS, default=Workload.task_risk,
                   help="high: only formats with very low expected accuracy loss (default: %(default)s)")
    p.add_argument("--report", metavar="REPORT_JSON", help="report.json of `quantaudit audit` on this model")
    p.add_argument("--hardware-file", metavar="TOML", help="extra or corrected GPUs, in the layout of advise/gpus.toml")
    p.add_argument("--json", metavar="OUT", help="write the full advice as JSON")
    p.add_argument("--bw-efficiency", type=float, default=eff.bandwidth,
                   help="fraction of datasheet memory bandwidth decode kernels reach (default: %(default)s)")
    p.add_argument("--flops-efficiency", type=float, default=eff.flops,
                   help="fraction of datasheet dense tensor throughput GEMMs reach (default: %(default)s)")
    p.add_argument("--group-size", type=int, default=plan.group_size, help="INT4 group size (default: %(default)s)")
    p.add_argument("--kv-free-fraction", type=float, default=plan.kv_free_fraction,
                   help="share of free memory TensorRT-LLM gives the KV cache (default: %(default)s)")
    p.add_argument("--max-num-tokens", type=int, default=plan.max_num_tokens,
                   help="tokens in flight the activation workspace is sized for (default: %(default)s)")
    p.add_argument("--sensitive-factor", type=float, default=4.0,
                   help="keep audited layers at least this many times the median sensitivity in 16 bit "
                        "(default: %(default)s)")


def run_advise(args: argparse.Namespace) -> int:
    result = advise(
        model=args.model, params=args.params, gpu=args.gpu, gpus=args.gpus,
        workload=Workload(args.batch, args.context, args.latency_target, args.task_risk),
        report=args.report, hardware_file=args.hardware_file,
        efficiency=Efficiency(args.bw_efficiency, args.flops_efficiency),
        settings=PlannerSettings(args.group_size, args.kv_free_fraction, args.max_num_tokens),
        sensitive_factor=args.sensitive_factor,
    )
    print_advice(result)
    if args.json:
        atomic_write_json(args.json, result)
        console.print(f"advice written to {args.json}")
    return 0


def print_advice(result: dict) -> None:
    m, w = result["model"], result["workload"]
    console.print(
        f"[bold]{m['name']}[/bold] ({m['params'] / 1e9:.3g}B params) on {result['gpus']}x {result['gpu']['name']}, "
        f"batch {w['batch']}, context {w['context']}, task risk {w['task_risk']}"
    )
    table = Table(title="recommendations (estimates: roofline, datasheet peaks x stated efficiencies)")
    for col in ("#", "format", "KV", "weights GB", "max seqs", "tok/s/user", "tok/s total", "GEMMs",
                "compute-bound from", "prefill ms", "audit KL"):
        table.add_column(col, justify="left" if col in ("format", "KV", "GEMMs") else "right")
    for r in result["recommendations"]:
        audit = r["audit"]
        table.add_row(
            str(r["rank"]), r["format"], r["kv_cache"], f"{r['weight_bytes'] / 1e9:.2f}", str(r["max_batch_at_context"]),
            f"{r['decode_tokens_per_s_per_user']:,.0f}", f"{r['decode_tokens_per_s']:,.0f}", r["decode_bound"],
            f"batch {r['crossover_batch']}", f"{1e3 * r['prefill_s']:,.0f}",
            f"{audit['kld_mean']:.4g}" if audit and audit["kld_mean"] is not None else "-",
        )
    console.print(table)
    top = result["recommendations"][0]
    console.print(f"[bold green]use {top['format']} with {top['kv_cache']} KV cache[/bold green]")
    for reason in top["reasons"]:
        console.print(f"  - {reason}")
    kv = Table(title=f"KV cache for {top['format']}")
    for col in ("KV cache", "bytes/token", "max seqs", "max context at batch", "tok/s total"):
        kv.add_column(col, justify="left" if col == "KV cache" else "right")
    for row in result["kv_cache_comparison"]:
        kv.add_row(row["kv_cache"], f"{row['kv_bytes_per_token']:,.0f}", str(row["max_batch_at_context"]),
                   f"{row['max_context_at_batch']:,}", f"{row['decode_tokens_per_s']:,.0f}")
    console.print(kv)
    for item in result["deployment"]:
        console.print(f"[bold]{item['topic'].replace('_', ' ')}[/bold]: {item['advice']}")
    for r in result["rejected"]:
        console.print(f"[dim]not {r['format']}: {r['reason']}[/dim]")
    for note in result["notes"]:
        console.print(f"[dim]note: {note}[/dim]")
