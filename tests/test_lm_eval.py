"""lm-evaluation-harness tasks (``--tasks lm_eval:NAME``, quantaudit.tasks.harness).

The task YAMLs are written here with local ``dataset_path: json`` data, and the Hugging Face hub is
switched to offline mode, so nothing is downloaded. Without the ``lm-eval`` extra these tests skip
(``make install`` installs it; in CI, where CI is set, they fail instead, so CI always runs them).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import sys

import numpy as np
import pytest
import torch
from cli_helpers import STORIES_HF, assert_refused, leftovers, run_cli, tiny_audit

from quantaudit.errors import UserError
from quantaudit.quant import QuantSpec, quantize
from quantaudit.tasks import (
    compare_task_results,
    evaluate_tasks,
    load_tasks,
    mcnemar_exact_p,
    tasks_summary,
)
from quantaudit.tasks.harness import harness_bos

PIQA_TASK = "piqa_quantaudit"
# lm-eval's tasks/piqa/piqa.yaml, on a local copy of the data (the original reads baber/piqa from the hub)
PIQA_YAML = """\
task: piqa_quantaudit
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {data}
output_type: multiple_choice
validation_split: validation
doc_to_text: "Question: {{{{goal}}}}\\nAnswer:"
doc_to_target: label
doc_to_choice: "{{{{[sol1, sol2]}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""

ARITH_TASK = "arith_quantaudit"
ARITH_ITEMS = [("What is 2 + 3?", 5), ("Tom has 4 apples and gets 3 more. How many apples does he have?", 7),
               ("What is 10 - 6?", 4), ("Lily has 2 bags with 5 toys in each. How many toys does she have?", 10),
               ("What is 9 + 1?", 10), ("What is 3 times 3?", 9)]
STRICT = r"#### (\-?[0-9\.\,]+)"
UNTIL = ["Question:", "</s>"]
MAX_GEN_TOKS = 24
# lm-eval's tasks/gsm8k/gsm8k.yaml (its answer format, filters and exact_match), zero-shot, on local items
ARITH_YAML = f"""\
task: arith_quantaudit
dataset_path: json
dataset_kwargs:
  data_files:
    test: DATA
output_type: generate_until
test_split: test
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: {json.dumps(UNTIL)}
  do_sample: false
  max_gen_toks: {MAX_GEN_TOKS}
filter_list:
  - name: strict-match
    filter:
      - function: regex
        regex_pattern: {json.dumps(STRICT)}
      - function: take_first
  - name: flexible-extract
    filter:
      - function: regex
        group_select: -1
        regex_pattern: "(-?[$0-9.,]{{2,}})|(-?[0-9]+)"
      - function: take_first
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
    ignore_case: true
    ignore_punctuation: false
    regexes_to_ignore: [",", "\\\\$", "(?s).*#### ", "\\\\.$"]
metadata:
  version: 1.0
"""


@pytest.fixture(scope="module")
def hub_offline(tmp_path_factory):
    """lm-eval installed (else skip, or fail in CI), the hub offline and the datasets cache in a temporary folder."""
    if importlib.util.find_spec("lm_eval") is None:
        message = "the lm-eval extra is not installed (pip install 'quantaudit[lm-eval]'; make install does)"
        if os.environ.get("CI"):
            pytest.fail(f"{message}: CI must run these tests")
        pytest.skip(message)
    import datasets.config
    import huggingface_hub.constants

    with pytest.MonkeyPatch.context() as mp:
        for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
            mp.setenv(name, "1")
        mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        mp.setattr(datasets.config, "HF_HUB_OFFLINE", True)
        mp.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.mktemp("hf_datasets"))
        yield


@pytest.fixture(scope="module")
def arith_dir(tmp_path_factory, hub_offline):
    folder = tmp_path_factory.mktemp("arith_tasks")
    data = folder / "arith.jsonl"
    data.write_text("".join(json.dumps({"question": q, "answer": f"The answer is {a}.\n#### {a}"}) + "\n"
                            for q, a in ARITH_ITEMS))
    (folder / "arith.yaml").write_text(ARITH_YAML.replace("DATA", str(data)))
    return folder


# ---------------------------------------------------------------- bad input: one line, exit 2, nothing written


