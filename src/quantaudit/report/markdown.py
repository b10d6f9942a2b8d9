"""report.json (see notes/REPORT_SCHEMA.md) as Markdown, and the report's text content.

The helpers that turn the report dict into rows of strings (number formatting, the formats
table, setup lines, rankings) live here and are reused by ``html.py``, so both renderings
print exactly the same figures. Optional sections (tasks, advice, outliers, autotune, a
format without layers) are simply left out when absent.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable

SIG = 4  # significant digits for every measured figure
TOP_N = 10  # sensitive layers listed per format
OUTLIER_ROWS = 40  # activation-outlier rows shown (flagged first); report.json has them all
DRIFT_CHUNK = 12  # decoder layers per row block in the compact drift table
DASH = "—"


def num(x, sig: int = SIG) -> str:
    """One number as printed everywhere: ``sig`` significant digits, thousands separators for
    large values, an em dash for a missing value."""
    if x is None:
        return DASH
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return f"{x:,}" if abs(x) >= 10_000 else str(x)
    if not math.isfinite(x):
        return str(x)
    text = f"{x:.{sig}g}"
    if "e+" in text:
        return f"{x:,.0f}"
    return text


def pm(value, uncertainty) -> str:
    """'value ± uncertainty' (uncertainty to 2 significant digits) or just the value."""
    return num(value) if uncertainty is None else f"{num(value)} ± {num(uncertainty, 2)}"


def megabytes(n_bytes) -> str:
    """Bytes as MB (10^6 bytes)."""
    return DASH if n_bytes is None else num(n_bytes / 1e6)


def verdict(fmt: dict) -> tuple[bool | None, str]:
    """(passed, 'PASS' | 'FAIL: <every failed metric>') for one format."""
    passed = fmt.get("passed")
    if passed is None:
        return None, DASH
    if passed:
        return True, "PASS"
    return False, "FAIL: " + "; ".join(fmt.get("failed") or ["budget not met"])


OPS = {"<=": "≤", ">=": "≥", "<": "<", ">": ">", "==": "="}


def budget_text(report: dict) -> str:
    items = report.get("budget") or []
    if not items:
        return (report.get("settings") or {}).get("budget") or "none"
    return ", ".join(f"{b['metric']} {OPS.get(b['op'], b['op'])} {num(b['value'])}" for b in items)


def _kld(fmt: dict, key: str):
    return (fmt.get("kld") or {}).get(key)


def ppl_ratio_unc(fmt: dict):
    """Standard error of the PPL ratio: the report's, else from ln-ratio's by the delta method
    (d ratio = ratio · d ln ratio)."""
    if fmt.get("ppl_ratio_unc") is not None:
        return fmt["ppl_ratio_unc"]
    if fmt.get("ppl_ratio") is not None and fmt.get("ln_ppl_ratio_unc") is not None:
        return fmt["ppl_ratio"] * fmt["ln_ppl_ratio_unc"]
    return None


def _ratio(x) -> str:
    return DASH if x is None else f"{num(x)}×"


# The formats table, as data: (header, cell of a format row, cell of the baseline row).
SUMMARY_COLUMNS: list[tuple[str, Callable[[dict], str], Callable[[dict], str]]] = [
    ("PPL", lambda f: pm(f.get("ppl"), f.get("ppl_unc")), lambda b: pm(b.get("ppl"), b.get("ppl_unc"))),
    ("PPL ratio", lambda f: pm(f.get("ppl_ratio"), ppl_ratio_unc(f)), lambda b: "1"),
    ("mean KLD", lambda f: pm(_kld(f, "mean"), _kld(f, "unc")), lambda b: "0"),
    ("KLD p99", lambda f: num(_kld(f, "p99")), lambda b: DASH),
    ("KLD max", lambda f: num(_kld(f, "max")), lambda b: DASH),
    ("top-1", lambda f: pm(f.get("top1"), f.get("top1_unc")), lambda b: "1"),
    ("Δp RMS", lambda f: num((f.get("delta_p") or {}).get("rms")), lambda b: DASH),
    ("weight MB", lambda f: megabytes(f.get("weight_bytes")), lambda b: megabytes(b.get("weight_bytes"))),
    ("compression", lambda f: _ratio(f.get("compression")), lambda b: "1×"),
    ("KV B/token", lambda f: num(f.get("kv_bytes_per_token")), lambda b: num(b.get("kv_bytes_per_token"))),
]
SUMMARY_HEADERS = ["format", *(c[0] for c in SUMMARY_COLUMNS), "verdict"]


def summary_rows(report: dict) -> list[tuple[list[str], dict | None]]:
    """The formats table without its verdict column: (cells, format dict) per format, after a
    baseline row whose format dict is None."""
    rows = []
    baseline = report.get("baseline")
    if baseline:
        rows.append((["baseline", *(c[2](baseline) for c in SUMMARY_COLUMNS)], None))
    for fmt in report.get("formats") or []:
        rows.append(([fmt["name"], *(c[1](fmt) for c in SUMMARY_COLUMNS)], fmt))
    return rows


def _kv(d: dict | None, skip: Iterable[str] = ()) -> str:
    return "; ".join(f"{k}={v}" for k, v in flatten({k: v for k, v in (d or {}).items() if k not in skip}))


def setup_rows(report: dict) -> list[tuple[str, str]]:
    """(label, text) lines describing what was audited and how."""
    rows = []
    m = report.get("model")
    if m:
        rows.append(("model", f"{m.get('name')} ({m.get('architecture', '?')}, {num(m.get('params'))} params, "
                              f"{num(m.get('decoder_layers'))} decoder layers, {num(m.get('linear_layers'))} linear layers)"))
        rows.append(("model source", f"{m.get('source')} (fingerprint {m.get('fingerprint')})"))
    e = report.get("eval")
    if e:
        rows.append(("eval data", f"{e.get('source')}: {num(e.get('windows'))} windows × {num(e.get('seq_len'))} tokens, "
                                  f"{num(e.get('tokens'))} scored tokens, BOS {e.get('bos')} (fingerprint {e.get('fingerprint')})"))
    c = report.get("calib")
    if c:
        rows.append(("calibration data", f"{c.get('source')}: {num(c.get('samples'))} samples × {num(c.get('seq_len'))} tokens, "
                                         f"{num(c.get('tokens'))} tokens"))
    if report.get("settings"):
        rows.append(("settings", _kv(report["settings"], skip=("budget",))))
    rows.append(("budget", budget_text(report)))
    b = report.get("baseline")
    if b:
        rows.append(("baseline", f"PPL {pm(b.get('ppl'), b.get('ppl_unc'))}, weights {megabytes(b.get('weight_bytes'))} MB, "
                                 f"KV cache {num(b.get('kv_bytes_per_token'))} B/token"))
    return rows


def format_facts(fmt: dict) -> str:
    """One line under a format's heading."""
    parts = [fmt.get("description"), f"TensorRT-LLM quant_algo {fmt.get('trtllm_quant_algo') or DASH}",
             f"KV cache {fmt.get('kv_cache') or 'none'}"]
    if fmt.get("quantize_seconds") is not None:
        parts.append(f"quantized in {num(fmt['quantize_seconds'])} s, evaluated in {num(fmt.get('eval_seconds'))} s")
    return "; ".join(p for p in parts if p)


