"""Scoring a task on a model the way lm-evaluation-harness does, batched.

Multiple choice (lm-eval ``output_type: multiple_choice``): each choice's continuation
``" " + choice`` is scored by its summed log-probability given the context; ``acc`` takes the
argmax, ``acc_norm`` the argmax of log-prob divided by the choice's length. lm-eval's code divides by
``len(choice)`` in characters, without the delimiter (``MCResult.char_lens``; often described as
byte-length normalisation, which it equals for ASCII text); we do exactly that.

Tokenisation follows lm-eval's ``TemplateLM._encode_pair``: trailing whitespace of the context moves
to the front of the continuation, then ``context + continuation`` is encoded as a whole and split
after the tokens of the context alone, so the continuation's tokens are the ones the model would
see in running text. Sequences longer than the model's ``max_position_embeddings + 1`` lose tokens
on the left, as in lm-eval's ``_loglikelihood_tokens``.

BOS is explicit and recorded (quantized models are sensitive to it): ``auto`` does what the
tokenizer does by default (lm-eval's default for Hugging Face models: Llama/SentencePiece add BOS,
SmolLM2 does not), ``doc`` puts BOS before every sequence, ``none`` never does.

Batching: every (item, choice) pair is an independent sequence. Sequences are sorted by length
(longest first, like lm-eval), right-padded and scored a batch at a time with one forward each.
Under causal attention right padding cannot change the real positions and padded positions are
never scored, so no attention mask is needed and the scores equal one-at-a-time scoring up to float
rounding. ``batch_size=None`` (default) fills each batch while its logits would stay under the same
budget as the perplexity loops (:data:`quantaudit.evaluate.LOGITS_BUDGET_BYTES`): few rows for the
long first sequences, many for the short rest; an integer fixes the rows per forward. Logits are only
made for the continuation tokens, from the final hidden states, in token chunks (:mod:`quantaudit.logits`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..data import resolve_bos
from ..errors import UserError
from ..evaluate import LOGITS_BUDGET_BYTES, MAX_AUTO_BATCH
from ..logits import OutputHead, final_hidden
from ..progress import track
from .generation import greedy_until_newline
from .readers import GENERATION, MULTIPLE_CHOICE, Task

TARGET_DELIMITER = " "  # lm-eval's default between context and choice
DEFAULT_MAX_NEW_TOKENS = 32


@dataclass
class TaskResult:
    """Per-item outcomes (kept for paired comparison) and the summary for the JSON report."""

    task: str
    kind: str
    fingerprint: str  # of the task items: only results over the same items are paired
    bos: str
    lines: list[int]  # source line of each item
    correct: list[bool]  # acc (generation: exact match)
    correct_norm: list[bool] | None  # acc_norm; None for generation
    predictions: list  # chosen index (multiple choice) or generated text
    loglikelihoods: list[list[float]] | None  # per item, per choice
    summary: dict


def mean_stderr(correct: list[bool]) -> tuple[float, float | None]:
    """Mean and lm-eval's ``mean_stderr``: sample stdev / sqrt(n) = sqrt(p(1-p)/(n-1))."""
    n = len(correct)
    p = sum(correct) / n
    return p, (math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else None)


def encode_pair(tokenizer, contexts: list[str], continuations: list[str]) -> list[tuple[list[int], list[int]]]:
    """lm-eval's ``_encode_pair`` for many pairs at once (no special tokens; BOS is added by the caller)."""
    moved = []
    for context, continuation in zip(contexts, continuations):
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
        moved.append((context, continuation))
    whole = tokenizer([c + k for c, k in moved], add_special_tokens=False).input_ids
    ctx = tokenizer([c for c, _ in moved], add_special_tokens=False).input_ids
    return [(c, w[len(c):]) for c, w in zip(ctx, whole)]


def _max_positions(model) -> int | None:
    return getattr(model.config, "max_position_embeddings", None)


def choice_sequences(task: Task, tokenizer, bos: str, max_positions: int | None):
    """Token sequences (context + continuation, BOS per policy) and continuation lengths, item-major."""
    prefix = [tokenizer.bos_token_id] if bos == "doc" else []
    contexts = [it.context for it in task.items for _ in it.choices]
    continuations = [TARGET_DELIMITER + c for it in task.items for c in it.choices]
    seqs, cont_lens = [], []
    for (ctx, cont), context in zip(encode_pair(tokenizer, contexts, continuations), contexts):
        if not cont:
            raise UserError(f"a choice after context {context[:40]!r} tokenizes to nothing: it cannot be scored")
        tokens = prefix + ctx + cont
        if max_positions is not None:
            if len(cont) > max_positions:
                raise UserError(f"a choice after context {context[:40]!r} is {len(cont)} tokens, longer than "
                                f"the model's {max_positions}-token context")
            tokens = tokens[-(max_positions + 1):]
        seqs.append(tokens)
        cont_lens.append(len(cont))
    return seqs, cont_lens


