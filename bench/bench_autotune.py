"""Autotune on SmolLM2-135M: the best uniform format meeting a KLD budget vs the autotuned mixed plan.

Calibration: the first ``--calib-size`` x 512 tokens of WikiText-2 validation (tokenized form);
evaluation: the first ``--windows`` x 512-token windows of WikiText-2 test. Every figure printed is
measured in this run: the uniform formats and the final plan by a real ``quantize()`` + evaluation,
the search's intermediate plans by composing the per-format models (marked "composed"). The plan
must meet the budget with fewer weight bytes than the best uniform format that meets it.
Writes bench/results/autotune.json (and the autotune outputs under bench/results/autotune/).

    .venv/bin/python bench/bench_autotune.py [--budget kld<=0.05] [--formats int4_awq] [--fallback fp8,none]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT / ".." / "shared"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--budget", default="kld<=0.05")
    parser.add_argument("--formats", default="int4_awq")
    parser.add_argument("--fallback", default="fp8,none")
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--calib-size", type=int, default=32)
    parser.add_argument("--sensitivity-windows", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "autotune.json")
    args = parser.parse_args()
    os.environ.setdefault("QUANTAUDIT_QUIET", "1")
    if not SHARED.is_dir():
        print(f"../shared not found at {SHARED}: the WikiText-2 files live there", file=sys.stderr)
        return 2

    from quantaudit.progress import console
    from quantaudit.tune import AutotuneSettings, autotune
    from quantaudit.tune.command import curve_table, summary_line

    settings = AutotuneSettings(
        model=args.model, formats=args.formats.split(","), fallback=args.fallback.split(","), budget=args.budget,
        calib=str(SHARED / "data" / "wikitext2_valid_tokens.txt"), calib_size=args.calib_size, calib_seq=512,
        eval=str(SHARED / "data" / "wikitext2_raw_test.txt"), windows=args.windows, seq_len=512,
        sensitivity_windows=args.sensitivity_windows,
    )
    started = time.perf_counter()
    result = autotune(settings, args.out.parent / "autotune", force=True)
    seconds = time.perf_counter() - started
    console.print(curve_table(result))
    best = result["best_uniform"]
    print(f"budget {args.budget}, {settings.calib_size} x 512 calibration tokens, {args.windows} x 512 eval windows")
    for u in result["uniform"]:
        print(f"uniform {u['name']:9s} {u['weight_bytes'] / 1e6:8.3f} MB  {u['effective_bits']:6.3f} bits/weight  "
              f"KLD {u['kld']:.5f}  {'meets' if u['passed'] else 'fails'} the budget")
    if best:
        print(f"best uniform format meeting the budget: {best['name']}, {best['weight_bytes'] / 1e6:.3f} MB, KLD {best['kld']:.5f}")
    else:
        print("no uniform format meets the budget")
    print(f"autotuned plan: {result['weight_bytes'] / 1e6:.3f} MB, {result['effective_bits']:.3f} bits/weight, "
          f"KLD {result['kld']:.5f} (quantize), composed {result['composed_kld']}, predicted {result['predicted_kld']:.5f}")
    formats = {}
    for fmt in result["plan"].values():
        formats[fmt] = formats.get(fmt, 0) + 1
    print(f"plan: {formats} linears; {result['search']['evaluations']} composed evaluations; {result['search']['outcome']}")
    smaller = best is not None and result["passed"] and result["weight_bytes"] < best["weight_bytes"]
    if best:
        print(f"plan / best uniform size: {result['weight_bytes'] / best['weight_bytes']:.4f} "
              f"({'smaller, budget met' if smaller else 'NOT smaller'})")
    print(f"wall time {seconds:.0f} s")
    print(summary_line(result))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    summary = {"budget": args.budget, "uniform": [{k: u[k] for k in ("name", "weight_bytes", "effective_bits", "kld", "passed")}
                                                   for u in result["uniform"]],
               "best_uniform": best, "plan_weight_bytes": result["weight_bytes"], "plan_effective_bits": result["effective_bits"],
               "plan_kld": result["kld"], "plan_composed_kld": result["composed_kld"], "plan_predicted_kld": result["predicted_kld"],
               "plan_passed": result["passed"], "plan_smaller_than_best_uniform": smaller,
               "evaluations": result["search"]["evaluations"], "seconds": seconds}
    from quantaudit.fileio import atomic_write_json

    atomic_write_json(args.out, summary)
    return 0 if smaller else 1


if __name__ == "__main__":
    sys.exit(main())