def _refused(tmp_path, capsys, fragments, *flags):
    out = tmp_path / "out"
    code, stdout, stderr = run_cli(tiny_audit(out, *flags), capsys)
    assert_refused(code, stdout, stderr)
    for fragment in fragments:
        assert fragment in stderr, stderr
    assert not out.exists() and leftovers(out) == []


def test_without_the_extra_lm_eval_tasks_are_refused_naming_it(tmp_path, capsys, monkeypatch, shared_dir):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # what an environment without lm_eval finds
    _refused(tmp_path, capsys, ["pip install 'quantaudit[lm-eval]'"], "--tasks", "lm_eval:piqa")


def test_unknown_lm_eval_task_says_how_to_list_them(tmp_path, capsys, hub_offline, shared_dir):
    _refused(tmp_path, capsys, ["unknown lm-eval task 'piqaa'", "`lm-eval ls tasks`", "close: piqa"],
             "--tasks", "lm_eval:piqaa")


def test_task_needing_a_download_offline_names_task_and_dataset(tmp_path, capsys, hub_offline, shared_dir):
    _refused(tmp_path, capsys, ["lm-eval task piqa needs dataset baber/piqa", "OfflineModeIsEnabled"],
             "--tasks", "lm_eval:piqa")


def test_bos_policy_on_a_tokenizer_that_adds_bos(stories):
    assert harness_bos(stories.tokenizer, "auto") == harness_bos(stories.tokenizer, "doc") == ("doc", None)
    assert harness_bos(stories.tokenizer, "none") == ("none", False)  # lm-eval's add_bos_token=False


@pytest.mark.slow
def test_bos_doc_is_refused_on_a_tokenizer_that_adds_none(smollm2):
    assert harness_bos(smollm2.tokenizer, "auto") == harness_bos(smollm2.tokenizer, "none") == ("none", None)
    with pytest.raises(UserError, match="--bos doc with lm_eval: tasks"):
        harness_bos(smollm2.tokenizer, "doc")


# ---------------------------------------------------------------- generation (GSM8K style) on stories260K


def reference_answers(model, tokenizer) -> list[str]:
    """Greedy HF generation of each prompt, one at a time, cut at lm-eval's ``until``, then the strict regex."""
    answers = []
    for question, _ in ARITH_ITEMS:
        ids = tokenizer(f"Question: {question}\nAnswer:", return_tensors="pt").input_ids  # BOS as the tokenizer adds it
        with torch.inference_mode():
            out = model.generate(ids, max_new_tokens=MAX_GEN_TOKS, do_sample=False)
        text = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        for stop in UNTIL:
            text = text.split(stop)[0]
        found = re.findall(STRICT, text)
        answers.append(found[0].strip() if found else "[invalid]")
    return answers


def test_generation_task_pairs_stories_base_and_int4(stories, arith_dir, tmp_path, one_thread):
    tasks = load_tasks([f"lm_eval:{ARITH_TASK}"], lm_eval_include=str(arith_dir))
    results = tmp_path / "lm_eval"
    base, = evaluate_tasks(stories.model, stories.tokenizer, tasks, results_dir=results, label="baseline")
    qm = quantize(stories.model, QuantSpec(format="int4_wo", group_size=64), None, progress=False)
    assert any(r.fallback_reason is None for r in qm.layers.values())
    cand, = evaluate_tasks(qm.model, stories.tokenizer, tasks, results_dir=results, label="int4_wo")

    assert base.kind == "generate_until" and base.bos == "doc" and base.lines == list(range(len(ARITH_ITEMS)))
    assert base.summary["metric"] == "exact_match,strict-match"
    for result, model in ((base, stories.model), (cand, qm.model)):
        expected = reference_answers(model, stories.tokenizer)
        assert result.predictions == expected
        assert result.correct == [answer == str(gold) for answer, (_, gold) in zip(expected, ARITH_ITEMS)]
    # stories260K tells stories: no "#### N" in its answers, so both score 0 (and nothing flips)
    comparison = compare_task_results(base, cand)
    print(f"stories260K arithmetic: base {base.predictions}, int4_wo {cand.predictions}")
    assert comparison["acc_base"] == sum(base.correct) / len(ARITH_ITEMS) == 0.0
    assert comparison["acc_quant"] == sum(cand.correct) / len(ARITH_ITEMS)
    assert comparison["metric"] == "exact_match,strict-match" and comparison["n"] == len(ARITH_ITEMS)
    right_to_wrong = sum(b and not c for b, c in zip(base.correct, cand.correct))
    wrong_to_right = sum(c and not b for b, c in zip(base.correct, cand.correct))
    assert (comparison["right_to_wrong"], comparison["wrong_to_right"]) == (right_to_wrong, wrong_to_right)
    assert comparison["mcnemar_p"] == mcnemar_exact_p(right_to_wrong, wrong_to_right)
    assert set(comparison["lm_eval"]["base"]) >= {"exact_match,strict-match", "exact_match,flexible-extract"}
    layout = json.loads((results / "int4_wo.json").read_text())
    assert layout["results"][ARITH_TASK]["exact_match,strict-match"] == comparison["acc_quant"]
    assert layout["n-samples"][ARITH_TASK]["effective"] == len(ARITH_ITEMS) and "samples" not in layout


