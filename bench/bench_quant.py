"""Quantize SmolLM2-135M to each TensorRT-LLM format and measure accuracy and quantization time.

Protocol (the one the ModelOpt / llm-compressor reference figures in ../shared/README.md used):
evaluation = first 16 windows x 512 tokens of WikiText-2 raw test (BOS auto: none for SmolLM2);
calibration = first 64 x 512 tokens of WikiText-2 validation (tokenized form). For each format:
quantize() wall time, mean full-vocabulary KL(base||quant) with its standard error, perplexity,
top-1 agreement, the INT4 group sizes (block formats: block sizes) actually used, and weight storage.
Checks the orderings the algorithms exist for (GPTQ and AWQ below RTN at the same group size,
SmoothQuant below plain W8A8) and writes everything to bench/results/quant.json. The block-scaled
formats (NVFP4 family, MXFP4/MXFP8, FP8 128x128 blocks) are reported next to int4_awq and fp8 with no
ordering imposed among them: their KLDs are whatever this protocol measures.

    .venv/bin/python bench/bench_quant.py                       # the full protocol (many minutes)
    .venv/bin/python bench/bench_quant.py --eval-windows 2 --calib-windows 8 --formats int8_wo fp8
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from collections import Counter
from pathlib import Path

import torch

from quantaudit.data import load_windows
from quantaudit.evaluate import build_baseline, compare_to_baseline
from quantaudit.fileio import atomic_write_json
from quantaudit.models import load_model
from quantaudit.quant import QuantSpec, quantize

ROOT = Path(__file__).resolve().parents[1]
SHARED = (ROOT / ".." / "shared").resolve()
FORMATS = ["int8_wo", "fp8", "int8_w8a8_nosmooth", "int8_sq", "int4_wo", "int4_awq", "int4_gptq", "w4a8_awq",
           "nvfp4", "nvfp4_awq", "w4a8_nvfp4_fp8", "mxfp4", "mxfp8", "fp8_pb_wo"]
ORDERINGS = [("int4_gptq", "int4_wo"), ("int4_awq", "int4_wo"), ("int8_sq", "int8_w8a8_nosmooth")]
# Mean KL(base||quant) measured by others on this machine, same protocol (../shared/README.md).
REFERENCE_KLD = {
    "int8_wo": "ModelOpt 0.0034",
    "fp8": "ModelOpt 0.037",
    "int8_sq": "ModelOpt 0.119 (static per-tensor act.)",
    "int4_awq": "ModelOpt 0.338 (16 calib samples)",
    "int4_gptq": "llm-compressor 0.309 (group 64)",
}


def group_sizes_used(quantized) -> str:
    """'64 x150, 128 x30': how many quantized linears used each group (or block) size."""
    counts = Counter(r.group_size for r in quantized.layers.values() if r.quantized and r.group_size)
    return ", ".join(f"{g} x{n}" for g, n in sorted(counts.items())) or "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--formats", nargs="+", default=FORMATS)
    parser.add_argument("--eval-windows", type=int, default=16)
    parser.add_argument("--calib-windows", type=int, default=64)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's); on a CPU shared with other jobs 1 can be faster")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "quant.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    loaded = load_model("smollm2-135m")
    tok = loaded.tokenizer
    evaluation = load_windows(SHARED / "data" / "wikitext2_raw_test.txt", tok, seq_len=512, n_windows=args.eval_windows)
    calib = load_windows(SHARED / "data" / "wikitext2_valid_tokens.txt", tok, seq_len=512,
                         n_windows=args.calib_windows, role="calib")
    print(f"eval: {evaluation.describe()}\ncalib: {calib.describe()}\ntorch threads: {torch.get_num_threads()}", flush=True)

    baseline = build_baseline(loaded, evaluation, use_cache=False)  # one fp32 pass shared by every format
    rows = []
    for name in args.formats:
        quantized = quantize(loaded.model, QuantSpec(format=name, group_size=args.group_size), calib, progress=False)
        started = time.perf_counter()
        summary = compare_to_baseline(baseline, quantized.model, evaluation)
        row = {
            "format": name,
            "kld": summary["kld"]["mean"],
            "kld_unc": summary["kld"]["unc"],
            "ppl": summary["ppl"],
            "ppl_base": summary["ppl_base"],
            "top1": summary["top1"],
            "tokens": summary["tokens"],
            "quant_seconds": quantized.seconds,
            "eval_seconds": time.perf_counter() - started,
            "group_sizes": group_sizes_used(quantized),
            "fallbacks": quantized.fallbacks(),
            "weight_bytes": quantized.weight_bytes(),
            "weight_bytes_breakdown": quantized.weight_bytes_breakdown(),
            "calib": quantized.calib_info,
            "load_average_after": os.getloadavg()[0],  # other jobs on the machine slow every timing
            "reference_kld": REFERENCE_KLD.get(name),
        }
        rows.append(row)
        print(f"{name:20s} KLD {row['kld']:.4f} ± {row['kld_unc']:.4f}  PPL {row['ppl']:.2f}  "
              f"quantize {row['quant_seconds']:.0f} s  groups {row['group_sizes']}  "
              f"load {row['load_average_after']:.1f}", flush=True)
        del quantized

    by_name = {r["format"]: r for r in rows}
    print(f"\nSmolLM2-135M, {rows[0]['tokens']} scored tokens, fp32 PPL {rows[0]['ppl_base']:.2f}; "
          f"calibration {calib.n} x {calib.seq_len} tokens; group size {args.group_size} requested")
    print(f"{'format':20s} {'mean KLD':>17s} {'PPL':>7s} {'top-1':>6s} {'quantize s':>10s} {'weights MB':>10s}  groups/blocks    reference KLD")
    for r in rows:
        print(f"{r['format']:20s} {r['kld']:8.4f} ± {r['kld_unc']:6.4f} {r['ppl']:7.2f} {r['top1']:6.3f} "
              f"{r['quant_seconds']:10.1f} {r['weight_bytes'] / 1e6:10.1f}  {r['group_sizes']:16s} {r['reference_kld'] or ''}")
    orderings = []
    for better, worse in ORDERINGS:
        if better in by_name and worse in by_name:
            ok = by_name[better]["kld"] < by_name[worse]["kld"]
            orderings.append({"better": better, "worse": worse, "holds": ok})
            print(f"ordering {better} < {worse}: {'holds' if ok else 'FAILS'} "
                  f"({by_name[better]['kld']:.4f} vs {by_name[worse]['kld']:.4f})")

    atomic_write_json(args.out, {
        "model": loaded.name, "evaluation": evaluation.describe(), "calibration": calib.describe(),
        "group_size_requested": args.group_size, "torch_threads": torch.get_num_threads(),
        "machine": platform.machine(), "rows": rows, "orderings": orderings,
    })
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
