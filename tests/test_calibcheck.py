"""calib-check: coverage figures against direct computations, JS divergence by hand, the ranking on stories260K."""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch

from quantaudit.calibcheck import (
    CalibCheckSettings,
    _CalibRange,
    calib_check,
    calibration_ranges,
    js_divergence,
    kld_check,
    range_coverage,
    rank,
    sample_adequacy,
    token_coverage,
)
from quantaudit.data import Windows
from quantaudit.errors import UserError


def test_js_divergence_zero_for_identical_and_by_hand():
    assert js_divergence([3, 1, 0, 6], [3, 1, 0, 6]) == 0.0
    assert js_divergence([3, 1, 0, 6], [6, 2, 0, 12]) == pytest.approx(0.0, abs=1e-15)  # same distribution
    # P = (1/2, 1/2, 0), Q = (0, 1/2, 1/2), M = (1/4, 1/2, 1/4): KL(P||M) = 1/2 log2 2 = 1/2 = KL(Q||M)
    assert js_divergence([1, 1, 0], [0, 1, 1]) == pytest.approx(0.5)
    assert js_divergence([1, 0], [0, 1]) == pytest.approx(1.0)  # disjoint: the maximum, 1 bit
    # P = (3/4, 1/4), Q = (1/4, 3/4), M = (1/2, 1/2): JS = 3/4 log2(3/2) + 1/4 log2(1/2)
    assert js_divergence([3, 1], [1, 3]) == pytest.approx(0.75 * torch.log2(torch.tensor(1.5)).item() - 0.25)


def _windows(rows: list[list[int]], seq_len: int) -> Windows:
    ids = torch.tensor([r + [0] * (seq_len - len(r)) for r in rows])
    return Windows(ids, torch.tensor([len(r) for r in rows]), "test", "none", sum(map(len, rows)))


def test_token_coverage_by_hand():
    calib = _windows([[1, 2, 3], [3, 3, 4]], seq_len=3)
    # padding (id 0) is never counted; positions 3 and 4 lie beyond the 3-token calibration samples
    eval_windows = _windows([[1, 5, 5, 3, 6], [2, 2]], seq_len=5)
    t = token_coverage(calib, eval_windows, vocab_size=8)
    assert t["calib_tokens"] == 6 and t["eval_tokens"] == 7
    assert t["unseen_token_share"] == pytest.approx(3 / 7)  # 5, 5, 6
    assert t["unseen_type_share"] == pytest.approx(2 / 5)  # {5, 6} of {1, 2, 3, 5, 6}
    assert t["beyond_calib_length_share"] == pytest.approx(2 / 7)
    assert t["eval_max_position"] == 4
    pc = [0, 1, 1, 3, 1, 0, 0, 0]
    pe = [0, 1, 2, 1, 0, 2, 1, 0]
    assert t["js_divergence_bits"] == pytest.approx(js_divergence(pc, pe))


def test_sample_adequacy_growth_and_curve_by_hand():
    ranges = {}
    for name, maxima in {"a": [1.0, 2.0, 3.0, 4.0], "b": [4.0, 1.0, 1.0, 4.1]}.items():
        r = _CalibRange(channels=1, samples=4, device="cpu")
        r.sample_max[:] = torch.tensor(maxima, dtype=torch.float64)
        ranges[name] = r
    a = sample_adequacy(ranges)
    # running max after 2 of 4 samples: a 2, b 4; final: a 4, b 4.1
    assert a["second_half_growth"]["a"] == pytest.approx(1.0)
    assert a["second_half_growth"]["b"] == pytest.approx(0.025)
    assert a["still_growing"] == ["a"] and a["still_growing_share"] == 0.5
    # median over inputs of running max / final max after 1, 2, 4 samples
    assert [c["samples"] for c in a["curve"]] == [1, 2, 4]
    assert [c["median_share_of_final_max"] for c in a["curve"]] == pytest.approx(
        [min(1 / 4, 4 / 4.1), min(2 / 4, 4 / 4.1), 1.0])  # torch's median of two values is the lower one


