"""Task accuracy: readers, lm-eval style scoring checked against a direct one-sequence-at-a-time
computation written here, generation, and the paired statistics checked by hand."""

from __future__ import annotations

import bz2
import dataclasses
import json
import re
from math import comb

import numpy as np
import pytest
import torch

from quantaudit.errors import UserError
from quantaudit.evaluate import LOGITS_BUDGET_BYTES, MAX_AUTO_BATCH
from quantaudit.tasks import (
    DEFAULT_TASK_BUDGET,
    GENERATION,
    MULTIPLE_CHOICE,
    TaskResult,
    compare_task_results,
    evaluate_task,
    load_task,
    mcnemar_exact_p,
    paired_bootstrap_ci,
    tasks_summary,
)
from quantaudit.tasks.scoring import encode_pair, plan_batches


@pytest.fixture(scope="module")
def data_dir(shared_dir):
    return shared_dir / "data"


# ---------------------------------------------------------------- independent reference scoring


@torch.inference_mode()
def reference_loglikelihood(model, tokenizer, context: str, continuation: str, bos: bool) -> float:
    """Summed log-prob of ``continuation`` after ``context``: one sequence, no batching, float64.

    Written out directly from lm-eval's definition: trailing context whitespace belongs to the
    continuation; the continuation's tokens are those of context+continuation after the context's.
    """
    stripped = context.rstrip()
    continuation = context[len(stripped):] + continuation
    whole = tokenizer(stripped + continuation, add_special_tokens=False).input_ids
    n_context = len(tokenizer(stripped, add_special_tokens=False).input_ids)
    ids = ([tokenizer.bos_token_id] if bos else []) + whole
    logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), dim=-1)
    first = len(ids) - (len(whole) - n_context)
    return sum(float(logp[t - 1, ids[t]]) for t in range(first, len(ids)))


def reference_choices(model, tokenizer, task, bos: bool):
    """Per item: the log-likelihoods of " " + choice, and the argmax choice."""
    out = []
    for it in task.items:
        lls = [reference_loglikelihood(model, tokenizer, it.context, " " + c, bos) for c in it.choices]
        out.append((lls, int(np.argmax(lls))))
    return out


# ---------------------------------------------------------------- readers


def test_piqa_reader_matches_files_and_lm_eval_prompt(data_dir):
    task = load_task("piqa", data_dir)
    assert task.kind == MULTIPLE_CHOICE and task.n == 1838 and not task.skipped
    first = task.items[0]
    record = json.loads((data_dir / "piqa_valid.jsonl").read_text().splitlines()[0])
    assert first.context == f"Question: {record['goal']}\nAnswer:"
    assert first.choices == (record["sol1"], record["sol2"])
    labels = (data_dir / "piqa_valid_labels.lst").read_text().split()
    assert [it.answer for it in task.items] == [int(x) for x in labels]

    head = load_task("piqa", data_dir, limit=200)
    assert head.items == task.items[:200] and head.meta["sample_seed"] is None
    sampled = load_task("piqa", data_dir, limit=200, seed=7)
    lines = [it.line for it in sampled.items]
    assert len(set(lines)) == 200 and lines == sorted(lines) and lines != list(range(1, 201))
    assert sampled.meta["sample_seed"] == 7
    assert [it.line for it in load_task("piqa", data_dir, limit=200, seed=7).items] == lines


def test_hellaswag_reader_applies_lm_eval_preprocessing(data_dir, tmp_path):
    task = load_task("hellaswag", data_dir)
    assert task.n == 10042 and not task.skipped
    first = task.items[0]
    # ctx_b ("he") capitalized as lm-eval's ctx_a + " " + ctx_b.capitalize() does
    assert first.context == "Roof shingle removal: A man is sitting on a roof. He"
    assert first.answer == 3 and first.choices[3] == "starts pulling up roofing on a roof."
    # WikiHow contexts end with "." and are left as they are; bracket leftovers removed as lm-eval does
    kiddio = next(it for it in task.items if "Visit a site like to find loads" in it.context)
    assert kiddio.context.endswith("Choose small, simple games like candy land or chutes and ladders.")
    assert not any(re.search(r"\[.*?\]", it.context + " ".join(it.choices)) for it in task.items)
    assert all(it.context == it.context.strip() for it in task.items)

    # plain (not bz2) file works too, and an item's line is where its block starts
    lines = bz2.open(data_dir / "hellaswag_val.txt.bz2", "rt").read().split("\n")[:12]
    (tmp_path / "hellaswag_val.txt").write_text("\n".join(lines) + "\n")
    small = load_task("hellaswag", tmp_path)
    assert [it.line for it in small.items] == [1, 7] and small.items == task.items[:2]


