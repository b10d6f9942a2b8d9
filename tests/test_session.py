"""The shared settings core (quantaudit.session): every quantizing command takes the same flags to the same
QuantSpec, hands it to quantize(), and export writes what the audit measured with it."""

from __future__ import annotations

import json

import pytest
import torch

from quantaudit.audit.inputs import candidates
from quantaudit.audit.settings import AuditSettings
from quantaudit.calibcheck.command import CalibCheckSettings
from quantaudit.cli import build_parser, main
from quantaudit.session import QuantSettings
from quantaudit.tune.settings import AutotuneSettings

SHARED_FLAGS = ["--kv-cache", "fp8", "--kv-scales", "separate", "--smoothquant-alpha", "search", "--no-act-order",
                "--gptq-scale", "amax", "--exclude", "*.0.self_attn.o_proj,*.4.mlp.*", "--include-lm-head",
                "--group-size", "64"]
SETTINGS = {"audit": AuditSettings, "autotune": AutotuneSettings, "calib-check": CalibCheckSettings,
            "export": QuantSettings}


def _parsed(command: str, *extra: str):
    required = {"audit": ["--out", "x"], "autotune": ["--out", "x", "--budget", "kld<=0.1"], "calib-check": [],
                "export": ["--out", "x", "--format", "int4_gptq"]}[command]
    return SETTINGS[command].from_args(build_parser().parse_args([command, *SHARED_FLAGS, *required, *extra]))


def test_every_quantizing_command_builds_the_same_spec_from_the_same_flags():
    specs = {command: _parsed(command).quant_spec("int4_gptq", {"model.layers.1.mlp.up_proj": "fp8"})
             for command in SETTINGS}
    want = specs["audit"]
    assert (want.kv_cache, want.kv_scales, want.smoothquant_alpha, want.gptq.act_order, want.gptq.scale_search,
            want.exclude, want.include_lm_head, want.group_size) == (
        "fp8", "separate", "search", False, "amax", ("*.0.self_attn.o_proj", "*.4.mlp.*"), True, 64)
    assert all(spec == want for spec in specs.values()), specs
    # and the defaults agree too (one declaration of each)
    defaults = {command: SETTINGS[command]().quant_spec("fp8") for command in SETTINGS}
    assert len(set(map(repr, defaults.values()))) == 1


def test_audit_candidates_are_built_by_the_settings():
    settings = _parsed("audit", "--formats", "int8_sq,int4_gptq")
    specs = [c.spec for c in candidates(settings, None)]
    assert specs == [settings.quant_spec("int8_sq"), settings.quant_spec("int4_gptq")]


def _recorded_specs(monkeypatch, module) -> list:
    seen = []
    real = module.quantize

    def recording(model, spec, calib, *args, **kwargs):
        seen.append(spec)
        return real(model, spec, calib, *args, **kwargs)

    monkeypatch.setattr(module, "quantize", recording)
    return seen


@pytest.fixture
def stories_flags(shared_dir):
    text = str(shared_dir / "data" / "tinystories_sample.txt")
    return ["--model", str(shared_dir / "models" / "stories260K" / "hf"), "--calib", text, "--calib-size", "3",
            "--calib-seq", "128", "--eval", text, "--windows", "2", "--seq-len", "128"]


def test_autotune_and_calib_check_quantize_with_the_shared_flags(stories_flags, tmp_path, monkeypatch, one_thread):
    import quantaudit.quant.engine as engine_module  # calib-check imports quantize when it runs
    import quantaudit.tune.command as tune_module

    seen = _recorded_specs(monkeypatch, tune_module)
    assert main(["autotune", *stories_flags, *SHARED_FLAGS, "--formats", "int4_gptq", "--fallback", "int8_sq,none",
                 "--budget", "kld<=1", "--refine", "0", "--out", str(tmp_path / "tune")]) in (0, 3)
    want = _parsed("autotune")
    assert seen and {s.format for s in seen} >= {"none", "int4_gptq", "int8_sq"}  # none: the KV-quantized base
    for spec in seen:
        assert spec == want.quant_spec(spec.format, spec.plan), spec
    result = json.loads((tmp_path / "tune" / "autotune.json").read_text())
    uniform = {u["name"]: u for u in result["uniform"]}
    assert uniform["none"]["kld"] > 0  # 16-bit weights, fp8 KV cache: the baseline of the composed plans moved
    # the excluded layers were never tuned away from 16 bit
    assert all(result["plan"].get(n, "none") == "none" for n in ("model.layers.0.self_attn.o_proj",
                                                                  "model.layers.4.mlp.down_proj"))

    seen = _recorded_specs(monkeypatch, engine_module)
    assert main(["calib-check", *stories_flags, *SHARED_FLAGS, "--formats", "int8_sq", "--sample-counts", "none"]) in (0, 3)
    assert seen == [_parsed("calib-check").quant_spec("int8_sq")]


