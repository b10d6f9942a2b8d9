"""calib-check: coverage figures against direct computations, the verdicts on constructed cases, and the
set x format measurement on stories260K against an independent quantize-and-compare."""

from __future__ import annotations

import argparse
import json
import shutil

import pytest
import torch

from quantaudit.calibcheck.command import CalibCheckSettings, add_calib_check_arguments, calib_check, run_calib_check
from quantaudit.calibcheck.coverage import (
    _CalibRange,
    calibration_ranges,
    coverage_prefers,
    js_divergence,
    range_coverage,
    sample_adequacy,
    token_coverage,
)
from quantaudit.calibcheck.verdict import INSENSITIVE, SENSITIVE, compare_pair, coverage_agreement, flattening, sensitivity
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




def test_coverage_prefers_from_coverage_only():
    def cov(clip, js, unseen):
        return {"summary": {"clip_share": clip}, "tokens": {"js_divergence_bits": js, "unseen_token_share": unseen}}

    assert coverage_prefers(cov(0.001, 0.5, 0.5), cov(0.002, 0.1, 0.1)) == (0, "clip_share")
    assert coverage_prefers(cov(0.00100, 0.5, 0.1), cov(0.00105, 0.1, 0.5)) == (1, "js_divergence_bits")  # clip: close
    assert coverage_prefers(cov(0.0, 0.30, 0.1), cov(0.0, 0.31, 0.2)) == (0, "unseen_token_share")
    # 3 vs 1 clipped values in ten million: too few to rank by, the token distribution decides
    assert coverage_prefers(cov(3e-7, 0.43, 0.3), cov(1e-7, 0.61, 0.46)) == (0, "js_divergence_bits")


def _per_token(seed: int = 0, n: int = 4000):
    torch.manual_seed(seed)
    shared = torch.rand(n) * 0.1  # token-to-token variation every calibration set shares
    return shared, lambda shift: shared + shift + torch.rand(n) * 0.001


def test_compare_pair_resolves_a_difference_only_pairing_can():
    shared, kld = _per_token()
    a, b = kld(0.0), kld(0.0005)
    pair = compare_pair("a", a, "b", b)
    d = (b - a).double()
    assert pair["difference"] == pytest.approx(float(d.mean()))
    assert pair["unc"] == pytest.approx(float(d.std(unbiased=False)) / (4000 - 1) ** 0.5)
    # unpaired, the shared variation (s.e. ~0.0009 each) would hide a difference of 0.0005
    assert (float(a.std()) ** 2 + float(b.std()) ** 2) ** 0.5 / 4000**0.5 > 0.0005 / 2
    assert pair["significant"] and pair["better"] == "a"
    assert compare_pair("b", b, "a", a)["better"] == "a"
    assert compare_pair("a", a, "c", a + 1e-6 * torch.randn(4000))["better"] is None


def test_sensitivity_claims_an_order_only_for_significant_pairs():
    shared, kld = _per_token(1)
    same = kld(0.0)
    verdict = sensitivity({"x": same, "x_copy": same.clone(), "y": same + 1e-7 * torch.randn(4000)})
    assert verdict["verdict"] == INSENSITIVE and verdict["sensitive"] is False
    assert verdict["best"] is None and verdict["best_vs_worst"] is None
    assert [p["better"] for p in verdict["pairs"]] == [None, None, None]
    assert verdict["pairs"][0]["difference"] == 0.0

    good, mid, bad = kld(0.0), kld(0.00001), kld(0.002)
    verdict = sensitivity({"good": good, "mid": mid, "bad": bad})
    assert verdict["verdict"] == SENSITIVE
    # good and mid are inside each other's noise: whichever has the lower mean is named best, the other tied
    assert {verdict["best"], *verdict["best_tied"]} == {"good", "mid"} and verdict["worst"] == "bad"
    assert verdict["worst_tied"] == []
    best = {"good": good, "mid": mid}[verdict["best"]]
    assert verdict["best_vs_worst"]["difference"] == pytest.approx(float((bad - best).double().mean()))
    significant = {(p["a"], p["b"]): p["better"] for p in verdict["pairs"] if p["significant"]}
    assert significant == {("good", "bad"): "good", ("mid", "bad"): "mid"}  # good vs mid: inside the noise, no order
    assert sensitivity({"only": good})["sensitive"] is None


