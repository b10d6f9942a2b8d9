"""Audit vs separate `compare` runs: what sharing one baseline pass saves, measured side by side.

Both paths evaluate the same quantized models on the same windows, in one process:

* audit path: one baseline pass (exact baseline cache, built fresh, not read from disk), then
  each format's candidate pass against it (``compare_to_baseline``), as ``quantaudit audit`` does;
* separate path: per format, what ``quantaudit compare --base M --candidate Q`` does: run its own
  base model and the candidate in lockstep (``compare_models``).

Quantization is done once, before timing, and is the same work on both paths, so it is reported
on its own line and left out of the ratios. Two ratios are printed:

* evaluation only: the two paths above, in this process;
* per run: a separate `compare` is also a process of its own that starts Python, imports, loads both
  models and tokenizes the text before it evaluates. That cost is measured by running the real
  `quantaudit compare` CLI once (base against itself, same windows): its wall time minus the
  evaluation time it reports. Six separate runs pay it six times, one audit once.

The script also runs the whole `audit` (quantization, drift, sensitivity and all) once and prints
its wall time. Writes bench/results/audit.json.

    .venv/bin/python bench/bench_audit.py [--windows 16] [--formats fp8,int8_wo,int8_sq,int4_awq,int4_gptq,w4a8_awq]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT / ".." / "shared"


def compare_process(model: str, data: Path, windows: int) -> tuple[float, float]:
    """(wall seconds, seconds besides evaluating) of one `quantaudit compare` process, base against itself."""
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "compare.json"
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "quantaudit.cli", "compare", "--base", model, "--candidate", model,
                        "--data", str(data), "--windows", str(windows), "--json", str(out)],
                       check=True, stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - start
        evaluated = json.loads(out.read_text())["stats"]["seconds"]
    return wall, wall - evaluated


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--formats", default="fp8,int8_wo,int8_sq,int4_awq,int4_gptq,w4a8_awq")
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--calib-size", type=int, default=32)
    parser.add_argument("--full-audit", action=argparse.BooleanOptionalAction, default=True,
                        help="also time the complete `audit` command")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "audit.json")
    args = parser.parse_args()
    os.environ["QUANTAUDIT_CACHE"] = tempfile.mkdtemp(prefix="qa-bench-cache-")  # nothing reused from earlier runs
    os.environ.setdefault("QUANTAUDIT_QUIET", "1")

    from quantaudit.data import load_windows
    from quantaudit.evaluate import build_baseline, compare_models, compare_to_baseline
    from quantaudit.models import load_model
    from quantaudit.quant import QuantSpec, quantize

    formats = args.formats.split(",")
    lm = load_model(args.model)
    windows = load_windows(SHARED / "data" / "wikitext2_raw_test.txt", lm.tokenizer, 512, args.windows)
    calib = load_windows(SHARED / "data" / "wikitext2_valid_tokens.txt", lm.tokenizer, 512, args.calib_size,
                         role="calib")
    quantized, quantize_seconds = {}, {}
    for name in formats:
        start = time.perf_counter()
        quantized[name] = quantize(lm.model, QuantSpec(format=name), calib, progress=False).model
        quantize_seconds[name] = time.perf_counter() - start
        print(f"quantized {name:10s} in {quantize_seconds[name]:6.1f} s", flush=True)

    start = time.perf_counter()
    baseline = build_baseline(lm, windows, use_cache=False)
    audit_kld = {name: compare_to_baseline(baseline, model, windows)["kld"]["mean"] for name, model in quantized.items()}
    audit_seconds = time.perf_counter() - start

    separate_seconds, separate_kld = 0.0, {}
    for name, model in quantized.items():
        base = load_model(args.model)  # each `compare` run has its own base model; loading is in its overhead
        start = time.perf_counter()
        separate_kld[name] = compare_models(base.model, model, windows)["kld"]["mean"]
        separate_seconds += time.perf_counter() - start
        del base

    ratio = separate_seconds / audit_seconds
    compare_wall, per_run = compare_process(args.model, SHARED / "data" / "wikitext2_raw_test.txt", args.windows)
    separate_runs = separate_seconds + len(formats) * per_run
    run_ratio = separate_runs / (audit_seconds + per_run)
    print(f"\n{args.model}: {len(formats)} formats, {windows.n} windows x 512 tokens of WikiText-2 test "
          f"({windows.scored_tokens} scored tokens), load average {os.getloadavg()[0]:.1f}")
    print(f"{'format':12s} {'KLD audit':>19s} {'KLD compare':>20s} {'rel diff':>9s}")
    for name in formats:
        rel = abs(audit_kld[name] - separate_kld[name]) / separate_kld[name]
        print(f"{name:12s} {audit_kld[name]:19.5f} {separate_kld[name]:20.5f} {100 * rel:8.2f}%")
    print(f"\nevaluation, audit path (1 baseline pass + {len(formats)} candidates): {audit_seconds:7.1f} s")
    print(f"evaluation, {len(formats)} separate compare runs:                  {separate_seconds:7.1f} s")
    print(f"speed-up of the shared baseline, evaluation only: {ratio:.2f}x")
    print(f"one `quantaudit compare` process took {compare_wall:.1f} s, {per_run:.1f} s of it besides evaluating "
          f"(start, imports, loading both models, tokenizing)")
    print(f"per run: {len(formats)} separate compare runs {separate_runs:.1f} s vs one audit "
          f"{audit_seconds + per_run:.1f} s: {run_ratio:.2f}x (issue requires >= 1.5x)")
    print(f"quantization (same on both paths, excluded above): {sum(quantize_seconds.values()):.1f} s")

    result = {
        "model": args.model, "formats": formats, "windows": windows.n, "tokens": windows.scored_tokens,
        "quantize_seconds": quantize_seconds, "audit_eval_seconds": audit_seconds,
        "separate_compare_seconds": separate_seconds, "speedup_evaluation": ratio,
        "compare_process_seconds": compare_wall, "compare_process_overhead_seconds": per_run,
        "separate_runs_seconds": separate_runs, "speedup": run_ratio,
        "kld_audit": audit_kld, "kld_compare": separate_kld, "load_average_1min": os.getloadavg()[0],
    }
    from quantaudit.fileio import atomic_write_json

    atomic_write_json(args.out, result)  # written now too: the complete audit below takes long
    if args.full_audit:
        from quantaudit.audit.run import run_audit
        from quantaudit.audit.settings import AuditSettings

        del quantized
        out_dir = Path(tempfile.mkdtemp(prefix="qa-bench-audit-"))
        settings = AuditSettings(model=args.model, formats=formats, windows=args.windows,
                                 eval=str(SHARED / "data" / "wikitext2_raw_test.txt"),
                                 calib=str(SHARED / "data" / "wikitext2_valid_tokens.txt"), calib_size=args.calib_size)
        start = time.perf_counter()
        run_audit(settings, out_dir, force=True)
        result["full_audit_seconds"] = time.perf_counter() - start
        # The same audit with each format's evaluation done as a separate `compare` run instead.
        result["full_audit_with_separate_compares_seconds"] = result["full_audit_seconds"] - audit_seconds + separate_runs
        print(f"complete audit (quantize + evaluate + drift + sensitivity + outliers + reports): "
              f"{result['full_audit_seconds']:.1f} s, report in {out_dir}; with separate compare runs instead of "
              f"the shared baseline it would take {result['full_audit_with_separate_compares_seconds']:.1f} s")
        atomic_write_json(args.out, result)
    return 0 if run_ratio >= 1.5 else 1


if __name__ == "__main__":
    sys.exit(main())