def top_sensitive(report: dict, fmt: dict, n: int = TOP_N) -> list[dict]:
    """The ``n`` layers whose quantization alone moves the output most (sensitivity_kld), with
    their drift/cosine. With decoder-granularity sensitivity the format's ``decoder_sensitivity``
    ranks whole decoder layers; otherwise the report's own ranking (sensitivity_top) is used when
    present, else the format's layers are ranked here."""
    by_name = {layer["name"]: layer for layer in fmt.get("layers") or []}
    if fmt.get("decoder_sensitivity"):
        return sorted(({"name": k, "sensitivity_kld": v} for k, v in fmt["decoder_sensitivity"].items() if v is not None),
                      key=lambda x: -x["sensitivity_kld"])[:n]
    ranked = (report.get("sensitivity_top") or {}).get(fmt["name"])
    if ranked is None:
        ranked = sorted((x for x in by_name.values() if x.get("sensitivity_kld") is not None),
                        key=lambda x: -x["sensitivity_kld"])
    return [{**by_name.get(r["name"], {}), **r} for r in ranked[:n]]


def fallback_groups(fmt: dict) -> list[tuple[str, str, list[str]]]:
    """Fallback layers grouped by (stored as, reason): a 30-layer model repeats one reason 150 times."""
    groups: dict[tuple[str, str], list[str]] = {}
    for x in fmt.get("fallback_layers") or []:
        groups.setdefault((x.get("format", DASH), x.get("reason", DASH)), []).append(x["name"])
    return [(stored, reason, names) for (stored, reason), names in groups.items()]