def test_flattening_finds_where_more_samples_stop_helping():
    shared, kld = _per_token(2)
    curve = {1: kld(0.01), 4: kld(0.003), 16: kld(0.00001), 64: kld(0.0)}
    flat = flattening(curve)
    assert flat["flattens_at"] == 16 and not flat["still_improving"]
    assert [p["worse_than_largest"] for p in flat["points"]] == [True, True, False, False]
    assert "stops improving after 16 samples" in flat["verdict"]
    rising = flattening({1: kld(0.01), 4: kld(0.003), 16: kld(0.0)})
    assert rising["flattens_at"] == 16 and rising["still_improving"] and "still improving at 16" in rising["verdict"]
    flat_at_once = flattening({1: kld(0.0), 4: kld(0.0)})
    assert flat_at_once["flattens_at"] == 1 and "no measurable gain" in flat_at_once["verdict"]
    # fewer samples measured better: said, not hidden
    overfit = flattening({1: kld(0.0), 4: kld(0.002)})
    assert overfit["points"][0]["better_than_largest"] and "1 sample(s) measured better than 4" in overfit["verdict"]


def test_coverage_agreement_counts_significant_pairs_only():
    formats = [{"pairs": [{"a": "w", "b": "p", "significant": True, "better": "w"},
                          {"a": "w", "b": "s", "significant": False, "better": None}]},
               {"pairs": [{"a": "w", "b": "p", "significant": True, "better": "p"}]}]
    found = coverage_agreement(formats, lambda a, b: "w")
    assert (found["significant_pairs"], found["agreeing"]) == (2, 1) and found["verdict"].startswith("partly")
    assert formats[0]["pairs"][0]["coverage_agrees"] and not formats[1]["pairs"][0]["coverage_agrees"]
    assert "coverage_prefers" not in formats[0]["pairs"][1]
    assert coverage_agreement([{"pairs": []}], lambda a, b: a)["verdict"].startswith("nothing to predict")