def test_missing_file_names_file_and_folder(tmp_path):
    with pytest.raises(UserError, match="piqa_valid.jsonl") as err:
        load_task("piqa", tmp_path)
    assert str(tmp_path.resolve()) in str(err.value)
    with pytest.raises(UserError, match=r"hellaswag_val\.txt\.bz2 or hellaswag_val\.txt"):
        load_task("hellaswag", tmp_path)
    with pytest.raises(UserError, match="unknown task"):
        load_task("arc_easy", tmp_path)


def _write_jsonl(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return str(path)


def test_bad_items_are_named_by_line_and_skipped_or_refused(tmp_path, capsys):
    path = _write_jsonl(tmp_path / "mine.jsonl", [
        {"context": "The sky is", "choices": ["blue", "green"], "answer": 0},
        {"context": "Only one", "choices": ["choice"], "answer": 0},
        {"context": "Out of range", "choices": ["a", "b"], "answer": 2},
        {"context": "   ", "choices": ["a", "b"], "answer": 1},
        "{not json",
        {"prompt": "a generation record", "answer": "x"},
        {"context": "Grass is", "choices": ["green", "red", "blue"], "answer": 0},
    ])
    task = load_task(path)
    assert [it.line for it in task.items] == [1, 7]
    assert [line for line, _ in task.skipped] == [2, 3, 4, 5, 6]
    reasons = dict(task.skipped)
    assert "1 choice" in reasons[2] and "out of range 0..1" in reasons[3] and reasons[4] == "empty context"
    warning = capsys.readouterr().err
    assert warning.count("\n") == 1 and "5 bad item(s)" in warning
    for line in (2, 3, 4, 5, 6):
        assert f"line {line}:" in warning

    with pytest.raises(UserError, match=r"line 2: .*line 3: .*line 4: empty context"):
        load_task(path, strict=True)

    bad_piqa = tmp_path / "piqa"
    bad_piqa.mkdir()
    _write_jsonl(bad_piqa / "piqa_valid.jsonl", [{"goal": "g", "sol1": "a", "sol2": "b"}] * 2)
    (bad_piqa / "piqa_valid_labels.lst").write_text("0\n5\n")
    with pytest.raises(UserError, match="line 2: answer 5 out of range 0..1"):
        load_task("piqa", bad_piqa, strict=True)
    (bad_piqa / "piqa_valid_labels.lst").write_text("0\n")
    with pytest.raises(UserError, match="must match line by line"):
        load_task("piqa", bad_piqa)


def test_generation_file_kind_and_bad_prompt(tmp_path, capsys):
    path = _write_jsonl(tmp_path / "gen.jsonl", [{"prompt": "2+2=", "answer": "4"}, {"prompt": "", "answer": "x"}])
    task = load_task(path)
    assert task.kind == GENERATION and task.n == 1 and task.skipped == [(2, "empty prompt")]


# ---------------------------------------------------------------- scoring (stories260K, fast)


def test_encode_pair_moves_trailing_space_into_continuation(stories, one_thread):
    tok = stories.tokenizer
    [(ctx, cont)] = encode_pair(tok, ["Once upon a time "], ["there was"])
    assert ctx == tok("Once upon a time", add_special_tokens=False).input_ids
    assert ctx + cont == tok("Once upon a time there was", add_special_tokens=False).input_ids


STORY_ITEMS = [
    {"context": "Once upon a time, there was a little girl named", "choices": ["Lily.", "table.", "blue."], "answer": 0},
    {"context": "Tom was very happy. He smiled and said,", "choices": ['"Thank you!"', "the car red."], "answer": 0},
    {"context": "The cat was hungry, so it wanted to eat some", "choices": ["rocks.", "food."], "answer": 1},
    {"context": "One day, Ben went to the park to play with his", "choices": ["friends.", "sky.", "loud."], "answer": 0},
    {"context": "The sun was shining and the birds were", "choices": ["singing.", "eating the house."], "answer": 0},
    {"context": "Sue fell down and hurt her knee. She started to", "choices": ["fly.", "cry."], "answer": 1},
]


def test_generic_jsonl_on_stories_equals_independent_computation(stories, one_thread, tmp_path):
    task = load_task(_write_jsonl(tmp_path / "stories.jsonl", STORY_ITEMS))
    result = evaluate_task(stories.model, stories.tokenizer, task, batch_size=4)
    assert result.bos == "doc" and result.summary["bos"] == "doc"  # Llama tokenizer adds BOS by default

    reference = reference_choices(stories.model, stories.tokenizer, task, bos=True)
    for got, (lls, pred) in zip(result.loglikelihoods, reference):
        np.testing.assert_allclose(got, lls, rtol=1e-5, atol=1e-4)
    assert result.predictions == [pred for _, pred in reference]
    acc = np.mean([pred == it["answer"] for (_, pred), it in zip(reference, STORY_ITEMS)])
    acc_norm = np.mean([int(np.argmax(np.array(lls) / [len(c) for c in it["choices"]])) == it["answer"]
                        for (lls, _), it in zip(reference, STORY_ITEMS)])
    assert result.summary["acc"] == pytest.approx(acc) and result.summary["acc_norm"] == pytest.approx(acc_norm)
    assert result.summary["n"] == 6
    assert result.summary["acc_stderr"] == pytest.approx(np.sqrt(acc * (1 - acc) / 5))
    assert acc >= 4 / 6  # a TinyStories model does pick the story-like endings

    no_bos = evaluate_task(stories.model, stories.tokenizer, task, batch_size=4, bos="none")
    ref_no_bos = reference_choices(stories.model, stories.tokenizer, task, bos=False)
    assert no_bos.summary["bos"] == "none"
    np.testing.assert_allclose(no_bos.loglikelihoods[0], ref_no_bos[0][0], rtol=1e-5, atol=1e-4)
    assert not np.allclose(no_bos.loglikelihoods[0], result.loglikelihoods[0])


def test_piqa_50_batched_choices_equal_unbatched_reference_on_stories(stories, one_thread, data_dir):
    task = load_task("piqa", data_dir, limit=50)
    result = evaluate_task(stories.model, stories.tokenizer, task)  # auto batches by the logits budget
    reference = reference_choices(stories.model, stories.tokenizer, task, bos=True)
    assert result.predictions == [pred for _, pred in reference]
    np.testing.assert_allclose(np.array(result.loglikelihoods), np.array([lls for lls, _ in reference]),
                               rtol=1e-5, atol=1e-3)
    assert result.correct == [pred == it.answer for (_, pred), it in zip(reference, task.items)]


def test_auto_batches_cover_every_sequence_once_within_the_logits_budget():
    rng = np.random.default_rng(0)
    seqs = [[0] * int(n) for n in rng.integers(2, 300, size=500)]
    batches = plan_batches(seqs, None, vocab_size=49152)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(500))
    assert [len(seqs[i]) for i in flat] == sorted((len(s) for s in seqs), reverse=True)
    for b in batches:
        assert len(b) == 1 or len(b) * len(seqs[b[0]]) * 49152 * 4 <= LOGITS_BUDGET_BYTES
        assert len(b) <= MAX_AUTO_BATCH
    assert len(batches[0]) < len(batches[-1])  # long sequences few per batch, short ones many
    assert [len(b) for b in plan_batches(seqs, 16, 49152)] == [16] * 31 + [4]


