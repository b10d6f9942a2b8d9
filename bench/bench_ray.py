"""`audit --ray auto` vs the sequential audit, measured side by side in one run, and an 8-worker projection.

Both runs audit the same model on the same windows with the same formats, each in its own `quantaudit audit`
process, one after the other (the machine's cores are never shared between them):

* sequential: the in-memory executor with torch's two threads;
* ray: a local Ray instance with two workers of one thread each (Ray gives a one-CPU task one thread), each
  format one job.

Each job's own time (quantize, evaluate, drift, sensitivity, tasks: report.json's ``timings``) then gives the
makespan on 8 workers (longest job first onto the least-loaded worker), added to the driver's shared work and
the Ray start: what 8 GPUs or 8 nodes would take, printed next to the measured times. Checks that both reports
hold the same KLDs. Writes bench/results/ray.json.

    .venv/bin/python bench/bench_ray.py [--formats fp8,int8_wo,int8_sq,int4_awq,int4_gptq,w4a8_awq] [--windows 16]
"""

from __future__ import annotations

import argparse
import heapq
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def audit(extra: list[str], args, out: Path) -> tuple[float, dict]:
    """Wall seconds and report of one `quantaudit audit` process."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "quantaudit.cli", "audit", "--model", args.model, "--formats", args.formats,
                    "--windows", str(args.windows), "--out", str(out), *extra],
                   check=False, stdout=subprocess.DEVNULL, env={**os.environ, "QUANTAUDIT_QUIET": "1"})
    wall = time.perf_counter() - start
    return wall, json.loads((out / "report.json").read_text())


def makespan(jobs: list[float], workers: int) -> float:
    """Longest-processing-time-first schedule of ``jobs`` on ``workers``: when the last one finishes."""
    loads = [0.0] * workers
    for job in sorted(jobs, reverse=True):
        heapq.heapreplace(loads, loads[0] + job)  # onto the least-loaded worker
    return max(loads)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--formats", default="fp8,int8_wo,int8_sq,int4_awq,int4_gptq,w4a8_awq")
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "ray.json"))
    args = parser.parse_args()
    print(f"load average before: {os.getloadavg()}", flush=True)
    with tempfile.TemporaryDirectory() as folder:
        # a first run builds the baseline cache both runs then read, so neither pays for it
        audit(["--formats", args.formats.split(",")[0], "--sensitivity-granularity", "none", "--drift-windows", "0"],
              args, Path(folder) / "warm")
        sequential_s, sequential = audit([], args, Path(folder) / "sequential")
        print(f"sequential: {sequential_s:.1f} s (load average {os.getloadavg()[0]:.2f})", flush=True)
        ray_s, distributed = audit(["--ray", "auto"], args, Path(folder) / "ray")
        print(f"ray, 2 workers x 1 thread: {ray_s:.1f} s (load average {os.getloadavg()[0]:.2f})", flush=True)
    jobs = {name: sum(seconds.values()) for name, seconds in distributed["timings"]["format_seconds"].items()}
    shared = sum(distributed["timings"]["baseline_seconds"].values())
    overhead = ray_s - shared - makespan(list(jobs.values()), 2)  # Ray's start, workers' imports and model loads
    projected = shared + max(overhead, 0.0) + makespan(list(jobs.values()), 8)
    want = {f["name"]: f["kld"]["mean"] for f in sequential["formats"]}
    got = {f["name"]: f["kld"]["mean"] for f in distributed["formats"]}
    worst = max(abs(got[name] - want[name]) / want[name] for name in want)
    result = {
        "model": args.model, "formats": args.formats.split(","), "windows": args.windows,
        "sequential_seconds": sequential_s, "ray_seconds": ray_s, "speedup": sequential_s / ray_s,
        "job_seconds": jobs, "shared_seconds": shared, "ray_overhead_seconds": overhead,
        "projected_8_workers_seconds": projected, "kld_max_relative_difference": worst,
        "klds": got,
        "load_average_after": os.getloadavg(),
    }
    print(f"speed-up {result['speedup']:.2f}x; jobs {', '.join(f'{k} {v:.0f} s' for k, v in jobs.items())}; "
          f"shared work {shared:.0f} s, Ray overhead {overhead:.0f} s; projected on 8 workers: {projected:.0f} s; "
          f"largest relative KLD difference ray vs sequential: {worst:.1e}")
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
