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
import time
from pathlib import Path

import torch

from quantaudit.data import Windows, load_windows
from quantaudit.evaluate import (
    auto_batch_size,
    build_baseline,
    compare_to_baseline,
    evaluate_perplexity,
)
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


def plain_loop(model, windows: Windows) -> None:
    with torch.inference_mode():
        model(input_ids=windows.ids, use_cache=False)


def batches(windows: Windows, size: int) -> list[Windows]:
    """The windows as consecutive batches, each its own Windows (so each can have its own baseline)."""
    return [Windows(windows.ids[s : s + size], windows.lengths[s : s + size], windows.source, windows.bos,
                    windows.stream_tokens) for s in range(0, windows.n, size)]


METHODS = ("plain", "evaluate_perplexity", "build_baseline", "compare_to_baseline")


def speed(windows_n: int, reps: int) -> dict:
    loaded = load_model("smollm2-135m")
    windows = load_windows(SHARED / "data" / "wikitext2_raw_test.txt", loaded.tokenizer, n_windows=windows_n)
    size = auto_batch_size(loaded, windows)
    load_before = os.getloadavg()[0]
    # seconds[method][rep] = [wall, cpu], summed over batches; every batch runs all methods in turn
    seconds = {m: [[0.0, 0.0] for _ in range(reps)] for m in METHODS}
    pieces = batches(windows, size)
    # untimed: the baselines compare_to_baseline reads, which also warms every code path up
    baselines = [build_baseline(loaded, piece, use_cache=False) for piece in pieces]
    for rep in range(reps):
        order = METHODS[rep % len(METHODS):] + METHODS[: rep % len(METHODS)]
        for piece, baseline in zip(pieces, baselines):
            runs = {
                "plain": lambda: plain_loop(loaded.model, piece),
                "evaluate_perplexity": lambda: evaluate_perplexity(loaded, piece),
                "build_baseline": lambda: build_baseline(loaded, piece, use_cache=False),
                "compare_to_baseline": lambda: compare_to_baseline(baseline, loaded, piece),
            }
            for name in order:
                wall, cpu = timed(runs[name])
                seconds[name][rep][0] += wall
                seconds[name][rep][1] += cpu
        print(f"rep {rep + 1}: " + ", ".join(f"{m} {windows.scored_tokens / seconds[m][rep][0]:.1f} tok/s"
                                             for m in METHODS), flush=True)
    tokens = windows.scored_tokens
    result = {
        "model": "smollm2-135m", "windows": windows.n, "seq_len": windows.seq_len, "tokens": tokens,
        "batch_size": size, "reps": reps, "threads": torch.get_num_threads(),
        "load_average_1min": [load_before, os.getloadavg()[0]],
        "tokens_per_s_wall": {m: [tokens / r[0] for r in seconds[m]] for m in METHODS},
        "tokens_per_cpu_s": {m: [tokens / r[1] for r in seconds[m]] for m in METHODS},
    }
    for clock, index in (("wall", 0), ("cpu", 1)):
        for name in METHODS[1:]:
            per_rep = [p[index] / q[index] for p, q in zip(seconds["plain"], seconds[name])]
            result[f"ratio_{name}_{clock}"] = sum(p[index] for p in seconds["plain"]) / sum(q[index] for q in seconds[name])
            result[f"ratio_{name}_{clock}_per_rep"] = per_rep
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


@torch.inference_mode()
def window_logits(model, windows: Windows):
    """Each window's scored logits [n, V] and targets [n], from the model's forward in the audit's batches."""
    size = auto_batch_size(model, windows)
    for start in range(0, windows.n, size):
        part = slice(start, min(start + size, windows.n))
        logits = model(input_ids=windows.ids[part, : int(windows.lengths[part].max())], use_cache=False).logits.float()
        for row, i in enumerate(range(part.start, part.stop)):
            n = int(windows.lengths[i]) - 1
            yield logits[row, :n], windows.ids[i, 1 : n + 1]


def k_errors(loaded, windows, candidate, ks) -> dict:
    accs = {k: PairedAccumulator() for k in (None, *ks)}
    for (base_logits, targets), (cand_logits, _) in zip(window_logits(loaded.model, windows),
                                                        window_logits(candidate, windows)):
        for k, acc in accs.items():
            acc.update(summarize_logits(base_logits, targets, k), cand_logits, targets)
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
    for name in METHODS[1:]:
        per_rep = ", ".join(f"{r:.3f}" for r in result[f"ratio_{name}_wall_per_rep"])
        need = "; required >= 0.9" if name == "evaluate_perplexity" else ""
        print(f"{name:20s}/ plain forward, tokens/s: wall {result[f'ratio_{name}_wall']:.3f} (per rep {per_rep}), "
              f"CPU time {result[f'ratio_{name}_cpu']:.3f}{need}")


if __name__ == "__main__":
    main()