def ordered_outliers(report: dict) -> list[dict]:
    """Flagged inputs first, then by max/median ratio, largest first; at most OUTLIER_ROWS (a
    30-layer model has 210 linear inputs, and the ones that matter sort first)."""
    entries = sorted(report.get("outliers") or [], key=lambda o: (o.get("flag") == "ok", -(o.get("ratio") or 0.0)))
    return entries[:OUTLIER_ROWS]


def outliers_note(report: dict) -> str:
    total = len(report.get("outliers") or [])
    shown = min(total, OUTLIER_ROWS)
    more = f" Showing {shown} of {total} inputs; all are in report.json." if total > shown else ""
    return f"ratio = largest channel abs-max / median channel abs-max; flagged inputs first, then by ratio.{more}"


def top_channels_text(entry: dict, n: int = 5) -> str:
    return ", ".join(f"{c}: {num(v)}" for c, v in (entry.get("top_channels") or [])[:n]) or DASH


def flatten(obj, prefix: str = "") -> list[tuple[str, str]]:
    """Any JSON value as (dotted key, text) rows, for sections whose shape we do not fix."""
    if isinstance(obj, dict):
        return [row for k, v in obj.items() for row in flatten(v, f"{prefix}.{k}" if prefix else str(k))]
    if isinstance(obj, list) and any(isinstance(v, (dict, list)) for v in obj):
        return [row for i, v in enumerate(obj) for row in flatten(v, f"{prefix}[{i}]")]
    if isinstance(obj, list):
        return [(prefix, ", ".join(num(v) if isinstance(v, (int, float)) else str(v) for v in obj))]
    return [(prefix, num(obj) if isinstance(obj, (int, float)) or obj is None else str(obj))]


def autotune_curve(report: dict) -> list[dict]:
    return ((report.get("autotune") or {}).get("curve")) or []


# ---------------------------------------------------------------- Markdown output


RAW_HTML_START = re.compile(r"<(?=[A-Za-z/!?])")  # CommonMark starts raw HTML only at these


def cell(text) -> str:
    """Plain text safe in a GFM table cell: no column breaks, no raw HTML ('<=' stays readable)."""
    text = str(text).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")
    return RAW_HTML_START.sub("&lt;", text)


def code(text) -> str:
    """A layer name or path as a code span (no emphasis from its underscores), table-safe."""
    text = str(text).replace("\n", " ")
    longest_backtick_run = max((len(m) for m in re.findall("`+", text)), default=0)
    fence = "`" * (longest_backtick_run + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text.replace('|', chr(92) + '|')}{pad}{fence}"


