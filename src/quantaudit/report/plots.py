"""Inline SVG charts for the HTML report.

Hand-written SVG strings: no JavaScript, no fonts, no files or URLs, so the report opens
offline (the SVG namespace is implied by HTML5, so not even ``xmlns`` appears). Every chart has a
title, axes with ticks and labels, and a legend when it draws more than one kind of mark.
Marks carry a class (``bar``, ``series``, ``point``, ``cell``) and ``data-value`` attributes, and
ticks carry ``data-axis``, ``data-value`` and their pixel ``data-pos``, so tests can check what was drawn
against the report's numbers.

A value axis switches to log10 when the plotted values span at least ``LOG_SPAN`` (a 0.03 KLD
bar next to a 3.0 p99 marker would otherwise be invisible); such axes say "(log scale)".
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from html import escape

from .markdown import num, ordered_outliers, ppl_ratio_unc

LOG_SPAN = 20.0
HEATMAP_COLUMNS = 64
# Okabe–Ito colour-blind-safe palette (minus yellow and black, which read badly as bars), then
# Paul Tol's darker "muted" colours for reports with more than six formats.
PALETTE = ["#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#332288", "#882255", "#117733", "#999999"]
# ColorBrewer "Oranges": channel max at the median is pale, 100× the median is dark.
HEAT_STOPS = [(0.0, (255, 245, 235)), (0.35, (253, 174, 107)), (0.65, (230, 85, 13)), (1.0, (127, 39, 4))]
FONT = 'font-family="system-ui, -apple-system, \'Segoe UI\', sans-serif" font-size="12"'
MONO = "ui-monospace, 'DejaVu Sans Mono', Menlo, Consolas, monospace"
MONO_CHAR_PX = 6.6  # advance of an 11 px monospace glyph
CHAR_PX = 7.0  # rough advance of a 12 px proportional glyph, for legend layout
AXIS = "#444"
GRID = "#e3e3e3"


@dataclass(frozen=True)
class Scale:
    """Maps data values in [lo, hi] to pixels in [start, end], linearly or in log10."""

    lo: float
    hi: float
    log: bool
    start: float
    end: float
    step: float = 0.0  # linear tick step

    def __call__(self, v: float) -> float:
        if self.log:
            t = (math.log10(max(v, self.lo)) - math.log10(self.lo)) / (math.log10(self.hi) - math.log10(self.lo))
        else:
            t = (v - self.lo) / (self.hi - self.lo)
        return self.start + t * (self.end - self.start)

    def ticks(self) -> list[tuple[float, str]]:
        if self.log:
            k0, k1 = round(math.log10(self.lo)), round(math.log10(self.hi))
            every = max(1, math.ceil((k1 - k0) / 8))
            return [(10.0**k, f"{10.0**k:g}") for k in range(k0, k1 + 1, every)]
        decimals = max(0, -math.floor(math.log10(self.step) + 1e-9))
        first, last = math.ceil(self.lo / self.step - 1e-9), math.floor(self.hi / self.step + 1e-9)
        return [(v, f"{v:.{decimals}f}") for v in (round(k * self.step, decimals + 3) for k in range(first, last + 1))]


def _nice_step(span: float, target: int = 5) -> float:
    raw = span / target
    power = 10.0 ** math.floor(math.log10(raw))
    return next(m * power for m in (1, 2, 5, 10) if m * power >= raw)


def wants_log(values) -> bool:
    """True when all values are positive and the largest is ≥ LOG_SPAN × the smallest."""
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return bool(vals) and min(vals) > 0 and max(vals) / min(vals) >= LOG_SPAN


def make_scale(values, start: float, end: float, *, include=(), log: bool | None = None,
               integer: bool = False, exact: bool = False) -> Scale:
    """A scale covering ``values`` and ``include``; log10 when ``log`` or (None) ``wants_log``.
    Linear ends are rounded out to a tick unless ``exact`` (then ticks fall inside); log ends go to the decades
    around the values, with room for a bar below the smallest unless ``exact``."""
    vals = [v for v in [*values, *include] if v is not None and math.isfinite(v)] or [0.0, 1.0]
    if log is None:
        log = wants_log(vals)
    if log:
        smallest = min(v for v in vals if v > 0)
        lo = 10.0 ** math.floor(math.log10(smallest))
        if not exact:
            lo = lo / 10 if smallest < 2 * lo else lo  # a bar just above the bottom decade would be invisible
        hi = 10.0 ** math.ceil(math.log10(max(vals)))
        return Scale(lo, hi if hi > lo else lo * 10, True, start, end)
    lo, hi = min(vals), max(vals)
    if hi == lo:
        lo, hi = lo - (abs(lo) * 0.05 or 1.0), hi + (abs(hi) * 0.05 or 1.0)
    step = max(_nice_step(hi - lo), 1.0) if integer else _nice_step(hi - lo)
    if exact:
        return Scale(lo, hi, False, start, end, step)
    return Scale(math.floor(lo / step + 1e-9) * step, math.ceil(hi / step - 1e-9) * step, False, start, end, step)


def format_colours(names: list[str]) -> dict[str, str]:
    """One stable colour per format, shared by every chart."""
    return {name: PALETTE[i % len(PALETTE)] for i, name in enumerate(names)}


def _f(x: float) -> str:
    return f"{x:.1f}"


def _text(x, y, s, *, anchor="start", size=None, weight=None, fill=None, rotate=False, mono=False, halo=False) -> str:
    """<text>; ``rotate`` turns it -90° about its anchor, ``halo`` keeps it legible over lines."""
    attrs = [f'x="{_f(x)}"', f'y="{_f(y)}"', f'text-anchor="{anchor}"']
    if size:
        attrs.append(f'font-size="{size}"')
    if weight:
        attrs.append(f'font-weight="{weight}"')
    if fill:
        attrs.append(f'fill="{fill}"')
    if mono:
        attrs.append(f'font-family="{MONO}"')
    if halo:
        attrs.append('stroke="#fff" stroke-width="3" paint-order="stroke"')
    if rotate:
        attrs.append(f'transform="rotate(-90 {_f(x)} {_f(y)})"')
    return f"<text {' '.join(attrs)}>{escape(str(s))}</text>"


def _svg(kind: str, width: float, height: float, title: str, body: list[str]) -> str:
    w, h = round(width), round(height)
    return (f'<svg class="plot" data-plot="{escape(kind)}" viewBox="0 0 {w} {h}" width="{w}" height="{h}" '
            f'role="img" aria-label="{escape(title)}" {FONT}><title>{escape(title)}</title>'
            f'<rect class="bg" x="0" y="0" width="{w}" height="{h}" fill="#fff"/>'
            + _text(12, 22, title, size=14, weight="600") + "".join(body) + "</svg>")


def _value_axis_y(scale: Scale, x0: float, x1: float, label: str) -> list[str]:
    """Horizontal grid lines with tick labels left of x0, and the rotated axis label."""
    out = []
    for v, text in scale.ticks():
        y = scale(v)
        out.append(f'<line class="grid" x1="{_f(x0)}" x2="{_f(x1)}" y1="{_f(y)}" y2="{_f(y)}" stroke="{GRID}"/>')
        out.append(f'<g class="tick" data-axis="y" data-value="{v!r}" data-pos="{_f(y)}">{_text(x0 - 6, y + 4, text, anchor="end", fill=AXIS)}</g>')
    out.append(f'<line x1="{_f(x0)}" x2="{_f(x0)}" y1="{_f(scale.start)}" y2="{_f(scale.end)}" stroke="{AXIS}"/>')
    mid = (scale.start + scale.end) / 2
    out.append(_text(16, mid, label + (" (log scale)" if scale.log else ""), anchor="middle", rotate=True, fill=AXIS))
    return out


def _value_axis_x(scale: Scale, y0: float, y1: float, label: str) -> list[str]:
    """Vertical grid lines with tick labels below y0, and the axis label under them."""
    out = []
    for v, text in scale.ticks():
        x = scale(v)
        out.append(f'<line class="grid" x1="{_f(x)}" x2="{_f(x)}" y1="{_f(y0)}" y2="{_f(y1)}" stroke="{GRID}"/>')
        out.append(f'<g class="tick" data-axis="x" data-value="{v!r}" data-pos="{_f(x)}">{_text(x, y0 + 16, text, anchor="middle", fill=AXIS)}</g>')
    out.append(f'<line x1="{_f(scale.start)}" x2="{_f(scale.end)}" y1="{_f(y0)}" y2="{_f(y0)}" stroke="{AXIS}"/>')
    out.append(_text((scale.start + scale.end) / 2, y0 + 34, label + (" (log scale)" if scale.log else ""),
                     anchor="middle", fill=AXIS))
    return out


LEGEND_Y, LEGEND_ROW = 36, 18


def _legend(items: list[tuple[str, str]], x0: float, x_max: float) -> tuple[list[str], float]:
    """Legend under the title from x0, wrapping before x_max; items are (14 px swatch svg, label).
    Returns the svg parts and the y below the legend, where the plot area may start."""
    out, x, y = [], x0, LEGEND_Y
    for swatch, label in items:
        w = len(label) * CHAR_PX + 34
        if x > x0 and x + w > x_max:
            x, y = x0, y + LEGEND_ROW
        out.append(f'<g class="legend" transform="translate({_f(x)},{_f(y)})">{swatch}{_text(18, 11, label, fill=AXIS)}</g>')
        x += w
    return out, (y + LEGEND_ROW + 14 if items else LEGEND_Y + 8)


def _swatch_line(colour: str, dash: str = "") -> str:
    return f'<line x1="0" x2="14" y1="7" y2="7" stroke="{colour}" stroke-width="2.5"{dash}/>'


def _diamond(cx: float, cy: float, r: float = 5.0) -> str:
    return f"M{_f(cx)},{_f(cy - r)} L{_f(cx + r)},{_f(cy)} L{_f(cx)},{_f(cy + r)} L{_f(cx - r)},{_f(cy)} Z"


def _clip(label: str, max_chars: int) -> str:
    return label if len(label) <= max_chars else "…" + label[-(max_chars - 1):]


# ---------------------------------------------------------------- generic charts


def bar_chart(kind: str, title: str, categories: list[str], values: list[float], colours: list[str], *,
              y_label: str, base: float = 0.0, errors: list[float | None] | None = None,
              markers: list[float | None] | None = None, marker_label: str = "",
              threshold: float | None = None, threshold_label: str = "", log: bool | None = None) -> str:
    """Vertical bars from ``base`` (or the bottom of a log axis) to each value, with optional
    ±error whiskers, a diamond marker per bar (e.g. p99) and a dashed threshold (the budget)."""
    width, height = 600, 360
    left, right = 78, 20
    band = (width - left - right) / len(categories)
    rotate = max(len(c) for c in categories) * CHAR_PX > band - 6  # names would collide: slant them
    bottom = 40 + (round(min(max(len(c) for c in categories), 16) * CHAR_PX * 0.5) if rotate else 0)
    legend = []
    if markers and any(m is not None for m in markers):
        legend.append((f'<path d="{_diamond(7, 7)}" fill="#222"/>', marker_label))
    if errors and any(errors):
        legend.append(('<path d="M7,1 V13 M3,1 H11 M3,13 H11" stroke="#222" fill="none"/>', "± 1 standard error"))
    if threshold is not None:
        legend.append((_swatch_line("#C00", ' stroke-dasharray="4 3"'), threshold_label))
    body, top = _legend(legend, left, width - right)
    extra = [m for m in markers or [] if m is not None] + [threshold] + [v + (e or 0) for v, e in zip(values, errors or [])]
    if log is None:
        log = wants_log([*values, *extra])
    scale = make_scale(values, height - bottom, top, include=extra + ([] if log else [base]), log=log)
    body += _value_axis_y(scale, left, width - right, y_label)
    y_base = scale(scale.lo if scale.log else base)
    for i, (name, v, colour) in enumerate(zip(categories, values, colours)):
        cx = left + band * (i + 0.5)
        if v is not None:
            y = scale(v)
            bw = min(60.0, band * 0.6)
            body.append(f'<rect class="bar" data-label="{escape(name)}" data-value="{v!r}" x="{_f(cx - bw / 2)}" '
                        f'y="{_f(min(y, y_base))}" width="{_f(bw)}" height="{_f(abs(y_base - y))}" fill="{colour}">'
                        f"<title>{escape(name)}: {num(v)}</title></rect>")
            err = errors[i] if errors else None
            if err:
                ya, yb = scale(v - err), scale(v + err)
                body.append(f'<path class="err" d="M{_f(cx)},{_f(ya)} V{_f(yb)} M{_f(cx - 5)},{_f(ya)} H{_f(cx + 5)} '
                            f'M{_f(cx - 5)},{_f(yb)} H{_f(cx + 5)}" stroke="#222" fill="none"/>')
            above = min(y, y_base, scale(v + err) if err else y)
            body.append(_text(cx, above - 5 if v >= base or scale.log else y + 14, num(v), anchor="middle", size=11,
                              fill="#222", halo=True))
        m = markers[i] if markers else None
        if m is not None:
            body.append(f'<path class="marker" data-value="{m!r}" d="{_diamond(cx, scale(m))}" fill="#222">'
                        f"<title>{escape(name)} {escape(marker_label)}: {num(m)}</title></path>")
        if rotate:
            x, y = cx + 4, height - bottom + 14
            body.append(f'<text x="{_f(x)}" y="{_f(y)}" text-anchor="end" transform="rotate(-30 {_f(x)} {_f(y)})">'
                        f"{escape(_clip(name, 16))}</text>")
        else:
            body.append(_text(cx, height - bottom + 18, _clip(name, 16), anchor="middle"))
    if threshold is not None:
        y = scale(threshold)
        body.append(f'<line class="threshold" data-value="{threshold!r}" x1="{left}" x2="{_f(width - right)}" '
                    f'y1="{_f(y)}" y2="{_f(y)}" stroke="#C00" stroke-width="1.5" stroke-dasharray="6 4"/>')
    return _svg(kind, width, height, title, body)


def line_chart(kind: str, title: str, xs: list[list[int]], series: list[tuple[str, list[float], str]], *,
               x_label: str, y_label: str, log: bool | None = None, x_log: bool = False) -> str:
    """One polyline per series (name, ys, colour) over integer x positions ``xs[i]`` (``x_log``: a log10
    x axis, for counts that grow geometrically)."""
    width, height = 600, 340
    left, right, bottom = 78, 24, 52
    body, top = _legend([(_swatch_line(c), n) for n, _, c in series], left, width - right)
    all_x = [x for row in xs for x in row]
    all_y = [y for _, ys, _ in series for y in ys if y is not None]
    sx = make_scale(all_x, left, width - right, integer=not x_log, log=x_log, exact=True)
    sy = make_scale(all_y, height - bottom, top, log=log)
    body += _value_axis_y(sy, left, width - right, y_label) + _value_axis_x(sx, height - bottom, top, x_label)
    for (name, ys, colour), row in zip(series, xs):
        pts = [(sx(x), sy(y)) for x, y in zip(row, ys) if y is not None]
        coords = " ".join(f"{_f(px)},{_f(py)}" for px, py in pts)
        body.append(f'<polyline class="series" data-series="{escape(name)}" points="{coords}" fill="none" '
                    f'stroke="{colour}" stroke-width="2.2" stroke-linejoin="round"/>')
        if len(pts) <= 40:
            body += [f'<circle class="pt" cx="{_f(px)}" cy="{_f(py)}" r="3" fill="{colour}"/>' for px, py in pts]
    return _svg(kind, width, height, title, body)


def hbar_chart(kind: str, title: str, labels: list[str], values: list[float], colour: str, *, x_label: str) -> str:
    """Horizontal bars from zero, one row per (monospace) label, longest first as given."""
    row, top, bottom, right = 22, 40, 48, 70
    left = min(max(len(s) for s in labels) * MONO_CHAR_PX + 16, 320) if labels else 100
    width, height = max(640, left + 360), top + row * len(labels) + bottom
    scale = make_scale(values, left, width - right, include=[0.0], log=False)
    body = _value_axis_x(scale, height - bottom, top, x_label)
    max_chars = int((left - 16) / MONO_CHAR_PX)
    for i, (name, v) in enumerate(zip(labels, values)):
        y = top + i * row
        body.append(f'<rect class="bar" data-label="{escape(name)}" data-value="{v!r}" x="{_f(scale(0.0))}" y="{_f(y + 4)}" '
                    f'width="{_f(scale(v) - scale(0.0))}" height="{row - 8}" fill="{colour}"><title>{escape(name)}: {num(v)}</title></rect>')
        body.append(_text(left - 8, y + row / 2 + 4, _clip(name, max_chars), anchor="end", size=11, mono=True))
        body.append(_text(scale(v) + 4, y + row / 2 + 4, num(v), size=11, fill="#222"))
    return _svg(kind, width, height, title, body)


def heat_colour(t: float) -> str:
    """Colour for t in [0, 1] interpolated along HEAT_STOPS."""
    t = min(max(t, 0.0), 1.0)
    for (t0, c0), (t1, c1) in zip(HEAT_STOPS, HEAT_STOPS[1:]):
        if t <= t1:
            u = (t - t0) / (t1 - t0)
            return "#" + "".join(f"{round(a + (b - a) * u):02x}" for a, b in zip(c0, c1))
    return "#" + "".join(f"{c:02x}" for c in HEAT_STOPS[-1][1])


def heatmap(kind: str, title: str, rows: list[tuple[str, list[tuple[float, str]]]], *, vmax: float,
            x_label: str, colour_label: str) -> str:
    """Rows of cells (value, tooltip); each row's cells share the full width. Colour = value/vmax;
    the colour bar labels value k as 10^k× (values are log10 ratios)."""
    row, top, bottom, bar_w = 24, 66, 52, 130
    left = min(max(len(label) for label, _ in rows) * MONO_CHAR_PX + 16, 320)
    width = max(760, left + 520 + bar_w)
    height = max(top + row * len(rows) + bottom, top + 170)
    x0, x1 = left, width - bar_w - 10
    body = []
    max_chars = int((left - 16) / MONO_CHAR_PX)
    for i, (label, cells) in enumerate(rows):
        y = top + i * row
        cw = (x1 - x0) / len(cells)
        parts = [f'<rect class="cell" data-value="{v!r}" x="{_f(x0 + j * cw)}" y="{_f(y)}" width="{_f(cw + 0.4)}" '
                 f'height="{row - 2}" fill="{heat_colour(v / vmax)}"><title>{escape(tip)}</title></rect>'
                 for j, (v, tip) in enumerate(cells)]
        body.append(f'<g class="heat-row" data-label="{escape(label)}">{"".join(parts)}</g>')
        body.append(_text(x0 - 8, y + row / 2 + 3, _clip(label, max_chars), anchor="end", size=11, mono=True))
    y_end = top + row * len(rows)
    for frac, text in [(0.0, "first"), (0.5, "middle"), (1.0, "last")]:
        x = x0 + frac * (x1 - x0)
        body.append(f'<line x1="{_f(x)}" x2="{_f(x)}" y1="{_f(y_end)}" y2="{_f(y_end + 5)}" stroke="{AXIS}"/>')
        body.append(_text(x, y_end + 18, text, anchor="middle", fill=AXIS))
    body.append(_text((x0 + x1) / 2, y_end + 36, x_label, anchor="middle", fill=AXIS))
    # colour bar
    bx, by, bh, steps = width - bar_w + 20, top + 4, 140, 30
    for k in range(steps):
        t = (k + 0.5) / steps
        body.append(f'<rect x="{bx}" y="{_f(by + bh * (1 - (k + 1) / steps))}" width="16" height="{_f(bh / steps + 0.4)}" '
                    f'fill="{heat_colour(t)}"/>')
    for k in range(int(vmax) + 1):
        y = by + bh * (1 - k / vmax)
        body.append(f'<g class="tick" data-value="{k}">{_text(bx + 22, y + 4, f"{10 ** k:g}×", fill=AXIS)}</g>')
    body.append(_text(bx - 4, by - 12, colour_label, anchor="start", fill=AXIS, size=11))
    return _svg(kind, width, height, title, body)


def scatter(kind: str, title: str, points: list[tuple[float, float, str]], colour: str, *,
            x_label: str, y_label: str, threshold: float | None = None, threshold_label: str = "") -> str:
    """Points (x, y, label) numbered 1..n in the given order; the full labels are in each point's
    tooltip and in the table the caller prints next to the chart (long labels would overlap)."""
    width, height = 600, 340
    left, right, bottom = 78, 30, 52
    legend = [(_swatch_line("#C00", ' stroke-dasharray="4 3"'), threshold_label)] if threshold is not None else []
    body, top = _legend(legend, left, width - right)
    sx = make_scale([p[0] for p in points], left, width - right, log=False)
    sy = make_scale([p[1] for p in points], height - bottom, top, include=[threshold])
    body += _value_axis_y(sy, left, width - right, y_label) + _value_axis_x(sx, height - bottom, top, x_label)
    if threshold is not None:
        y = sy(threshold)
        body.append(f'<line class="threshold" data-value="{threshold!r}" x1="{left}" x2="{_f(width - right)}" '
                    f'y1="{_f(y)}" y2="{_f(y)}" stroke="#C00" stroke-width="1.5" stroke-dasharray="6 4"/>')
    for i, (x, y, label) in enumerate(points, 1):
        px, py = sx(x), sy(y)
        body.append(f'<circle class="point" data-value="{y!r}" cx="{_f(px)}" cy="{_f(py)}" r="5" fill="{colour}">'
                    f"<title>{i}. {escape(label)}: {num(x)}, {num(y)}</title></circle>")
        body.append(_text(px + 8, py - 6, str(i), size=11, weight="600"))
    return _svg(kind, width, height, title, body)


# ---------------------------------------------------------------- the report's charts


def budget_limit(report: dict, metric: str) -> tuple[float, str] | None:
    """(value, legend text) of an upper-bound budget on ``metric``, if the budget has one."""
    for b in report.get("budget") or []:
        if b.get("metric") == metric and b.get("op") in ("<=", "<"):
            return b["value"], f"budget {metric} {'≤' if b['op'] == '<=' else '<'} {num(b['value'])}"
    return None


def _with(report: dict, get) -> list[dict]:
    return [f for f in report.get("formats") or [] if get(f) is not None]


def kld_plot(report: dict, colours: dict[str, str]) -> str:
    fmts = _with(report, lambda f: (f.get("kld") or {}).get("mean"))
    if not fmts:
        return ""
    limit = budget_limit(report, "kld")
    return bar_chart("kld", "Mean KL divergence from the baseline, per format", [f["name"] for f in fmts],
                     [f["kld"]["mean"] for f in fmts], [colours[f["name"]] for f in fmts],
                     y_label="KLD (nats/token)", errors=[f["kld"].get("unc") for f in fmts],
                     markers=[f["kld"].get("p99") for f in fmts], marker_label="p99 of per-token KLD",
                     threshold=limit and limit[0], threshold_label=limit[1] if limit else "")


def ppl_ratio_plot(report: dict, colours: dict[str, str]) -> str:
    fmts = _with(report, lambda f: f.get("ppl_ratio"))
    if not fmts:
        return ""
    limit = budget_limit(report, "ppl_ratio")
    errors = [ppl_ratio_unc(f) for f in fmts]
    return bar_chart("ppl_ratio", "Perplexity ratio to the baseline (bars start at 1)", [f["name"] for f in fmts],
                     [f["ppl_ratio"] for f in fmts], [colours[f["name"]] for f in fmts],
                     y_label="PPL(quantized) / PPL(baseline)", base=1.0, errors=errors, log=False,
                     threshold=limit and limit[0], threshold_label=limit[1] if limit else "")


def depth_plot(report: dict, colours: dict[str, str], key: str) -> str:
    """drift_rel or cosine of the hidden state after each decoder layer, one line per format."""
    fmts = [f for f in report.get("formats") or [] if f.get("decoder_layers")]
    if not fmts:
        return ""
    titles = {"drift_rel": ("drift", "Relative hidden-state drift across depth", "‖h_q − h‖ / ‖h‖"),
              "cosine": ("cosine", "Cosine similarity of hidden states across depth", "cos(h_q, h)")}
    kind, title, y_label = titles[key]
    xs = [[d["index"] for d in f["decoder_layers"]] for f in fmts]
    series = [(f["name"], [d.get(key) for d in f["decoder_layers"]], colours[f["name"]]) for f in fmts]
    return line_chart(kind, title, xs, series, x_label="decoder layer (output of)", y_label=y_label,
                      log=False if key == "cosine" else None)


def survival_plot(report: dict, colours: dict[str, str]) -> str:
    """--generate: the share of prompts whose continuation is still identical to the baseline's after t tokens."""
    fmts = [f for f in report.get("formats") or [] if f.get("generation")]
    if not fmts:
        return ""
    xs = [list(range(len(f["generation"]["survival"]))) for f in fmts]
    series = [(f["name"], f["generation"]["survival"], colours[f["name"]]) for f in fmts]
    return line_chart("survival", "Generation: prompts still identical to the baseline", xs, series,
                      x_label="generated tokens", y_label="share identical", log=False)