def test_audit_and_compare_run_lm_eval_tasks_and_write_lm_eval_results(arith_dir, tmp_path, capsys, shared_dir,
                                                                       one_thread):
    out = tmp_path / "audit"
    flags = ["--tasks", f"lm_eval:{ARITH_TASK}", "--lm-eval-include", str(arith_dir), "--limit", "0.5"]
    code, _, stderr = run_cli(tiny_audit(out, "--formats", "int4_wo", "--group-size", "64",
                                         "--budget", "acc_drop<=0.01", *flags), capsys)
    assert code == 0, stderr
    report = json.loads((out / "report.json").read_text())
    name = f"lm_eval:{ARITH_TASK}"
    assert report["tasks"][name]["n"] == math.ceil(0.5 * len(ARITH_ITEMS)) == 3  # lm-eval's fractional --limit
    comparison, = report["formats"][0]["tasks"]
    assert comparison["task"] == name and report["formats"][0]["tasks_summary"]["acc_drop"] == comparison["acc_drop"]
    assert sorted(p.name for p in (out / "lm_eval").iterdir()) == ["baseline.json", "int4_wo.json"]
    baseline = json.loads((out / "lm_eval" / "baseline.json").read_text())
    assert baseline["results"][ARITH_TASK]["exact_match,strict-match"] == comparison["acc_base"]

    cmp_json = tmp_path / "cmp" / "cmp.json"
    code, _, stderr = run_cli(["compare", "--base", str(STORIES_HF), "--candidate", str(STORIES_HF),
                               "--data", str(shared_dir / "data" / "tinystories_sample.txt"), "--windows", "1",
                               "--seq-len", "32", "--json", str(cmp_json), *flags], capsys)
    assert code == 0, stderr
    same, = json.loads(cmp_json.read_text())["tasks"]
    assert same["n"] == 3 and same["right_to_wrong"] == same["wrong_to_right"] == 0 and same["mcnemar_p"] == 1.0
    assert sorted(p.name for p in (cmp_json.parent / "lm_eval").iterdir()) == ["base.json", "candidate.json"]

    eval_json = tmp_path / "eval" / "eval.json"
    code, _, stderr = run_cli(["eval", "--model", str(STORIES_HF), "--json", str(eval_json), "--bos", "none", *flags],
                              capsys)
    assert code == 0, stderr
    summary = json.loads(eval_json.read_text())["tasks"][name]
    assert summary["n"] == 3 and summary["bos"] == "none" and summary["metric"] == "exact_match,strict-match"
    assert json.loads((eval_json.parent / "lm_eval" / "model.json").read_text())["results"][ARITH_TASK] == summary["lm_eval"]


# ---------------------------------------------------------------- PIQA: lm-eval against quantaudit's own scorer


