"""Generation fidelity: does the quantized model still write what the original writes?

Teacher-forced statistics score one token at a time on the baseline's own text. A user meets the model
free-running, where one early different token changes everything after it. Here the baseline and the
quantized model continue the same prompts greedily (``model.generate``: batched, left-padded, with a KV
cache), and the two continuations of each prompt are paired:

* **identical**: the share of prompts whose continuations are token for token the same;
* **first divergence**: the first position where they differ (one ending while the other goes on counts),
  summarised as a survival curve ``S(t)`` = share of prompts whose continuations agree on their first ``t``
  tokens, and its median (the first ``t`` with ``S(t) <= 0.5``; "never" when it stays above);
* **similarity after divergence**: token-level ROUGE-L F1 of the two remainders (Lin, 2004);
* **degeneration**, for each model: the share of continuations ending in a repetition loop (the last
  ``LOOP_REPEATS`` periods of some period up to ``LOOP_MAX_PERIOD`` tokens identical) and distinct-2
  (Li et al., 2016: distinct bigrams / bigrams);
* **checks** (per prompt, optional): a regular expression that must match, or "the output parses as JSON";
  pass rates of both models, flips, and the exact McNemar p-value (:mod:`quantaudit.tasks.compare`).

Greedy decoding with the quantized model as the draft of greedy speculative decoding accepts a drafted
token exactly while the two greedy continuations agree, so ``S(t)`` is the probability that a draft of
``t`` tokens is accepted whole (the advisor's per-token top-1 agreement is its one-token case).

Prompts: a JSONL of ``{"prompt": str}`` with optional ``"regex"``, ``"json": true`` and ``"stop": [str]``
(the continuation is cut before the first stop string, for the statistics and the checks). Without a file,
the openings of the default evaluation text's paragraphs (:func:`default_prompts`).
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import UserError
from .progress import track
from .tasks.compare import mcnemar_exact_p

DEFAULT_PROMPTS = 64
DEFAULT_MAX_NEW_TOKENS = 128
PROMPT_CHARS = 240  # the default prompts: paragraph openings, cut at a word boundary
PARAGRAPHS_PER_DOCUMENT = 2
LOOP_MAX_PERIOD = 16
LOOP_REPEATS = 3
GEN_BATCH = 16  # prompts per generate() call


@dataclass(frozen=True)
class Prompt:
    text: str
    regex: str | None = None
    json: bool = False
    stop: tuple[str, ...] = ()

    @property
    def checked(self) -> bool:
        return self.regex is not None or self.json


def load_prompts(path: str | Path) -> list[Prompt]:
    """The prompts of a JSONL file; a bad line is named with what is wrong and how to write it."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--generate: prompts file not found: {path}")
    prompts = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"--generate {path}, line {number}"
        try:
            item = json.loads(line)
        except ValueError as exc:
            raise UserError(f"{where}: not JSON ({exc.msg}); each line is {{\"prompt\": \"...\"}}") from None
        if not isinstance(item, dict) or not isinstance(item.get("prompt"), str) or not item["prompt"]:
            raise UserError(f"{where}: needs a non-empty string \"prompt\"; each line is {{\"prompt\": \"...\"}}")
        regex = item.get("regex")
        if regex is not None:
            if not isinstance(regex, str):
                raise UserError(f"{where}: \"regex\" must be a string")
            try:
                re.compile(regex)
            except re.error as exc:
                raise UserError(f"{where}: invalid regex {regex!r} ({exc})") from None
        stop = item.get("stop", [])
        if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
            raise UserError(f"{where}: \"stop\" must be a list of non-empty strings")
        prompts.append(Prompt(item["prompt"], regex, bool(item.get("json", False)), tuple(stop)))
    if not prompts:
        raise UserError(f"--generate {path} holds no prompts; each line is {{\"prompt\": \"...\"}}")
    return prompts


def default_prompts(documents: list[str], n: int = DEFAULT_PROMPTS) -> list[Prompt]:
    """The openings (``PROMPT_CHARS``, cut at a word boundary) of the documents' prose paragraphs, at most
    ``PARAGRAPHS_PER_DOCUMENT`` per document (so that ``n`` prompts span many sections), the first ``n``."""
    prompts = []
    for doc in documents:
        paragraphs = [" ".join(p.split()) for p in doc.split("\n\n")]
        prose = [p for p in paragraphs if len(p) >= 60 and sum(c.isalpha() for c in p) > 0.6 * len(p)]
        for text in prose[:PARAGRAPHS_PER_DOCUMENT]:
            cut = text[:PROMPT_CHARS]
            prompts.append(Prompt(cut.rsplit(" ", 1)[0] if len(text) > PROMPT_CHARS else cut))
            if len(prompts) == n:
                return prompts
    return prompts


