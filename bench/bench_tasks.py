"""Task scoring speed: PIQA items/s on SmolLM2-135M, batched against one sequence per forward.

Both runs score the same items in the same process, one after the other, so the ratio is measured
side by side; the per-item choices of both runs are compared too (they must agree: batching only
changes float rounding). Writes bench/results/tasks.json.

    .venv/bin/python bench/bench_tasks.py [--items 200] [--batch-sizes 1,auto,16] [--task-data ../shared/data]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from quantaudit.models import load_model
from quantaudit.tasks import evaluate_task, load_task

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--items", type=int, default=200, help="first N PIQA items")
    parser.add_argument("--batch-sizes", default="1,auto,16",
                        help="sequences per forward, comma-separated; 1 = unbatched, auto = by logits budget")
    parser.add_argument("--task-data", default=str(REPO / ".." / "shared" / "data"))
    args = parser.parse_args()

    sizes = [None if b == "auto" else int(b) for b in args.batch_sizes.split(",")]
    if 1 not in sizes:
        parser.error("--batch-sizes must include 1: the unbatched run is the reference for the ratio")
    loaded = load_model(args.model)
    task = load_task("piqa", args.task_data, limit=args.items)
    sequences = sum(len(it.choices) for it in task.items)
    runs = {}
    for batch_size in sizes:
        start = time.perf_counter()
        result = evaluate_task(loaded.model, loaded.tokenizer, task, batch_size=batch_size)
        seconds = time.perf_counter() - start
        runs[batch_size] = {"seconds": seconds, "items_per_s": task.n / seconds, "result": result}

    unbatched = runs[1]
    rows = []
    print(f"PIQA first {task.n} items ({sequences} sequences), {args.model}, torch threads {torch.get_num_threads()}, "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"{'batch':>6} {'seconds':>8} {'items/s':>8} {'vs unbatched':>13} {'acc':>6} {'acc_norm':>9} {'same choices':>13}")
    for batch_size, run in runs.items():
        r = run["result"]
        same = sum(a == b for a, b in zip(r.predictions, unbatched["result"].predictions))
        speedup = run["items_per_s"] / unbatched["items_per_s"]
        print(f"{batch_size or 'auto':>6} {run['seconds']:>8.1f} {run['items_per_s']:>8.2f} {speedup:>12.2f}x "
              f"{r.summary['acc']:>6.3f} {r.summary['acc_norm']:>9.3f} {same:>8}/{task.n}")
        rows.append({"batch_size": batch_size or "auto", "seconds": run["seconds"], "items_per_s": run["items_per_s"],
                     "speedup_vs_unbatched": speedup, "acc": r.summary["acc"], "acc_norm": r.summary["acc_norm"],
                     "same_choices_as_unbatched": same})

    out = REPO / "bench" / "results" / "tasks.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "benchmark": "piqa task scoring",
        "model": args.model,
        "items": task.n,
        "sequences": sequences,
        "bos": unbatched["result"].bos,
        "torch_threads": torch.get_num_threads(),
        "load_average_1min": os.getloadavg()[0],
        "machine": platform.processor() or platform.machine(),
        "runs": rows,
    }, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
