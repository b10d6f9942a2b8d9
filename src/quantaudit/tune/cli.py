"""``quantaudit autotune`` settings and command-line arguments (light: no torch import, so --help is instant).

The work is in :mod:`quantaudit.tune.command`, imported when the command runs.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

from ..audit.budget import METRICS, Limit, parse_budget
from ..audit.settings import at_least, check_text_flags
from ..errors import UserError
from ..progress import console
from ..quant.formats import get_format

NONE = "none"  # 16-bit: the format that leaves a layer unquantized


@dataclass
class AutotuneSettings:
    model: str = "smollm2-135m"
    formats: list[str] = field(default_factory=lambda: ["int4_awq"])
    fallback: list[str] = field(default_factory=lambda: ["fp8", NONE])
    budget: str | None = None  # e.g. "kld<=0.02"
    effective_bits: float | None = None  # size target instead of (or besides) a budget
    calib: str | None = None
    calib_size: int = 32
    calib_seq: int = 512
    eval: str | None = None
    windows: int | None = 16
    seq_len: int = 512
    bos: str = "auto"
    group_size: int = 128
    sensitivity_windows: int = 1
    refine: int = 8  # lowering attempts of the second pass (budget mode)
    probes: int = 4  # greedy prefixes measured besides the fill (effective-bits mode)
    verify_attempts: int = 3
    batch_size: int | None = None
    device: str = "cpu"

    @property
    def ladder(self) -> list[str]:
        return list(dict.fromkeys([*self.formats, *self.fallback]))


def validate(s: AutotuneSettings) -> list[Limit]:
    """Every user choice checked before any slow work starts."""
    check_text_flags(s)
    at_least("--refine", s.refine, 0)
    if not s.formats:
        raise UserError("--formats is empty: name the most aggressive format(s) to start from, e.g. int4_awq")
    for name in s.ladder:
        get_format(name)
    if all(f == NONE for f in s.ladder):
        raise UserError("--formats/--fallback name no quantized format: nothing to tune")
    if s.group_size not in (64, 128):
        raise UserError(f"--group-size must be 64 or 128 (what TensorRT-LLM supports), got {s.group_size}")
    if s.sensitivity_windows < 1:
        raise UserError(f"--sensitivity-windows must be at least 1 (got {s.sensitivity_windows})")
    if s.budget is None and s.effective_bits is None:
        raise UserError('give an accuracy budget (--budget "kld<=0.02") or a size target (--effective-bits 5.0)')
    if s.effective_bits is not None and not 0 < s.effective_bits <= 16:
        raise UserError(f"--effective-bits must be in (0, 16] bits per weight (got {s.effective_bits})")
    limits = parse_budget(s.budget) if s.budget is not None else []
    unmeasured = [l for l in limits if METRICS[l.metric][0][0] == "tasks_summary"]
    if unmeasured:
        raise UserError(f"autotune measures KLD, PPL and top-1 only; the budget term {unmeasured[0]} needs `audit --tasks`")
    return limits



def add_autotune_arguments(p: argparse.ArgumentParser) -> None:
    d = AutotuneSettings()
    p.add_argument("--model", default=d.model, help="HF folder, .gguf file or short name (default: %(default)s)")
    p.add_argument("--formats", default=",".join(d.formats),
                   help="most aggressive format(s) every layer starts from, comma-separated (default: %(default)s)")
    p.add_argument("--fallback", default=",".join(d.fallback),
                   help="formats a layer may be raised to, comma-separated; none = 16-bit (default: %(default)s)")
    p.add_argument("--budget", default=None, help='accuracy budget to meet, e.g. "kld<=0.02" (see `audit --help`)')
    p.add_argument("--effective-bits", type=float, default=None, metavar="BITS",
                   help="size target instead: stored bits per weight of the tuned linears, scales included "
                        "(ModelOpt auto_quantize's effective_bits); minimises KLD within it")
    p.add_argument("--calib", default=None, metavar="FILE", help="calibration text (default: embedded, calib half)")
    p.add_argument("--calib-size", type=int, default=d.calib_size, help="calibration samples (default: %(default)s)")
    p.add_argument("--calib-seq", type=int, default=d.calib_seq, help="tokens per sample (default: %(default)s)")
    p.add_argument("--eval", default=None, metavar="FILE", help="evaluation text (default: embedded, eval half)")
    p.add_argument("--windows", type=int, default=d.windows, metavar="N", help="evaluation windows (default: %(default)s)")
    p.add_argument("--seq-len", type=int, default=d.seq_len, help="tokens per window (default: %(default)s)")
    p.add_argument("--bos", choices=["auto", "doc", "none"], default=d.bos, help="BOS policy (default: auto)")
    p.add_argument("--group-size", type=int, default=d.group_size, help="INT4 group size, 128 or 64 (default: %(default)s)")
    p.add_argument("--sensitivity-windows", type=int, default=d.sensitivity_windows,
                   help="evaluation windows for the per-unit sensitivity (default: %(default)s)")
    p.add_argument("--refine", type=int, default=d.refine,
                   help="second pass: units tried one rung lower again, each measured (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=None, help="windows per forward (default: automatic)")
    p.add_argument("--device", default=d.device, help="torch device (default: %(default)s)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory for autotune.json, plan.json, autotune.html")
    p.add_argument("--force", action="store_true", help="overwrite the files of a previous run in --out")


def _names(text: str) -> list[str]:
    return [f.strip() for f in text.split(",") if f.strip()]


def run_autotune(args) -> int:
    s = AutotuneSettings(
        model=args.model, formats=_names(args.formats), fallback=_names(args.fallback), budget=args.budget,
        effective_bits=args.effective_bits, calib=args.calib, calib_size=args.calib_size, calib_seq=args.calib_seq,
        eval=args.eval, windows=args.windows, seq_len=args.seq_len, bos=args.bos, group_size=args.group_size,
        sensitivity_windows=args.sensitivity_windows, refine=args.refine, batch_size=args.batch_size, device=args.device,
    )
    from .command import autotune, curve_table, summary_line

    result = autotune(s, Path(args.out), force=args.force)
    console.print(curve_table(result))
    console.print(("[green]" if result["passed"] else "[red]") + summary_line(result))
    console.print(f"outputs: {args.out}/autotune.json, plan.json, autotune.html")
    return result["exit_code"]
