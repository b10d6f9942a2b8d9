"""calib-check on SmolLM2-135M: what the choice of calibration set costs, per format (issue 21's protocol).

Eval: the first ``--windows`` x 512 tokens of WikiText-2 test. Calibration sets, ``--calib-size`` x 512 tokens
each: WikiText-2 valid, Penn Treebank valid, the TinyStories sample, and Python source (the standard
library's own ``.py`` files, which every install has). Formats: calib-check's default, the calibration-dependent
ones (int4_awq, int4_gptq, w4a8_awq, int8_sq_static, fp8). Sample-count curves (1, 4, 16 and the whole set) for
``--curve-formats`` on WikiText-2 valid. Prints the set x format KLD table, the sensitive formats with best and
worst set, the curves, and whether coverage predicted the measured order; writes bench/results/calibcheck.json
and the full calib_check.{json,md,html} beside it. Run it alone on the machine.

    .venv/bin/python bench/bench_calibcheck.py [--calib-size 32] [--windows 16]
"""

from __future__ import annotations

import argparse
import os
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT / ".." / "shared"
PYTHON_SOURCE_CHARS = 400_000  # ~100k tokens, several times what 32 x 512 needs


def python_source(target: Path) -> Path:
    """The standard library's top-level .py files, one document each, until PYTHON_SOURCE_CHARS."""
    docs, size = [], 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        docs.append(text)
        size += len(text)
        if size >= PYTHON_SOURCE_CHARS:
            break
    target.write_text("<|endoftext|>".join(docs))
    return target


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--calib-size", type=int, default=32)
    parser.add_argument("--formats", default="int4_awq,int4_gptq,w4a8_awq,int8_sq_static,fp8")
    parser.add_argument("--curve-formats", default="int4_awq,int4_gptq")
    parser.add_argument("--sample-counts", default="1,4,16,64")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "calibcheck.json")
    args = parser.parse_args()
    os.environ.setdefault("QUANTAUDIT_QUIET", "1")
    if not SHARED.is_dir():
        print(f"../shared not found at {SHARED}: the WikiText-2, PTB and TinyStories files live there", file=sys.stderr)
        return 2

    from quantaudit.calibcheck.command import CalibCheckSettings, calib_check, curve_table, kld_table
    from quantaudit.fileio import atomic_write_json
    from quantaudit.progress import console
    from quantaudit.session import split_list

    data = SHARED / "data"
    load = os.getloadavg()
    print(f"load average before: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} (run alone: nothing else on the cores)")
    with tempfile.TemporaryDirectory() as tmp:
        sets = [data / "wikitext2_valid_tokens.txt", data / "ptb_valid.txt", data / "tinystories_sample.txt",
                python_source(Path(tmp) / "python_stdlib.txt")]
        settings = CalibCheckSettings(model=args.model, calib=str(sets[0]), calib2=[str(s) for s in sets[1:]],
                                      eval=str(data / "wikitext2_raw_test.txt"), calib_size=args.calib_size,
                                      windows=args.windows, formats=split_list(args.formats),
                                      curve_formats=split_list(args.curve_formats),
                                      sample_counts=split_list(args.sample_counts))
        started = time.perf_counter()
        result = calib_check(settings, args.out.parent / "calibcheck")
        seconds = time.perf_counter() - started
    console.print(kld_table(result))
    console.print(curve_table(result))
    for f in result["formats"]:
        if f["sensitive"]:
            b = f["best_vs_worst"]
            print(f"{f['format']}: calibration-sensitive; best {f['best']} (tied: {', '.join(f['best_tied']) or 'none'}), "
                  f"worst {f['worst']}: worst - best {b['difference']:+.5f} ± {b['unc']:.5f}")
        else:
            print(f"{f['format']}: {f['verdict']}")
        if f.get("curve"):
            print(f"  samples curve: {f['curve']['verdict']}")
    print(f"coverage heuristics: {result['coverage_prediction']['verdict']}")
    for w in result["warnings"]:
        print(f"warning: {w}")
    load_after = os.getloadavg()
    print(f"wall time {seconds:.0f} s; load average after: {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f}")
    atomic_write_json(args.out, {
        "protocol": {"model": args.model, "eval": "wikitext2_raw_test.txt", "windows": args.windows, "seq_len": 512,
                     "calib_size": args.calib_size, "calib_seq": 512, "formats": settings.formats,
                     "curve_formats": settings.curve_formats},
        "sets": [{"label": s["label"], "samples": s["samples"], "unseen_token_share": s["coverage"]["tokens"]["unseen_token_share"],
                  "js_divergence_bits": s["coverage"]["tokens"]["js_divergence_bits"],
                  "clip_share": s["coverage"]["summary"]["clip_share"]} for s in result["sets"]],
        "formats": [{key: f.get(key) for key in ("format", "klds", "verdict", "best", "best_tied", "worst", "worst_tied",
                                                 "best_vs_worst", "pairs", "curve")} for f in result["formats"]],
        "coverage_prediction": result["coverage_prediction"], "warnings": result["warnings"],
        "seconds": seconds, "load_average": {"before": load, "after": load_after},
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
