"""report.json (see notes/REPORT_SCHEMA.md) as one self-contained HTML file.

Same content as the Markdown report (the rows come from ``markdown.py``) plus inline SVG
charts from ``plots.py``. The file references nothing outside itself: no scripts, no
stylesheets, fonts, images or URLs, so it opens offline and can be mailed or archived as is.
Every piece of text from the report (layer names, paths, reasons) goes through html.escape.
A ``<meta name="quantaudit-plots">`` lists the charts drawn (kind=count) so a browser check
(scripts/check_report_html.py) can confirm the browser's DOM holds all of them.
"""

from __future__ import annotations

import re
from collections import Counter
from html import escape

from . import plots
from .markdown import (
    DASH,
    DRIFT_CHUNK,
    GENERATION_HEADERS,
    SUMMARY_HEADERS,
    autotune_curve,
    fallback_groups,
    flatten,
    format_facts,
    generation_rows,
    megabytes,
    num,
    ordered_outliers,
    outliers_note,
    setup_rows,
    summary_rows,
    top_channels_text,
    top_sensitive,
    verdict,
)

CSS = """
:root { color-scheme: light; }
body { margin: 0; background: #f6f7f9; color: #1d2330; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; }
main { max-width: 1400px; margin: 0 auto; padding: 24px 20px 48px; }
h1 { font-size: 24px; margin: 0 0 4px; }
h2 { font-size: 19px; margin: 32px 0 10px; padding-bottom: 4px; border-bottom: 2px solid #d9dde3; }
h3 { font-size: 15px; margin: 18px 0 8px; }
.meta, .note { color: #5b6472; }
.note { font-size: 12.5px; }
section.card { background: #fff; border: 1px solid #dde1e6; border-radius: 6px; padding: 4px 16px 14px; margin: 18px 0; }
table { border-collapse: collapse; margin: 6px 0 10px; font-variant-numeric: tabular-nums; }
th, td { border-bottom: 1px solid #e4e7eb; padding: 5px 8px; text-align: left; vertical-align: top; }
th { background: #eef1f4; font-weight: 600; white-space: nowrap; }
td.num, th.num { text-align: right; white-space: nowrap; }
table.kv th { background: none; color: #5b6472; font-weight: 500; }
code, .mono { font-family: ui-monospace, "DejaVu Sans Mono", Menlo, Consolas, monospace; font-size: 12.5px; }
.pass { color: #0b6b2f; font-weight: 600; }
.fail { color: #a4161a; font-weight: 600; }
.badge { display: inline-block; padding: 1px 8px; border-radius: 10px; font-size: 12px; font-weight: 600; vertical-align: 2px; }
.badge.pass { background: #dcf3e3; }
.badge.fail { background: #fbe1e1; }
tr.recommended td:first-child { font-weight: 700; }
tr.recommended td:first-child::after { content: " ★"; color: #0b6b2f; }
tr.flagged td { background: #fff4e5; }
.rec { border-left: 6px solid #0b6b2f; }
.rec.none { border-left-color: #a4161a; }
.rec .big { font-size: 18px; font-weight: 700; }
.plots { display: flex; flex-wrap: wrap; gap: 16px; align-items: flex-start; }
.plots svg { max-width: 100%; height: auto; border: 1px solid #e4e7eb; border-radius: 4px; background: #fff; }
.plots.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(520px, 1fr)); }
.plots.grid svg { width: 100%; }
table.summary td:first-child { white-space: nowrap; }
table.summary td:last-child { min-width: 170px; }
.why { display: block; color: #a4161a; font-size: 12.5px; }
.unc { display: block; color: #5b6472; font-size: 11.5px; }
.side { display: flex; flex-wrap: wrap; gap: 18px; align-items: flex-start; }
.side > div { flex: 1 1 520px; min-width: 0; }
.scroll { overflow-x: auto; }
footer { margin-top: 40px; color: #5b6472; font-size: 12px; }
"""


def _table(headers: list[str], rows: list[list[str]], *, num_cols: set[int] = frozenset(), row_classes: list[str] | None = None,
           cls: str = "") -> str:
    """HTML table. ``headers`` are plain text (escaped here); ``rows`` cells are HTML already."""
    head = "".join(f'<th class="num">{escape(h)}</th>' if j in num_cols else f"<th>{escape(h)}</th>" for j, h in enumerate(headers))
    body = []
    for i, row in enumerate(rows):
        rc = f' class="{row_classes[i]}"' if row_classes and row_classes[i] else ""
        cells = "".join(f'<td class="num">{c}</td>' if j in num_cols else f"<td>{c}</td>" for j, c in enumerate(row))
        body.append(f"<tr{rc}>{cells}</tr>")
    table_cls = f' class="{cls}"' if cls else ""
    return f'<div class="scroll"><table{table_cls}><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>'


def _code(text) -> str:
    return f"<code>{escape(str(text))}</code>"


