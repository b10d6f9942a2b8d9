"""Markdown rendering of report.json: every figure printed is the report's, in the right place.

tests/report/sample_report.json is a SYNTHETIC fixture (made-up values shaped like a 3-layer
SmolLM2-width model); it exercises the renderer, it is not a measurement.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest

from quantaudit.report.markdown import render_markdown

SAMPLE = Path(__file__).with_name("sample_report.json")


@pytest.fixture()
def report() -> dict:
    return json.loads(SAMPLE.read_text())


def section(md: str, heading: str) -> str:
    """Text from a heading line to the next heading of the same or higher level."""
    level = heading.split(" ")[0]
    start = md.index(heading + "\n") if heading + "\n" in md else md.index(heading)
    rest = md[start + len(heading):]
    stop = re.search(rf"^#{{1,{len(level)}}} ", rest, re.M)
    return rest[: stop.start()] if stop else rest


def table_rows(text: str) -> list[list[str]]:
    """Cells of every GFM table row (header and body), split on unescaped pipes."""
    rows = []
    for line in text.splitlines():
        if line.startswith("|") and not line.startswith("|---"):
            rows.append([c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]])
    return rows


def test_formats_table_has_every_format_with_its_figures(report):
    md = render_markdown(report)
    rows = {r[0]: r for r in table_rows(section(md, "## Formats"))}
    header = rows["format"]
    assert header == ["format", "PPL", "PPL ratio", "mean KLD", "KLD p99", "KLD max", "top-1", "Δp RMS",
                      "weight MB", "compression", "KV B/token", "verdict"]
    # exact row, read off the fixture by hand: 36.849→36.85, 0.663→0.66, PPL ratio 1.0213 ± 1.0213·0.00471
    # (delta method from ln_ppl_ratio_unc; the fixture has no ppl_ratio_unc) → 1.021 ± 0.0048, ...
    assert "| fp8 | 36.85 ± 0.66 | 1.021 ± 0.0048 | 0.03712 ± 0.0013 | 0.2264 | 0.5642 | 0.9412 ± 0.0026 | 0.03083 | 67.25 | 2.316× | 4608 | PASS |" in md
    for fmt in report["formats"]:
        row = dict(zip(header, rows[fmt["name"]]))
        assert row["mean KLD"].split(" ± ")[0] == f"{fmt['kld']['mean']:.4g}"
        assert row["KLD p99"] == f"{fmt['kld']['p99']:.4g}"
        assert row["PPL ratio"] == f"{fmt['ppl_ratio']:.4g} ± {fmt['ppl_ratio'] * fmt['ln_ppl_ratio_unc']:.2g}"
        assert row["weight MB"] == f"{fmt['weight_bytes'] / 1e6:.4g}"
    assert rows["baseline"][1] == "36.08 ± 0.61"


def test_failed_formats_say_which_metrics_failed(report):
    md = render_markdown(report)
    rows = {r[0]: r for r in table_rows(section(md, "## Formats"))}
    assert rows["int8_sq"][-1] == "FAIL: kld 0.1187 > 0.05; ppl_ratio 1.084 > 1.05; top1 0.8861 < 0.9"
    assert rows["int4_awq"][-1].startswith("FAIL: kld 0.3384 > 0.05")
    assert "### int4_awq — FAIL: kld 0.3384 > 0.05; ppl_ratio 1.239 > 1.05; top1 0.8123 < 0.9" in md


def test_setup_and_recommendation(report):
    md = render_markdown(report)
    setup = dict((r[0], r[1]) for r in table_rows(section(md, "## Setup"))[1:])
    assert setup["budget"] == "kld ≤ 0.05, ppl_ratio ≤ 1.05, top1 ≥ 0.9"
    assert setup["eval data"].startswith("pydoc:eval: 16 windows × 512 tokens, 8176 scored tokens")
    assert "38,932,416 params" in setup["model"]
    rec = section(md, "## Recommendation")
    assert rec.strip().startswith("**fp8** — cheapest format meeting the budget")
    assert [line for line in rec.splitlines() if line.startswith("- ")] == [
        f"- `{name}`" for name in report["recommendation"]["keep_high_precision"]]


def test_top_sensitive_layers_are_the_ten_largest(report):
    md = render_markdown(report)
    for fmt in report["formats"]:
        block = section(md, f"### {fmt['name']} ")
        rows = table_rows(section(block, "#### Most sensitive layers"))[1:]
        brute = sorted(fmt["layers"], key=lambda x: x["sensitivity_kld"], reverse=True)[:10]
        assert [r[1].strip("`") for r in rows] == [x["name"] for x in brute]
        assert [r[2] for r in rows] == [f"{x['sensitivity_kld']:.4g}" for x in brute]


def test_fallback_and_drift_tables(report):
    md = render_markdown(report)
    awq = section(md, "### int4_awq ")
    fallback = report["formats"][2]["fallback_layers"]
    assert f"#### Fallback layers ({len(fallback)})" in awq
    assert all(f"`{x['name']}`" in section(awq, "#### Fallback layers") for x in fallback)
    assert "None: every candidate layer" in section(md, "### fp8 ")
    drift = table_rows(section(awq, "#### Hidden-state drift"))
    decoder = report["formats"][2]["decoder_layers"]
    assert drift[0] == ["layer", *(str(d["index"]) for d in decoder)]
    assert drift[1] == ["drift_rel", *(f"{d['drift_rel']:.4g}" for d in decoder)]
    assert drift[2] == ["cosine", *(f"{d['cosine']:.6g}" for d in decoder)]


def test_outliers_flagged_first_then_by_ratio(report):
    md = render_markdown(report)
    rows = table_rows(section(md, "## Activation outliers"))
    names = [r[0].strip("`") for r in rows[1:]]
    brute = [o["name"] for o in sorted(report["outliers"], key=lambda o: (o["flag"] == "ok", -o["ratio"]))]
    assert names == brute
    first = dict(zip(rows[0], rows[1]))
    assert first["flag"] == "clip_risk"
    assert first["max/median"] == "56.91"
    assert first["top channels (ch: max)"].startswith("411: 120, 12: 80, 1090: 41.5")
    assert len(rows[0]) == 9 and all(len(r) == 9 for r in rows)  # "max |x|" header did not split the table


def test_tasks_advice_and_autotune_render_generically(report):
    md = render_markdown(report)
    tasks = dict((r[0], r[1]) for r in table_rows(section(md, "## Tasks"))[1:])
    assert tasks["piqa.baseline_acc"] == "0.615" and tasks["piqa.n"] == "200"
    advice = dict((r[0], r[1]) for r in table_rows(section(md, "## Advice"))[1:])
    assert advice["next_step"] == "quantaudit export --format fp8"
    curve = table_rows(section(md, "## Size vs KLD"))
    assert len(curve) == 1 + len(report["autotune"]["curve"])


def test_optional_sections_may_be_missing(report):
    r = copy.deepcopy(report)
    for key in ("tasks", "advice", "autotune", "sensitivity_top"):
        del r[key]
    r["outliers"] = []
    r["formats"][0]["layers"] = []
    del r["formats"][0]["decoder_layers"]
    md = render_markdown(r)
    for heading in ("## Tasks", "## Advice", "## Activation outliers", "## Size vs KLD"):
        assert heading not in md
    fp8 = section(md, "### fp8 ")
    assert "Most sensitive" not in fp8 and "Hidden-state drift" not in fp8
    # the other formats rank their own layers when the report has no sensitivity_top
    assert "#### Most sensitive layers (top 10" in section(md, "### int4_awq ")
    assert all(f["name"] in md for f in r["formats"])


def test_no_passing_format(report):
    r = copy.deepcopy(report)
    r["recommendation"] = {"format": None, "passed": False, "reason": "no format meets kld<=0.001", "exit_code": 3,
                           "closest": "fp8", "keep_high_precision": ["model.layers.2.mlp.down_proj"]}
    md = render_markdown(r)
    assert "**No format meets the budget.** no format meets kld<=0.001" in md
    assert "Closest to the budget: **fp8**." in md and "Exit code 3." in md


def test_report_ppl_ratio_unc_is_used_when_present(report):
    r = copy.deepcopy(report)
    r["formats"][1]["ppl_ratio_unc"] = 0.0123
    rows = {row[0]: row for row in table_rows(section(render_markdown(r), "## Formats"))}
    assert rows["int8_sq"][2] == "1.084 ± 0.012"


def test_decoder_granularity_sensitivity_ranks_decoder_layers(report):
    r = copy.deepcopy(report)
    r["formats"][0]["decoder_sensitivity"] = {"model.layers.0": 0.002, "model.layers.1": 0.011, "model.layers.2": 0.0071}
    rows = table_rows(section(section(render_markdown(r), "### fp8 "), "#### Most sensitive layers"))[1:]
    assert [(row[1], row[2]) for row in rows] == [("`model.layers.1`", "0.011"), ("`model.layers.2`", "0.0071"),
                                                  ("`model.layers.0`", "0.002")]


def test_many_outlier_inputs_are_capped_with_a_note(report):
    r = copy.deepcopy(report)
    base = r["outliers"][3]  # an "ok" entry
    r["outliers"] += [dict(base, name=f"model.layers.9.x{i}", ratio=1.0 + i / 100) for i in range(60)]
    md = render_markdown(r)
    block = section(md, "## Activation outliers")
    rows = table_rows(block)[1:]
    assert len(rows) == 40 and "Showing 40 of 64 inputs; all are in report.json." in block
    assert [row[2] for row in rows[:2]] == ["clip_risk", "clip_risk"]  # flagged ones are never cut first
    # then by ratio: the two original "ok" inputs (5.49, 4.37), then the extras x59 (1.59) .. x24 (1.24)
    assert [row[0] for row in rows[2:5]] == ["`model.layers.0.mlp.down_proj`", "`model.layers.0.self_attn.q_proj`",
                                             "`model.layers.9.x59`"]
    assert rows[-1][0] == "`model.layers.9.x24`"


def test_user_text_cannot_break_tables_or_inject_html(report):
    r = copy.deepcopy(report)
    evil = "model.layers.0.mlp.down|proj<script>x</script>"
    r["outliers"][0]["name"] = evil
    r["outliers"][0]["remedy"] = "keep | <b>bold</b>"
    md = render_markdown(r)
    rows = table_rows(section(md, "## Activation outliers"))
    assert all(len(row) == 9 for row in rows)
    assert "&lt;b>bold&lt;/b>" in md and "<b>" not in md
