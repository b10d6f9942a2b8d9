"""Evaluation throughput against a plain forward loop, measured side by side in one run.

    python bench/bench_eval.py [--windows 16] [--reps 3]     -> bench/results/eval.json
    python bench/bench_eval.py --k-table [--k-windows 4]      -> bench/results/eval_k_table.json

Speed: SmolLM2-135M on the first ``--windows`` x 512 tokens of WikiText-2 test. Each repetition
times, in turn, a plain ``model(input_ids=..., use_cache=False)`` loop under
``torch.inference_mode()`` (the same batches, nothing else computed), ``evaluate_perplexity`` and
``compare_to_baseline`` (exact baseline, candidate = the base model itself: a fake-quantized
candidate costs the same forward). Tokens/s are scored tokens over wall time; ratios use the best
repetition of each (the least disturbed by other processes) and the median is printed too.

K table: how far the top-K + tail-bin KL falls below the full-vocabulary KL, on stories260K
(TinyStories sample) and SmolLM2 (WikiText-2), for round-to-nearest weight perturbations.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
from pathlib import Path

import torch

from quantaudit.data import load_windows
from quantaudit.evaluate import auto_batch_size, build_baseline, compare_to_baseline, evaluate_perplexity, iter_logits
from quantaudit.metrics import PairedAccumulator, summarize_logits
from quantaudit.models import load_model
from quantaudit.quant.numerics import fake_int, grouped, int_scale

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
RESULTS = REPO / "bench" / "results"


def timed(run) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of ``run()``."""
    wall, cpu = time.perf_counter(), time.process_time()
    run()
    return time.perf_counter() - wall, time.process_time() - cpu


def plain_loop(model, windows, batch_size: int) -> None:
    with torch.inference_mode():
        for start in range(0, windows.n, batch_size):
            model(input_ids=windows.ids[start : start + batch_size], use_cache=False)


def speed(windows_n: int, reps: int) -> dict:
    loaded = load_model("smollm2-135m")
    windows = load_windows(SHARED / "data" / "wikitext2_raw_test.txt", loaded.tokenizer, n_windows=windows_n)
    batch = auto_batch_size(loaded, windows)
    load_before = os.getloadavg()[0]
    baseline = None

    def build():
        nonlocal baseline
        baseline = build_baseline(loaded, windows, use_cache=False, batch_size=batch)

    build_time = timed(build)
    runs = {
        "plain": lambda: plain_loop(loaded.model, windows, batch),
        "evaluate_perplexity": lambda: evaluate_perplexity(loaded, windows, batch),
        "compare_to_baseline": lambda: compare_to_baseline(baseline, loaded, windows, batch),
    }
    times = {name: [] for name in runs}
    for rep in range(reps):
        for name, run in runs.items():
            times[name].append(timed(run))
        print(f"rep {rep + 1}: " + ", ".join(f"{k} {windows.scored_tokens / v[-1][0]:.1f} tok/s" for k, v in times.items()),
              flush=True)
    tokens = windows.scored_tokens
    result = {
        "model": "smollm2-135m", "windows": windows.n, "seq_len": windows.seq_len, "tokens": tokens,
        "batch_size": batch, "reps": reps, "threads": torch.get_num_threads(),
        "load_average_1min": [load_before, os.getloadavg()[0]],
        "tokens_per_s_wall": {k: [tokens / wall for wall, _ in v] for k, v in times.items()},
        "tokens_per_cpu_s": {k: [tokens / cpu for _, cpu in v] for k, v in times.items()},
    }
    for clock, index in (("wall", 0), ("cpu", 1)):
        best = {k: min(t[index] for t in v) for k, v in times.items()}
        median = {k: statistics.median(t[index] for t in v) for k, v in times.items()}
        for name in ("evaluate_perplexity", "compare_to_baseline"):
            result[f"ratio_{name}_{clock}"] = best["plain"] / best[name]
            result[f"ratio_{name}_{clock}_median"] = median["plain"] / median[name]
        result[f"ratio_build_baseline_{clock}"] = best["plain"] / build_time[index]
    return result


