"""Generation fidelity on SmolLM2-135M-Instruct, and batched against one-prompt-at-a-time generation.

    python bench/bench_generate.py [--prompts 64] [--max-new-tokens 128] [--formats int8_wo fp8 int4_awq int4_wo]
        -> bench/results/generate.json

Prompts: the embedded default set (paragraph openings of the default evaluation text), in the model's chat
template. Speed: the baseline's greedy continuations of every prompt, batched (``fidelity.GEN_BATCH`` prompts
per ``generate`` call, left-padded) and one prompt at a time, measured side by side; prompts/s and whether the
outputs are identical. Fidelity: per format, the share of prompts continued identically and the median first
divergence (``quantaudit.fidelity``), calibrated on the embedded calibration text (32 x 512 tokens).
Run it with nothing else on the machine; the load average is printed with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from quantaudit.data import load_windows
from quantaudit.fidelity import GEN_BATCH, compare_generations, continuations, generate, prompt_set
from quantaudit.models import load_model
from quantaudit.quant import QuantSpec, quantize

RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--formats", nargs="+", default=["int8_wo", "fp8", "int4_awq", "int4_wo"])
    args = parser.parse_args()

    lm = load_model("smollm2-135m")
    tok = lm.tokenizer
    prompts = prompt_set("default", tok, "auto", args.max_new_tokens)
    prompts = type(prompts)(prompts.source, prompts.prompts[: args.prompts], prompts.ids[: args.prompts],
                            prompts.chat_template, prompts.max_new_tokens)
    load_before = os.getloadavg()
    started = time.perf_counter()
    batched = generate(lm.model, prompts.ids, args.max_new_tokens, tok.eos_token_id, tok.pad_token_id, GEN_BATCH)
    batched_s = time.perf_counter() - started
    started = time.perf_counter()
    single = generate(lm.model, prompts.ids, args.max_new_tokens, tok.eos_token_id, tok.pad_token_id, 1)
    single_s = time.perf_counter() - started
    same = sum(a == b for a, b in zip(batched, single))
    speed = {"prompts": len(prompts.ids), "batch": GEN_BATCH, "batched_s": batched_s, "single_s": single_s,
             "batched_prompts_per_s": len(prompts.ids) / batched_s, "single_prompts_per_s": len(prompts.ids) / single_s,
             "speedup": single_s / batched_s, "identical_outputs": same, "generated_tokens": sum(map(len, batched)),
             "load_average_before": load_before, "load_average_after": os.getloadavg()}
    print(f"batched {speed['batched_prompts_per_s']:.2f} prompts/s vs one at a time "
          f"{speed['single_prompts_per_s']:.2f}: {speed['speedup']:.2f}x; identical outputs {same}/{len(batched)}; "
          f"load average {load_before[0]:.2f} -> {speed['load_average_after'][0]:.2f}", flush=True)

    calib = load_windows(None, tok, 512, 32, role="calib")
    base = continuations(lm.model, tok, prompts.prompts, prompts.ids, args.max_new_tokens, "baseline")
    formats = {}
    for name in args.formats:
        qm = quantize(lm.model, QuantSpec(format=name, group_size=64), calib)
        quant = continuations(qm.model, tok, prompts.prompts, prompts.ids, args.max_new_tokens, name)
        g = compare_generations(base, quant, prompts.prompts, args.max_new_tokens)
        formats[name] = {k: g[k] for k in ("identical", "median_divergence", "rouge_l_after_divergence", "degeneration")}
        print(f"{name}: identical {100 * g['identical']:.1f}%, median first divergence "
              f"{g['median_divergence'] if g['median_divergence'] is not None else '> ' + str(args.max_new_tokens)}, "
              f"ROUGE-L after divergence {g['rouge_l_after_divergence']}", flush=True)
        del qm
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "generate.json").write_text(json.dumps({"prompts": prompts.describe() | {"prompts": len(prompts.ids)},
                                                       "speed": speed, "formats": formats}, indent=2) + "\n")


if __name__ == "__main__":
    main()