@pytest.mark.parametrize("fmt, plan", [
    ("int8_sq", None),  # the SmoothQuant alpha search, with an fp8 KV cache
    (None, {"format": "fp8", "layers": {"model.layers.1.mlp.gate_proj": "int4_awq",
                                        "model.layers.1.mlp.up_proj": "int4_awq"}}),
])
def test_export_writes_what_the_audit_measured(fmt, plan, stories_flags, stories, tmp_path, monkeypatch, one_thread):
    """Audit and export with the same flags: the export's spec, calibration and per-layer formats are the audited
    candidate's, and its checkpoint holds that candidate's codes and KV-cache scales."""
    from safetensors.torch import load_file

    from quantaudit.data import load_windows
    from quantaudit.quant import quantize

    flags = [*stories_flags, "--kv-cache", "fp8", "--smoothquant-alpha", "search", "--group-size", "64"]
    if plan:
        (tmp_path / "plan.json").write_text(json.dumps(plan))
        which_audit, which_export = ["--formats", "", "--plan", str(tmp_path / "plan.json")], ["--plan", str(tmp_path / "plan.json")]
    else:
        which_audit, which_export = ["--formats", fmt], ["--format", fmt]
    assert main(["audit", *flags, *which_audit, "--drift-windows", "0", "--sensitivity-granularity", "none",
                 "--out", str(tmp_path / "audit")]) in (0, 3)
    export_flags = [f for i, f in enumerate(flags) if not (f in ("--eval", "--windows", "--seq-len") or
                                                          flags[i - 1] in ("--eval", "--windows", "--seq-len"))]
    assert main(["export", *export_flags, *which_export, "--out", str(tmp_path / "export")]) == 0
    report = json.loads((tmp_path / "audit" / "report.json").read_text())
    entry = report["formats"][0]
    record = json.loads((tmp_path / "export" / "quantaudit_export.json").read_text())

    settings = AuditSettings.from_args(build_parser().parse_args(["audit", *flags, *which_audit, "--out", "x"]))
    candidate = candidates(settings, stories.model)[0]
    assert record["spec"] == json.loads(json.dumps(candidate.spec.describe(), default=str))
    assert record["calib"] == entry["calib"]
    assert record["layers"] == {l["name"]: (None if l["format"] == "none" or l["name"] in
                                            {f["name"] for f in entry["fallback_layers"]} else l["format"])
                                for l in entry["layers"]}
    calib = load_windows(settings.calib, stories.tokenizer, settings.calib_seq, settings.calib_size, settings.bos,
                         role="calib")
    qm = quantize(stories.model, candidate.spec, calib, progress=False)
    assert qm.weight_bytes() == entry["weight_bytes"]
    rank0 = load_file(tmp_path / "export" / "rank0.safetensors")
    for i in range(5):
        kv = rank0[f"transformer.layers.{i}.attention.kv_cache_scaling_factor"]
        assert kv.item() == qm.kv_scales[i].k_scale.item()
    gate = qm.layers["model.layers.1.mlp.gate_proj"]
    written = rank0["transformer.layers.1.mlp.fc.weight"] if fmt else None
    if written is not None:  # TensorRT-LLM's fc is the gate: the codes the audit measured
        assert torch.equal(written.to(torch.int8), gate.codes.to(torch.int8))
