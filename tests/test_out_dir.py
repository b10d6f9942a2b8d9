"""--out is replaced whole or not at all (quantaudit.fileio.output_dir), even when the run is killed."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from cli_helpers import leftovers, snapshot, tiny_audit

from quantaudit.errors import UserError
from quantaudit.fileio import output_dir


def _fill(folder, **files):
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name).write_text(text)


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two renames"])
def test_the_new_folder_replaces_the_old_only_when_the_block_finishes(exchange, tmp_path, monkeypatch):
    from quantaudit import fileio

    if not exchange:
        monkeypatch.setattr(fileio, "_exchange", lambda a, b: False)
    out = tmp_path / "out"
    _fill(out, **{"report.json": "old"})
    with pytest.raises(RuntimeError), output_dir(out, force=True) as work:
        (work / "report.json").write_text("new")
        raise RuntimeError("failed mid-run")
    assert snapshot(out) == {"report.json": b"old"} and leftovers(out) == []
    with output_dir(out, force=True) as work:
        (work / "report.json").write_text("new")
        assert snapshot(out) == {"report.json": b"old"}  # not before the end
    assert snapshot(out) == {"report.json": b"new"} and leftovers(out) == []


def test_a_half_done_swap_is_undone_by_the_next_run(tmp_path):
    out = tmp_path / "out"
    _fill(tmp_path / ".out.replaced", **{"report.json": "old"})  # killed between the two renames
    with pytest.raises(UserError, match="not empty"), output_dir(out):
        pass
    assert snapshot(out) == {"report.json": b"old"} and leftovers(out) == []


def test_resume_continues_the_staged_run_and_partial_work_is_kept(tmp_path):
    out = tmp_path / "out"
    _fill(out / "formats", **{"a.json": "from the previous run"})
    with pytest.raises(KeyboardInterrupt), output_dir(out, force=True, keep_partial=True) as work:
        _fill(work / "formats", **{"b.json": "finished before the interrupt"})
        raise KeyboardInterrupt
    assert snapshot(out) == {"formats": None, "formats/a.json": b"from the previous run"}
    with output_dir(out, resume=True) as work:  # the interrupted --force run, not a copy of out
        assert snapshot(work) == {"formats": None, "formats/b.json": b"finished before the interrupt"}
    with output_dir(out, resume=True) as work:  # nothing interrupted: starts from a copy of out
        assert snapshot(work) == snapshot(out)
        (work / "formats" / "b.json").write_text("again")
    assert (out / "formats" / "b.json").read_text() == "again" and leftovers(out) == []


def test_merge_adds_its_file_to_a_shared_folder(tmp_path):
    out = tmp_path / "out"
    _fill(out, **{"report.json": "someone else's", "calib_check.json": "old"})
    with output_dir(out, merge=True) as work:
        (work / "calib_check.json").write_text("new")
    assert snapshot(out) == {"report.json": b"someone else's", "calib_check.json": b"new"}


def _wait_for(predicate, proc, timeout=120.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end and proc.poll() is None:
        if predicate():
            return True
        time.sleep(0.005)
    return False


@pytest.mark.parametrize("moment", ["first staged format", "staged report.md"])
def test_sigkill_during_force_leaves_the_old_run_or_the_new_one_never_a_mix(moment, shared_dir, tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "QUANTAUDIT_QUIET": "1"}
    base = [sys.executable, "-m", "quantaudit.cli"]
    subprocess.run([*base, *tiny_audit(out)], check=True, capture_output=True, env=env, timeout=300)
    old = snapshot(out)
    formats = "int8_wo,int4_wo,fp8,int8_sq,int4_awq"
    argv = [*base, *tiny_audit(out, "--force", "--formats", formats, "--sensitivity-granularity", "decoder",
                               "--drift-windows", "1")]
    staging = tmp_path / ".run.incoming"
    trigger = {"first staged format": lambda: any((staging / "formats").glob("*.json")),
               "staged report.md": lambda: (staging / "report.md").exists()}[moment]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    try:
        seen = _wait_for(trigger, proc)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert "Traceback" not in proc.stderr.read().decode()
    now = snapshot(out)
    if now != old:  # the new run, complete: its report names exactly the formats in formats/
        report = json.loads((out / "report.json").read_text())
        assert [f["name"] for f in report["formats"]] == formats.split(",")
        assert sorted(p.stem for p in (out / "formats").glob("*.json")) == sorted(formats.split(","))
    elif moment == "first staged format":
        assert seen and proc.returncode == -signal.SIGKILL
    # --resume picks up what the killed run finished, and then replaces the old run
    done = subprocess.run([*argv, "--resume"], check=False, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode in (0, 3), done.stderr
    if now == old and moment == "first staged format":
        assert "reusing the finished result" in " ".join(done.stdout.split())
    report = json.loads((out / "report.json").read_text())
    assert [f["name"] for f in report["formats"]] == formats.split(",") and leftovers(out) == []
    shutil.rmtree(out)
