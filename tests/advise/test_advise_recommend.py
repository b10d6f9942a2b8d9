"""The decision engine: recommendations, hard limits, audit integration and deployment advice."""

from __future__ import annotations

import json
import re

import pytest

from quantaudit.advise import PlannerSettings, Workload, advise
from quantaudit.advise.hardware import load_hardware
from quantaudit.advise.model_shape import reference_shape, shape_from_params
from quantaudit.advise.planner import plan_memory, weight_bytes
from quantaudit.advise.recommend import RULES
from quantaudit.advise.roofline import estimate_speed
from quantaudit.errors import UserError
from quantaudit.quant.formats import FORMATS, KV_CACHE_FORMATS


def uses_fp8_math(fmt_name: str) -> bool:
    """From quant.formats alone: a format whose weights or activations are FP8 needs FP8 tensor cores."""
    fmt = FORMATS[fmt_name]
    return any(q is not None and q.kind == "fp8" for q in (fmt.weight, fmt.act))


def test_h100_70b_low_risk_is_fp8_with_fp8_kv_cache():
    top = advise(params=70e9, gpu="h100", workload=Workload(task_risk="low"))["recommendations"][0]
    assert (top["format"], top["kv_cache"]) == ("fp8", "fp8")
    assert top["rule"] == "fp8-first"
    assert top["fits"] and top["max_batch_at_context"] >= 1


def test_a100_80gb_70b_is_int4_awq():
    result = advise(params=70e9, gpu="a100-80gb")
    top = result["recommendations"][0]
    assert top["format"] == "int4_awq"
    assert top["decode_bound"] == "memory"  # batch 1: weight bytes decide, so 4-bit weights win
    int8 = next(r for r in result["recommendations"] if r["format"] == "int8_wo")
    assert top["decode_tokens_per_s"] > int8["decode_tokens_per_s"]


def test_a100_7b_high_risk_is_int8_weight_only():
    result = advise(params=7e9, gpu="a100", workload=Workload(task_risk="high"))
    top = result["recommendations"][0]
    assert (top["format"], top["rule"]) == ("int8_wo", "high-risk-8-bit")
    assert top["kv_cache"] == "none"  # high risk keeps the KV cache in FP16 while it fits
    allowed = {"very_low", "none"}
    assert all(r["expected_degradation"] in allowed for r in result["recommendations"])


def test_a100_large_batch_prefers_int8_smoothquant():
    """ModelOpt: on Ampere, INT4 AWQ for small batches, INT8 SmoothQuant once compute-bound."""
    top = advise(params=70e9, gpu="a100", workload=Workload(batch=64, context=512))["recommendations"][0]
    assert top["format"] in {"int8_sq", "int8_sq_static"}


def test_h100_falls_back_to_4_bit_when_fp8_does_not_fit():
    result = advise(params=70e9, gpu="h100", workload=Workload(batch=256, context=512))
    assert result["recommendations"][0]["format"] == "w4a8_awq"
    fp8 = next(r for r in result["rejected"] if r["format"] == "fp8")
    assert fp8["kind"] == "memory" and "need 256" in fp8["reason"]


WORKLOADS = [Workload(), Workload(batch=16, context=1024), Workload(task_risk="high"),
             Workload(batch=4, context=2048, task_risk="high")]


@pytest.mark.parametrize("gpu", sorted(load_hardware().gpus))
def test_never_recommends_what_the_gpu_cannot_run(gpu):
    table = load_hardware()
    g = table.gpu(gpu)
    for params in (1e9, 7e9):
        for workload in WORKLOADS:
            recs = advise(params=params, gpu=gpu, workload=workload)["recommendations"]
            for r in recs:
                if "fp8" not in g.flops:
                    assert not uses_fp8_math(r["format"]), (gpu, r["format"])
                algo = FORMATS[r["format"]].trtllm_quant_algo
                assert algo is None or algo in g.arch.trtllm_quant_algos
                assert r["kv_cache"] in g.arch.kv_cache
                assert r["fits"]


def test_recommendation_fields_are_consistent():
    result = advise(params=7e9, gpu="l40s", workload=Workload(batch=4, context=2048))
    shape = shape_from_params(7e9)
    for r in result["recommendations"]:
        assert r["format"] in FORMATS and r["kv_cache"] in KV_CACHE_FORMATS
        assert r["weight_bytes"] == weight_bytes(shape, FORMATS[r["format"]], 128)
        assert r["decode_tokens_per_s"] == pytest.approx(4 * r["decode_tokens_per_s_per_user"])
        assert r["reasons"] and all(isinstance(x, str) and x for x in r["reasons"])
    assert [r["rank"] for r in result["recommendations"]] == list(range(1, len(result["recommendations"]) + 1))
    names = [r["format"] for r in result["recommendations"]] + [r["format"] for r in result["rejected"]]
    assert sorted(names) == sorted(FORMATS)  # every format is either ranked or rejected with a reason
    json.dumps(result)  # JSON-ready


