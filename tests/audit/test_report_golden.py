"""The report of one fixed audit, field by field, against the one recorded before the run pipeline was
restructured (issue 17): every default format, ``--kv-cache fp8`` and a small task file on stories260K.

Timings, timestamps and temporary paths are left out; numbers must agree to float rounding. After a change
that is meant to change the numbers, record the file again with ``QUANTAUDIT_RECORD_GOLDEN=1 pytest`` on this
test and say why in the commit.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from quantaudit.cli import main

GOLDEN = Path(__file__).parent / "golden"
TIMING_KEYS = ("seconds", "_per_s", "created", "quantaudit_version", "torch_threads", "timings")


def _normal(value, tmp: str):
    """The report without timings and with the run's temporary folder named ``<tmp>``."""
    if isinstance(value, dict):
        return {k.replace(tmp, "<tmp>"): _normal(v, tmp) for k, v in value.items() if not any(t in k for t in TIMING_KEYS)}
    if isinstance(value, list):
        return [_normal(v, tmp) for v in value]
    if isinstance(value, str):
        return value.replace(tmp, "<tmp>")
    return value


def _differences(got, want, path="report") -> list[str]:
    if isinstance(want, dict) and isinstance(got, dict):
        out = [f"{path}: keys {sorted(set(got) ^ set(want))} differ"] if set(got) != set(want) else []
        for key in set(got) & set(want):
            out += _differences(got[key], want[key], f"{path}.{key}")
        return out
    if isinstance(want, list) and isinstance(got, list):
        if len(got) != len(want):
            return [f"{path}: {len(got)} items, recorded {len(want)}"]
        return [d for i, (g, w) in enumerate(zip(got, want)) for d in _differences(g, w, f"{path}[{i}]")]
    if isinstance(want, float) and isinstance(got, (int, float)) and not isinstance(got, bool):
        close = math.isclose(got, want, rel_tol=1e-5, abs_tol=1e-7) or (math.isnan(got) and math.isnan(want))
        return [] if close else [f"{path}: {got!r}, recorded {want!r}"]
    return [] if got == want else [f"{path}: {got!r}, recorded {want!r}"]


def test_fixed_audit_report_equals_the_recorded_one(shared_dir, tmp_path, one_thread):
    text = str(shared_dir / "data" / "tinystories_sample.txt")
    tasks = tmp_path / "stories_tasks.jsonl"
    tasks.write_text((GOLDEN / "stories_tasks.jsonl").read_text())
    out = tmp_path / "audit"
    code = main(["audit", "--model", str(shared_dir / "models" / "stories260K" / "hf"), "--calib", text,
                 "--calib-size", "6", "--calib-seq", "256", "--eval", text, "--windows", "6", "--seq-len", "256",
                 "--kv-cache", "fp8", "--tasks", str(tasks), "--budget", "kld<=0.05", "--out", str(out)])
    assert code in (0, 3)
    report = _normal(json.loads((out / "report.json").read_text()), str(tmp_path))
    recorded = GOLDEN / "report_stories.json"
    if os.environ.get("QUANTAUDIT_RECORD_GOLDEN"):
        recorded.write_text(json.dumps(report, indent=1, sort_keys=True) + "\n")
    differences = _differences(report, json.loads(recorded.read_text()))
    assert not differences, "\n".join(differences[:20])
    # the fixed audit covers what the issue asked: every default format, the KV cache, a task
    assert [f["name"] for f in report["formats"]] == ["fp8", "int8_wo", "int8_sq", "int4_awq", "int4_gptq", "w4a8_awq"]
    assert all(f["kv_cache"] == "fp8" and f["tasks"] for f in report["formats"])
