"""The baseline cache: the base model's predictions, computed once, reused for every format.

Auditing N formats needs the base model's full next-token distribution at every scored token N
times. llama.cpp keeps it in its ``--kl-divergence-base`` file as all V log-probs in uint16 (2·V
bytes a token: 98 KB for SmolLM2's 49,152-token vocabulary, 512 KB for Gemma's 262,144; and an
approximation). Here a window is stored as one of:

* ``hidden`` (exact mode, the default): the input of the output layer (the final hidden state,
  d floats: 2.3 KB a token for SmolLM2) plus the targets; the output layer's weight is stored once
  in ``head.safetensors`` and the model's config in ``meta.json``, and the base logits are recomputed
  by :class:`quantaudit.logits.OutputHead` (output layer, then the family's soft-capping or scaling)
  when read, one chunk of tokens at a time, exactly as the candidate's are made;
* ``topk`` (``top_k=K``): the K largest log-probs with their ids, the rest one tail bin: KL is then
  a lower bound. Fine for a 512-token vocabulary (stories260K: 0.3% low at K = 64), far too low
  for a 49k one, where most of a small perturbation's KL sits in the long tail (SmolLM2, int8
  RTN: 25% low at K = 64, 13% at 256, 1.4% at 4096; ``python bench/bench_eval.py --k-table``).

Trade-off of exact mode: nothing proportional to the vocabulary is kept per token, on disk or in RAM,
so memory is the same at any vocabulary (one chunk of logits, :mod:`quantaudit.logits`); in exchange
every candidate recomputes the base logits of every scored token: one output-layer product (d·V
multiply-adds a token) and a log-softmax over V, in the order of a fifth of a SmolLM2 forward pass.
Keeping the recomputed log-probs instead would cost 4·V bytes a token (2 GiB for 2,048 tokens at
262,144), which is what bounded memory rules out; both give the same numbers.

Every window also keeps what perplexity needs; ``meta.json`` holds the base model's perplexity,
so evaluating the baseline costs nothing.

Layout: ``cache_dir()/baselines/<key>/`` with ``window_00000.safetensors``, ..., ``head.safetensors``
and ``meta.json``. The key hashes the model fingerprint, the windows' token fingerprint, seq_len,
K (None = exact) and the BOS policy. A baseline is written into a temporary sibling folder and
renamed into place only when complete, and ``meta.json`` (written last) must list files that all
exist: a killed run never leaves a folder that is read as valid (its ``.tmp-*`` folder is never
read, and a later build removes it once a day old). Windows are read back one at a time, so memory
stays flat however many windows there are.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .errors import UserError
from .logits import OutputHead
from .metrics import BaselineChunk, PerplexityAccumulator, summarize_logits
from .models import cache_dir

FORMAT_VERSION = 2
HEAD_FILE = "head.safetensors"
# A temporary folder untouched this long is a killed run's leftover and is removed.
STALE_TMP_SECONDS = 24 * 3600


def baselines_root() -> Path:
    return cache_dir() / "baselines"


def baseline_key(model_fingerprint: str, windows, top_k: int | None) -> str:
    """Cache key: model, exact token windows, seq_len, K (None = exact) and BOS policy."""
    spec = {
        "version": FORMAT_VERSION,
        "model": model_fingerprint,
        "windows": windows.fingerprint,
        "seq_len": windows.seq_len,
        "top_k": top_k,
        "bos": windows.bos,
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:20]


def _save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, path)


@dataclass
class BaselineWindow:
    """One window of a baseline: :meth:`chunk` gives the :class:`BaselineChunk` of any of its scored tokens."""

    head: OutputHead | None = None  # exact mode: the base model's head, final hidden states and targets
    hidden: torch.Tensor | None = None
    targets: torch.Tensor | None = None
    stored: BaselineChunk | None = None  # top-K mode: the stored log-probs

    def chunk(self, rows: slice) -> BaselineChunk:
        """The base statistics of scored tokens ``rows`` (recomputed from the hidden states in exact mode)."""
        if self.stored is not None:
            return self.stored.rows(rows)
        return summarize_logits(self.head(self.hidden[rows]), self.targets[rows])


@dataclass
class Baseline:
    """A complete baseline on disk; :meth:`windows` streams its windows in order."""

    path: Path
    meta: dict

    @property
    def top_k(self) -> int | None:
        """K of a top-K baseline; None for an exact (full-vocabulary) one."""
        return self.meta["top_k"]

    @property
    def ppl(self) -> dict:
        """The base model's perplexity summary on these windows (tokens, ppl, ppl_unc, ln_ppl, ...)."""
        return self.meta["ppl"]

    @property
    def n_windows(self) -> int:
        return len(self.meta["files"])

    def windows(self, device: torch.device | str = "cpu") -> Iterator[BaselineWindow]:
        """One :class:`BaselineWindow` per window, in window order, on ``device``."""
        head = None
        for name in self.meta["files"]:
            t = load_file(self.path / name, device=str(device))
            if "hidden" in t:
                if head is None:
                    weights = load_file(self.path / HEAD_FILE, device=str(device))
                    head = OutputHead.from_weight(weights["weight"], weights.get("bias"), self.meta["config"])
                yield BaselineWindow(head, t["hidden"], t["targets"].long())
            else:
                chunk = BaselineChunk(t["topk_logprobs"], t["topk_ids"].long(), t["target_logprob"])
                yield BaselineWindow(stored=chunk)