def test_generation_exact_match_against_hf_greedy(stories, one_thread, tmp_path):
    tok, model = stories.tokenizer, stories.model
    prompt_ids = [tok.bos_token_id] + tok("Once upon a time", add_special_tokens=False).input_ids
    out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=64, do_sample=False)
    reference = tok.decode(out[0, len(prompt_ids):], skip_special_tokens=True).split("\n")[0]
    # llama2.c's published greedy output for this prompt
    assert reference.startswith(", there was a little girl named Lily. She loved to play outside in the park.")
    path = _write_jsonl(tmp_path / "gen.jsonl", [
        {"prompt": "Once upon a time", "answer": reference.strip() + "  "},
        {"prompt": "Once upon a time", "answer": "there was a dragon."},
    ])
    result = evaluate_task(model, tok, load_task(path), max_new_tokens=64)
    assert result.predictions == [reference, reference]
    assert result.correct == [True, False] and result.summary["acc"] == 0.5 and result.summary["acc_norm"] is None

    short = evaluate_task(model, tok, load_task(path), max_new_tokens=5)
    out5 = model.generate(torch.tensor([prompt_ids]), max_new_tokens=5, do_sample=False)
    assert short.predictions[0] == tok.decode(out5[0, len(prompt_ids):], skip_special_tokens=True)


# ---------------------------------------------------------------- paired statistics


def _result(correct, task="t", lines=None):
    lines = lines or list(range(1, len(correct) + 1))
    return TaskResult(task=task, kind=MULTIPLE_CHOICE, fingerprint="f", bos="none", lines=lines,
                      correct=correct, correct_norm=correct, predictions=[0] * len(correct),
                      loglikelihoods=None, summary={})