def test_rules_are_a_short_ordered_list_with_reasons():
    assert [r.name for r in RULES] == ["high-risk-8-bit", "fp8-first", "fastest-within-risk", "remaining"]
    assert all(len(r.reason) > 40 for r in RULES)


def test_latency_target_rejects_slow_formats():
    free = advise(params=70e9, gpu="h100")
    fp8_ms = free["recommendations"][0]["decode_step_ms"]
    result = advise(params=70e9, gpu="h100", workload=Workload(latency_target_ms=fp8_ms * 0.9))
    assert result["recommendations"][0]["format"] != "fp8"
    assert all(r["decode_step_ms"] <= fp8_ms * 0.9 for r in result["recommendations"])
    rejected = {r["format"]: r for r in result["rejected"]}
    assert rejected["fp8"]["kind"] == "latency"


def test_kv_cache_comparison_shows_fp16_vs_8_bit():
    result = advise(shape=reference_shape("Llama-2-7B"), gpu="h100", workload=Workload(batch=8, context=4096))
    rows = {row["kv_cache"]: row for row in result["kv_cache_comparison"]}
    assert set(rows) == {"none", "fp8", "int8"}
    assert rows["none"]["kv_bytes_per_token"] == 2 * rows["fp8"]["kv_bytes_per_token"] == 32 * 32 * 128 * 2 * 2
    assert rows["fp8"]["max_batch_at_context"] >= 2 * rows["none"]["max_batch_at_context"]


def test_unknown_gpu_lists_the_known_ones():
    with pytest.raises(UserError) as err:
        advise(params=7e9, gpu="tpu-v5")
    assert all(k in str(err.value) for k in ("h100-sxm", "a100-80gb", "l4", "rtx-5090", "b200"))


def test_model_too_large_says_so_with_numbers():
    with pytest.raises(UserError) as err:
        advise(params=405e9, gpu="l4")
    message = str(err.value)
    smallest = weight_bytes(shape_from_params(405e9), FORMATS["int4_awq"], 128)
    assert "does not fit" in message and "even at int4_awq" in message
    assert f"{smallest / 1e9:.1f} GB" in message and "24 GB" in message


def test_workload_too_large_says_how_many_sequences_fit():
    with pytest.raises(UserError) as err:
        advise(params=7e9, gpu="l4", workload=Workload(batch=512, context=32768))
    message = str(err.value)
    assert re.search(r"hold at most \d+ sequences of 32768 tokens \(need 512\)", message)


@pytest.mark.parametrize("kwargs, expected", [
    (dict(workload=Workload(batch=0)), "--batch"),
    (dict(workload=Workload(task_risk="medium")), "--task-risk"),
    (dict(workload=Workload(latency_target_ms=-1)), "--latency-target"),
    (dict(gpus=0), "--gpus"),
    (dict(settings=PlannerSettings(group_size=32)), "--group-size"),
    (dict(model="smollm2-135m"), "exactly one"),
])
def test_bad_input(kwargs, expected):
    with pytest.raises(UserError, match=re.escape(expected)):
        advise(**{"params": 7e9, "gpu": "h100", **kwargs})


def _report(tmp_path, formats):
    path = tmp_path / "report.json"
    path.write_text(json.dumps({"schema_version": 1, "formats": formats}))
    return path


def _entry(name, kld, top1, passed, layers=()):
    return {"name": name, "kld": {"mean": kld}, "top1": top1, "passed": passed,
            "layers": [{"name": n, "sensitivity_kld": v} for n, v in layers]}


def test_audit_removes_failed_formats_and_flags_sensitive_layers(tmp_path):
    sensitivities = [(f"model.layers.{i}.mlp.down_proj", 0.001 * (1 + i % 3)) for i in range(81)]
    sensitivities[0] = ("model.layers.0.mlp.down_proj", 0.05)  # 25x the median
    report = _report(tmp_path, [
        _entry("fp8", 0.4, 0.80, False),
        _entry("int4_awq", 0.05, 0.93, True, sensitivities),
        _entry("w4a8_awq", 0.09, 0.91, True),
    ])
    result = advise(params=70e9, gpu="h100", report=report)
    rejected = {r["format"]: r for r in result["rejected"]}
    assert rejected["fp8"]["kind"] == "audit" and "0.4" in rejected["fp8"]["reason"]
    recs = {r["format"]: r for r in result["recommendations"]}
    assert "fp8" not in recs
    awq = recs["int4_awq"]
    assert awq["audit"] == {"kld_mean": 0.05, "top1": 0.93, "passed": True}
    assert [k["name"] for k in awq["keep_high_precision"]] == ["model.layers.0.mlp.down_proj"]
    extra = 8192 * 28672 * (2 - (4 + 16 / 128) / 8)  # down_proj at 16 bit instead of INT4 + fp16 group scales
    assert any(f"+{extra / 1e6:,.1f} MB" in reason for reason in awq["reasons"])
    assert any("not audited" in reason for reason in recs["int8_wo"]["reasons"])