def _sets(shared_dir, tmp_path):
    """The stories calibration text as .txt and as .jsonl (same documents, so the same scales), a text of
    numbers counting up (other activation ranges: static scales fitted to it clip the stories), and the eval text."""
    calib, _, eval_path = _texts(shared_dir, tmp_path)
    docs = calib.read_text().split("<|endoftext|>")
    (tmp_path / "stories_calib.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    (tmp_path / "numbers.txt").write_text(" ".join(str(i) for i in range(3000)))
    return calib, tmp_path / "stories_calib.jsonl", tmp_path / "numbers.txt", eval_path


@pytest.fixture(scope="module")
def checked(shared_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("calibcheck")
    calib, as_jsonl, numbers, eval_path = _sets(shared_dir, tmp)
    settings = CalibCheckSettings(model=str(shared_dir / "models/stories260K/hf"), calib=str(calib),
                                  calib2=[str(as_jsonl), str(numbers)], eval=str(eval_path), calib_size=6,
                                  calib_seq=128, windows=None, seq_len=128, formats=["fp8", "int4_awq", "int8_wo"],
                                  sample_counts=["1", "2"], curve_formats=["fp8"])
    return calib_check(settings, tmp / "out"), tmp


def test_same_scales_are_insensitive_and_a_clipping_set_is_found(checked):
    result, _ = checked
    labels = [s["label"] for s in result["sets"]]
    assert labels == ["stories_calib.txt", "stories_calib.jsonl", "numbers.txt"]
    by_format = {f["format"]: f for f in result["formats"]}
    for f in by_format.values():  # the same documents in two files: the same scales, the same KLD, no order
        same = next(p for p in f["pairs"] if {p["a"], p["b"]} == {"stories_calib.txt", "stories_calib.jsonl"})
        assert same["difference"] == 0.0 and not same["significant"] and same["better"] is None
    fp8 = by_format["fp8"]
    assert fp8["verdict"] == SENSITIVE and fp8["worst"] == "numbers.txt" and fp8["best"] != "numbers.txt"
    assert fp8["best_vs_worst"]["difference"] > 2 * fp8["best_vs_worst"]["unc"]
    assert fp8["klds"]["numbers.txt"]["kld"] > 2 * fp8["klds"]["stories_calib.txt"]["kld"]
    # weight-only round-to-nearest reads no calibration: measured once, every set the same
    wo = by_format["int8_wo"]
    assert not wo["uses_calibration"] and wo["verdict"] == INSENSITIVE
    assert len({v["kld"] for v in wo["klds"].values()}) == 1
    assert any("int8_wo reads no calibration data" in w for w in result["warnings"])
    # coverage saw the numbers text's other ranges: it predicted every significant pair
    cover = {s["label"]: s["coverage"] for s in result["sets"]}
    assert cover["numbers.txt"]["summary"]["clip_share"] > 10 * cover["stories_calib.txt"]["summary"]["clip_share"]
    prediction = result["coverage_prediction"]
    assert prediction["significant_pairs"] >= 2 and prediction["agreeing"] == prediction["significant_pairs"]
    assert result["exit_code"] == (3 if result["reasons"] else 0)
    assert not any("measured better than stories_calib.txt" in r for r in result["reasons"])


def test_klds_and_curve_points_equal_an_independent_quantization(checked, stories):
    from quantaudit.data import load_windows
    from quantaudit.evaluate import build_baseline, compare_to_baseline
    from quantaudit.quant import QuantSpec, quantize

    result, _ = checked
    s = result["settings"]
    windows = load_windows(s["eval"], stories.tokenizer, s["seq_len"], s["windows"])
    baseline = build_baseline(stories, windows, use_cache=False)

    def kld(calib, fmt):
        qm = quantize(stories.model, QuantSpec(format=fmt, group_size=128), calib, progress=False)
        return compare_to_baseline(baseline, qm.model, windows)["kld"]["mean"]

    numbers = load_windows(s["calib2"][1], stories.tokenizer, s["calib_seq"], s["calib_size"], role="calib")
    by_format = {f["format"]: f for f in result["formats"]}
    assert by_format["int4_awq"]["klds"]["numbers.txt"]["kld"] == pytest.approx(kld(numbers, "int4_awq"), rel=1e-9)
    calib = load_windows(s["calib"], stories.tokenizer, s["calib_seq"], s["calib_size"], role="calib")
    curve = by_format["fp8"]["curve"]
    assert curve["set"] == "stories_calib.txt" and [p["samples"] for p in curve["points"]] == [1, 2, 6]
    assert curve["points"][1]["kld"] == pytest.approx(kld(calib.subset(2), "fp8"), rel=1e-9)
    assert curve["points"][2]["kld"] == by_format["fp8"]["klds"]["stories_calib.txt"]["kld"]
    assert "curve" not in by_format["int4_awq"]  # --curve-formats fp8


def test_reports_say_what_the_json_holds(checked):
    result, tmp = checked
    saved = json.loads((tmp / "out" / "calib_check.json").read_text())
    assert saved["formats"][0]["klds"] == result["formats"][0]["klds"] and saved["verdict"] == result["verdict"]
    md = (tmp / "out" / "calib_check.md").read_text()
    fp8 = result["formats"][0]
    assert f"calibration-sensitive: best {fp8['best']} (within the noise of it: " in md and ", worst numbers.txt;" in md
    assert "| int8_wo |" in md and "reads no calibration data" in md
    html = (tmp / "out" / "calib_check.html").read_text()
    assert html.count('data-plot="calib-kld"') == 3 and html.count('data-plot="calib-curve"') == 1
    assert f'data-value="{fp8["klds"]["numbers.txt"]["kld"]!r}"' in html
    assert "<script" not in html and "http" not in html


def test_the_grid_on_ray_equals_the_sequential_run(ray_installed, checked):
    """Every set x format job and curve point as a Ray task (a local instance): the same result, with how it ran."""
    from report_compare import differences, normal

    result, tmp = checked
    settings = CalibCheckSettings(**{**result["settings"], "ray": "auto"})
    on_ray = json.loads(json.dumps(calib_check(settings)))
    found = differences(normal(on_ray, {}, ("ray",)), normal(json.loads(json.dumps(result)), {}, ("ray",)))
    assert not found, "\n".join(found[:20])
    jobs = on_ray["ray"]["jobs"]
    # 3 sets x fp8 and int4_awq, int8_wo once (it reads no calibration), fp8's curve at 1 and 2 samples
    assert sorted(jobs) == sorted(["fp8.set0", "fp8.set1", "fp8.set2", "int4_awq.set0", "int4_awq.set1",
                                   "int4_awq.set2", "int8_wo.set0", "fp8.set0.first1", "fp8.set0.first2"])
    assert all(j["attempts"] == 1 for j in jobs.values())


def test_a_worse_calib_exits_3_with_the_measured_reason(shared_dir, tmp_path, capsys):
    calib, _, numbers, eval_path = _sets(shared_dir, tmp_path)
    parser = argparse.ArgumentParser()
    add_calib_check_arguments(parser)
    args = parser.parse_args(["--model", str(shared_dir / "models/stories260K/hf"), "--calib", str(numbers),
                              "--calib2", str(calib), "--eval", str(eval_path), "--calib-size", "6", "--calib-seq", "128",
                              "--seq-len", "128", "--formats", "fp8", "--sample-counts", "none"])
    assert run_calib_check(args) == 3
    out = capsys.readouterr().out
    assert "fp8: stories_calib.txt measured better than numbers.txt by" in out
    assert "calibration-sensitive" in out and "coverage heuristics: predicted" in out


def test_bad_calibration_input_is_a_clear_error(shared_dir, tmp_path):
    parser = argparse.ArgumentParser()
    add_calib_check_arguments(parser)
    text = shared_dir / "data/tinystories_sample.txt"
    copy = tmp_path / "copy.txt"
    shutil.copy(text, copy)
    (tmp_path / "empty.txt").write_text("\n\n")
    (tmp_path / "short.txt").write_text("Once upon a time.")
    out = tmp_path / "out"
    base = ["--model", str(shared_dir / "models/stories260K/hf"), "--eval", str(text), "--out", str(out)]

    def refused(match, *argv):
        with pytest.raises(UserError, match=match):
            run_calib_check(parser.parse_args([*base, *argv]))
        assert not out.exists()

    refused("empty.txt is empty", "--calib", str(tmp_path / "empty.txt"))
    refused("short.txt has .* tokens, fewer than one window of 512.*--calib-seq", "--calib", str(text), "--calib2",
            str(tmp_path / "short.txt"))
    refused("unknown format 'fp7'", "--formats", "fp8,fp7")
    refused("--calib2 .*copy.txt is the same file as", "--calib", str(text), "--calib2", str(copy))
    refused("--calib2 .* is the same file as", "--calib", str(text), "--calib2", str(text))
    refused("--curve-formats int4_gptq not in --formats", "--formats", "fp8", "--curve-formats", "int4_gptq")
    refused("--sample-counts 1,many: give whole numbers", "--sample-counts", "1,many")
    refused("unquantized baseline has nothing to calibrate", "--formats", "none")
    refused(r"--ray (127\.0\.0\.1:1: cannot reach the Ray head|needs Ray)", "--ray", "127.0.0.1:1")
    refused("--shared-dir is where Ray workers read the baseline: give --ray too", "--shared-dir", str(tmp_path))


def test_eval_text_used_for_calibration_is_warned_as_in_sample(shared_dir, tmp_path):
    text = str(shared_dir / "data/tinystories_sample.txt")
    settings = CalibCheckSettings(model=str(shared_dir / "models/stories260K/hf"), calib=text, eval=text, calib_size=2,
                                  calib_seq=64, windows=2, seq_len=64, formats=["fp8"], sample_counts=["none"])
    result = calib_check(settings)
    assert any("also the --eval text: the measurement is in-sample" in w for w in result["warnings"])
    assert result["formats"][0]["verdict"] == "not judged: one calibration set" and "curve" not in result["formats"][0]
