"""Peak memory of an audit against vocabulary size: a tiny Llama (hidden 128, 2 layers) with vocabulary 512 and
262,144 (Gemma's), in memory and layer-streamed, each audit in a process of its own (peak RSS is per process).

Same protocol for all: ``int8_wo,fp8``, 4 × 512 evaluation tokens and 4 × 256 calibration tokens of
``../shared/data/tinystories_sample.txt``, decoder sensitivity in memory. Prints and writes
bench/results/vocab.json: peak RSS, wall seconds, load average and the KLDs, which must agree between
in-memory and streamed runs.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SHARED = (REPO / ".." / "shared").resolve()
TEXT = SHARED / "data" / "tinystories_sample.txt"


def one(vocab: int, streaming: str, root: Path) -> dict:
    """Build (once) and audit the model in this process; called in a child process by :func:`main`."""
    sys.path.insert(0, str(REPO / "tests"))
    from tiny_models import build_tiny_model

    from quantaudit.audit.run import run_audit
    from quantaudit.audit.settings import AuditSettings

    folder = root / f"vocab{vocab}"
    if not (folder / "config.json").exists():
        folder.mkdir(parents=True, exist_ok=True)
        build_tiny_model("llama", folder, SHARED / "models" / "stories260K" / "hf", vocab_size=vocab)
    started = time.perf_counter()
    settings = AuditSettings(model=str(folder), formats=["int8_wo", "fp8"], calib=str(TEXT), calib_size=4,
                             calib_seq=256, eval=str(TEXT), windows=4, seq_len=512, sensitivity="decoder",
                             streaming=streaming, budget="kld<=10")
    report = run_audit(settings, root / f"out-{vocab}-{streaming}", force=True)
    return {"vocab": vocab, "streaming": streaming, "seconds": time.perf_counter() - started,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "kld": {f["name"]: f["kld"]["mean"] for f in report["formats"]}, "load_average_1min": os.getloadavg()[0]}


def main() -> int:
    if not SHARED.is_dir():
        print(f"../shared not found at {SHARED}", file=sys.stderr)
        return 2
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for vocab, streaming in ((512, "off"), (262144, "off"), (262144, "on")):
            out = subprocess.run([sys.executable, __file__, "--one", str(vocab), streaming, tmp], check=True,
                                 capture_output=True, text=True, env={**os.environ, "QUANTAUDIT_QUIET": "1"})
            row = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(f"vocab {vocab:>7} streaming {streaming:>3}: peak RSS {row['peak_rss_mb']:7.0f} MB, "
                  f"{row['seconds']:5.1f} s, KLD {row['kld']}, load average {row['load_average_1min']:.1f}", flush=True)
    small, large, streamed = rows
    result = {"rows": rows, "large_over_small_rss": large["peak_rss_mb"] / small["peak_rss_mb"],
              "streamed_over_in_memory_rss": streamed["peak_rss_mb"] / large["peak_rss_mb"]}
    print(f"peak RSS, vocabulary 262,144 / 512 in memory: {result['large_over_small_rss']:.1f}x; "
          f"streamed / in memory at 262,144: {result['streamed_over_in_memory_rss']:.2f}x")
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "vocab.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--one"]:
        print(json.dumps(one(int(sys.argv[2]), sys.argv[3], Path(sys.argv[4]))))
        sys.exit(0)
    sys.exit(main())
