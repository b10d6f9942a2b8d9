"""The whole audit on stories260K: real content in all three reports, resume, refusal to overwrite."""

from __future__ import annotations

import json

import pytest
import torch

from quantaudit.audit.run import run_audit
from quantaudit.audit.settings import AuditSettings
from quantaudit.cli import main
from quantaudit.errors import EXIT_BUDGET_FAILED, UserError

ALL_FORMATS = ["fp8", "fp8_pc_pt", "int8_wo", "int4_wo", "int8_sq", "int4_awq", "int4_gptq", "w4a8_awq"]


def _settings(shared_dir, **overrides) -> AuditSettings:
    base = dict(
        model=str(shared_dir / "models/stories260K/hf"),
        formats=ALL_FORMATS,
        calib=str(shared_dir / "data/tinystories_sample.txt"),
        calib_size=6, calib_seq=256,
        eval=str(shared_dir / "data/tinystories_sample.txt"),
        windows=None, seq_len=512,
        drift_windows=1, sensitivity="linear", sensitivity_windows=1,
        budget="kld<=0.05,top1>=0.85",
    )
    base.update(overrides)
    return AuditSettings(**base)


@pytest.fixture(scope="module")
def audit(shared_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("audit")
    report = run_audit(_settings(shared_dir), out, force=True)
    return report, out


def test_every_format_is_audited_with_real_numbers(audit, stories):
    report, out = audit
    by_name = {f["name"]: f for f in report["formats"]}
    assert list(by_name) == ALL_FORMATS
    n_linear = sum(isinstance(m, torch.nn.Linear) for m in stories.model.modules())
    assert report["model"]["linear_layers"] == n_linear == 36  # 5 layers x 7 + lm_head
    for f in report["formats"]:
        assert f["kld"]["mean"] > 0 and 0 < f["top1"] < 1, f["name"]
        assert len(f["layers"]) == n_linear
        assert len(f["decoder_layers"]) == 5
        assert f["weight_bytes"] < report["baseline"]["weight_bytes"]
    # int4 is worse than int8 for the same (round-to-nearest) algorithm
    assert by_name["int4_wo"]["kld"]["mean"] > by_name["int8_wo"]["kld"]["mean"]
    assert by_name["int4_wo"]["weight_bytes"] < by_name["int8_wo"]["weight_bytes"]
    # down_proj (172 inputs) cannot be grouped by 128 or 64: recorded, and kept unquantized
    fallbacks = {l["name"] for l in by_name["int4_awq"]["fallback_layers"]}
    assert {f"model.layers.{i}.mlp.down_proj" for i in range(5)} <= fallbacks
    down = next(l for l in by_name["int4_awq"]["layers"] if l["name"] == "model.layers.0.mlp.down_proj")
    assert down["sensitivity_kld"] is None
    q = next(l for l in by_name["int4_awq"]["layers"] if l["name"] == "model.layers.0.self_attn.q_proj")
    assert q["sensitivity_kld"] > 0 and 0 < q["cosine"] < 1 and q["drift_rel"] > 0


def test_smoothquant_sensitivity_keeps_the_folded_scale(audit):
    """A SmoothQuant linear swapped alone must carry its norm's smoothing: without it one layer's
    KLD was ~2000x the whole model's. With it, single layers stay the same order as the whole."""
    report, _ = audit
    sq = next(f for f in report["formats"] if f["name"] == "int8_sq")
    worst = max(l["sensitivity_kld"] for l in sq["layers"] if l["sensitivity_kld"] is not None)
    assert 0 < worst < 10 * sq["kld"]["mean"]


def test_verdicts_and_recommendation_follow_the_budget(audit):
    report, _ = audit
    for f in report["formats"]:
        assert f["passed"] == (f["kld"]["mean"] <= 0.05 and f["top1"] >= 0.85)
    rec = report["recommendation"]
    passing = [f for f in report["formats"] if f["passed"]]
    if passing:
        assert rec["format"] == min(passing, key=lambda f: f["weight_bytes"])["name"]
    else:
        assert rec["format"] is None and rec["exit_code"] == EXIT_BUDGET_FAILED


def test_reports_on_disk_agree(audit):
    report, out = audit
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["formats"][0]["kld"]["mean"] == report["formats"][0]["kld"]["mean"]
    md = (out / "report.md").read_text()
    html = (out / "report.html").read_text()
    for f in report["formats"]:
        assert f["name"] in md and f["name"] in html
    assert html.count("<svg") >= 4 and "http://" not in html and "https://" not in html
    assert report["outliers"] and report["outliers"][0]["ratio"] >= report["outliers"][-1]["ratio"]


def test_existing_run_is_not_overwritten_without_force(audit, shared_dir):
    _, out = audit
    with pytest.raises(UserError, match="--force"):
        run_audit(_settings(shared_dir, formats=["int8_wo"]), out)


def test_resume_reuses_finished_formats(shared_dir, tmp_path, monkeypatch):
    settings = _settings(shared_dir, formats=["int8_wo"], sensitivity="none", drift_windows=0)
    first = run_audit(settings, tmp_path / "r", force=True)
    (tmp_path / "r" / "report.json").unlink()  # as if killed before the final report
    from quantaudit.audit.in_memory import InMemoryExecutor

    def must_not_run(*args, **kwargs):
        raise AssertionError("a finished format was recomputed")

    monkeypatch.setattr(InMemoryExecutor, "measure_one", must_not_run)
    second = run_audit(settings, tmp_path / "r", resume=True)
    assert second["formats"][0]["kld"] == first["formats"][0]["kld"]


def test_cli_exit_code_3_when_nothing_passes(shared_dir, tmp_path, capsys):
    code = main(["audit", "--model", str(shared_dir / "models/stories260K/hf"), "--formats", "int4_wo",
                 "--calib", str(shared_dir / "data/tinystories_sample.txt"), "--calib-size", "2", "--calib-seq", "256",
                 "--eval", str(shared_dir / "data/tinystories_sample.txt"), "--windows", "2",
                 "--sensitivity-granularity", "none", "--drift-windows", "0",
                 "--budget", "kld<=0.000001", "--out", str(tmp_path / "o")])
    out = capsys.readouterr().out
    assert code == EXIT_BUDGET_FAILED
    assert "no format meets the budget" in out
    assert json.loads((tmp_path / "o" / "report.json").read_text())["recommendation"]["exit_code"] == 3


def test_plan_is_audited_as_quantized_and_a_changed_plan_is_recomputed_on_resume(shared_dir, stories, tmp_path):
    from quantaudit.data import load_windows
    from quantaudit.evaluate import compare_models
    from quantaudit.quant import QuantSpec, quantize

    layers = {"model.layers.0.self_attn.q_proj": "int8_wo", "model.layers.0.self_attn.k_proj": "int8_wo",
              "model.layers.0.self_attn.v_proj": "int8_wo", "model.layers.1.mlp.gate_proj": "fp8",
              "model.layers.1.mlp.up_proj": "fp8", "model.layers.2.self_attn.o_proj": "int4_wo"}
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(json.dumps({"plan": layers}))
    settings = _settings(shared_dir, formats=[], plan=str(plan_file), windows=4, sensitivity="none", drift_windows=0)
    report = run_audit(settings, tmp_path / "p", force=True)
    (entry,) = report["formats"]
    assert entry["name"] == "plan" and entry["trtllm_quant_algo"] == "MIXED_PRECISION" and entry["plan"] == layers
    formats = {l["name"]: l["format"] for l in entry["layers"]}
    assert {n: formats[n] for n in layers} == layers and formats["model.layers.3.mlp.up_proj"] == "none"
    # the same plan quantized and compared in lockstep, without the audit's cached baseline
    calib = load_windows(settings.calib, stories.tokenizer, 256, 6, role="calib")
    windows = load_windows(settings.eval, stories.tokenizer, 512, 4)
    qm = quantize(stories.model, QuantSpec(format="none", plan=layers), calib, progress=False)
    assert entry["kld"]["mean"] == pytest.approx(compare_models(stories.model, qm.model, windows)["kld"]["mean"], rel=1e-5)

    layers["model.layers.4.mlp.down_proj"] = "int8_wo"
    plan_file.write_text(json.dumps(layers))  # a bare {layer: format} works too
    (tmp_path / "p" / "report.json").unlink()
    again = run_audit(settings, tmp_path / "p", resume=True)
    assert again["formats"][0]["plan"] == layers and again["formats"][0]["kld"]["mean"] > entry["kld"]["mean"]

    plan_file.write_text(json.dumps({"model.layers.9.mlp.down_proj": "fp8"}))
    with pytest.raises(UserError, match="names layer 'model.layers.9.mlp.down_proj', which this model does not have"):
        run_audit(settings, tmp_path / "p", force=True)
