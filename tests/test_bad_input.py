"""Bad input never costs a user their previous results (issue 18).

Every input is checked before --out is touched: a refused run exits 2 with one line on stderr and no
traceback, leaves a fresh --out uncreated and a previous run (even under --force) byte for byte as it
was. A run writes into a staging folder beside --out, swapped in when it finishes, under a lock.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from cli_helpers import STORIES_HF, TEXT, assert_refused, leftovers, run_cli, snapshot, tiny_audit


@pytest.fixture(scope="module")
def previous(shared_dir, tmp_path_factory):
    """A finished audit of stories260K (report.json/md/html and formats/), to be copied per test."""
    from quantaudit.cli import main

    out = tmp_path_factory.mktemp("previous") / "run"
    assert main(tiny_audit(out)) in (0, 3)
    return out


@pytest.fixture
def over_previous(previous, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(previous, out)
    return out


def _model_copy(tmp_path, name="model"):
    folder = tmp_path / name
    shutil.copytree(STORIES_HF, folder)
    for p in [folder, *folder.iterdir()]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    return folder


def _truncated(tmp_path):
    folder = _model_copy(tmp_path)
    with open(folder / "model.safetensors", "r+b") as f:
        f.truncate(1000)
    return ["--model", str(folder)]


def _zero_bytes(tmp_path):
    folder = _model_copy(tmp_path)
    (folder / "model.safetensors").write_bytes(b"")
    return ["--model", str(folder), "--streaming", "on"]


def _wrong_shape(tmp_path):
    folder = _model_copy(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["intermediate_size"] = 176
    (folder / "config.json").write_text(json.dumps(config))
    return ["--model", str(folder)]


def _plan(tmp_path, layers):
    path = tmp_path / "plan.json"
    path.write_text(json.dumps({"plan": layers}))
    return ["--plan", str(path)]


CASES = {
    # the model
    "missing model": (lambda t: ["--model", str(t / "nope")], "model not found"),
    "truncated safetensors": (_truncated, "truncated or damaged"),
    "zero-byte safetensors, streamed": (_zero_bytes, "truncated or damaged"),
    "wrong-shaped tensor": (_wrong_shape, "tensor model.layers.0.mlp.down_proj.weight has shape [64, 172]"),
    # the device
    "invalid device": (lambda t: ["--device", "gpu0"], "is not a torch device"),
    "cuda without CUDA": (lambda t: ["--device", "cuda"], "CUDA is not available"),
    # texts
    "folder as --calib": (lambda t: ["--calib", str(t)], "is a folder"),
    "folder as --eval": (lambda t: ["--eval", str(t)], "is a folder"),
    "missing --eval": (lambda t: ["--eval", str(t / "nope.txt")], "text file not found"),
    "--calib-seq 1": (lambda t: ["--calib-seq", "1"], "--calib-seq must be at least 2"),
    # numeric flags
    "--sensitivity-windows 0": (lambda t: ["--sensitivity-granularity", "decoder", "--sensitivity-windows", "0"],
                                "--sensitivity-windows must be at least 1"),
    "--windows -1": (lambda t: ["--windows", "-1"], "--windows must be at least 1"),
    "--calib-size 0": (lambda t: ["--calib-size", "0"], "--calib-size must be at least 1"),
    "--seq-len -5": (lambda t: ["--seq-len", "-5"], "--seq-len must be at least 2"),
    "--drift-windows -1": (lambda t: ["--drift-windows", "-1"], "--drift-windows must be at least 0"),
    "--top-k 0": (lambda t: ["--top-k", "0"], "--top-k must be at least 1"),
    "--batch-size 0": (lambda t: ["--batch-size", "0"], "--batch-size must be at least 1"),
    "--stream-ram -1": (lambda t: ["--stream-ram", "-1"], "--stream-ram must be at least 0"),
    "--limit 0": (lambda t: ["--tasks", "piqa", "--limit", "0"], "--limit must be at least 1"),
    "--seed -1": (lambda t: ["--seed", "-1"], "--seed must be at least 0"),
    "--group-size 32": (lambda t: ["--group-size", "32"], "--group-size must be 64 or 128"),
    "--windows abc": (lambda t: ["--windows", "abc"], "invalid int value: 'abc'"),
    "--smoothquant-alpha 2": (lambda t: ["--smoothquant-alpha", "2"], "must be in [0, 1]"),
    # budget, formats, tasks, GPU
    "infinite budget": (lambda t: ["--budget", "kld<=1e999"], "not a finite number"),
    "nan budget": (lambda t: ["--budget", "kld<=nan"], "cannot parse budget term"),
    "unknown format": (lambda t: ["--formats", "int3"], "unknown format 'int3'"),
    "unknown task": (lambda t: ["--tasks", "mmlu"], "unknown task 'mmlu'"),
    "unknown GPU": (lambda t: ["--gpu", "rtx-9999"], "unknown GPU 'rtx-9999'"),
    # plans
    "plan mixing q/k/v formats": (lambda t: _plan(t, {"model.layers.0.self_attn.q_proj": "int8_wo"}),
                                  "mixes formats inside one fused TensorRT-LLM GEMM"),
    "plan mixing gate/up formats": (lambda t: _plan(t, {"model.layers.2.mlp.gate_proj": "fp8", "model.layers.2.mlp.up_proj": "int8_wo"}),
                                    "model.layers.2.mlp.gate_proj=fp8, model.layers.2.mlp.up_proj=int8_wo"),
    "plan naming a missing layer": (lambda t: _plan(t, {"model.layers.9.mlp.down_proj": "fp8"}),
                                    "which this model does not have"),
    "plan that is a folder": (lambda t: ["--plan", str(t)], "plan file not found"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_and_touches_no_out(case, shared_dir, over_previous, tmp_path, capsys):
    if case == "cuda without CUDA" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    make, fragment = CASES[case]
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    extra = make(inputs)
    fresh = tmp_path / "fresh"
    assert_refused(*run_cli(tiny_audit(fresh, *extra), capsys), fragment)
    assert not fresh.exists() and leftovers(fresh) == []
    before = snapshot(over_previous)
    assert_refused(*run_cli(tiny_audit(over_previous, *extra, "--force"), capsys), fragment)
    assert snapshot(over_previous) == before and leftovers(over_previous) == []


def test_force_with_a_bad_model_keeps_the_previous_report_byte_identical(over_previous, tmp_path, capsys):
    report = (over_previous / "report.json").read_bytes()
    assert_refused(*run_cli(tiny_audit(over_previous, "--force", model=tmp_path / "typo"), capsys), "model not found")
    assert (over_previous / "report.json").read_bytes() == report
    assert sorted(p.name for p in (over_previous / "formats").iterdir()) == ["int8_wo.json"]


def test_a_failed_run_then_the_corrected_command_succeeds_without_force(shared_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert_refused(*run_cli(tiny_audit(out, "--calib", str(tmp_path)), capsys), "is a folder")
    code, _, err = run_cli(tiny_audit(out), capsys)
    assert code in (0, 3), err
    assert json.loads((out / "report.json").read_text())["formats"][0]["name"] == "int8_wo"
    assert leftovers(out) == []


def test_force_replaces_the_previous_run_whole(over_previous, capsys):
    code, _, err = run_cli(tiny_audit(over_previous, "--force", "--formats", "int4_wo"), capsys)
    assert code in (0, 3), err
    assert [p.name for p in (over_previous / "formats").iterdir()] == ["int4_wo.json"]  # no int8_wo left: no mix
    assert [f["name"] for f in json.loads((over_previous / "report.json").read_text())["formats"]] == ["int4_wo"]
    assert leftovers(over_previous) == []


def test_force_refuses_a_folder_holding_other_files(over_previous, capsys):
    (over_previous / "notes.txt").write_text("mine")
    before = snapshot(over_previous)
    assert_refused(*run_cli(tiny_audit(over_previous, "--force"), capsys), "holds 'notes.txt', which this command does not write")
    assert snapshot(over_previous) == before


def test_resume_over_a_damaged_format_file_audits_it_again(over_previous, capsys):
    (over_previous / "formats" / "int8_wo.json").write_text('{"settings_fingerprint": "')  # cut off mid-write
    (over_previous / "report.json").unlink()
    code, out, err = run_cli(tiny_audit(over_previous, "--resume"), capsys)
    assert code in (0, 3) and "Traceback" not in out + err
    assert "is damaged: int8_wo is audited again" in " ".join(out.split())
    saved = json.loads((over_previous / "formats" / "int8_wo.json").read_text())
    assert saved["entry"]["kld"] == json.loads((over_previous / "report.json").read_text())["formats"][0]["kld"]


def test_a_second_run_on_a_locked_out_is_refused_naming_the_first(over_previous, capsys):
    import fcntl

    before = snapshot(over_previous)
    lock = over_previous.with_name(".run.lock")
    with open(lock, "w") as held:  # what a running audit holds: the flock, and its pid in the file
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("4242\n")
        held.flush()
        assert_refused(*run_cli(tiny_audit(over_previous, "--force"), capsys), "in use by another quantaudit run (pid 4242)")
        assert snapshot(over_previous) == before
    lock.unlink()
    code, _, _ = run_cli(tiny_audit(over_previous, "--force"), capsys)
    assert code in (0, 3) and leftovers(over_previous) == []  # the lock file goes with the lock


def test_a_bug_is_one_line_with_the_saved_traceback(monkeypatch, tmp_path, capsys):
    import quantaudit.audit.run as run_module

    def broken(*args, **kwargs):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(run_module, "run_audit", broken)
    code, out, err = run_cli(tiny_audit(tmp_path / "o"), capsys)
    assert code == 1 and "Traceback" not in out + err
    (line,) = err.strip().splitlines()
    assert "internal error, this is a bug (ZeroDivisionError: division by zero)" in line
    saved = Path(line.rsplit("saved in ", 1)[1])
    assert "Traceback" in saved.read_text() and "in broken" in saved.read_text()
    saved.unlink()


def test_a_killed_exports_staging_folder_is_cleaned_by_the_next_export(shared_dir, tmp_path, capsys):
    out = tmp_path / "ckpt"
    (tmp_path / ".ckpt.incoming").mkdir()
    (tmp_path / ".ckpt.incoming" / "rank0.safetensors").write_bytes(b"half")  # what a SIGKILL leaves
    code, _, err = run_cli(["export", "--model", str(STORIES_HF), "--format", "int8_wo", "--calib", str(TEXT),
                            "--calib-size", "2", "--calib-seq", "32", "--out", str(out)], capsys)
    assert code == 0, err
    assert (out / "rank0.safetensors").stat().st_size > 1000 and leftovers(out) == []


@pytest.mark.parametrize("command", ["autotune", "calib-check", "export"])
def test_other_commands_with_a_bad_model_create_no_out(command, shared_dir, tmp_path, capsys):
    out = tmp_path / "o"
    extra = {"autotune": ["--budget", "kld<=0.1"], "calib-check": [], "export": ["--format", "int8_wo"]}[command]
    argv = [command, "--model", str(tmp_path / "typo"), "--calib", str(TEXT), *extra, "--out", str(out)]
    assert_refused(*run_cli(argv, capsys), "model not found")
    assert not out.exists() and leftovers(out) == []
    argv = [command, "--model", str(STORIES_HF), "--calib", str(TEXT), "--device", "cuda:9", *extra, "--out", str(out)]
    assert_refused(*run_cli(argv, capsys), "--device cuda:9")
    assert not out.exists()


def test_export_refuses_the_plan_audit_refuses(shared_dir, tmp_path, capsys):
    plan = _plan(tmp_path, {"model.layers.0.self_attn.q_proj": "int8_wo", "model.layers.0.self_attn.k_proj": "fp8",
                            "model.layers.0.self_attn.v_proj": "fp8"})
    fragment = "mixes formats inside one fused TensorRT-LLM GEMM (model.layers.0.self_attn.q_proj=int8_wo"
    assert_refused(*run_cli(tiny_audit(tmp_path / "a", *plan, "--formats", ""), capsys), fragment)
    assert_refused(*run_cli(["export", "--model", str(STORIES_HF), *plan, "--calib", str(TEXT), "--calib-size", "2",
                             "--calib-seq", "32", "--out", str(tmp_path / "e")], capsys), fragment)
    assert not (tmp_path / "a").exists() and not (tmp_path / "e").exists()
