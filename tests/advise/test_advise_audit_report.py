"""Reading an audit report.json (the layout quantaudit.audit.run writes)."""

from __future__ import annotations

import json

import pytest

from quantaudit.advise import advise
from quantaudit.advise.audit_report import load_audit_report
from quantaudit.advise.model_shape import reference_shape
from quantaudit.errors import UserError


def write(tmp_path, obj, name="report.json"):
    path = tmp_path / name
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return path


def test_per_linear_sensitivity(tmp_path):
    layers = [{"name": f"model.layers.{i}.self_attn.q_proj", "decoder_layer": i, "sensitivity_kld": v}
              for i, v in enumerate([0.01, 0.02, 0.015, 0.2, None])]
    path = write(tmp_path, {"formats": [{"name": "int4_awq", "kld": {"mean": 0.3, "p99": 2.0}, "top1": 0.88,
                                         "passed": False, "layers": layers}]})
    audit = load_audit_report(path)["int4_awq"]
    assert (audit.kld_mean, audit.top1, audit.passed) == (0.3, 0.88, False)
    assert audit.sensitivity == {f"model.layers.{i}.self_attn.q_proj": v for i, v in enumerate([0.01, 0.02, 0.015, 0.2])}
    # median of (0.01, 0.015, 0.02, 0.2) is 0.0175; 4x = 0.07
    assert audit.sensitive_layers(4.0) == [("model.layers.3.self_attn.q_proj", 0.2)]
    assert audit.sensitive_layers(20.0) == []


def test_decoder_sensitivity_and_its_cost(tmp_path):
    shape = reference_shape("Llama-2-7B")
    sens = {f"model.layers.{i}": 0.001 for i in range(32)}
    sens["model.layers.31"] = 0.05
    path = write(tmp_path, {"formats": [{"name": "int4_awq", "kld": {"mean": 0.04}, "top1": 0.95, "passed": True,
                                         "layers": [], "decoder_sensitivity": sens}]})
    rec = next(r for r in advise(shape=shape, gpu="a100", report=path)["recommendations"] if r["format"] == "int4_awq")
    assert rec["keep_high_precision"] == [{"name": "model.layers.31", "sensitivity_kld": 0.05}]
    whole_layer = shape.linear_params_per_layer * (2 - (4 + 16 / 128) / 8)  # all 7 linears back to 16 bit
    assert any(f"+{whole_layer / 1e6:,.1f} MB" in reason for reason in rec["reasons"])


@pytest.mark.parametrize("content, expected", [
    ("{not json", "not valid JSON"),
    ({"model": {}}, "no formats list"),
    ({"formats": [{"name": "fp8"}]}, "malformed format entry fp8"),
])
def test_bad_reports(tmp_path, content, expected):
    with pytest.raises(UserError, match=expected):
        load_audit_report(write(tmp_path, content))


def test_missing_report(tmp_path):
    with pytest.raises(UserError, match="run `quantaudit audit` first"):
        load_audit_report(tmp_path / "nope.json")
