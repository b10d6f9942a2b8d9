"""``quantaudit autotune``'s command line (light: no torch import, so --help is instant); the work is in
:mod:`quantaudit.tune.command`, imported when the command runs."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..progress import console
from ..session import add_arguments
from .settings import AutotuneSettings


def add_autotune_arguments(p: argparse.ArgumentParser) -> None:
    add_arguments(p, AutotuneSettings)
    p.add_argument("--out", required=True, metavar="DIR", help="output directory for autotune.json, plan.json, autotune.html")
    p.add_argument("--force", action="store_true", help="overwrite the files of a previous run in --out")


def run_autotune(args) -> int:
    from .command import autotune, curve_table, summary_line

    result = autotune(AutotuneSettings.from_args(args), Path(args.out), force=args.force)
    console.print(curve_table(result))
    console.print(("[green]" if result["passed"] else "[red]") + summary_line(result))
    console.print(f"outputs: {args.out}/autotune.json, plan.json, autotune.html")
    return result["exit_code"]
