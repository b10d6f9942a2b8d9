"""Evaluation and calibration text: reading, tokenizing once, cutting into fixed windows.

Both models of a comparison are fed the very same :class:`Windows` tensor, so every paired
statistic compares predictions of identical tokens.

Windows follow lm-eval's per-document scheme (``loglikelihood_rolling`` with disjoint windows):
each document is tokenized and cut into windows of ``seq_len`` tokens that never cross a document
boundary, so one document's text never serves as context for another's (a single-document file,
such as WikiText-2, gives exactly llama.cpp's flat, non-overlapping windows). A document's last,
shorter window is right-padded; under causal attention padding cannot influence the real
positions, and padded positions are never scored. Within a window, position ``t`` predicts token
``t + 1``, so a window of ``len`` real tokens scores ``len - 1`` tokens. BOS handling is explicit and recorded: ``doc`` puts the
tokenizer's BOS before every document, ``none`` never adds it, ``auto`` does what the tokenizer
does by default (Llama/SentencePiece tokenizers add BOS; SmolLM2's does not).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import UserError
from .memory import trim_heap

DOC_SEPARATOR = "<|endoftext|>"  # TinyStories / GPT-2 style document separator in plain text
BOS_POLICIES = ("auto", "doc", "none")
DEFAULT_TEXT_NAME = "pydoc"


@dataclass
class Windows:
    """Token windows, the unit every evaluation and calibration pass iterates over."""

    ids: torch.Tensor  # [n, seq_len] int64, right-padded
    lengths: torch.Tensor  # [n] int64, real tokens per window (<= seq_len)
    source: str
    bos: str  # the policy actually applied: "doc" or "none"
    stream_tokens: int  # tokens in the whole tokenized text, before cutting
    meta: dict = field(default_factory=dict)

    @property
    def n(self) -> int:
        return self.ids.shape[0]

    @property
    def seq_len(self) -> int:
        return self.ids.shape[1]

    @property
    def scored_tokens(self) -> int:
        return int((self.lengths - 1).sum())

    def targets(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Next-token targets ``ids[:, 1:]`` and the mask of positions that are scored ([n, seq_len-1])."""
        positions = torch.arange(self.seq_len - 1)
        return self.ids[:, 1:], positions[None, :] < (self.lengths[:, None] - 1)

    def subset(self, n: int) -> "Windows":
        """The first ``n`` windows (for the layer-drift and sensitivity samples)."""
        return Windows(self.ids[:n], self.lengths[:n], self.source, self.bos, self.stream_tokens, dict(self.meta))

    @property
    def fingerprint(self) -> str:
        """Identity of the exact token content (for keying baseline caches)."""
        h = hashlib.sha256(self.ids.numpy().tobytes())
        h.update(self.lengths.numpy().tobytes())
        return h.hexdigest()[:16]

    def describe(self) -> dict:
        return {
            "source": self.source,
            "windows": self.n,
            "seq_len": self.seq_len,
            "tokens": self.scored_tokens,
            "bos": self.bos,
            "stream_tokens": self.stream_tokens,
            "fingerprint": self.fingerprint,
        }


def default_documents(role: str) -> list[str]:
    """The embedded default text: Python's reference documentation from the standard library.

    ``pydoc_data.topics`` ships with every CPython (PSF licence), so the default run needs no
    download and no ../shared. Distinct sections (two topics share one text) are sorted by name
    and split alternately into disjoint calibration (even) and evaluation (odd) halves.
    """
    import pydoc_data.topics

    first_name: dict[str, str] = {}
    for name, text in sorted(pydoc_data.topics.topics.items()):
        first_name.setdefault(text, name)
    sections = sorted(first_name, key=first_name.get)
    start = 0 if role == "calib" else 1
    return sections[start::2]


