"""The report of one fixed audit, field by field, against the one recorded before the run pipeline was
restructured (issue 17): every default format, ``--kv-cache fp8`` and a small task file on stories260K.

Timings, timestamps and the model's on-disk identity are left out, and paths are written relative to their
folders (CI checks out elsewhere); numbers must agree to float rounding. After a change meant to change the
numbers, record the file again with ``QUANTAUDIT_RECORD_GOLDEN=1 pytest`` on this test and say why in the commit.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from report_compare import differences, normal

from quantaudit.cli import main

GOLDEN = Path(__file__).parent / "golden"


def test_fixed_audit_report_equals_the_recorded_one(shared_dir, tmp_path, one_thread):
    text = str(shared_dir / "data" / "tinystories_sample.txt")
    tasks = tmp_path / "stories_tasks.jsonl"
    tasks.write_text((GOLDEN / "stories_tasks.jsonl").read_text())
    out = tmp_path / "audit"
    code = main(["audit", "--model", str(shared_dir / "models" / "stories260K" / "hf"), "--calib", text,
                 "--calib-size", "6", "--calib-seq", "256", "--eval", text, "--windows", "6", "--seq-len", "256",
                 "--kv-cache", "fp8", "--tasks", str(tasks), "--budget", "kld<=0.05", "--out", str(out)])
    assert code in (0, 3)
    report = normal(json.loads((out / "report.json").read_text()), {str(tmp_path): "<tmp>", str(shared_dir): "<shared>"})
    del report["model"]["fingerprint"]  # the folder's path and file times: differs from machine to machine
    recorded = GOLDEN / "report_stories.json"
    if os.environ.get("QUANTAUDIT_RECORD_GOLDEN"):
        recorded.write_text(json.dumps(report, indent=1, sort_keys=True) + "\n")
    found = differences(report, json.loads(recorded.read_text()))
    assert not found, "\n".join(found[:20])
    # the fixed audit covers what the issue asked: every default format, the KV cache, a task
    assert [f["name"] for f in report["formats"]] == ["fp8", "int8_wo", "int8_sq", "int4_awq", "int4_gptq", "w4a8_awq"]
    assert all(f["kv_cache"] == "fp8" and f["tasks"] for f in report["formats"])