def _with_unc(text: str) -> str:
    """'value ± unc' with the uncertainty on its own smaller line, to keep the table narrow."""
    value, sep, unc = text.partition(" ± ")
    return escape(value) + (f'<span class="unc">± {escape(unc)}</span>' if sep else "")


def _verdict_html(fmt: dict | None) -> str:
    """PASS, or FAIL with one failed metric per line."""
    passed, text = verdict(fmt) if fmt else (None, DASH)
    if passed is None:
        return escape(text)
    if passed:
        return '<span class="pass">PASS</span>'
    reasons = "".join(f'<span class="why">{escape(r)}</span>' for r in fmt.get("failed") or [])
    return f'<span class="fail">FAIL</span>{reasons}'


def _setup(report: dict) -> str:
    rows = "".join(f"<tr><th>{escape(k)}</th><td>{escape(v)}</td></tr>" for k, v in setup_rows(report))
    return f'<section class="card"><h2>Setup</h2><table class="kv"><tbody>{rows}</tbody></table></section>'


def _recommendation(report: dict) -> str:
    rec = report.get("recommendation")
    if not rec:
        return ""
    if rec.get("format"):
        head = f'<p class="big">Recommended: <span class="pass">{escape(rec["format"])}</span></p>'
    else:
        head = '<p class="big fail">No format meets the budget</p>'
    parts = [head, f"<p>{escape(rec.get('reason') or '')}</p>"]
    if rec.get("closest"):
        parts.append(f"<p>Closest to the budget: <b>{escape(str(rec['closest']))}</b></p>")
    if rec.get("exit_code") is not None:
        parts.append(f'<p class="note">exit code {escape(str(rec["exit_code"]))}</p>')
    keep = rec.get("keep_high_precision") or []
    if keep:
        parts.append("<p>Keep in higher precision: " + ", ".join(_code(n) for n in keep) + "</p>")
    cls = "card rec" + ("" if rec.get("format") else " none")
    return f'<section class="{cls}"><h2>Recommendation</h2>{"".join(parts)}</section>'


def _formats(report: dict) -> str:
    if not report.get("formats"):
        return ""
    recommended = (report.get("recommendation") or {}).get("format")
    rows, classes = [], []
    for cells, fmt in summary_rows(report):
        rows.append([_with_unc(c) for c in cells] + [_verdict_html(fmt)])
        classes.append("recommended" if fmt and fmt["name"] == recommended else "")
    table = _table(SUMMARY_HEADERS, rows, num_cols=set(range(1, len(SUMMARY_HEADERS) - 1)), row_classes=classes, cls="summary")
    note = ('<p class="note">★ recommended. KLD = KL(baseline ‖ quantized) per scored token, nats; ± = one standard error. '
            "MB = 10<sup>6</sup> bytes. Δp = change of the probability of the observed next token.</p>")
    return f'<section class="card"><h2>Formats</h2>{table}{note}</section>'


def _overview_plots(report: dict, colours: dict[str, str]) -> str:
    charts = [plots.kld_plot(report, colours), plots.ppl_ratio_plot(report, colours),
              plots.depth_plot(report, colours, "drift_rel"), plots.depth_plot(report, colours, "cosine"),
              plots.survival_plot(report, colours), plots.autotune_plot(report), plots.frontier_plot(report)]
    charts = [c for c in charts if c]
    if not charts:
        return ""
    curve = autotune_curve(report)
    frontier = plots.frontier_entries(report.get("advice") or {})
    if frontier:  # numbered as in the frontier chart
        charts.append("<div><h3>Accuracy vs speed</h3>" + _table(
            ["#", "format", "KV cache", "decode tokens/s", "mean KLD", "advisor"],
            [[str(i), escape(r["format"]), escape(str(r.get("kv_cache"))), num(r["decode_tokens_per_s"]),
              num(r["audit"]["kld_mean"]), escape(f"rank {r['rank']}" if "rank" in r else r.get("reason", DASH))]
             for i, r in enumerate(frontier, 1)], num_cols={0, 3, 4}) + "</div>")
    if curve:  # the scatter numbers its points; this table names them
        charts.append("<div><h3>Autotune candidates</h3>" + _table(
            ["#", "candidate", "weight MB", "mean KLD"],
            [[str(i), escape(str(p.get("label", DASH))), megabytes(p.get("weight_bytes")), num(p.get("kld"))]
             for i, p in enumerate(curve, 1)], num_cols={0, 2, 3}) + "</div>")
    return f'<section class="card"><h2>Overview</h2><div class="plots grid">{"".join(charts)}</div></section>'