def encode_prompts(prompts: list[Prompt], tokenizer, chat_template: bool) -> list[list[int]]:
    """Token ids per prompt: the tokenizer's chat template (a user turn, then the assistant's start) when asked
    for, else the plain text as the tokenizer encodes it."""
    if chat_template and not getattr(tokenizer, "chat_template", None):
        raise UserError("--chat-template on: this tokenizer has no chat template; use --chat-template off")
    out = []
    for p in prompts:
        if chat_template:
            ids = tokenizer.apply_chat_template([{"role": "user", "content": p.text}], add_generation_prompt=True,
                                                tokenize=True)
            ids = ids["input_ids"] if hasattr(ids, "keys") else ids  # a BatchEncoding in some transformers versions
        else:
            ids = tokenizer(p.text)["input_ids"]
        out.append(list(ids))
    return out


@dataclass(frozen=True)
class PromptSet:
    """The prompts of an audit, tokenized once for every model."""

    source: str  # "default" or the file
    prompts: list[Prompt]
    ids: list[list[int]]
    chat_template: bool
    max_new_tokens: int

    def describe(self) -> dict:
        return {"source": self.source, "prompts": len(self.prompts), "chat_template": self.chat_template,
                "max_new_tokens": self.max_new_tokens}


def prompt_set(source: str, tokenizer, chat_template: str, max_new_tokens: int) -> PromptSet:
    """``--generate`` (``default`` or a JSONL path) read and tokenized; ``chat_template`` auto, on or off."""
    from .data import default_documents

    prompts = default_prompts(default_documents("eval")) if source == "default" else load_prompts(source)
    use_template = chat_template == "on" or (chat_template == "auto" and bool(getattr(tokenizer, "chat_template", None)))
    return PromptSet(source, prompts, encode_prompts(prompts, tokenizer, use_template), use_template, max_new_tokens)


@torch.inference_mode()
def generate(model, prompt_ids: list[list[int]], max_new_tokens: int, eos_id: int | None, pad_id: int | None,
             batch_size: int = GEN_BATCH, description: str = "generating") -> list[list[int]]:
    """Greedy continuations (tokens after the prompt, up to and excluding EOS), ``batch_size`` prompts per call,
    left-padded with an attention mask: HF ``generate`` derives the positions from the mask, so a padded
    prompt is continued as it would be alone."""
    if max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be at least 1 (got {max_new_tokens})")
    device = next(model.parameters()).device
    pad = pad_id if pad_id is not None else (eos_id if eos_id is not None else 0)
    order = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))  # similar lengths: little padding
    outputs: list[list[int] | None] = [None] * len(prompt_ids)
    starts = range(0, len(order), batch_size)
    for start in track(starts, description, total=len(starts)):
        chunk = order[start : start + batch_size]
        width = max(len(prompt_ids[i]) for i in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, i in enumerate(chunk):
            n = len(prompt_ids[i])
            ids[row, width - n :] = torch.tensor(prompt_ids[i])
            mask[row, width - n :] = 1
        generated = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                                   num_beams=1, max_new_tokens=max_new_tokens, min_new_tokens=0,
                                   eos_token_id=eos_id, pad_token_id=pad, temperature=None, top_p=None, top_k=None)
        for row, i in enumerate(chunk):
            tokens = generated[row, width:].tolist()
            if eos_id is not None and eos_id in tokens:
                tokens = tokens[: tokens.index(eos_id)]
            outputs[i] = tokens
    return outputs


def cut_at_stop(tokens: list[int], decode, stops: tuple[str, ...]) -> list[int]:
    """The shortest prefix of ``tokens`` whose text reaches the first stop string, minus it (all if none)."""
    text = decode(tokens)
    found = [text.find(s) for s in stops if s in text]
    if not found:
        return tokens
    limit = min(found)
    lo, hi = 0, len(tokens)  # the fewest tokens whose text extends past the stop's start
    while lo < hi:
        mid = (lo + hi) // 2
        if len(decode(tokens[:mid])) > limit:
            hi = mid
        else:
            lo = mid + 1
    return tokens[: max(0, lo - 1)] if lo else tokens[:0]


def first_divergence(a: list[int], b: list[int]) -> int | None:
    """The first position where ``a`` and ``b`` differ (one ending counts), None if identical."""
    for t, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return t
    return None if len(a) == len(b) else min(len(a), len(b))