def test_ranking_rule_uses_coverage_only():
    def cov(clip, js, unseen):
        return {"summary": {"clip_share": clip}, "tokens": {"js_divergence_bits": js, "unseen_token_share": unseen}}

    assert rank(cov(0.001, 0.5, 0.5), cov(0.002, 0.1, 0.1)) == ("calib", "clip_share")
    assert rank(cov(0.00100, 0.5, 0.1), cov(0.00105, 0.1, 0.5)) == ("calib2", "js_divergence_bits")  # clip: too close
    assert rank(cov(0.0, 0.30, 0.1), cov(0.0, 0.31, 0.2)) == ("calib", "unseen_token_share")
    # 3 vs 1 clipped values in ten million: too few to rank by, the token distribution decides
    assert rank(cov(3e-7, 0.43, 0.3), cov(1e-7, 0.61, 0.46)) == ("calib", "js_divergence_bits")


def test_kld_check_pairs_the_per_token_klds():
    torch.manual_seed(0)
    shared = torch.rand(4000) * 0.1  # token-to-token variation both calibration sets share
    better = shared + torch.rand(4000) * 0.001
    worse = shared + 0.0005 + torch.rand(4000) * 0.001
    check = kld_check(better, worse)
    d = (worse - better).double()
    assert check["kld_difference"] == pytest.approx(float(d.mean()))
    assert check["kld_difference_unc"] == pytest.approx(float(d.std(unbiased=False)) / (4000 - 1) ** 0.5)
    # unpaired, the shared variation (s.e. ~0.0009 each) would hide a difference of 0.0005
    assert math.hypot(float(better.std()), float(worse.std())) / 4000**0.5 > 0.0005 / 2
    assert check["kld_agreement"] == "agrees"
    assert kld_check(worse, better)["kld_agreement"] == "disagrees"
    assert kld_check(better, better + 1e-6 * torch.randn(4000))["kld_agreement"] == "not significant"


def _texts(shared_dir, tmp_path):
    stories = (shared_dir / "data/tinystories_sample.txt").read_text().split("<|endoftext|>")
    (tmp_path / "stories_calib.txt").write_text("<|endoftext|>".join(stories[:3]))
    (tmp_path / "stories_eval.txt").write_text("<|endoftext|>".join(stories[3:]))
    items = [json.loads(line) for line in (shared_dir / "data/piqa_valid.jsonl").read_text().splitlines()[:60]]
    (tmp_path / "piqa.txt").write_text("<|endoftext|>".join(f"{i['goal']} {i['sol1']} {i['sol2']}" for i in items))
    return tmp_path / "stories_calib.txt", tmp_path / "piqa.txt", tmp_path / "stories_eval.txt"


def test_range_coverage_equals_a_direct_computation(stories, shared_dir, tmp_path):
    from quantaudit.data import load_windows
    from quantaudit.quant.plan import plan_units

    calib_path, _, eval_path = _texts(shared_dir, tmp_path)
    calib = load_windows(calib_path, stories.tokenizer, 64, 6, role="calib")
    eval_windows = load_windows(eval_path, stories.tokenizer, 96, 6)
    assert (eval_windows.lengths < 96).any()  # padding present, and it must be ignored
    units = [u for u in plan_units(stories.model) if u.name.startswith(("model.layers.1.", "model.layers.4.mlp.down"))]
    ranges = calibration_ranges(stories.model, units, calib, batch_size=4)
    found = {r["name"]: r for r in range_coverage(stories.model, units, ranges, eval_windows, batch_size=4)}

    def inputs_of(module, windows) -> list[torch.Tensor]:  # real-token inputs, window by window, whole causal LM
        seen = []
        handle = module.register_forward_pre_hook(lambda _m, args: seen.append(args[0][0]))
        try:
            with torch.no_grad():
                for i in range(windows.n):
                    stories.model(input_ids=windows.ids[i : i + 1, : windows.lengths[i]])
        finally:
            handle.remove()
        return seen

    for u in units:
        module = stories.model.get_submodule(u.linears[0])
        per_window = inputs_of(module, calib)
        xc, xe = torch.cat(per_window).abs(), torch.cat(inputs_of(module, eval_windows)).abs()
        cmax = xc.amax(dim=0)
        r = found[u.name]
        assert r["values"] == xe.numel() == int(eval_windows.lengths.sum()) * module.in_features
        assert r["calib_max"] == pytest.approx(float(cmax.max()), rel=1e-6)
        assert r["clip_share"] == pytest.approx(float((xe > cmax.max()).double().mean()), abs=2 / xe.numel())
        assert r["channel_exceed_share"] == pytest.approx(float((xe > cmax).double().mean()), abs=2 / xe.numel())
        assert r["channels_exceeded"] == pytest.approx(float((xe.amax(dim=0) > cmax).double().mean()))
        assert ranges[u.name].sample_max.tolist() == pytest.approx([float(x.abs().max()) for x in per_window], rel=1e-6)
    assert any(r["channel_exceed_share"] > 0 for r in found.values())  # a real, non-trivial case