def rtn(model: torch.nn.Module, bits: int, group: int | None = None) -> torch.nn.Module:
    """Symmetric round-to-nearest of every decoder linear weight (per channel, or per group)."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and name.startswith("model.layers."):
                w = grouped(module.weight, group) if group else module.weight[:, None, :]
                module.weight.copy_(fake_int(w, int_scale(w.abs().amax(-1, keepdim=True), bits), bits).reshape_as(module.weight))
    return model


def noisy(model: torch.nn.Module, fraction: float) -> torch.nn.Module:
    model = copy.deepcopy(model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * p.std() * fraction)
    return model


def k_errors(loaded, windows, candidate, ks) -> dict:
    accs = {k: PairedAccumulator() for k in (None, *ks)}
    for (part, base_logits), (_, cand_logits) in zip(iter_logits(loaded, windows), iter_logits(candidate, windows)):
        for row, i in enumerate(range(part.start, part.stop)):
            n = int(windows.lengths[i]) - 1
            targets = windows.ids[i, 1 : n + 1]
            for k, acc in accs.items():
                acc.update(summarize_logits(base_logits[row, :n], targets, k), cand_logits[row, :n], targets)
    full = accs[None].summary()
    row = {"kld_full": full["kld"]["mean"], "kld_reverse_full": full["kld_reverse"]["mean"], "rel_error": {},
           "rel_error_reverse": {}}
    for k in ks:
        s = accs[k].summary()
        row["rel_error"][k] = s["kld"]["mean"] / full["kld"]["mean"] - 1
        row["rel_error_reverse"][k] = s["kld_reverse"]["mean"] / full["kld_reverse"]["mean"] - 1
    return row


def k_table(k_windows: int) -> dict:
    ks = (16, 32, 64, 128, 256)
    table = {}
    stories = load_model(str(SHARED / "models" / "stories260K" / "hf"))
    w = load_windows(SHARED / "data" / "tinystories_sample.txt", stories.tokenizer)
    for name, cand in {"noise-5%": noisy(stories.model, 0.05), "rtn-int8": rtn(stories.model, 8),
                       "rtn-int4": rtn(stories.model, 4)}.items():
        table[f"stories260K/{name}"] = {"tokens": w.scored_tokens, **k_errors(stories, w, cand, ks)}
    smol = load_model("smollm2-135m")
    w = load_windows(SHARED / "data" / "wikitext2_raw_test.txt", smol.tokenizer, n_windows=k_windows)
    for name, make in {"rtn-int8": lambda m: rtn(m, 8), "rtn-int4-g64": lambda m: rtn(m, 4, 64)}.items():
        table[f"smollm2-135m/{name}"] = {"tokens": w.scored_tokens, **k_errors(smol, w, make(smol.model), ks + (1024, 4096))}
    for name, row in table.items():
        errs = "  ".join(f"K={k}: {e * 100:+.2f}%" for k, e in row["rel_error"].items())
        print(f"{name:28s} KLD {row['kld_full']:.5f}  {errs}")
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--k-table", action="store_true", help="measure top-K baseline error instead of speed")
    parser.add_argument("--k-windows", type=int, default=4)
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.k_table:
        (RESULTS / "eval_k_table.json").write_text(json.dumps(k_table(args.k_windows), indent=1))
        return
    result = speed(args.windows, args.reps)
    (RESULTS / "eval.json").write_text(json.dumps(result, indent=1))
    print(f"1-min load average {result['load_average_1min'][0]:.1f} -> {result['load_average_1min'][1]:.1f} "
          f"on {os.cpu_count()} CPUs")
    for name in ("evaluate_perplexity", "compare_to_baseline", "build_baseline"):
        extra = "" if name == "build_baseline" else f" (median {result[f'ratio_{name}_wall_median']:.3f})"
        need = "; required >= 0.9" if name == "evaluate_perplexity" else ""
        print(f"{name:20s}/ plain forward tokens/s: wall {result[f'ratio_{name}_wall']:.3f}{extra}, "
              f"CPU time {result[f'ratio_{name}_cpu']:.3f}{need}")

if __name__ == "__main__":
    main()