def test_mcnemar_and_flips_on_constructed_example():
    # 20 items: 7 right in both, 3 wrong in both, 2 right->wrong, 8 wrong->right
    base = [True] * 7 + [False] * 3 + [True] * 2 + [False] * 8
    cand = [True] * 7 + [False] * 3 + [False] * 2 + [True] * 8
    cmp = compare_task_results(_result(base), _result(cand))
    assert (cmp["right_to_wrong"], cmp["wrong_to_right"]) == (2, 8)
    # by hand: X ~ Bin(10, 1/2); P(X <= 2) = (1 + 10 + 45) / 1024; two-sided doubles it
    assert cmp["mcnemar_p"] == pytest.approx(112 / 1024, abs=1e-15)
    assert cmp["acc_base"] == 9 / 20 and cmp["acc_quant"] == 15 / 20
    assert cmp["recovery"] == pytest.approx(15 / 9) and cmp["acc_drop"] == pytest.approx(-6 / 20)
    lo, hi = cmp["acc_diff_ci95"]
    assert lo < 6 / 20 < hi

    assert mcnemar_exact_p(0, 0) == 1.0 and mcnemar_exact_p(5, 5) == 1.0
    assert mcnemar_exact_p(0, 6) == pytest.approx(2 / 64)
    assert mcnemar_exact_p(3, 40) == pytest.approx(2 * sum(comb(43, k) for k in range(4)) / 2**43)
    assert compare_task_results(_result([False] * 4), _result([False] * 4))["recovery"] is None
    with pytest.raises(ValueError, match="different items"):
        compare_task_results(_result(base), _result(cand, lines=list(range(2, 22))))


def test_tasks_summary_feeds_the_audit_budget():
    from quantaudit.measure.budget import check_budget, parse_budget

    piqa = compare_task_results(_result([True] * 10, task="piqa"), _result([True] * 9 + [False], task="piqa"))
    hella = compare_task_results(_result([True] * 4 + [False] * 6, task="hellaswag"),
                                 _result([True] * 3 + [False] * 7, task="hellaswag"))
    summary = tasks_summary([piqa, hella])
    assert summary["recovery"] == pytest.approx(0.75) and summary["recovery_task"] == "hellaswag"
    assert summary["acc_drop"] == pytest.approx(0.1) and summary["acc_drop_task"] in ("piqa", "hellaswag")
    failed = check_budget({"tasks_summary": summary}, parse_budget(DEFAULT_TASK_BUDGET))
    assert len(failed) == 2 and failed[0].startswith("recovery 0.75 fails")
    ok = compare_task_results(_result([True] * 10, task="piqa"), _result([True] * 10, task="piqa"))
    assert check_budget({"tasks_summary": tasks_summary([ok])}, parse_budget(DEFAULT_TASK_BUDGET)) == []


def test_bootstrap_equals_index_resampling_in_distribution():
    rng = np.random.default_rng(1)
    base = rng.random(400) < 0.6
    cand = base.copy()
    cand[:30] = ~cand[:30]  # some flips both ways
    cand[30:40] = False
    diff = cand.astype(float) - base
    idx = rng.integers(0, 400, size=(20000, 400))
    brute = np.quantile(diff[idx].mean(1), [0.025, 0.975])
    b = int((base & ~cand).sum())
    c = int((~base & cand).sum())
    fast = paired_bootstrap_ci(b, c, 400, resamples=20000, seed=3)
    np.testing.assert_allclose(fast, brute, atol=0.006)
    assert paired_bootstrap_ci(b, c, 400, seed=3) == paired_bootstrap_ci(b, c, 400, seed=3)


# ---------------------------------------------------------------- SmolLM2 (slow)


@pytest.mark.slow
def test_smollm2_piqa_200_accuracy(smollm2_piqa200):
    _, result = smollm2_piqa200
    s = result.summary
    print(f"SmolLM2 PIQA first 200: acc {s['acc']:.3f} ± {s['acc_stderr']:.3f}, "
          f"acc_norm {s['acc_norm']:.3f} ± {s['acc_norm_stderr']:.3f}, bos {s['bos']}")
    assert s["bos"] == "none"  # SmolLM2's tokenizer adds no BOS
    assert 0.60 <= s["acc"] <= 0.68


@pytest.mark.slow
def test_smollm2_piqa_50_choices_equal_unbatched_reference(smollm2, smollm2_piqa200):
    task, result = smollm2_piqa200
    first50 = dataclasses.replace(task, items=task.items[:50])
    reference = reference_choices(smollm2.model, smollm2.tokenizer, first50, bos=False)
    assert result.predictions[:50] == [pred for _, pred in reference]
    np.testing.assert_allclose(np.array(result.loglikelihoods[:50]), np.array([lls for lls, _ in reference]),
                               rtol=1e-4, atol=1e-3)