def test_audit_reorders_within_a_rule(tmp_path):
    report = _report(tmp_path, [_entry("int8_wo", 0.001, 0.99, True), _entry("fp8", 0.03, 0.97, True),
                                _entry("fp8_pc_pt", 0.02, 0.98, True)])
    recs = advise(params=7e9, gpu="h100", workload=Workload(task_risk="high"), report=report)["recommendations"]
    assert [r["format"] for r in recs[:3]] == ["int8_wo", "fp8_pc_pt", "fp8"]  # lowest measured KL first


def test_speculative_decoding_uses_the_audited_top1(tmp_path):
    report = _report(tmp_path, [_entry("int4_awq", 0.05, 0.85, True), _entry("int8_wo", 0.002, 0.99, True)])
    result = advise(params=7e9, gpu="a100", workload=Workload(task_risk="high"), report=report)
    top = result["recommendations"][0]
    assert top["format"] == "int8_wo"
    awq = next(r for r in result["rejected"] if r["format"] == "int4_awq")
    assert awq["kind"] == "risk" and "although the audit passed it" in awq["reason"] and "--task-risk low" in awq["reason"]
    spec = next(d for d in result["deployment"] if d["topic"] == "speculative_decoding")
    assert spec["draft_format"] == "int4_awq" and spec["acceptance_rate_estimate"] == 0.85
    # Leviathan et al. 2023: (1 - a^(k+1)) / (1 - a) tokens per (k draft steps + 1 target step); at batch 1 the
    # target verifies k+1 tokens in the time of one memory-bound step
    shape, a100 = shape_from_params(7e9), load_hardware().gpu("a100")
    draft_plan = plan_memory(shape, FORMATS["int4_awq"], top["kv_cache"], a100, 1, 1, 4096)
    t_draft = estimate_speed(shape, "fp16", draft_plan, a100, 1, 4096).decode_step_s
    t_target = 1 / top["decode_tokens_per_s_per_user"]

    def speedup(k):
        return (1 - 0.85 ** (k + 1)) / (1 - 0.85) * t_target / (k * t_draft + t_target)

    best = max(range(1, 9), key=speedup)
    assert spec["draft_tokens"] == best
    assert spec["estimated_speedup"] == pytest.approx(speedup(best), rel=1e-9)
    assert spec["recommended"] is (speedup(best) >= 1.05)


def test_speculative_decoding_not_advised_when_compute_bound():
    result = advise(params=7e9, gpu="a100", workload=Workload(batch=256, context=256))
    spec = next(d for d in result["deployment"] if d["topic"] == "speculative_decoding")
    assert spec["recommended"] is False and "compute-bound" in spec["advice"]


def test_inflight_batching_and_model_size_numbers():
    result = advise(params=70e9, gpu="a100")
    batching, _, size = result["deployment"]
    top = result["recommendations"][0]
    assert batching["max_batch_at_context"] == top["max_batch_at_context"]
    assert batching["max_batch_at_quarter_context"] >= 4 * top["max_batch_at_context"]
    assert size["max_params_at_top_format"] >= result["model"]["params"]  # the model itself fits


def test_fp4_note_on_blackwell():
    notes = advise(params=7e9, gpu="b200")["notes"]
    assert any("NVFP4" in n for n in notes)
    assert not any("NVFP4" in n for n in advise(params=7e9, gpu="h100")["notes"])


def test_hardware_file_gpu_is_used(tmp_path):
    path = tmp_path / "gpu.toml"
    path.write_text('[gpus.tiny]\nname = "Tiny"\narch = "ampere"\nmemory_gb = 3\nbandwidth_gbs = 100\n'
                    'tflops = { fp16 = 10, int8 = 20 }\n')
    result = advise(shape=reference_shape("Llama-3.2-1B"), gpu="tiny", hardware_file=path)
    assert result["gpu"] == {**result["gpu"], "key": "tiny", "memory_gb": 3, "bandwidth_gbs": 100}
    assert result["recommendations"][0]["format"] == "int4_awq"
    assert {r["format"] for r in result["rejected"] if r["kind"] == "memory"} == {"none"}  # 2.5 GB of fp16 embeddings
