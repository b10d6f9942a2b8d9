"""Peak memory of an audit does not grow with the vocabulary beyond the vocabulary's own weights (slow).

The same audit (``int8_wo``, 4 windows of up to 256 tokens, drift, decoder sensitivity, outliers) of a tiny Llama
(hidden 128, tied embeddings) at vocabulary 512 and at Gemma's 262,144, each in a process of its own, which
reads its peak RSS from /proc (``VmHWM``: ``ru_maxrss`` would include the forking test process's). The
difference must stay within

    3 × ΔW + logits.WORKING_BYTES

where ΔW is what the vocabulary adds to the fp32 weights (the tied embedding / lm_head: 262,144 − 512 rows of
128 floats, 134 MB): the model, its quantized copy (embedding and lm_head stay unquantized) and the baseline's
stored lm_head while a candidate is compared each hold it once; the logits themselves only ever take a chunk
of tokens' worth (quantaudit.logits). Measured when this test was written: +479 MiB (895 MiB at 262,144,
416 MiB at 512) against a bound of 639 MiB; before chunking, +4,152 MiB (4,575 MiB against 423 MiB). The
statistics of the large-vocabulary audit equal those of the model's whole-window logits, computed here
without chunks (quantaudit.logits says to what precision).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from test_logits import assert_same_statistics
from tiny_models import build_tiny_model

from quantaudit.data import load_windows
from quantaudit.logits import WORKING_BYTES
from quantaudit.metrics import PairedAccumulator, summarize_logits
from quantaudit.models import load_model
from quantaudit.quant import QuantSpec, quantize
from quantaudit.stream.source import checkpoint_fp32_bytes

SMALL, LARGE = 512, 262144
SEQ_LEN, WINDOWS = 256, 4
CHILD = f"""
import json, re, sys
from pathlib import Path
from quantaudit.audit.run import run_audit
from quantaudit.audit.settings import AuditSettings
model, text, out = sys.argv[1:4]
settings = AuditSettings(model=model, formats=["int8_wo"], calib=text, calib_size=2, calib_seq=128, eval=text,
                         windows={WINDOWS}, seq_len={SEQ_LEN}, drift_windows=1, sensitivity="decoder", streaming="off",
                         budget="kld<=10")
report = run_audit(settings, Path(out), force=True)
peak = int(re.search(r"VmHWM:\\s+(\\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024
print(json.dumps({{"peak_rss_bytes": peak, "entry": report["formats"][0]}}))
"""
COMPARED = ("ppl", "ppl_unc", "ppl_ratio", "ln_ppl_ratio", "kld", "kld_reverse", "top1", "top1_unc", "delta_p")


def _audit(model_dir, text, out, cache) -> dict:
    env = {**os.environ, "QUANTAUDIT_QUIET": "1", "QUANTAUDIT_CACHE": str(cache)}  # a fresh baseline cache
    done = subprocess.run([sys.executable, "-c", CHILD, str(model_dir), str(text), str(out)], env=env,
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


@torch.no_grad()
def _whole_window_statistics(model_dir, text) -> dict:
    """Paired statistics from the models' forward logits of whole windows, one window a pass (the audit's
    batch at this vocabulary: evaluate.auto_batch_size)."""
    lm = load_model(str(model_dir))
    qm = quantize(lm.model, QuantSpec(format="int8_wo"), None, progress=False)
    windows = load_windows(text, lm.tokenizer, SEQ_LEN, WINDOWS)
    acc = PairedAccumulator()
    for i in range(windows.n):
        n = int(windows.lengths[i]) - 1
        ids, targets = windows.ids[i : i + 1, : n + 1], windows.ids[i, 1 : n + 1]
        acc.update(summarize_logits(lm.model(ids).logits[0, :n], targets), qm.model(ids).logits[0, :n], targets)
    return acc.summary()


@pytest.mark.slow
def test_peak_memory_of_an_audit_is_bounded_at_a_262k_vocabulary(tmp_path, shared_dir):
    text = shared_dir / "data" / "tinystories_sample.txt"
    folders = {v: build_tiny_model("llama", tmp_path / f"vocab{v}", shared_dir / "models/stories260K/hf", vocab_size=v)
               for v in (SMALL, LARGE)}
    runs = {v: _audit(folder, text, tmp_path / f"out{v}", tmp_path / f"cache{v}") for v, folder in folders.items()}
    added_weights = checkpoint_fp32_bytes(folders[LARGE]) - checkpoint_fp32_bytes(folders[SMALL])
    assert added_weights == (LARGE - SMALL) * 128 * 4  # tied: one vocabulary-sized matrix
    grown = runs[LARGE]["peak_rss_bytes"] - runs[SMALL]["peak_rss_bytes"]
    bound = 3 * added_weights + WORKING_BYTES
    print(f"peak RSS {runs[SMALL]['peak_rss_bytes'] / 2**20:.0f} MiB at {SMALL}, "
          f"{runs[LARGE]['peak_rss_bytes'] / 2**20:.0f} MiB at {LARGE}: +{grown / 2**20:.0f} MiB, bound {bound / 2**20:.0f} MiB")
    assert grown <= bound
    want = _whole_window_statistics(folders[LARGE], text)
    entry = runs[LARGE]["entry"]
    assert entry["kld"]["mean"] > 0
    assert_same_statistics({k: entry[k] for k in COMPARED}, want)
