"""The command line: real results through `main()`, and one clear line for every bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from quantaudit.cli import main

STORIES = "../shared/models/stories260K/hf"


def run(argv, capsys):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_eval_stories260k_perplexity(shared_dir, tmp_path, capsys):
    out_json = tmp_path / "eval.json"
    code, out, _ = run(["eval", "--model", str(shared_dir / "models/stories260K/hf"),
                        "--data", str(shared_dir / "data/tinystories_sample.txt"), "--json", str(out_json)], capsys)
    assert code == 0
    result = json.loads(out_json.read_text())
    assert 3.4 <= result["ppl"] <= 3.7
    assert result["eval"]["bos"] == "doc" and result["tokens"] == result["eval"]["tokens"] == 1804
    assert f"{result['ppl']:.4f}" in out


def test_compare_identical_models_is_exactly_zero(shared_dir, tmp_path, capsys):
    model = str(shared_dir / "models/stories260K/hf")
    out_json = tmp_path / "cmp.json"
    code, out, _ = run(["compare", "--base", model, "--candidate", model,
                        "--data", str(shared_dir / "data/tinystories_sample.txt"), "--json", str(out_json)], capsys)
    assert code == 0
    stats = json.loads(out_json.read_text())["stats"]
    assert stats["kld"]["mean"] == 0 and stats["kld"]["max"] == 0 and stats["top1"] == 1.0
    assert stats["ppl_ratio"] == 1.0
    assert "same top-1" in out


def _different_vocab_model(shared_dir, tmp_path):
    """A small random Llama with another vocabulary, saved with stories260K's tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder = tmp_path / "other"
    cfg = LlamaConfig(vocab_size=600, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    AutoTokenizer.from_pretrained(shared_dir / "models/stories260K/hf").save_pretrained(folder)
    return folder


@pytest.mark.parametrize(
    "case, fragment",
    [
        ("missing_model", "model not found"),
        ("empty_text", "is empty"),
        ("short_text", "fewer than one window"),
        ("binary_text", "not UTF-8"),
        ("bad_jsonl", ":2: not valid JSON"),
        ("vocab_mismatch", "different vocabularies"),
        ("unknown_format", "unknown format 'int3'; valid formats: none, fp8, fp8_pc_pt, int8_wo, int4_wo"),
        ("bad_budget", "budget grammar"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(case, fragment, shared_dir, tmp_path, capsys):
    model = str(shared_dir / "models/stories260K/hf")
    text = tmp_path / "t.txt"
    argv = ["eval", "--model", model, "--data", str(text)]
    if case == "missing_model":
        argv = ["eval", "--model", str(tmp_path / "nope")]
    elif case == "empty_text":
        text.write_text("")
    elif case == "short_text":
        text.write_text("Once upon a time.")
    elif case == "binary_text":
        text.write_bytes(b"\xff\xfe\x00 binary " * 40)
    elif case == "bad_jsonl":
        bad = tmp_path / "t.jsonl"
        bad.write_text('{"text": "ok"}\nnot json\n')
        argv = ["eval", "--model", model, "--data", str(bad)]
    elif case == "vocab_mismatch":
        text.write_text("Once upon a time. " * 300)
        argv = ["compare", "--base", model, "--candidate", str(_different_vocab_model(shared_dir, tmp_path)),
                "--data", str(text)]
    elif case == "unknown_format":
        argv = ["audit", "--model", model, "--formats", "fp8,int3", "--out", str(tmp_path / "o")]
    elif case == "bad_budget":
        argv = ["audit", "--model", model, "--budget", "kld=<0.1", "--out", str(tmp_path / "o")]
    code, out, err = run(argv, capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0], err
    assert "Traceback" not in err + out


def test_no_traceback_from_the_installed_command(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "quantaudit.cli", "eval", "--model", str(tmp_path / "missing")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.startswith("quantaudit eval: error: model not found") and "Traceback" not in proc.stderr


def test_eval_tasks_json_and_audit_task_budget(shared_dir, tmp_path, capsys):
    """`eval --tasks` writes acc/acc_norm/n per task; `audit --tasks` gates on recovery."""
    from quantaudit.models import load_model
    from quantaudit.tasks import evaluate_task, load_task

    model = str(shared_dir / "models/stories260K/hf")
    out_json = tmp_path / "tasks.json"
    code, out, _ = run(["eval", "--model", model, "--tasks", "piqa", "--task-data", str(shared_dir / "data"),
                        "--limit", "12", "--json", str(out_json)], capsys)
    assert code == 0
    piqa = json.loads(out_json.read_text())["tasks"]["piqa"]
    lm = load_model(model)
    direct = evaluate_task(lm.model, lm.tokenizer, load_task("piqa", shared_dir / "data", limit=12)).summary
    assert piqa["n"] == 12 and piqa["acc"] == direct["acc"] and piqa["acc_norm"] == direct["acc_norm"]

    code, _, _ = run(["audit", "--model", model, "--formats", "int8_wo", "--calib", str(shared_dir / "data/tinystories_sample.txt"),
                      "--calib-size", "2", "--calib-seq", "256", "--eval", str(shared_dir / "data/tinystories_sample.txt"),
                      "--windows", "1", "--drift-windows", "0", "--sensitivity-granularity", "none",
                      "--tasks", "piqa", "--task-data", str(shared_dir / "data"), "--limit", "12",
                      "--budget", "recovery>=0.5", "--out", str(tmp_path / "a")], capsys)
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    entry = report["formats"][0]
    assert report["tasks"]["piqa"]["acc"] == direct["acc"]
    comparison = entry["tasks"][0]
    assert comparison["acc_base"] == direct["acc"] and comparison["n"] == 12
    assert entry["tasks_summary"]["recovery"] == comparison["recovery"]
    assert entry["passed"] == (comparison["recovery"] >= 0.5) and code == (0 if entry["passed"] else 3)


def test_atomic_outputs_get_ordinary_permissions(tmp_path):
    """Written through a private temporary file, the result still gets the mode the umask gives new files."""
    import os

    from quantaudit.fileio import atomic_directory, atomic_write_json

    mask = os.umask(0o022)
    try:
        atomic_write_json(tmp_path / "report.json", {"a": 1})
        with atomic_directory(tmp_path / "ckpt"):
            pass
    finally:
        os.umask(mask)
    assert (tmp_path / "report.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "ckpt").stat().st_mode & 0o777 == 0o755