def read_documents(path: str | Path) -> list[str]:
    """Read a ``.txt`` file (documents split on ``<|endoftext|>``) or ``.jsonl`` (``{"text": ...}`` per line)."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path} is a folder; give a .txt or .jsonl text file")
    if not path.is_file():
        raise UserError(f"text file not found: {path}")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise UserError(f"cannot read text file {path}: {exc.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(
            f"{path} is not UTF-8 text (invalid byte at offset {exc.start}); convert it, e.g. `iconv -t utf-8`"
        ) from None
    text = text.replace("\r\n", "\n")
    if path.suffix == ".jsonl":
        docs = []
        for lineno, line in enumerate(text.split("\n"), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{path}:{lineno}: not valid JSON ({exc.msg}); each line must be {{\"text\": ...}}") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise UserError(f"{path}:{lineno}: expected an object with a string field \"text\"")
            docs.append(record["text"])
    else:
        docs = [d for d in text.split(DOC_SEPARATOR)]
    docs = [d.strip("\n") for d in docs if d.strip()]
    if not docs:
        raise UserError(f"{path} is empty: it holds no text to evaluate or calibrate on")
    return docs


def resolve_bos(tokenizer, bos: str) -> str:
    """Turn ``auto`` into the tokenizer's own default; check a BOS token exists for ``doc``."""
    if bos not in BOS_POLICIES:
        raise UserError(f"unknown BOS policy {bos!r}; choose one of {', '.join(BOS_POLICIES)}")
    if bos == "auto":
        probe = tokenizer("a").input_ids
        bos = "doc" if tokenizer.bos_token_id is not None and probe[:1] == [tokenizer.bos_token_id] else "none"
    if bos == "doc" and tokenizer.bos_token_id is None:
        raise UserError("--bos doc asked for, but this tokenizer has no BOS token; use --bos none")
    return bos


def tokenize_documents(docs: list[str], tokenizer, bos: str) -> list[list[int]]:
    """Token ids of each document, with BOS first when ``bos == 'doc'``."""
    prefix = [tokenizer.bos_token_id] if bos == "doc" else []
    return [prefix + ids for ids in tokenizer(docs, add_special_tokens=False).input_ids]


def cut_windows(docs: list[list[int]], seq_len: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Document-bounded windows of ``seq_len`` tokens; pieces with nothing to score (< 2 tokens) are dropped."""
    rows, lengths = [], []
    for ids in docs:
        for start in range(0, len(ids), seq_len):
            piece = ids[start : start + seq_len]
            if len(piece) >= 2:
                rows.append(piece + [pad_id] * (seq_len - len(piece)))
                lengths.append(len(piece))
    return torch.tensor(rows, dtype=torch.long).reshape(-1, seq_len), torch.tensor(lengths, dtype=torch.long)


def load_windows(
    source: str | Path | None,
    tokenizer,
    seq_len: int = 512,
    n_windows: int | None = None,
    bos: str = "auto",
    role: str = "eval",
) -> Windows:
    """Read, tokenize and cut ``source`` (``None`` = the embedded default text for ``role``).

    ``role="eval"`` gives document-bounded windows (see the module docstring); ``role="calib"``
    packs all documents into one stream and cuts full ``seq_len`` samples, so no calibration
    statistic ever includes padding.
    """
    flag = "--calib-seq" if role == "calib" else "--seq-len"
    if seq_len < 2:
        raise UserError(f"{flag} must be at least 2 (got {seq_len})")
    if n_windows is not None and n_windows < 1:
        raise UserError(f"{'--calib-size' if role == 'calib' else '--windows'} must be at least 1 (got {n_windows})")
    if source is None or str(source) == DEFAULT_TEXT_NAME:
        docs, name = default_documents(role), f"{DEFAULT_TEXT_NAME}:{role}"
    else:
        docs, name = read_documents(source), str(source)
    bos = resolve_bos(tokenizer, bos)
    tokenized = tokenize_documents(docs, tokenizer, bos)
    del docs
    trim_heap()  # the tokenizer's per-token records are freed but would stay resident (quantaudit.memory)
    total = sum(len(ids) for ids in tokenized)
    if total < seq_len:
        raise UserError(
            f"{name} has {total} tokens, fewer than one window of {seq_len}: give more text or a smaller {flag}"
        )
    if role == "calib":
        # Calibration samples are packed (documents joined, full windows only), as ModelOpt and
        # llm-compressor build them: statistics never see padding.
        stream = [t for ids in tokenized for t in ids]
        n = len(stream) // seq_len
        ids = torch.tensor(stream[: n * seq_len], dtype=torch.long).reshape(n, seq_len)
        lengths = torch.full((n,), seq_len, dtype=torch.long)
    else:
        pad_id = next(t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if t is not None)
        ids, lengths = cut_windows(tokenized, seq_len, pad_id)
    if n_windows is not None:
        ids, lengths = ids[:n_windows], lengths[:n_windows]
    return Windows(ids=ids, lengths=lengths, source=name, bos=bos, stream_tokens=total, meta={"requested": n_windows})