@pytest.fixture(scope="module")
def piqa_tasks(tmp_path_factory, hub_offline, shared_dir):
    """lm-eval's piqa task on PIQA's validation file with its labels (one record per line, label added)."""
    folder = tmp_path_factory.mktemp("piqa_task")
    records = (shared_dir / "data" / "piqa_valid.jsonl").read_text(encoding="utf-8").splitlines()
    labels = (shared_dir / "data" / "piqa_valid_labels.lst").read_text(encoding="utf-8").splitlines()
    data = folder / "piqa.jsonl"
    data.write_text("".join(json.dumps({**json.loads(r), "label": int(l)}) + "\n" for r, l in zip(records, labels)))
    (folder / "piqa.yaml").write_text(PIQA_YAML.format(data=data))
    return load_tasks([f"lm_eval:{PIQA_TASK}"], limit=200, lm_eval_include=str(folder))


@pytest.mark.slow
def test_smollm2_piqa_200_lm_eval_equals_own_scorer_item_by_item_and_pairs_a_format(
        smollm2, smollm2_piqa200, piqa_tasks, tmp_path):
    task, own = smollm2_piqa200
    results = tmp_path / "lm_eval"
    harness, = evaluate_tasks(smollm2.model, smollm2.tokenizer, piqa_tasks, results_dir=results, label="baseline")
    # the same items: doc_id i is line i + 1 of the files (none of the first 200 is skipped by our reader)
    assert [it.line for it in task.items] == [i + 1 for i in harness.lines] == list(range(1, 201))
    assert harness.bos == own.bos == "none"
    disagree = [i for i, (a, b) in enumerate(zip(harness.predictions, own.predictions)) if a != b]
    gap = np.abs(np.array(harness.loglikelihoods) - np.array(own.loglikelihoods)).max()
    print(f"PIQA first 200, SmolLM2: lm-eval acc {harness.summary['acc']:.3f} acc_norm {harness.summary['acc_norm']:.3f}, "
          f"own acc {own.summary['acc']:.3f} acc_norm {own.summary['acc_norm']:.3f}; items choosing differently: "
          f"{disagree}; largest log-likelihood difference {gap:.2e}")
    assert disagree == [] and harness.correct == own.correct and harness.correct_norm == own.correct_norm
    assert gap < 1e-3
    assert harness.summary["acc"] == own.summary["acc"] == 0.64
    assert harness.summary["acc_norm"] == own.summary["acc_norm"]
    assert harness.summary["acc_stderr"] == pytest.approx(own.summary["acc_stderr"], rel=1e-9)
    layout = json.loads((results / "baseline.json").read_text())
    assert layout["results"][PIQA_TASK]["acc,none"] == 0.64
    assert layout["results"][PIQA_TASK]["acc_stderr,none"] == pytest.approx(own.summary["acc_stderr"], rel=1e-9)

    qm = quantize(smollm2.model, QuantSpec(format="int4_wo"), None, progress=False)
    quant, = evaluate_tasks(qm.model, smollm2.tokenizer, piqa_tasks, results_dir=results, label="int4_wo")
    comparison = compare_task_results(harness, quant)
    right_to_wrong = sum(b and not c for b, c in zip(harness.correct, quant.correct))
    wrong_to_right = sum(c and not b for b, c in zip(harness.correct, quant.correct))
    acc_quant = sum(quant.correct) / 200
    print(f"int4_wo: acc {acc_quant:.3f}, right->wrong {right_to_wrong}, wrong->right {wrong_to_right}, "
          f"McNemar p {comparison['mcnemar_p']:.3g}, 95% CI of the difference {comparison['acc_diff_ci95']}")
    assert comparison["metric"] == "acc,none" and comparison["n"] == 200
    assert comparison["acc_base"] == 0.64 and comparison["acc_quant"] == acc_quant
    assert comparison["recovery"] == pytest.approx(acc_quant / 0.64)
    assert (comparison["right_to_wrong"], comparison["wrong_to_right"]) == (right_to_wrong, wrong_to_right)
    assert right_to_wrong + wrong_to_right > 0  # int4 RTN changes some of SmolLM2's answers
    assert comparison["mcnemar_p"] == mcnemar_exact_p(right_to_wrong, wrong_to_right)
    lo, hi = comparison["acc_diff_ci95"]
    assert lo <= acc_quant - 0.64 <= hi
    assert comparison["lm_eval"]["quant"]["acc,none"] == acc_quant
    assert tasks_summary([comparison])["recovery"] == comparison["recovery"]
