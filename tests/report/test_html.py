"""HTML rendering of report.json: well-formed, self-contained, escaped, and every chart draws the
report's numbers (bar heights and positions are checked against the axis ticks independently).

tests/report/sample_report.json is a SYNTHETIC fixture (made-up values); it exercises the renderer.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import statistics
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

from quantaudit.report.html import render_html

REPO = Path(__file__).resolve().parents[2]
SAMPLE = Path(__file__).with_name("sample_report.json")
SCRIPT = REPO / "scripts" / "check_report_html.py"
CHROMIUM = Path("/usr/bin/chromium")


def load_checker():
    spec = importlib.util.spec_from_file_location("check_report_html", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


checker = load_checker()


class Plots(HTMLParser):
    """Every element inside each <svg class="plot">, as (tag, attrs), keyed by data-plot (a list per kind)."""

    def __init__(self):
        super().__init__()
        self.plots: dict[str, list[list[tuple[str, dict]]]] = {}
        self.depth = 0
        self.current: list | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "svg" and a.get("class") == "plot":
            self.current = []
            self.plots.setdefault(a["data-plot"], []).append(self.current)
        elif self.current is not None:
            self.current.append((tag, a))
        if tag == "svg":
            self.depth += 1

    def handle_endtag(self, tag):
        if tag == "svg":
            self.depth -= 1
            if self.depth == 0:
                self.current = None


def plots_of(html: str) -> dict[str, list[list[tuple[str, dict]]]]:
    p = Plots()
    p.feed(html)
    return p.plots


def marks(elements, cls: str) -> list[dict]:
    return [a for _, a in elements if cls in (a.get("class") or "").split()]


def ticks(elements, axis: str = "y") -> list[tuple[float, float]]:
    return [(float(a["data-value"]), float(a["data-pos"])) for a in marks(elements, "tick") if a.get("data-axis") == axis]


def axis_map(tick_list, log: bool):
    """pixel = a + b·t(v) fitted on the two extreme ticks (t = log10 for a log axis)."""
    t = (lambda v: math.log10(v)) if log else (lambda v: v)
    (v0, p0), (v1, p1) = tick_list[0], tick_list[-1]
    b = (p1 - p0) / (t(v1) - t(v0))
    return lambda v: p0 + b * (t(v) - t(v0))


@pytest.fixture()
def report() -> dict:
    return json.loads(SAMPLE.read_text())


@pytest.fixture()
def html(report) -> str:
    return render_html(report)


def test_parses_with_balanced_tags_and_lists_its_charts(html, report):
    parsed = checker.parse(html)
    assert parsed.problems == []
    n_formats = len(report["formats"])
    expected = {"kld": 1, "ppl_ratio": 1, "drift": 1, "cosine": 1, "sensitivity": n_formats, "outliers": 1, "autotune": 1}
    assert {k: len(v) for k, v in plots_of(html).items()} == expected
    assert dict(parsed.meta_plots) == expected


def test_self_contained_no_external_references(html):
    low = html.lower()
    for needle in ("http://", "https://", "src=", "<script", "<link", "url(", "@import", "<img", "<iframe"):
        assert needle not in low, needle
    assert checker.static_problems(html) == []


def test_kld_bars_one_per_format_on_a_correct_log_axis(html, report):
    (kld,) = plots_of(html)["kld"]
    bars, diamonds = marks(kld, "bar"), marks(kld, "marker")
    fmts = report["formats"]
    assert [b["data-label"] for b in bars] == [f["name"] for f in fmts]
    assert [float(b["data-value"]) for b in bars] == [f["kld"]["mean"] for f in fmts]
    assert [float(d["data-value"]) for d in diamonds] == [f["kld"]["p99"] for f in fmts]
    # values span 0.037 .. 2.06: the axis must be log10 and labelled so
    assert "KLD (nats/token) (log scale)" in html
    tick_list = ticks(kld)
    assert [v for v, _ in tick_list] == [0.01, 0.1, 1.0, 10.0]
    to_px = axis_map(tick_list, log=True)
    bottom = to_px(0.01)
    for b, f in zip(bars, fmts):
        top, height = float(b["y"]), float(b["height"])
        assert top == pytest.approx(to_px(f["kld"]["mean"]), abs=0.15)
        assert top + height == pytest.approx(bottom, abs=0.15)
    (threshold,) = marks(kld, "threshold")
    assert float(threshold["data-value"]) == 0.05 and float(threshold["y1"]) == pytest.approx(to_px(0.05), abs=0.15)


def test_ppl_ratio_bars_start_at_one_on_a_linear_axis(html, report):
    (chart,) = plots_of(html)["ppl_ratio"]
    bars = marks(chart, "bar")
    assert len(bars) == len(report["formats"])
    to_px = axis_map(ticks(chart), log=False)
    for b, f in zip(bars, report["formats"]):
        assert float(b["y"]) == pytest.approx(to_px(f["ppl_ratio"]), abs=0.15)
        assert float(b["y"]) + float(b["height"]) == pytest.approx(to_px(1.0), abs=0.15)


@pytest.mark.parametrize("kind,key", [("drift", "drift_rel"), ("cosine", "cosine")])
def test_depth_curves_one_line_per_format_one_point_per_decoder_layer(html, report, kind, key):
    (chart,) = plots_of(html)[kind]
    lines = marks(chart, "series")
    assert [a["data-series"] for a in lines] == [f["name"] for f in report["formats"]]
    log = kind == "drift"  # drift_rel spans 0.0098 .. 0.21 (> 20×); cosine does not
    y_label = {"drift": "‖h_q − h‖ / ‖h‖", "cosine": "cos(h_q, h)"}[kind]
    assert (f"{y_label} (log scale)" in html) is log
    y_px, x_px = axis_map(ticks(chart, "y"), log=log), axis_map(ticks(chart, "x"), log=False)
    for line, f in zip(lines, report["formats"]):
        points = [tuple(map(float, p.split(","))) for p in line["points"].split()]
        assert len(points) == len(f["decoder_layers"])
        for (px, py), d in zip(points, f["decoder_layers"]):
            assert px == pytest.approx(x_px(d["index"]), abs=0.15)
            assert py == pytest.approx(y_px(d[key]), abs=0.15)


def test_sensitivity_bars_are_the_top_layers_with_proportional_lengths(html, report):
    charts = plots_of(html)["sensitivity"]
    for chart, fmt in zip(charts, report["formats"]):
        bars = marks(chart, "bar")
        brute = sorted(fmt["layers"], key=lambda x: x["sensitivity_kld"], reverse=True)[:10]
        assert [b["data-label"] for b in bars] == [x["name"] for x in brute]
        per_unit = [float(b["width"]) / x["sensitivity_kld"] for b, x in zip(bars, brute)]
        assert max(per_unit) == pytest.approx(min(per_unit), rel=0.02)  # widths rounded to 0.1 px


def test_outlier_heatmap_rows_and_cells_match_brute_force(html, report):
    (chart,) = plots_of(html)["outliers"]
    rows = marks(chart, "heat-row")
    ordered = sorted(report["outliers"], key=lambda o: (o["flag"] == "ok", -o["ratio"]))
    assert len(rows) == len(report["outliers"])
    assert [r["data-label"].removeprefix("⚠ ") for r in rows] == [o["name"] for o in ordered]
    assert [r["data-label"].startswith("⚠") for r in rows] == [o["flag"] != "ok" for o in ordered]
    cells = marks(chart, "cell")
    at = 0
    for o in ordered:
        cm, n = o["channel_max"], min(64, len(o["channel_max"]))
        assert statistics.median(cm) == pytest.approx(o["median_channel_max"])
        expected = []
        for j in range(n):  # bucket j holds channels [j·C/n, (j+1)·C/n)
            lo, hi = j * len(cm) // n, (j + 1) * len(cm) // n
            expected.append(max(0.0, math.log10(max(cm[lo:hi]) / o["median_channel_max"])))
        got = [float(c["data-value"]) for c in cells[at:at + n]]
        at += n
        assert got == pytest.approx(expected, abs=1e-12)
        assert max(got) == pytest.approx(math.log10(o["ratio"]), abs=5e-4)  # the spike is in the picture
    assert at == len(cells)


def test_heatmap_rows_capped_like_the_table(report):
    r = copy.deepcopy(report)
    r["outliers"] += [dict(r["outliers"][3], name=f"model.layers.9.x{i}", ratio=1.0 + i / 100) for i in range(60)]
    out = render_html(r)
    (chart,) = plots_of(out)["outliers"]
    assert len(marks(chart, "heat-row")) == 40
    assert "Showing 40 of 64 inputs; all are in report.json." in out


def test_autotune_scatter_has_one_point_per_candidate(html, report):
    (chart,) = plots_of(html)["autotune"]
    points = marks(chart, "point")
    assert [float(p["data-value"]) for p in points] == [c["kld"] for c in report["autotune"]["curve"]]


def test_audit_gpu_frontier_plots_the_advisors_speed_against_the_measured_kld(report, tmp_path):
    """``audit --gpu``: one point per audited format the GPU runs natively, recommended or rejected for its
    budget, at the advisor's decode tokens/s and the report's own mean KLD (all three are native on an H100)."""
    from quantaudit.advise import advise

    path = tmp_path / "report.json"
    path.write_text(json.dumps(report))
    r = dict(report, advice=advise(params=8e9, gpu="h100", report=path))
    audited = [x for x in r["advice"]["recommendations"] + r["advice"]["rejected"] if x["audit"] is not None]
    assert sorted(x["format"] for x in audited) == ["fp8", "int4_awq", "int8_sq"]
    assert all(x["decode_tokens_per_s"] > 0 for x in audited)
    out = render_html(r)
    (chart,) = plots_of(out)["frontier"]
    kld = {f["name"]: f["kld"]["mean"] for f in report["formats"]}
    assert [float(p["data-value"]) for p in marks(chart, "point")] == [kld[x["format"]] for x in audited]
    assert "<h3>Accuracy vs speed</h3>" in out


def test_summary_table_and_verdicts(html, report):
    assert '<span class="pass">PASS</span>' in html
    assert '<span class="fail">FAIL</span><span class="why">kld 0.1187 &gt; 0.05</span>' in html
    assert '<tr class="recommended"><td>fp8</td>' in html
    assert '<td class="num">0.03712<span class="unc">± 0.0013</span></td>' in html
    assert '<td class="num">0.3384<span class="unc">± 0.012</span></td>' in html


def test_user_text_is_escaped(report):
    r = copy.deepcopy(report)
    evil = '<script>alert("x")</script>&'
    r["model"]["name"] = evil
    r["model"]["source"] = "/tmp/" + evil
    fmt = r["formats"][2]
    fmt["layers"][6]["name"] = "model.layers.0." + evil  # the top-sensitivity down_proj ... renamed everywhere
    r["sensitivity_top"] = {}
    fmt["fallback_layers"][0]["reason"] = evil
    r["outliers"][0]["name"] = evil
    r["recommendation"]["keep_high_precision"] = [evil]
    r["tasks"] = {evil: evil}
    out = render_html(r)
    assert "<script" not in out.lower()
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;&amp;" in out
    assert checker.parse(out).problems == []


def test_optional_sections_may_be_missing(report):
    r = copy.deepcopy(report)
    for key in ("tasks", "advice", "autotune", "sensitivity_top"):
        del r[key]
    r["outliers"] = []
    r["formats"][0]["layers"] = []
    del r["formats"][0]["decoder_layers"]
    r["recommendation"] = {"format": None, "passed": False, "reason": "nothing fits", "exit_code": 3}
    out = render_html(r)
    assert checker.parse(out).problems == []
    counts = {k: len(v) for k, v in plots_of(out).items()}
    assert counts == {"kld": 1, "ppl_ratio": 1, "drift": 1, "cosine": 1, "sensitivity": 2}
    (drift,) = plots_of(out)["drift"]
    assert [a["data-series"] for a in marks(drift, "series")] == ["int8_sq", "int4_awq"]
    assert "No format meets the budget" in out and "<h2>Tasks</h2>" not in out


def test_bare_minimum_report_renders():
    out = render_html({"schema_version": 1, "formats": []})
    assert checker.parse(out).problems == [] and "<svg" not in out


# ---------------------------------------------------------------- headless Chromium

needs_chromium = pytest.mark.skipif(not CHROMIUM.exists(), reason="chromium not installed: run scripts/check_report_html.py where it is")


@needs_chromium
def test_chromium_renders_every_chart_without_network(tmp_path, html):
    page, png = tmp_path / "report.html", tmp_path / "report.png"
    page.write_text(html, encoding="utf-8")
    run = subprocess.run([sys.executable, str(SCRIPT), str(page), str(png)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "charts in DOM: {'kld': 1, 'ppl_ratio': 1, 'drift': 1, 'cosine': 1, 'autotune': 1, 'sensitivity': 3, 'outliers': 1}" in run.stdout
    assert checker.png_size(png) == (1400, 3000)


@needs_chromium
def test_chromium_check_catches_a_page_that_fetches(tmp_path):
    """The net-log method really sees page requests (and tells them from Chromium's own)."""
    page = tmp_path / "leaky.html"
    page.write_text('<!DOCTYPE html><html><body><img src="https://example.com/pixel.png">'
                    '<div style="background:url(http://example.org/bg.png)">x</div></body></html>')
    log = tmp_path / "net.json"
    run = checker.run_chromium(str(CHROMIUM), page, ["--dump-dom"], log, timeout=120)
    assert run.returncode == 0
    urls, _ = checker.page_requests(log)
    assert urls == ["http://example.org/bg.png", "https://example.com/pixel.png"]
    assert set(checker.static_problems(page.read_text())) >= {"contains https:// URL", "contains src= attribute", "contains CSS url()"}
