"""`python -m bench` (or `make bench`): every benchmark, one after another, results in bench/results/.

Each script measures its ratios side by side in one process and writes its own JSON; this runner
only sequences them (the machine has two cores: running them in parallel would corrupt the timings)
and collects their JSON into bench/results/summary.json for comparison across commits.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPTS = ["bench_eval.py", "bench_quant.py", "bench_audit.py", "bench_tasks.py", "bench_stream.py", "bench_vocab.py",
           "bench_generate.py"]


def main() -> int:
    only = sys.argv[1:]
    summary, failed = {}, []
    for script in SCRIPTS:
        if only and script.removeprefix("bench_").removesuffix(".py") not in only:
            continue
        print(f"\n=== {script} ===", flush=True)
        start = time.perf_counter()
        code = subprocess.call([sys.executable, str(HERE / script)])
        if code:
            failed.append(script)
        result_file = HERE / "results" / f"{script.removeprefix('bench_').removesuffix('.py')}.json"
        summary[script] = {"exit_code": code, "seconds": time.perf_counter() - start,
                           "result": json.loads(result_file.read_text()) if result_file.is_file() else None}
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
