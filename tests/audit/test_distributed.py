"""``audit --ray``: each format a Ray task on a local Ray instance, the report the sequential audit's; a worker
killed mid-job is retried and the numbers stay the same. Without the ray extra these tests skip (in CI they fail
instead: conftest's ``ray_installed``)."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest
from cli_helpers import assert_refused
from report_compare import differences, normal

from quantaudit.cli import main

FORMATS = "fp8,int8_wo,int4_gptq,int8_sq"
EXECUTION = ("ray", "shared_dir")  # how the run executed, not what it measured (report["ray"], two settings)


@pytest.fixture(scope="module")
def flags(shared_dir, tmp_path_factory):
    text = str(shared_dir / "data" / "tinystories_sample.txt")
    tasks = tmp_path_factory.mktemp("tasks") / "choice.jsonl"
    tasks.write_text(json.dumps({"context": "The cat was hungry, so it wanted to eat some",
                                 "choices": ["rocks.", "food."], "answer": 1}) + "\n")
    return ["--model", str(shared_dir / "models" / "stories260K" / "hf"), "--calib", text, "--calib-size", "4",
            "--calib-seq", "128", "--eval", text, "--windows", "4", "--seq-len", "128", "--formats", FORMATS,
            "--kv-cache", "fp8", "--drift-windows", "1", "--tasks", str(tasks)]


@pytest.fixture(scope="module")
def sequential(flags, tmp_path_factory):
    out = tmp_path_factory.mktemp("sequential") / "audit"
    assert main(["audit", *flags, "--out", str(out)]) in (0, 3)
    return json.loads((out / "report.json").read_text()), str(out.parent)


def _compare(report: dict, tmp: str, sequential) -> list[str]:
    """Differences but timings and how the run executed (report["ray"], settings.ray and settings.shared_dir)."""
    want, want_tmp = sequential
    return differences(normal(report, {tmp: "<tmp>"}, EXECUTION), normal(want, {want_tmp: "<tmp>"}, EXECUTION))


def test_ray_audit_report_equals_the_sequential_one(ray_installed, flags, sequential, tmp_path):
    out = tmp_path / "audit"
    assert main(["audit", *flags, "--ray", "auto", "--out", str(out)]) in (0, 3)
    report = json.loads((out / "report.json").read_text())
    found = _compare(report, str(tmp_path), sequential)
    assert not found, "\n".join(found[:20])
    assert report["settings"]["ray"] == "auto"
    assert report["ray"]["jobs"] == {name: {"attempts": 1, "node": report["ray"]["jobs"][name]["node"]}
                                     for name in FORMATS.split(",")}


def test_a_killed_worker_is_retried_and_the_numbers_stay(ray_installed, flags, sequential, tmp_path):
    """The worker running int4_gptq is killed (SIGKILL) as soon as its job starts; Ray runs the job again and the
    report says so, with the sequential audit's numbers."""
    out = tmp_path / "audit"
    killed = []

    def kill_first_attempt():
        deadline = time.time() + 600
        while time.time() < deadline and not killed:
            for record in tmp_path.glob("**/formats/.jobs/int4_gptq.1.json"):
                pid = json.loads(record.read_text())["pid"]
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            time.sleep(0.02)

    killer = threading.Thread(target=kill_first_attempt, daemon=True)
    killer.start()
    assert main(["audit", *flags, "--ray", "auto", "--out", str(out)]) in (0, 3)
    killer.join(timeout=5)
    assert killed
    report = json.loads((out / "report.json").read_text())
    assert report["ray"]["jobs"]["int4_gptq"]["attempts"] == 2
    assert all(report["ray"]["jobs"][name]["attempts"] == 1 for name in ("fp8", "int8_wo", "int8_sq"))
    found = _compare(report, str(tmp_path), sequential)
    assert not found, "\n".join(found[:20])


def test_bad_ray_input_is_one_line(ray_installed, flags, tmp_path, capsys, monkeypatch):
    started = time.perf_counter()
    assert_refused(main(["audit", *flags, "--ray", "127.0.0.1:9", "--out", str(tmp_path / "a")]),
                   *capsys.readouterr(), "cannot reach the Ray head")
    assert time.perf_counter() - started < 30
    assert_refused(main(["audit", *flags, "--ray", "nowhere", "--out", str(tmp_path / "b")]), *capsys.readouterr(),
                   "HOST:PORT")
    assert_refused(main(["audit", *flags, "--shared-dir", str(tmp_path), "--out", str(tmp_path / "c")]),
                   *capsys.readouterr(), "give --ray too")
    assert_refused(main(["audit", *flags, "--ray", "auto", "--streaming", "on", "--out", str(tmp_path / "d")]),
                   *capsys.readouterr(), "drop --ray or --streaming on")
    assert_refused(main(["audit", *flags, "--ray", "auto", "--shared-dir", str(tmp_path / "missing"),
                         "--out", str(tmp_path / "e")]), *capsys.readouterr(), "--shared-dir")
    monkeypatch.setitem(__import__("sys").modules, "ray", None)  # as if the extra were not installed
    assert_refused(main(["audit", *flags, "--ray", "auto", "--out", str(tmp_path / "f")]), *capsys.readouterr(),
                   "pip install 'quantaudit[ray]'")
    assert not any((tmp_path / name).exists() for name in "abcdef")
