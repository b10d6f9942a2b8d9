"""autotune: the search on hand-made option tables, plan files, and the whole command on stories260K."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math

import pytest

from quantaudit.errors import UserError
from quantaudit.quant.plan import MixedPlan, effective_bits, load_plan, plan_layer_names, plan_units
from quantaudit.tune.search import Option, Searcher, greedy_moves, hull, plan_bytes, predicted, search_budget

BUDGET = 0.03  # between stories260K's uniform int8_wo (~0.0004) and int4_wo (~0.1) KLDs in this setup


# ---------------------------------------------------------------- the search, on option tables


def test_hull_keeps_only_the_lower_convex_hull():
    options = [Option("a", 100, 1.0), Option("b", 150, 0.2), Option("c", 200, 0.19), Option("d", 300, 0.0),
               Option("e", 250, 0.5)]  # e: bigger and worse than b; c: above the b-d segment
    assert [o.format for o in hull(options)] == ["a", "b", "d"]


def test_greedy_moves_best_gain_per_byte_first_and_each_unit_in_rung_order():
    table = {"u": [Option("4", 10, 1.0), Option("8", 20, 0.2), Option("16", 40, 0.0)],  # gains 0.08, 0.01
             "v": [Option("4", 10, 0.5), Option("16", 40, 0.0)]}  # gain 0.5/30 = 0.0167
    start, moves = greedy_moves(table)
    assert {u: o.format for u, o in start.items()} == {"u": "4", "v": "4"}
    assert [(m.unit, m.target.format) for m in moves] == [("u", "8"), ("v", "16"), ("u", "16")]
    assert [round(m.gain, 6) for m in moves] == [0.08, round(0.5 / 30, 6), 0.01]


def _additive_searcher(limit: float) -> Searcher:
    return Searcher(lambda plan: {"kld": {"mean": predicted(plan)}}, lambda m: m["kld"]["mean"] <= limit)


def test_budget_search_bisects_then_lowers_a_unit_the_slack_allows():
    table = {"A": [Option("int4", 10, 0.8), Option("none", 20, 0.0)],  # gain 0.08 per byte
             "B": [Option("int4", 100, 5.0), Option("none", 200, 0.0)],  # gain 0.05
             "C": [Option("int4", 10, 0.3), Option("none", 20, 0.0)]}  # gain 0.03
    searcher = _additive_searcher(1.2)
    best, info = search_budget(table, searcher, refine=8)
    # prefixes: 6.1 (fail), A up 5.3 (fail), A+B up 0.3 (pass): then lowering B fails (5.3), lowering A passes (1.1)
    assert info["chosen_prefix"] == 2
    assert {u: o.format for u, o in best.plan.items()} == {"A": "int4", "B": "none", "C": "int4"}
    assert best.passed and best.measured["kld"]["mean"] == pytest.approx(1.1)
    assert plan_bytes(best.plan) == 220
    assert info["lowered"] == [{"unit": "A", "from": "none", "to": "int4"}]
    # measured once each: step 0, step 3, bisection at 1 and 2, then lowering A (lowering B is step 1 again)
    assert [t.measured["kld"]["mean"] for t in searcher.trials] == pytest.approx([6.1, 0.0, 5.3, 0.3, 1.1])


def test_budget_search_needs_only_logarithmically_many_evaluations():
    table = {f"u{i}": [Option("int4", 10, 0.01 * (i + 1)), Option("int8", 20, 0.001 * (i + 1))] for i in range(64)}
    searcher = _additive_searcher(5.0)  # all int4: 20.8, all int8: 2.08
    best, info = search_budget(table, searcher, refine=0)
    assert best.passed
    _, moves = greedy_moves(table)
    # the prefix one shorter fails: bisection found the smallest passing prefix
    shorter = dict(best.plan)
    shorter[moves[info["chosen_prefix"] - 1].unit] = moves[info["chosen_prefix"] - 1].source
    assert predicted(shorter) > 5.0
    assert len(searcher.trials) <= 2 + math.ceil(math.log2(len(moves)))


# ---------------------------------------------------------------- plan files


def test_plan_units_group_fused_linears(stories):
    units = plan_units(stories.model)
    assert len(units) == 5 * 4
    assert units[0].name == "model.layers.0.self_attn.q_proj+k_proj+v_proj"
    assert units[0].linears == ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj",
                                "model.layers.0.self_attn.v_proj")
    assert units[0].params == 64 * 64 + 32 * 64 + 32 * 64
    assert sum(u.params for u in units) == 5 * (2 * 64 * 64 + 2 * 32 * 64 + 3 * 64 * 172) == 226560


def test_load_plan_accepts_both_shapes_and_names_the_first_problem(stories, tmp_path):
    good = {"model.layers.0.mlp.down_proj": "fp8", "model.layers.4.self_attn.q_proj": "int8_wo"}
    (tmp_path / "wrapped.json").write_text(json.dumps({"plan": good}))
    (tmp_path / "bare.json").write_text(json.dumps(good))
    (tmp_path / "default.json").write_text(json.dumps({"format": "int8_wo", "layers": good}))
    assert load_plan(tmp_path / "wrapped.json", stories.model) == MixedPlan(good, "none")
    assert load_plan(tmp_path / "bare.json", stories.model) == MixedPlan(good, "none")
    assert load_plan(tmp_path / "default.json", stories.model) == MixedPlan(good, "int8_wo")

    (tmp_path / "unknown.json").write_text(json.dumps({"model.layers.0.mlp.down_proj": "fp8", "model.layers.7.mlp.up_proj": "fp8"}))
    with pytest.raises(UserError, match=r"'model\.layers\.7\.mlp\.up_proj'.*does not have.*'model\.layers\.0\.self_attn\.q_proj'"):
        load_plan(tmp_path / "unknown.json", stories.model)
    (tmp_path / "fmt.json").write_text(json.dumps({"model.layers.0.mlp.down_proj": "int3"}))
    with pytest.raises(UserError, match=r"unknown format 'int3'; valid formats: none, fp8, .*int4_awq"):
        load_plan(tmp_path / "fmt.json", stories.model)
    (tmp_path / "empty.json").write_text("{}")
    with pytest.raises(UserError, match="holds no plan"):
        load_plan(tmp_path / "empty.json", stories.model)
    (tmp_path / "broken.json").write_text("{plan:")
    with pytest.raises(UserError, match="not valid JSON"):
        load_plan(tmp_path / "broken.json", stories.model)
    with pytest.raises(UserError, match="not found"):
        load_plan(tmp_path / "missing.json", stories.model)
    assert plan_layer_names(stories.model)[-1] == "lm_head" and len(plan_layer_names(stories.model)) == 36


# ---------------------------------------------------------------- the whole command on stories260K


def _hand_bytes(fmt: str, out_features: int, in_features: int) -> int:
    """Stored bytes of one bias-free linear, written out by hand (not with the engine's formula)."""
    if fmt == "int4_wo" and in_features % 64 == 0:  # group 64 (128 divides none of stories' inputs)
        return out_features * in_features // 2 + out_features * (in_features // 64) * 2  # fp16 group scales
    if fmt == "int4_wo":  # 172 inputs: neither group size divides, kept 16-bit
        return out_features * in_features * 2
    if fmt == "int8_wo":
        return out_features * in_features + out_features * 4  # fp32 per-channel scales
    assert fmt == "none"
    return out_features * in_features * 2


@pytest.fixture(scope="module")
def tuned(shared_dir, tmp_path_factory):
    from quantaudit.tune import AutotuneSettings, autotune

    settings = AutotuneSettings(
        model=str(shared_dir / "models/stories260K/hf"), formats=["int4_wo"], fallback=["int8_wo", "none"],
        budget=f"kld<={BUDGET}", calib=str(shared_dir / "data/tinystories_sample.txt"), calib_size=4, calib_seq=128,
        eval=str(shared_dir / "data/tinystories_sample.txt"), windows=8, seq_len=128, sensitivity_windows=1, refine=4,
    )
    out = tmp_path_factory.mktemp("autotune")
    return settings, autotune(settings, out, force=True), out


def test_autotuned_plan_meets_the_budget_cheaper_than_the_best_uniform(tuned):
    _, result, _ = tuned
    uniform = {u["name"]: u for u in result["uniform"]}
    assert uniform["int4_wo"]["kld"] > BUDGET > uniform["int8_wo"]["kld"] > 0 == uniform["none"]["kld"]
    assert result["passed"] and result["exit_code"] == 0 and result["kld"] <= BUDGET
    assert result["best_uniform"]["name"] == "int8_wo"
    assert result["best_uniform"]["weight_bytes"] == uniform["int8_wo"]["weight_bytes"]
    assert result["weight_bytes"] < result["best_uniform"]["weight_bytes"]
    assert set(result["plan"].values()) >= {"int4_wo", "int8_wo"}  # really mixed


def test_reported_kld_is_an_independent_quantize_of_the_plan(tuned, stories):
    from quantaudit.data import load_windows
    from quantaudit.evaluate import build_baseline, compare_to_baseline
    from quantaudit.quant import QuantSpec, quantize

    settings, result, _ = tuned
    calib = load_windows(settings.calib, stories.tokenizer, settings.calib_seq, settings.calib_size, role="calib")
    windows = load_windows(settings.eval, stories.tokenizer, settings.seq_len, settings.windows)
    qm = quantize(stories.model, QuantSpec(format="int8_wo", plan=result["plan"]), calib, progress=False)
    stats = compare_to_baseline(build_baseline(stories, windows, use_cache=False), qm.model, windows)
    assert result["kld"] == pytest.approx(stats["kld"]["mean"], rel=1e-9, abs=1e-12)
    assert result["metrics"]["top1"] == stats["top1"]
    assert result["weight_bytes"] == qm.weight_bytes()
    # round-to-nearest needs no calibration, so swapping modules in is exact: composed == real
    assert result["composed_kld"] == pytest.approx(result["kld"], rel=1e-9)


def test_effective_bits_are_stored_bits_per_weight_of_the_tuned_linears(tuned, stories):
    _, result, _ = tuned
    params = 0
    stored = 0
    for name, fmt in result["plan"].items():
        linear = stories.model.get_submodule(name)
        params += linear.in_features * linear.out_features
        stored += _hand_bytes(fmt, linear.out_features, linear.in_features)
    assert params == result["linear_params"] == 226560
    assert stored == result["linear_weight_bytes"]
    assert result["effective_bits"] == pytest.approx(8 * stored / params) == effective_bits(stored, params)
    # uniform int4_wo by hand: per decoder layer q,o 2176 B, k,v 1088 B, gate,up 5848 B, down 16-bit 22016 B
    int4 = next(u for u in result["uniform"] if u["name"] == "int4_wo")
    assert int4["linear_weight_bytes"] == 5 * (2 * 2176 + 2 * 1088 + 2 * 5848 + 22016) == 201200
    assert int4["effective_bits"] == pytest.approx(8 * 201200 / 226560)


def test_outputs_hold_plan_curve_and_predicted_vs_measured(tuned, stories):
    _, result, out = tuned
    saved = json.loads((out / "autotune.json").read_text())
    for key in ("plan", "weight_bytes", "effective_bits", "kld", "best_uniform", "curve"):
        assert saved[key] == result[key]
    assert load_plan(out / "plan.json", stories.model).layers == result["plan"]
    composed = [p for p in result["curve"] if p["source"] == "composed"]
    assert len(composed) == result["search"]["evaluations"] >= 3
    assert all(p["predicted_kld"] >= 0 and p["kld"] >= 0 for p in composed)
    # per-unit errors are close to additive on stories260K: measured / predicted near 1
    ratios = sorted(p["kld"] / p["predicted_kld"] for p in result["curve"] if p["predicted_kld"])
    assert result["search"]["measured_over_predicted"] == ratios[len(ratios) // 2]
    assert 0.5 < result["search"]["measured_over_predicted"] < 2
    assert result["curve"][-1]["label"].startswith("autotuned plan") and result["curve"][-1]["kld"] == result["kld"]
    html = (out / "autotune.html").read_text()
    assert 'data-plot="autotune"' in html and "autotuned plan" in html


def test_effective_bits_target_is_met_with_lower_kld_than_the_uniform_that_fits(shared_dir, tuned, tmp_path):
    from quantaudit.tune import autotune

    settings, budget_result, _ = tuned
    settings = dataclasses.replace(settings, budget=None, effective_bits=7.5)
    result = autotune(settings, tmp_path, force=True)
    assert result["mode"] == "effective_bits" and result["effective_bits"] <= 7.5
    fitting = [u for u in budget_result["uniform"] if u["effective_bits"] <= 7.5]
    assert [u["name"] for u in fitting] == ["int4_wo"]
    assert result["best_uniform"]["name"] == "int4_wo"
    assert result["kld"] < result["best_uniform"]["kld"]
    with pytest.raises(UserError, match="below the smallest plan"):
        autotune(dataclasses.replace(settings, effective_bits=2.0), tmp_path / "again", force=True)


def test_autotune_on_ray_equals_the_sequential_run(ray_installed, tuned, tmp_path):
    """--ray: each format's quantize, evaluation and unit sensitivities a Ray task that sends back only the
    quantized linears; autotune.json equals the sequential run's field for field, timings and ``ray`` aside. With
    a SmoothQuant format (its linears travel wrapped, the smoothing undone) and an FP8 KV cache (the base the
    workers rebuild is quantized too)."""
    from report_compare import differences, normal

    from quantaudit.tune import autotune

    settings = dataclasses.replace(tuned[0], formats=["int4_wo", "int8_sq"], kv_cache="fp8", budget="kld<=0.05")
    sequential = autotune(settings, tmp_path / "sequential")
    on_ray = autotune(dataclasses.replace(settings, ray="auto"), tmp_path / "ray")
    found = differences(normal(on_ray, {}, ("ray",)), normal(sequential, {}, ("ray",)))
    assert not found, "\n".join(found[:20])
    assert set(sequential["plan"].values()) > {"int8_sq"}  # SmoothQuant linears really in the composed plans
    assert "ray" not in sequential
    assert on_ray["ray"]["jobs"] == {f: {"attempts": 1, "node": on_ray["ray"]["jobs"][f]["node"]}
                                     for f in ("int4_wo", "int8_sq", "int8_wo")}
    assert json.loads((tmp_path / "ray" / "autotune.json").read_text())["ray"] == on_ray["ray"]


def test_cli_arguments_and_bad_input(tmp_path):
    from quantaudit.tune import add_autotune_arguments, run_autotune

    parser = argparse.ArgumentParser()
    add_autotune_arguments(parser)
    args = parser.parse_args(["--out", str(tmp_path / "o"), "--formats", "int4_awq"])
    with pytest.raises(UserError, match="--budget.*--effective-bits"):
        run_autotune(args)
    args = parser.parse_args(["--out", str(tmp_path / "o"), "--formats", "int5", "--budget", "kld<=0.1"])
    with pytest.raises(UserError, match="unknown format 'int5'"):
        run_autotune(args)
    args = parser.parse_args(["--out", str(tmp_path / "o"), "--budget", "recovery>=0.9"])
    with pytest.raises(UserError, match="audit --tasks"):
        run_autotune(args)
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "autotune.json").write_text("{}")
    args = parser.parse_args(["--out", str(tmp_path / "used"), "--budget", "kld<=0.1"])
    with pytest.raises(UserError, match="not empty: pass --force"):
        run_autotune(args)
    args = parser.parse_args(["--out", str(tmp_path / "o"), "--budget", "kld<=0.1", "--shared-dir", str(tmp_path)])
    with pytest.raises(UserError, match="--shared-dir is where Ray workers read the baseline: give --ray too"):
        run_autotune(args)
    args = parser.parse_args(["--out", str(tmp_path / "o"), "--budget", "kld<=0.1", "--ray", "127.0.0.1:1"])
    with pytest.raises(UserError, match=r"--ray (127\.0\.0\.1:1: cannot reach the Ray head|needs Ray)"):
        run_autotune(args)