def table(headers: list[str], rows: list[list[str]]) -> str:
    """GFM table; body cells are already escaped (cell/code), headers are escaped here."""
    lines = ["| " + " | ".join(cell(h) for h in headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _recommendation_md(report: dict) -> list[str]:
    rec = report.get("recommendation")
    if not rec:
        return []
    out = ["## Recommendation", ""]
    if rec.get("format"):
        out.append(f"**{cell(rec['format'])}** — {cell(rec.get('reason', ''))}")
    else:
        out.append(f"**No format meets the budget.** {cell(rec.get('reason', ''))}")
    if rec.get("closest"):
        out.append(f"\nClosest to the budget: **{cell(rec['closest'])}**.")
    if rec.get("exit_code") is not None:
        out.append(f"\nExit code {rec['exit_code']}.")
    keep = rec.get("keep_high_precision") or []
    if keep:
        out += ["", "Keep in higher precision:", ""] + [f"- {code(name)}" for name in keep]
    return out + [""]


def _format_md(report: dict, fmt: dict) -> list[str]:
    passed, text = verdict(fmt)
    out = [f"### {cell(fmt['name'])} — {cell(text)}", "", cell(format_facts(fmt)), ""]
    top = top_sensitive(report, fmt)
    if top:
        out += [f"#### Most sensitive layers (top {len(top)} by sensitivity KLD)", "",
                table(["#", "layer", "sensitivity KLD", "drift_rel", "cosine"],
                      [[str(i + 1), code(x["name"]), num(x.get("sensitivity_kld")), num(x.get("drift_rel")), num(x.get("cosine"), 6)]
                       for i, x in enumerate(top)]), ""]
    groups = fallback_groups(fmt)
    out += [f"#### Fallback layers ({sum(len(names) for *_, names in groups)})", ""]
    if groups:
        out += [table(["stored as", "reason", "layers"],
                      [[cell(stored), cell(reason), ", ".join(code(n) for n in names)] for stored, reason, names in groups]), ""]
    else:
        out += ["None: every candidate layer uses the format as specified.", ""]
    decoder = fmt.get("decoder_layers") or []
    if decoder:
        out += ["#### Hidden-state drift after each decoder layer", ""]
        for start in range(0, len(decoder), DRIFT_CHUNK):
            chunk = decoder[start:start + DRIFT_CHUNK]
            out += [table(["layer", *(str(d["index"]) for d in chunk)],
                          [["drift_rel", *(num(d.get("drift_rel")) for d in chunk)],
                           ["cosine", *(num(d.get("cosine"), 6) for d in chunk)]]), ""]
    return out


GENERATION_HEADERS = ["format", "identical", "median divergence", "ROUGE-L after", "loops base → quant",
                      "distinct-2 base → quant", "checks base → quant", "McNemar p"]


def generation_rows(report: dict) -> list[list[str]]:
    """Per format with ``--generate`` results: the paired generation statistics (quantaudit.fidelity), as text."""
    rows = []
    for fmt in report.get("formats") or []:
        g = fmt.get("generation")
        if not g:
            continue
        base, quant = g["degeneration"]["base"], g["degeneration"]["quant"]
        checks = g.get("checks")
        median = g["median_divergence"]
        rows.append([
            fmt["name"], f"{100 * g['identical']:.1f}% of {g['prompts']}",
            f"> {g['max_new_tokens']}" if median is None else f"{median} tokens",
            num(g["rouge_l_after_divergence"]),
            f"{100 * base['loop_share']:.1f}% → {100 * quant['loop_share']:.1f}%",
            f"{num(base['distinct_2'])} → {num(quant['distinct_2'])}",
            f"{100 * checks['base_pass']:.1f}% → {100 * checks['quant_pass']:.1f}% (n={checks['n']})" if checks else DASH,
            num(checks["mcnemar_p"]) if checks else DASH,
        ])
    return rows


TIMING_STAGES = ("quantize", "evaluate", "drift", "sensitivity", "tasks", "generation")


def timing_rows(report: dict) -> tuple[list[str], list[list[str]]]:
    """Where the audit's time went (``report["timings"]``): headers, then a row for the shared baseline work and
    one per format, seconds per stage (empty without timings, e.g. a report from an older version)."""
    timings = report.get("timings")
    if not timings:
        return [], []
    per_format = timings.get("format_seconds") or {}
    stages = [s for s in TIMING_STAGES if any(s in t for t in per_format.values())]
    base = timings.get("baseline_seconds") or {}
    headers = ["part", *stages, "total s"]
    rows = [["baseline: " + ", ".join(f"{k} {v:.1f}" for k, v in base.items()), *[DASH] * len(stages),
             f"{sum(base.values()):.1f}"]]
    for name, seconds in per_format.items():
        rows.append([name, *(f"{seconds[s]:.1f}" if s in seconds else DASH for s in stages),
                     f"{sum(seconds.get(s, 0.0) for s in TIMING_STAGES):.1f}"])
    if "total_seconds" in timings:
        rows.append(["whole run (reports: " + f"{timings.get('report_seconds', 0.0):.1f} s)", *[DASH] * len(stages),
                     f"{timings['total_seconds']:.1f}"])
    return headers, rows


def _generation_md(report: dict) -> list[str]:
    rows = generation_rows(report)
    if not rows:
        return []
    return ["## Generation fidelity", "",
            "Greedy continuations of the same prompts by the baseline and each format. Median divergence: the "
            "first token position where at least half the prompts' continuations differ (> N: never within N).", "",
            table(GENERATION_HEADERS, [list(map(cell, r)) for r in rows]), ""]


def _outliers_md(report: dict) -> list[str]:
    entries = ordered_outliers(report)
    if not entries:
        return []
    rows = [[code(o["name"]), num(o.get("decoder_layer")), cell(o.get("flag", DASH)), num(o.get("ratio")), num(o.get("kurtosis")),
             num(o.get("max_abs")), num(o.get("channels")), cell(top_channels_text(o)), cell(o.get("remedy") or DASH)]
            for o in entries]
    return ["## Activation outliers (linear-layer inputs)", "", outliers_note(report), "",
            table(["input of", "decoder layer", "flag", "max/median", "kurtosis", "max |x|", "channels", "top channels (ch: max)", "remedy"],
                  rows), ""]


def _generic_md(title: str, obj) -> list[str]:
    if not obj:
        return []
    return [f"## {title}", "", table(["key", "value"], [[cell(k), cell(v)] for k, v in flatten(obj)]), ""]


def render_markdown(report: dict) -> str:
    """The whole report as GitHub-flavoured Markdown."""
    model = (report.get("model") or {}).get("name", "model")
    out = [f"# quantaudit report: {cell(model)}", ""]
    if report.get("created") or report.get("quantaudit_version"):
        out += [f"Created {cell(report.get('created', DASH))} by quantaudit {cell(report.get('quantaudit_version', DASH))}.", ""]
    out += ["## Setup", "", table(["", ""], [[cell(k), cell(v)] for k, v in setup_rows(report)]), ""]
    if report.get("formats"):
        out += ["## Formats", "",
                table(SUMMARY_HEADERS, [[*map(cell, row), cell(verdict(fmt)[1] if fmt else DASH)] for row, fmt in summary_rows(report)]), "",
                "KLD = KL(baseline ‖ quantized) per scored token, nats; ± = one standard error. "
                "MB = 10^6 bytes. Δp = change of the probability of the observed next token.", ""]
    out += _recommendation_md(report)
    curve = autotune_curve(report)
    if curve:
        out += ["## Size vs KLD (autotune)", "",
                table(["#", "candidate", "weight MB", "mean KLD"],
                      [[str(i), cell(p.get("label", DASH)), megabytes(p.get("weight_bytes")), num(p.get("kld"))]
                       for i, p in enumerate(curve, 1)]), ""]
    if report.get("formats"):
        out += ["## Per format", ""]
        for fmt in report["formats"]:
            out += _format_md(report, fmt)
    out += _generation_md(report)
    out += _outliers_md(report)
    out += _generic_md("Tasks", report.get("tasks"))
    headers, rows = timing_rows(report)
    if rows:
        out += ["## Where the time went", "", "Seconds per stage; a resumed format keeps the times of the run that "
                "measured it.", "", table(headers, [list(map(cell, r)) for r in rows]), ""]
    out += _generic_md("Advice", report.get("advice"))
    return "\n".join(out).rstrip() + "\n"