def sensitivity_plot(fmt: dict, top: list[dict], colour: str) -> str:
    top = [x for x in top if x.get("sensitivity_kld") is not None]
    if not top:
        return ""
    return hbar_chart("sensitivity", f"{fmt['name']}: most sensitive layers", [x["name"] for x in top],
                      [x["sensitivity_kld"] for x in top], colour,
                      x_label="KLD when only this layer is quantized (nats/token)")


def bucket_max(values: list[float], n_columns: int = HEATMAP_COLUMNS) -> list[tuple[int, int, float]]:
    """Split channels into ≤ n_columns contiguous ranges [lo, hi) and keep each range's max."""
    n = min(n_columns, len(values))
    edges = [len(values) * j // n for j in range(n + 1)]
    return [(lo, hi, max(values[lo:hi])) for lo, hi in zip(edges, edges[1:])]


def outlier_heatmap(report: dict) -> str:
    entries = [o for o in ordered_outliers(report) if o.get("channel_max") and o.get("median_channel_max")]
    if not entries:
        return ""
    rows, top_log = [], 0.0
    for o in entries:
        med = o["median_channel_max"]
        cells = []
        for lo, hi, mx in bucket_max(o["channel_max"]):
            value = math.log10(mx / med) if mx > 0 else 0.0
            top_log = max(top_log, value)
            span = f"channel {lo}" if hi - lo == 1 else f"channels {lo}–{hi - 1}"
            cells.append((max(value, 0.0), f"{o['name']} {span}: max {num(mx)} = {num(mx / med)}× median"))
        flag = "⚠ " if o.get("flag") not in (None, "ok") else ""
        rows.append((f"{flag}{o['name']}", cells))
    vmax = max(1.0, math.ceil(top_log))
    return heatmap("outliers", "Activation outliers: per-channel abs-max of each linear input, relative to its median",
                   rows, vmax=vmax, x_label=f"input channels, in order (≤ {HEATMAP_COLUMNS} buckets per row, max per bucket)",
                   colour_label="max ÷ median")


def autotune_plot(report: dict) -> str:
    curve = [p for p in (report.get("autotune") or {}).get("curve") or []
             if p.get("weight_bytes") is not None and p.get("kld") is not None]
    if not curve:
        return ""
    limit = budget_limit(report, "kld")
    return scatter("autotune", "Weight size vs mean KLD (autotune candidates)",
                   [(p["weight_bytes"] / 1e6, p["kld"], str(p.get("label", ""))) for p in curve], PALETTE[0],
                   x_label="weights (MB)", y_label="mean KLD (nats/token)",
                   threshold=limit and limit[0], threshold_label=limit[1] if limit else "")


def frontier_entries(advice: dict) -> list[dict]:
    """The advisor's entries (recommended first, then rejected) that have both a speed estimate and an audit KLD."""
    return [r for r in (advice.get("recommendations") or []) + (advice.get("rejected") or [])
            if (r.get("audit") or {}).get("kld_mean") is not None and r.get("decode_tokens_per_s") is not None]


def frontier_plot(report: dict) -> str:
    """``audit --gpu``: each audited format the GPU runs, recommended or not, at its estimated decode
    tokens/s there (the advisor's roofline) against its measured mean KLD: the accuracy-speed frontier,
    the budget as a line."""
    advice = report.get("advice") or {}
    points = [(r["decode_tokens_per_s"], r["audit"]["kld_mean"], f"{r['format']} (KV {r.get('kv_cache')})")
              for r in frontier_entries(advice)]
    if not points:
        return ""
    gpu = (advice.get("gpu") or {}).get("name", "GPU")
    limit = budget_limit(report, "kld")
    return scatter("frontier", f"Estimated decode tokens/s on {gpu} vs measured mean KLD", points, PALETTE[1],
                   x_label=f"decode tokens/s, batch {(advice.get('workload') or {}).get('batch', '?')} (roofline)",
                   y_label="mean KLD (nats/token)", threshold=limit and limit[0], threshold_label=limit[1] if limit else "")
