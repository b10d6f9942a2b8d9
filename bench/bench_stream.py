"""Layer-streamed audits: peak memory against the model's fp32 weights (issue #9).

(b) SmolLM2-135M streamed (``quantaudit audit --streaming on``), 3 formats (int8_wo, fp8, int4_awq),
    16 windows x 512 tokens of WikiText-2 test, 8 x 512 calibration tokens of WikiText-2 valid: peak RSS
    of the whole process / SmolLM2's fp32 weight bytes (538 MB), next to the fixed overhead: a process
    that imports torch, transformers' Llama modules and quantaudit's audit code, loads the tokenizer and
    reads and tokenizes the same evaluation and calibration text, which any audit does whatever the
    model's size. Issue #9's target: streamed peak < 0.5 x 538 MB + that overhead.
(s) A synthetic deep model: random weights, Llama config, ~8 GB of fp32 decoder layers written as
    safetensors shards under /tmp (removed afterwards; stories260K's tokenizer), audited streaming
    (int8_wo, 2 windows x 128 tokens): peak RSS must stay under 2 GB.

Every figure is one child process's ``ru_maxrss``: a light wrapper (no torch) runs the job and reads
``resource.getrusage(RUSAGE_CHILDREN)``, which then covers that job alone. Writes bench/results/stream.json.

    .venv/bin/python bench/bench_stream.py
    .venv/bin/python bench/bench_stream.py --synthetic-gb 1 --skip-smollm2
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = (ROOT / ".." / "shared").resolve()
MB = 10**6
SMOLLM2_FORMATS = "int8_wo,fp8,int4_awq"
SMOLLM2_TARGET_SHARE = 0.5  # of the fp32 weights, above the fixed overhead
SYNTHETIC_LIMIT_BYTES = 2 * 2**30
# Synthetic layer shape (TinyLlama-1.1B's): 44 M parameters, 176 MB of fp32 per decoder layer.
SYNTHETIC = {"hidden_size": 2048, "intermediate_size": 5632, "num_attention_heads": 32, "num_key_value_heads": 8}
# The fixed overhead: what a streamed audit holds whatever the model's size — the imports, the
# tokenizer, and the evaluation and calibration text read and tokenized (the Rust tokenizer's
# transient per-token records peak here). Run as its own process, on the same text as the audit.
OVERHEAD_SCRIPT = """
import sys, torch, transformers.models.llama.modeling_llama, quantaudit.cli, quantaudit.audit.run, quantaudit.audit.streamed
from quantaudit.data import load_windows
from quantaudit.models import load_tokenizer, model_folder
tokenizer = load_tokenizer(model_folder(sys.argv[1])[0])
load_windows(sys.argv[2], tokenizer, 512, int(sys.argv[3]))
load_windows(sys.argv[4], tokenizer, 512, int(sys.argv[5]), role="calib")
"""


def measured(command: list[str]) -> dict:
    """Run ``command`` under a torch-free wrapper process; its exit code, wall time and peak RSS."""
    wrapper = [sys.executable, __file__, "--child", json.dumps(command)]
    done = subprocess.run(wrapper, stdout=subprocess.PIPE, check=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_child(command: list[str]) -> None:
    started = time.perf_counter()
    code = subprocess.call(command, stdout=sys.stderr)
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    print(json.dumps({"exit_code": code, "seconds": time.perf_counter() - started, "max_rss_bytes": rss}))


def audit_command(model: str, out: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "quantaudit.cli", "audit", "--model", model, "--streaming", "on",
            "--sensitivity-granularity", "none", "--out", str(out), "--force", *args]


def write_synthetic(folder: Path, target_bytes: float) -> dict:
    """A Llama checkpoint of random weights with ``target_bytes`` of fp32 decoder layers, sharded by layer groups."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    stories = SHARED / "models" / "stories260K" / "hf"
    per_layer = sum(math.prod(s) for s in _layer_shapes().values())
    n_layers = max(1, round(target_bytes / (4 * per_layer)))
    config = LlamaConfig(**SYNTHETIC, num_hidden_layers=n_layers, vocab_size=512, max_position_embeddings=512,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    config.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"):
        shutil.copy(stories / name, folder / name)
    generator = torch.Generator().manual_seed(0)
    hidden = SYNTHETIC["hidden_size"]
    weight_map, layers_per_shard = {}, 4
    shards = [range(i, min(i + layers_per_shard, n_layers)) for i in range(0, n_layers, layers_per_shard)]
    for number, layers in enumerate(shards):
        file = f"model-{number + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for i in layers:
            for name, shape in _layer_shapes().items():
                tensors[f"model.layers.{i}.{name}.weight"] = torch.randn(shape, generator=generator) * 0.02
            tensors[f"model.layers.{i}.input_layernorm.weight"] = torch.ones(hidden)
            tensors[f"model.layers.{i}.post_attention_layernorm.weight"] = torch.ones(hidden)
        if number == 0:
            tensors["model.embed_tokens.weight"] = torch.randn(512, hidden, generator=generator) * 0.02
            tensors["model.norm.weight"] = torch.ones(hidden)
        save_file(tensors, folder / file)
        weight_map.update(dict.fromkeys(tensors, file))
        del tensors
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return {"decoder_layers": n_layers, "decoder_fp32_bytes": 4 * per_layer * n_layers, **SYNTHETIC}


def _layer_shapes() -> dict[str, tuple[int, int]]:
    h, m = SYNTHETIC["hidden_size"], SYNTHETIC["intermediate_size"]
    kv = h // SYNTHETIC["num_attention_heads"] * SYNTHETIC["num_key_value_heads"]
    return {"self_attn.q_proj": (h, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
            "self_attn.o_proj": (h, h), "mlp.gate_proj": (m, h), "mlp.up_proj": (m, h), "mlp.down_proj": (h, m)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--eval-windows", type=int, default=16)
    parser.add_argument("--calib-windows", type=int, default=8)
    parser.add_argument("--synthetic-gb", type=float, default=8.0, help="fp32 GB of synthetic decoder layers")
    parser.add_argument("--skip-smollm2", action="store_true")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "stream.json")
    args = parser.parse_args()
    if args.child:
        run_child(json.loads(args.child))
        return 0

    result = {"machine": platform.platform(), "python": platform.python_version()}
    eval_text, calib_text = SHARED / "data" / "wikitext2_raw_test.txt", SHARED / "data" / "wikitext2_valid_tokens.txt"
    overhead = measured([sys.executable, "-c", OVERHEAD_SCRIPT, "smollm2-135m", str(eval_text), str(args.eval_windows),
                         str(calib_text), str(args.calib_windows)])
    result["fixed_overhead"] = {"what": "imports, SmolLM2's tokenizer, the eval and calibration text tokenized",
                                "script": OVERHEAD_SCRIPT, **overhead}
    print(f"fixed overhead (imports, tokenizer, tokenized text): {overhead['max_rss_bytes'] / MB:.0f} MB", flush=True)
    ok = True
    with tempfile.TemporaryDirectory(prefix="quantaudit-bench-stream-", dir="/tmp") as tmp:
        tmp = Path(tmp)
        if not args.skip_smollm2:
            from quantaudit.models import model_folder
            from quantaudit.stream.source import checkpoint_fp32_bytes

            weights = checkpoint_fp32_bytes(model_folder("smollm2-135m")[0])
            run = measured(audit_command(
                "smollm2-135m", tmp / "smollm2", "--formats", SMOLLM2_FORMATS,
                "--eval", str(eval_text), "--windows", str(args.eval_windows),
                "--seq-len", "512", "--calib", str(calib_text),
                "--calib-size", str(args.calib_windows), "--calib-seq", "512"))
            report = json.loads((tmp / "smollm2" / "report.json").read_text())
            above = run["max_rss_bytes"] - overhead["max_rss_bytes"]
            passed = run["exit_code"] in (0, 3) and above < SMOLLM2_TARGET_SHARE * weights
            ok &= passed
            result["smollm2"] = {
                **run, "formats": SMOLLM2_FORMATS, "eval_windows": args.eval_windows, "calib_windows": args.calib_windows,
                "fp32_weight_bytes": weights, "rss_over_fp32_weights": run["max_rss_bytes"] / weights,
                "rss_above_overhead_over_fp32_weights": above / weights, "target": f"< {SMOLLM2_TARGET_SHARE} x fp32 + overhead",
                "passed": passed, "streaming": report["streaming"],
                "kld": {f["name"]: f["kld"]["mean"] for f in report["formats"]},
            }
            print(f"SmolLM2 streamed, {SMOLLM2_FORMATS}: peak RSS {run['max_rss_bytes'] / MB:.0f} MB = "
                  f"{run['max_rss_bytes'] / weights:.2f} x fp32 weights ({weights / MB:.0f} MB); above the overhead "
                  f"{above / MB:.0f} MB = {above / weights:.2f} x (target < {SMOLLM2_TARGET_SHARE}); "
                  f"{run['seconds']:.0f} s  {'PASS' if passed else 'FAIL'}", flush=True)

        folder = tmp / "synthetic"
        started = time.perf_counter()
        shape = write_synthetic(folder, args.synthetic_gb * 1e9)
        written = time.perf_counter() - started
        text = str(SHARED / "data" / "tinystories_sample.txt")
        run = measured(audit_command(str(folder), tmp / "synthetic-out", "--formats", "int8_wo", "--eval", text,
                                     "--windows", "2", "--seq-len", "128", "--calib", text, "--calib-size", "2",
                                     "--calib-seq", "128"))
        report = json.loads((tmp / "synthetic-out" / "report.json").read_text())
        passed = run["exit_code"] in (0, 3) and run["max_rss_bytes"] < SYNTHETIC_LIMIT_BYTES
        ok &= passed
        result["synthetic"] = {**run, **shape, "write_seconds": written, "limit_bytes": SYNTHETIC_LIMIT_BYTES,
                               "rss_over_decoder_fp32": run["max_rss_bytes"] / shape["decoder_fp32_bytes"],
                               "passed": passed, "kld": report["formats"][0]["kld"]["mean"],
                               "streaming": report["streaming"]}
        print(f"synthetic {shape['decoder_layers']} layers, {shape['decoder_fp32_bytes'] / 1e9:.1f} GB fp32 (written in "
              f"{written:.0f} s): streamed peak RSS {run['max_rss_bytes'] / MB:.0f} MB "
              f"(limit {SYNTHETIC_LIMIT_BYTES / MB:.0f} MB), {run['seconds']:.0f} s  {'PASS' if passed else 'FAIL'}", flush=True)

    from quantaudit.fileio import atomic_write_json

    atomic_write_json(args.out, result)
    print(f"written {args.out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