def open_baseline(path: Path) -> Baseline | None:
    """The complete baseline stored at ``path``, or None when absent, incomplete or of another version."""
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    files = meta.get("files", []) + ([HEAD_FILE] if "hidden" in meta.get("storage", []) else [])
    if meta.get("version") != FORMAT_VERSION or not all((path / name).is_file() for name in files):
        return None
    return Baseline(path, meta)


def open_shared_baseline(path: Path) -> Baseline:
    """The baseline a driver published at ``path``, opened in a worker process or node; one line if it cannot."""
    found = open_baseline(path)
    if found is None:
        raise UserError(f"the baseline cache {path} is not readable here: give every worker one folder they all "
                        "read (--shared-dir)")
    return found


def _remove_stale_tmp(root: Path) -> None:
    for old in root.glob(".tmp-*"):
        try:
            stale = time.time() - old.stat().st_mtime > STALE_TMP_SECONDS
        except OSError:  # removed meanwhile by another process
            continue
        if stale:
            shutil.rmtree(old, ignore_errors=True)


class BaselineWriter:
    """Writes windows into a temporary folder; :meth:`commit` renames it into place.

    ``target=None`` keeps the baseline private: it lives in a scratch folder under the cache root
    that is deleted when the returned :class:`Baseline` is garbage-collected.
    """

    def __init__(self, target: Path | None, meta: dict):
        root = baselines_root()
        root.mkdir(parents=True, exist_ok=True)
        _remove_stale_tmp(root)
        self.target, self.meta = target, dict(meta)
        self.tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
        self.files: list[str] = []
        self.storage: set[str] = set()
        self.ppl = PerplexityAccumulator()
        self.started = time.perf_counter()

    def _add(self, kind: str, tensors: dict[str, torch.Tensor], target_logprob: torch.Tensor) -> None:
        name = f"window_{len(self.files):05d}.safetensors"
        _save(tensors, self.tmp / name)
        self.files.append(name)
        self.storage.add(kind)
        self.ppl.add_nll(-target_logprob)

    def add_chunk(self, chunk: BaselineChunk) -> None:
        """Store a window as its top-K log-probs with their ids."""
        tensors = {"topk_logprobs": chunk.topk_logprobs, "target_logprob": chunk.target_logprob,
                   "topk_ids": chunk.topk_ids.to(torch.int32)}
        self._add("topk", tensors, chunk.target_logprob)

    def add_hidden(self, head: OutputHead, hidden: torch.Tensor, targets: torch.Tensor,
                   target_logprob: torch.Tensor) -> None:
        """Store a window as output-layer inputs [T, d] (exact; ``head``'s weight and config are saved with
        the first one); ``target_logprob`` [T], the base log-prob of each target, feeds the perplexity."""
        if "hidden" not in self.storage:
            layer = head.layer
            _save({"weight": layer.weight} | ({} if layer.bias is None else {"bias": layer.bias}), self.tmp / HEAD_FILE)
            self.meta["config"] = head.config_dict()
        self._add("hidden", {"hidden": hidden, "targets": targets.to(torch.int32)}, target_logprob)

    def commit(self) -> Baseline:
        seconds = time.perf_counter() - self.started
        summary = self.ppl.summary()
        meta = {**self.meta, "version": FORMAT_VERSION, "files": self.files, "storage": sorted(self.storage),
                "ppl": summary, "seconds": seconds, "tokens_per_s": summary["tokens"] / seconds}
        (self.tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        if self.target is None:
            baseline = Baseline(self.tmp, meta)
            weakref.finalize(baseline, shutil.rmtree, self.tmp, True)
            return baseline
        if self.target.exists():  # an incomplete or stale folder under our key: never valid, replace it
            shutil.rmtree(self.target, ignore_errors=True)
        try:
            os.replace(self.tmp, self.target)
        except OSError:
            shutil.rmtree(self.tmp, ignore_errors=True)
            found = open_baseline(self.target)  # another process may have committed the same key
            if found is None:
                raise
            return found
        return Baseline(self.target, meta)

    def discard(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> BaselineWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.discard()
