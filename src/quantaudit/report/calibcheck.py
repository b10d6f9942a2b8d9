"""calib_check.json as Markdown and as one self-contained HTML page (the same tables; the HTML adds a KLD bar
chart per format, one bar per calibration set with its standard error, and the sample-count curves)."""

from __future__ import annotations

from html import escape

from . import plots
from .html import CSS, _table
from .markdown import DASH, cell, num, pm, table


def _set_rows(result: dict) -> tuple[list[str], list[list[str]]]:
    headers = ["set", "source", "samples × tokens", "unseen eval tokens", "unigram JS (bits)",
               "eval activations beyond calib max", "inputs whose max still grows", "coverage notes"]
    rows = []
    for s in result["sets"]:
        c = s["coverage"]
        rows.append([s["label"], s["source"], f"{s['samples']} × {s['seq_len']}",
                     f"{100 * c['tokens']['unseen_token_share']:.2f} %", num(c["tokens"]["js_divergence_bits"]),
                     f"{100 * c['summary']['clip_share']:.4f} %",
                     f"{100 * c['adequacy']['still_growing_share']:.0f} %" if c["adequacy"].get("judged") else DASH,
                     "; ".join(c["reasons"]) or "none"])
    return headers, rows


def verdict_text(f: dict) -> str:
    """One format's calibration verdict as a line (terminal, Markdown and HTML say the same)."""
    if not f["uses_calibration"]:
        return "reads no calibration data"
    if not f["sensitive"]:
        return f["verdict"]
    b = f["best_vs_worst"]

    def named(label: str, tied: list[str]) -> str:
        return label + (f" (within the noise of it: {', '.join(tied)})" if tied else "")

    return (f"{f['verdict']}: best {named(f['best'], f['best_tied'])}, worst {named(f['worst'], f['worst_tied'])}; "
            f"worst − best {pm(b['difference'], b['unc'])}")


def _kld_rows(result: dict) -> tuple[list[str], list[list[str]]]:
    labels = [s["label"] for s in result["sets"]]
    rows = [[f["format"], *(pm(f["klds"][label]["kld"], f["klds"][label]["kld_unc"]) for label in labels), verdict_text(f)]
            for f in result["formats"]]
    return ["format", *labels, "verdict"], rows


def _pair_rows(result: dict) -> tuple[list[str], list[list[str]]]:
    headers = ["format", "pair (b − a)", "KLD difference", "significant", "measured better", "coverage prefers"]
    rows = []
    for f in result["formats"]:
        for p in f["pairs"]:
            rows.append([f["format"], f"{p['b']} − {p['a']}", pm(p["difference"], p["unc"]), num(p["significant"]),
                         p["better"] or "no order", p.get("coverage_prefers", DASH)
                         + ("" if "coverage_agrees" not in p else " (agrees)" if p["coverage_agrees"] else " (disagrees)")])
    return headers, rows


def _curve_rows(result: dict) -> tuple[list[str], list[list[str]]] | None:
    curves = [f for f in result["formats"] if f.get("curve")]
    if not curves:
        return None
    counts = sorted({p["samples"] for f in curves for p in f["curve"]["points"]})
    rows = []
    for f in curves:
        points = {p["samples"]: p for p in f["curve"]["points"]}
        rows.append([f["format"], *(pm(points[c]["kld"], points[c]["kld_unc"]) if c in points else DASH for c in counts),
                     f["curve"]["verdict"]])
    return ["format", *(f"n = {c}" for c in counts), "where it flattens"], rows


def _intro(result: dict) -> list[tuple[str, str]]:
    e = result["eval"]
    return [("model", f"{result['model']['name']} ({result['model']['source']})"),
            ("eval text", f"{e['source']}: {e['windows']} windows × {e['seq_len']} tokens, {e['tokens']} scored tokens"),
            ("--calib verdict", result["verdict"]),
            ("coverage heuristics", result["coverage_prediction"]["verdict"])]


def render_calib_check_markdown(result: dict) -> str:
    lines = [f"# calib-check: {result['model']['name']}", ""]
    lines += [f"- **{k}**: {cell(v)}" for k, v in _intro(result)]
    lines += [f"- **warning**: {cell(w)}" for w in result["warnings"]]
    lines += [f"- **why**: {cell(r)}" for r in result["reasons"]]
    body = [("KLD per format and calibration set", _kld_rows(result)),
            ("Every pair of sets (paired per-token differences)", _pair_rows(result)),
            ("KLD by number of calibration samples", _curve_rows(result)),
            ("Coverage of the eval text by each set (explanations, not the verdict)", _set_rows(result))]
    for title, found in body:
        if found:
            headers, rows = found
            lines += ["", f"## {title}", "", table(headers, [[cell(c) for c in row] for row in rows])]
    lines += ["", f"Coverage ranks two sets by: {cell(result['ranking_rule'])}.", ""]
    return "\n".join(lines)


def _kld_bars(f: dict, labels: list[str], colours: dict[str, str]) -> str:
    values = [f["klds"][label]["kld"] for label in labels]
    errors = [f["klds"][label]["kld_unc"] for label in labels]
    return plots.bar_chart("calib-kld", f"{f['format']}: KLD per calibration set", labels, values,
                           [colours[label] for label in labels], y_label="mean KLD", errors=errors, log=False)


def _curves_chart(result: dict) -> str:
    curves = [f for f in result["formats"] if f.get("curve")]
    if not curves:
        return ""
    colours = plots.format_colours([f["format"] for f in curves])
    xs = [[p["samples"] for p in f["curve"]["points"]] for f in curves]
    series = [(f["format"], [p["kld"] for p in f["curve"]["points"]], colours[f["format"]]) for f in curves]
    return plots.line_chart("calib-curve", f"KLD by calibration samples of {curves[0]['curve']['set']}", xs, series,
                            x_label="calibration samples", y_label="mean KLD", x_log=True)


def render_calib_check_html(result: dict) -> str:
    title = f"calib-check: {result['model']['name']}"
    labels = [s["label"] for s in result["sets"]]
    colours = plots.format_colours(labels)
    intro = "".join(f"<tr><th>{escape(k)}</th><td>{escape(str(v))}</td></tr>" for k, v in _intro(result))
    notes = "".join(f'<p class="why">warning: {escape(w)}</p>' for w in result["warnings"])
    notes += "".join(f'<p class="why">{escape(r)}</p>' for r in result["reasons"])
    parts = [f"<header><h1>{escape(title)}</h1></header>",
             f'<section class="card"><table class="kv">{intro}</table>{notes}</section>']

    def section(heading: str, found, extra: str = "") -> None:
        if found:
            headers, rows = found
            body = _table(headers, [[escape(str(c)) for c in row] for row in rows])
            parts.append(f'<section class="card"><h2>{escape(heading)}</h2>{body}{extra}</section>')

    bars = "".join(_kld_bars(f, labels, colours) for f in result["formats"])
    section("KLD per format and calibration set", _kld_rows(result), f'<div class="plots grid">{bars}</div>')
    section("Every pair of sets (paired per-token differences)", _pair_rows(result))
    curves = _curves_chart(result)
    section("KLD by number of calibration samples", _curve_rows(result), f'<div class="plots">{curves}</div>')
    section("Coverage of the eval text by each set (explanations, not the verdict)", _set_rows(result),
            f'<p class="note">Coverage ranks two sets by: {escape(result["ranking_rule"])}.</p>')
    return ("<!DOCTYPE html>\n"
            '<html lang="en"><head><meta charset="utf-8">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{escape(title)}</title><style>{CSS}</style></head>"
            f"<body><main>{''.join(parts)}</main></body></html>\n")

