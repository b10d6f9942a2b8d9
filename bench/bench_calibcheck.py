"""calib-check on SmolLM2-135M: Penn Treebank vs WikiText-2 as calibration text for WikiText-2 test.

calib-check ranks the two calibration sets from coverage alone (clipped activation share, token
distribution); the FP8 (static activation scale) KLD each yields on the eval text is measured in the
same run and compared with that ranking (agrees / disagrees / not significant at 2 standard errors). Calibration: the first ``--calib-size`` x 512 tokens of
each text; evaluation: the first ``--windows`` x 512-token windows of WikiText-2 test.
Writes bench/results/calibcheck.json (the full result as DIR/calib_check.json next to it).

    .venv/bin/python bench/bench_calibcheck.py [--calib-size 32] [--windows 8]
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
    parser.add_argument("--format", default="fp8")
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--calib-size", type=int, default=32)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "calibcheck.json")
    args = parser.parse_args()
    os.environ.setdefault("QUANTAUDIT_QUIET", "1")
    if not SHARED.is_dir():
        print(f"../shared not found at {SHARED}: the WikiText-2 and PTB files live there", file=sys.stderr)
        return 2

    from quantaudit.calibcheck import CalibCheckSettings, calib_check, coverage_table
    from quantaudit.fileio import atomic_write_json
    from quantaudit.progress import console

    data = SHARED / "data"
    settings = CalibCheckSettings(model=args.model, calib=str(data / "ptb_valid.txt"),
                                  calib2=str(data / "wikitext2_valid_tokens.txt"), eval=str(data / "wikitext2_raw_test.txt"),
                                  format=args.format, calib_size=args.calib_size, windows=args.windows)
    started = time.perf_counter()
    result = calib_check(settings, args.out.parent / "calibcheck")
    seconds = time.perf_counter() - started
    console.print(coverage_table(result))
    names = {"calib": "PTB", "calib2": "WikiText-2"}
    for role in ("calib", "calib2"):
        r = result[role]
        s = r["coverage"]["summary"]
        t = r["coverage"]["tokens"]
        print(f"{names[role]:10s} clipped eval activations {100 * s['clip_share']:.4f} % (worst input {100 * s['worst_clip_share']:.3f} %), "
              f"unseen tokens {100 * t['unseen_token_share']:.2f} %, JS {t['js_divergence_bits']:.4f} bits, "
              f"{args.format} KLD {r['kld']:.5f} ± {r['kld_unc']:.5f}, verdict {r['verdict']}")
    better = names[result["better"]]
    print(f"calib-check ranks {better} better (decided by {result['decided_by']}); measured {args.format} KLD of the other "
          f"set minus {better}'s: {result['kld_difference']:+.5f} ± {result['kld_difference_unc']:.5f} "
          f"({result['kld_agreement']})")
    print(f"wall time {seconds:.0f} s")
    ok = result["better"] == "calib2" and result["kld_agreement"] == "agrees"
    atomic_write_json(args.out, {
        "better": better, "decided_by": result["decided_by"], "kld_difference": result["kld_difference"],
        "kld_difference_unc": result["kld_difference_unc"], "kld_agreement": result["kld_agreement"],
        **{names[role]: {"kld": result[role]["kld"], "kld_unc": result[role]["kld_unc"],
                         "summary": result[role]["coverage"]["summary"], "tokens": result[role]["coverage"]["tokens"],
                         "verdict": result[role]["verdict"], "reasons": result[role]["reasons"]} for role in ("calib", "calib2")},
        "seconds": seconds,
    })
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