def plan_batches(seqs: list[list[int]], batch_size: int | None, vocab_size: int) -> list[list[int]]:
    """Sequence indices per forward, longest first; ``None`` sizes each batch by the logits budget."""
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    if batch_size is not None:
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    batches: list[list[int]] = []
    for i in order:  # a batch's first sequence is its longest, so it sets the padded width
        if batches and len(batches[-1]) < MAX_AUTO_BATCH and \
                (len(batches[-1]) + 1) * len(seqs[batches[-1][0]]) * vocab_size * 4 <= LOGITS_BUDGET_BYTES:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def target_logprobs(head: OutputHead, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) at each row of final hidden states ``hidden`` [T, d], the logits made a chunk at a time (float64)."""
    return torch.cat([logits.log_softmax(-1).gather(1, targets[rows, None]).squeeze(1)
                      for rows, logits in head.chunks(hidden)]).double()


@torch.inference_mode()
def score_sequences(model, seqs: list[list[int]], cont_lens: list[int], batch_size: int | None = None,
                    description: str = "scoring") -> torch.Tensor:
    """Summed log-prob of the last ``cont_lens[i]`` tokens of each sequence given the ones before (float64)."""
    device = next(model.parameters()).device
    head = OutputHead.of(model)
    batches = plan_batches(seqs, batch_size, head.vocab)
    totals = torch.zeros(len(seqs), dtype=torch.float64)
    for batch in track(batches, description, total=len(batches)):
        lengths = torch.tensor([len(seqs[i]) for i in batch])
        conts = torch.tensor([cont_lens[i] for i in batch])
        # Pad id 0: padded positions follow the real ones, so causal attention never lets them in.
        ids = torch.zeros(len(batch), int(lengths.max()), dtype=torch.long)
        for row, i in enumerate(batch):
            ids[row, : len(seqs[i])] = torch.tensor(seqs[i])
        hidden = final_hidden(model, ids[:, :-1].to(device))
        # Input position t predicts token t+1; a continuation of c tokens ends a sequence of length L,
        # so its predictions sit at positions L-1-c .. L-2.
        positions = torch.arange(ids.shape[1] - 1)
        scored = (positions >= (lengths - 1 - conts)[:, None]) & (positions < (lengths - 1)[:, None])
        rows, cols = scored.nonzero(as_tuple=True)
        picked, targets = hidden[rows.to(device), cols.to(device)], ids[rows, cols + 1].to(device)
        token_lp = target_logprobs(head, picked, targets).cpu()
        totals[torch.tensor(batch)] = torch.zeros(len(batch), dtype=torch.float64).index_add_(0, rows, token_lp)
    return totals


def _evaluate_multiple_choice(model, tokenizer, task: Task, bos: str, batch_size: int, **_):
    seqs, cont_lens = choice_sequences(task, tokenizer, bos, _max_positions(model))
    flat = score_sequences(model, seqs, cont_lens, batch_size, f"{task.name}: scoring").tolist()
    return (*choose(task, flat), {"batch_size": batch_size or "auto"})


def choose(task: Task, flat: list[float]):
    """acc's and acc_norm's choices from every (item, choice) log-likelihood, item-major as
    :func:`choice_sequences` orders them: (correct, correct_norm, predictions, per-item log-likelihoods)."""
    lls, correct, correct_norm, predictions, start = [], [], [], [], 0
    for it in task.items:
        item_lls = flat[start : start + len(it.choices)]
        start += len(it.choices)
        pred = max(range(len(item_lls)), key=item_lls.__getitem__)
        pred_norm = max(range(len(item_lls)), key=lambda j: item_lls[j] / len(it.choices[j]))
        lls.append(item_lls)
        predictions.append(pred)
        correct.append(pred == it.answer)
        correct_norm.append(pred_norm == it.answer)
    return correct, correct_norm, predictions, lls


def _evaluate_generation(model, tokenizer, task: Task, bos: str, max_new_tokens: int, **_):
    prefix = [tokenizer.bos_token_id] if bos == "doc" else []
    prompts = tokenizer([it.context for it in task.items], add_special_tokens=False).input_ids
    max_positions = _max_positions(model)
    keep = None if max_positions is None else max(max_positions - max_new_tokens, 1)
    generated = []
    for ids in track(prompts, f"{task.name}: generating", total=len(prompts)):
        tokens = prefix + ids
        generated.append(greedy_until_newline(model, tokenizer, tokens[-keep:] if keep else tokens, max_new_tokens))
    correct = [g.strip() == it.answer.strip() for g, it in zip(generated, task.items)]
    return correct, None, generated, None, {"max_new_tokens": max_new_tokens, "stop": "EOS or newline"}


EVALUATORS = {MULTIPLE_CHOICE: _evaluate_multiple_choice, GENERATION: _evaluate_generation}


def evaluate_task(model, tokenizer, task: Task, batch_size: int | None = None, bos: str = "auto",
                  max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS) -> TaskResult:
    """Score ``task`` on ``model``; the result keeps per-item outcomes for :func:`compare_task_results`."""
    if batch_size is not None and batch_size < 1:
        raise UserError(f"batch size must be at least 1 (got {batch_size})")
    if max_new_tokens < 1:
        raise UserError(f"max new tokens must be at least 1 (got {max_new_tokens})")
    bos = resolve_bos(tokenizer, bos)
    return task_result(task, bos, *EVALUATORS[task.kind](model, tokenizer, task, bos=bos, batch_size=batch_size,
                                                         max_new_tokens=max_new_tokens))


def task_result(task: Task, bos: str, correct: list[bool], correct_norm: list[bool] | None, predictions: list,
                lls: list[list[float]] | None, settings: dict) -> TaskResult:
    """The result of ``task`` from its per-item outcomes (``bos``: the policy applied; ``settings``: how it ran)."""
    acc, acc_stderr = mean_stderr(correct)
    acc_norm, acc_norm_stderr = mean_stderr(correct_norm) if correct_norm is not None else (None, None)
    summary = {**task.describe(), "acc": acc, "acc_stderr": acc_stderr, "acc_norm": acc_norm,
               "acc_norm_stderr": acc_norm_stderr, "bos": bos, **settings}
    return TaskResult(task=task.name, kind=task.kind, fingerprint=task.fingerprint, bos=bos,
                      lines=[it.line for it in task.items], correct=correct, correct_norm=correct_norm,
                      predictions=predictions, loglikelihoods=lls, summary=summary)