def _format_section(report: dict, fmt: dict, colour: str) -> str:
    passed, text = verdict(fmt)
    badge = f' <span class="badge {"pass" if passed else "fail"}">{escape(text)}</span>' if passed is not None else ""
    parts = [f'<h2 id="format-{escape(fmt["name"])}">{escape(fmt["name"])}{badge}</h2>',
             f'<p class="meta">{escape(format_facts(fmt))}</p>']
    top = top_sensitive(report, fmt)
    if top:
        table = _table(["#", "layer", "sensitivity KLD", "drift_rel", "cosine"],
                       [[str(i + 1), _code(x["name"]), num(x.get("sensitivity_kld")), num(x.get("drift_rel")), num(x.get("cosine"), 6)]
                        for i, x in enumerate(top)], num_cols={0, 2, 3, 4})
        parts.append(f'<h3>Most sensitive layers (top {len(top)} by sensitivity KLD)</h3><div class="side">'
                     f'<div class="plots">{plots.sensitivity_plot(fmt, top, colour)}</div><div>{table}</div></div>')
    groups = fallback_groups(fmt)
    parts.append(f"<h3>Fallback layers ({sum(len(names) for *_, names in groups)})</h3>")
    if groups:
        parts.append(_table(["stored as", "reason", "layers"],
                            [[escape(stored), escape(reason), ", ".join(_code(n) for n in names)] for stored, reason, names in groups]))
    else:
        parts.append("<p>None: every candidate layer uses the format as specified.</p>")
    decoder = fmt.get("decoder_layers") or []
    if decoder:
        parts.append("<h3>Hidden-state drift after each decoder layer</h3>")
        for start in range(0, len(decoder), DRIFT_CHUNK):
            chunk = decoder[start:start + DRIFT_CHUNK]
            rows = [["drift_rel", *(num(d.get("drift_rel")) for d in chunk)], ["cosine", *(num(d.get("cosine"), 6) for d in chunk)]]
            parts.append(_table(["layer", *(str(d["index"]) for d in chunk)], rows, num_cols=set(range(1, len(chunk) + 1))))
    return f'<section class="card">{"".join(parts)}</section>'


def _generation(report: dict) -> str:
    rows = generation_rows(report)
    if not rows:
        return ""
    return ('<section class="card"><h2>Generation fidelity</h2>'
            "<p>Greedy continuations of the same prompts by the baseline and each format; the survival curve is in "
            "the overview.</p>" + _table(GENERATION_HEADERS, [[escape(c) for c in r] for r in rows]) + "</section>")


def _outliers(report: dict) -> str:
    entries = ordered_outliers(report)
    if not entries:
        return ""
    rows = [[_code(o["name"]), num(o.get("decoder_layer")), escape(str(o.get("flag", DASH))), num(o.get("ratio")), num(o.get("kurtosis")),
             num(o.get("max_abs")), num(o.get("channels")), escape(top_channels_text(o)), escape(o.get("remedy") or DASH)]
            for o in entries]
    classes = ["flagged" if o.get("flag") not in (None, "ok") else "" for o in entries]
    table = _table(["input of", "decoder layer", "flag", "max/median", "kurtosis", "max |x|", "channels", "top channels (ch: max)", "remedy"],
                   rows, num_cols={1, 3, 4, 5, 6}, row_classes=classes)
    heat = plots.outlier_heatmap(report)
    return ('<section class="card"><h2>Activation outliers (linear-layer inputs)</h2>'
            f'<p class="note">{escape(outliers_note(report))} ⚠ = flagged.</p>'
            f'<div class="plots">{heat}</div>{table}</section>')


def _generic(title: str, obj) -> str:
    if not obj:
        return ""
    rows = [[escape(k), escape(v)] for k, v in flatten(obj)]
    return f'<section class="card"><h2>{escape(title)}</h2>{_table(["key", "value"], rows, cls="kv")}</section>'


def render_html(report: dict) -> str:
    """The whole report as one HTML document (a string; the caller writes it)."""
    model = (report.get("model") or {}).get("name", "model")
    colours = plots.format_colours([f["name"] for f in report.get("formats") or []])
    body = [
        f"<header><h1>quantaudit report: {escape(str(model))}</h1>"
        f'<p class="meta">created {escape(str(report.get("created", DASH)))} by quantaudit '
        f'{escape(str(report.get("quantaudit_version", DASH)))}</p></header>',
        _setup(report), _formats(report), _recommendation(report), _overview_plots(report, colours),
        *(_format_section(report, f, colours[f["name"]]) for f in report.get("formats") or []),
        _generation(report), _outliers(report), _generic("Tasks", report.get("tasks")),
        _generic("Advice", report.get("advice")),
        '<footer>Self-contained report: no scripts, no external resources. Hover a bar or heatmap cell for its exact value.</footer>',
    ]
    main = "".join(b for b in body if b)
    kinds = Counter(re.findall(r'<svg class="plot" data-plot="([^"]+)"', main))
    plot_list = ";".join(f"{k}={n}" for k, n in sorted(kinds.items()))
    return ("<!DOCTYPE html>\n"
            '<html lang="en"><head><meta charset="utf-8">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f'<meta name="quantaudit-plots" content="{plot_list}">'
            f"<title>quantaudit report: {escape(str(model))}</title><style>{CSS}</style></head>"
            f"<body><main>{main}</main></body></html>\n")