def survival(divergences: list[int | None], horizon: int) -> list[float]:
    """``S(t)`` for ``t = 0..horizon``: the share of prompts whose continuations agree on their first ``t`` tokens."""
    n = len(divergences)
    return [sum(d is None or d >= t for d in divergences) / n for t in range(horizon + 1)] if n else []


def median_divergence(curve: list[float]) -> int | None:
    """The first ``t`` with ``S(t) <= 0.5`` (None: more than half the prompts never diverge within the horizon)."""
    return next((t for t, s in enumerate(curve) if s <= 0.5), None)


def rouge_l(a: list[int], b: list[int]) -> float:
    """Token-level ROUGE-L F1 (longest common subsequence); 1.0 for two empty sequences."""
    if not a and not b:
        return 1.0
    if not a or not b:
        return 0.0
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    lcs = previous[-1]
    return 2 * lcs / (len(a) + len(b))


def in_loop(tokens: list[int]) -> bool:
    """The sequence ends in ``LOOP_REPEATS`` identical repeats of a period of 1..``LOOP_MAX_PERIOD`` tokens."""
    for period in range(1, LOOP_MAX_PERIOD + 1):
        span = period * LOOP_REPEATS
        if len(tokens) >= max(span, 6) and all(tokens[-i] == tokens[-i - period] for i in range(1, span - period + 1)):
            return True
    return False


def distinct_2(tokens: list[int]) -> float | None:
    bigrams = list(zip(tokens, tokens[1:]))
    return len(set(bigrams)) / len(bigrams) if bigrams else None


def passes(prompt: Prompt, text: str) -> bool:
    if prompt.regex is not None and re.search(prompt.regex, text) is None:
        return False
    if prompt.json:
        try:
            json.loads(text.strip())
        except ValueError:
            return False
    return True


@dataclass
class Generations:
    """One model's continuations of the prompts, cut at each prompt's stop strings."""

    tokens: list[list[int]]
    texts: list[str]
    seconds: float = 0.0


def continuations(model, tokenizer, prompts: list[Prompt], prompt_ids: list[list[int]], max_new_tokens: int,
                  description: str, batch_size: int = GEN_BATCH) -> Generations:
    started = time.perf_counter()
    raw = generate(model, prompt_ids, max_new_tokens, tokenizer.eos_token_id, tokenizer.pad_token_id, batch_size,
                   description)
    seconds = time.perf_counter() - started

    def decode(ids):
        return tokenizer.decode(ids, skip_special_tokens=True)

    tokens = [cut_at_stop(t, decode, p.stop) if p.stop else t for t, p in zip(raw, prompts)]
    return Generations(tokens, [decode(t) for t in tokens], seconds)


def _degeneration(gen: Generations) -> dict:
    d2 = [v for v in (distinct_2(t) for t in gen.tokens) if v is not None]
    return {"loop_share": sum(map(in_loop, gen.tokens)) / len(gen.tokens),
            "distinct_2": sum(d2) / len(d2) if d2 else None}


def compare_generations(base: Generations, quant: Generations, prompts: list[Prompt], max_new_tokens: int) -> dict:
    """The report's ``generation`` entry for one format (see the module docstring)."""
    divergences = [first_divergence(a, b) for a, b in zip(base.tokens, quant.tokens)]
    curve = survival(divergences, max_new_tokens)
    after = [rouge_l(a[d:], b[d:]) for a, b, d in zip(base.tokens, quant.tokens, divergences) if d is not None]
    out = {
        "prompts": len(prompts),
        "max_new_tokens": max_new_tokens,
        "identical": sum(d is None for d in divergences) / len(divergences),
        "median_divergence": median_divergence(curve),
        "survival": [round(s, 6) for s in curve],
        "rouge_l_after_divergence": sum(after) / len(after) if after else None,
        "degeneration": {"base": _degeneration(base), "quant": _degeneration(quant)},
        "first_divergence": divergences,
        "seconds": quant.seconds,
    }
    checked = [i for i, p in enumerate(prompts) if p.checked]
    if checked:
        base_ok = [passes(prompts[i], base.texts[i]) for i in checked]
        quant_ok = [passes(prompts[i], quant.texts[i]) for i in checked]
        lost = sum(b and not q for b, q in zip(base_ok, quant_ok))
        gained = sum(q and not b for b, q in zip(base_ok, quant_ok))
        out["checks"] = {"n": len(checked), "base_pass": sum(base_ok) / len(checked),
                         "quant_pass": sum(quant_ok) / len(checked),
                         "drop": (sum(base_ok) - sum(quant_ok)) / len(checked),
                         "right_to_wrong": lost, "wrong_to_right": gained,
                         "mcnemar_p": mcnemar_exact_p(lost, gained)}
    return out