@pytest.fixture(scope="module")
def checked(shared_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("calibcheck")
    calib, piqa, eval_path = _texts(shared_dir, tmp)
    settings = CalibCheckSettings(model=str(shared_dir / "models/stories260K/hf"), calib=str(calib), calib2=str(piqa),
                                  eval=str(eval_path), calib_size=6, calib_seq=128, windows=None, seq_len=128)
    return calib_check(settings, tmp / "out"), tmp


def test_matching_calibration_text_ranks_better_than_a_mismatched_one(checked):
    result, tmp = checked
    assert result["better"] == "calib"  # TinyStories text for TinyStories eval, not PIQA questions
    c1, c2 = result["calib"]["coverage"], result["calib2"]["coverage"]
    assert c1["tokens"]["unseen_token_share"] < c2["tokens"]["unseen_token_share"]
    assert c1["tokens"]["js_divergence_bits"] < c2["tokens"]["js_divergence_bits"]
    for role in ("calib", "calib2"):
        assert result[role]["kld"] > 0 and len(result[role]["coverage"]["ranges"]) == 20
    assert result["kld_agreement"] in ("agrees", "disagrees", "not significant")
    assert result["kld_difference"] == pytest.approx(result["calib2"]["kld"] - result["calib"]["kld"])
    saved = json.loads((tmp / "out" / "calib_check.json").read_text())
    assert saved["better"] == "calib" and saved["verdict"] == result["verdict"]
    assert saved["calib"]["kld"] == result["calib"]["kld"] and "coverage" in saved["calib2"]
    assert result["exit_code"] == (0 if result["verdict"] == "ok" else 3)
    assert all(isinstance(r, str) and r for r in result["reasons"])


def test_kld_is_the_fp8_quantization_calibrated_on_each_set(checked, stories):
    from quantaudit.data import load_windows
    from quantaudit.evaluate import build_baseline, compare_to_baseline
    from quantaudit.quant import QuantSpec, quantize

    result, _ = checked
    s = result["settings"]
    calib = load_windows(s["calib2"], stories.tokenizer, s["calib_seq"], s["calib_size"], role="calib")
    windows = load_windows(s["eval"], stories.tokenizer, s["seq_len"], s["windows"])
    qm = quantize(stories.model, QuantSpec(format="fp8"), calib, progress=False)
    stats = compare_to_baseline(build_baseline(stories, windows, use_cache=False), qm.model, windows)
    assert result["calib2"]["kld"] == pytest.approx(stats["kld"]["mean"], rel=1e-9)


def test_bad_calibration_input_is_a_clear_error(shared_dir, tmp_path):
    from quantaudit.calibcheck import add_calib_check_arguments, run_calib_check

    parser = argparse.ArgumentParser()
    add_calib_check_arguments(parser)
    model = str(shared_dir / "models/stories260K/hf")
    (tmp_path / "empty.txt").write_text("\n\n")
    (tmp_path / "short.txt").write_text("Once upon a time.")
    base = ["--model", model, "--eval", str(shared_dir / "data/tinystories_sample.txt")]
    with pytest.raises(UserError, match="empty.txt is empty"):
        run_calib_check(parser.parse_args([*base, "--calib", str(tmp_path / "empty.txt")]))
    with pytest.raises(UserError, match="short.txt has .* tokens, fewer than one window of 512.*--calib-seq"):
        run_calib_check(parser.parse_args([*base, "--calib", str(tmp_path / "short.txt")]))
    with pytest.raises(UserError, match="unknown format 'fp7'"):
        run_calib_check(parser.parse_args([*base, "--format", "fp7"]))
