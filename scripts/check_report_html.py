#!/usr/bin/env python3
"""Check a quantaudit HTML report in headless Chromium: it renders, holds its charts, fetches nothing.

    scripts/check_report_html.py REPORT.html OUT.png [--chromium /usr/bin/chromium] [--height 3000]

1. Static: the file contains no URL, script, stylesheet link, image, frame or CSS url()/@import,
   and its tags balance (html.parser).
2. Chromium ``--dump-dom``: the DOM the browser built holds every chart listed in
   ``<meta name="quantaudit-plots">`` with the same number of marks (bars, lines, points,
   heatmap cells) as the file, i.e. the browser parsed the markup the way we wrote it.
3. Chromium ``--screenshot``: OUT.png is written at the window size (look at it).
4. Network: both runs use ``--host-resolver-rules="MAP * ~NOTFOUND"`` so no host name resolves
   (nothing can leave the machine), and ``--log-net-log`` records every URL request Chromium
   starts. A request the page made carries the document as initiator (a file:// page has the
   opaque origin "null") and a file:// network isolation key; Chromium's own background requests
   (component updater, time and account pings, which it makes even with
   --disable-background-networking) have initiator "not an origin" and are only counted. Any
   page-initiated request to a non-local scheme fails the check. The net log is the browser's own
   record, so this does not depend on log verbosity or on the request succeeding.

Exit status 0 when every check passes, 1 otherwise; one line per finding.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import struct
import subprocess
import sys
import tempfile
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars", '--host-resolver-rules=MAP * ~NOTFOUND']
LOCAL_SCHEMES = ("file:", "data:", "about:", "blob:", "chrome:", "chrome-extension:", "devtools:")
FORBIDDEN = [("http://", "http:// URL"), ("https://", "https:// URL"), ("<script", "<script> element"),
             ("<link", "<link> element"), ("<img", "<img> element"), ("<iframe", "<iframe>"), ("<object", "<object>"),
             ("<embed", "<embed>"), ("url(", "CSS url()"), ("@import", "CSS @import"), ("src=", "src= attribute"),
             ("<use", "<use> (may reference outside)")]
HREF = re.compile(r"""\bhref\s*=\s*["']?(?!#)""", re.I)
VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}
MARKS = ("bar", "series", "point", "cell", "marker", "heat-row")


class ReportParser(HTMLParser):
    """Collects tag-balance problems, the plot list in the meta tag, and the marks in each <svg class="plot">."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.problems: list[str] = []
        self.meta_plots: Counter = Counter()
        self.plots: list[tuple[str, Counter]] = []  # (data-plot, marks by class) in document order

    def handle_starttag(self, tag, attrs, closed=False):
        a = dict(attrs)
        if tag == "meta" and a.get("name") == "quantaudit-plots":
            for item in filter(None, (a.get("content") or "").split(";")):
                kind, n = item.split("=")
                self.meta_plots[kind] = int(n)
        if tag == "svg" and "plot" in (a.get("class") or "").split():
            self.plots.append((a.get("data-plot", "?"), Counter()))
        elif self.plots and "svg" in self.stack:
            for cls in (a.get("class") or "").split():
                if cls in MARKS:
                    self.plots[-1][1][cls] += 1
        if not closed and tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.handle_starttag(tag, attrs, closed=True)

    def handle_endtag(self, tag):
        if tag in VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            self.problems.append(f"unbalanced </{tag}> (open: {'/'.join(self.stack[-4:]) or 'nothing'}) at line {self.getpos()[0]}")
            if tag in self.stack:
                while self.stack.pop() != tag:
                    pass
            return
        self.stack.pop()

    def close(self):
        super().close()
        if self.stack:
            self.problems.append(f"unclosed tags at end: {'/'.join(self.stack)}")


def parse(text: str) -> ReportParser:
    parser = ReportParser()
    parser.feed(text)
    parser.close()
    return parser


def static_problems(text: str) -> list[str]:
    lower = text.lower()
    found = [f"contains {what}" for needle, what in FORBIDDEN if needle in lower]
    if HREF.search(text):
        found.append("contains an href that is not a same-page #anchor")
    return found


def plot_summary(p: ReportParser) -> list[tuple[str, dict]]:
    return [(kind, dict(sorted(marks.items()))) for kind, marks in p.plots]


def page_requests(netlog_path: Path) -> tuple[list[str], int]:
    """(non-local URLs the page requested, number of Chromium-internal requests ignored)."""
    log = json.loads(netlog_path.read_text())
    start_job = log["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"]
    page, internal = set(), set()
    for event in log.get("events", []):
        params = event.get("params") or {}
        if event.get("type") != start_job or "url" not in params:
            continue
        url = params["url"]
        if url.startswith(LOCAL_SCHEMES):
            continue
        from_page = params.get("initiator") not in (None, "not an origin") or "file://" in str(params.get("network_isolation_key"))
        (page if from_page else internal).add(url)
    return sorted(page), len(internal)


def run_chromium(chromium: str, html: Path, extra: list[str], netlog: Path, timeout: float) -> subprocess.CompletedProcess:
    """One headless Chromium run in its own process group, so a hung run is ended with all its
    helper processes (zygotes, GPU, network service) and nothing else."""
    with tempfile.TemporaryDirectory(prefix="qa-chromium-") as profile:
        cmd = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--log-net-log={netlog}", *extra,
               html.resolve().as_uri()]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            err += f"\n(killed after {timeout:.0f} s)"
        return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    if head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        raise ValueError(f"{path} is not a PNG")
    return struct.unpack(">II", head[16:24])


def check(html: Path, png: Path, chromium: str = CHROMIUM, width: int = 1400, height: int = 3000,
          timeout: float = 120.0) -> list[str]:
    """All findings (empty list = the report passed every check)."""
    text = html.read_text(encoding="utf-8")
    problems = static_problems(text)
    source = parse(text)
    problems += [f"source: {p}" for p in source.problems]
    kinds = Counter(kind for kind, _ in source.plots)
    if kinds != source.meta_plots:
        problems.append(f"source: charts {dict(kinds)} differ from the meta list {dict(source.meta_plots)}")
    with tempfile.TemporaryDirectory(prefix="qa-netlog-") as tmp:
        dom_log, shot_log = Path(tmp) / "dom.json", Path(tmp) / "shot.json"
        dom_run = run_chromium(chromium, html, ["--dump-dom"], dom_log, timeout)
        if dom_run.returncode != 0 or "<svg" not in dom_run.stdout:
            return problems + [f"chromium --dump-dom failed (exit {dom_run.returncode}): {dom_run.stderr.strip()[-400:]}"]
        dom = parse(dom_run.stdout)
        if plot_summary(dom) != plot_summary(source):
            problems.append(f"DOM charts differ from the file: DOM {plot_summary(dom)} vs file {plot_summary(source)}")
        png.unlink(missing_ok=True)
        shot_run = run_chromium(chromium, html, [f"--screenshot={png.resolve()}", f"--window-size={width},{height}"],
                                shot_log, timeout)
        if shot_run.returncode != 0 or not png.exists():
            problems.append(f"chromium --screenshot failed (exit {shot_run.returncode}): {shot_run.stderr.strip()[-400:]}")
        elif png_size(png) != (width, height):
            problems.append(f"screenshot is {png_size(png)}, expected {(width, height)}")
        internal = 0
        for log in (dom_log, shot_log):
            if not log.exists():
                problems.append(f"chromium wrote no net log {log.name}: network use unverified")
                continue
            urls, n = page_requests(log)
            internal += n
            problems += [f"page requested {u}" for u in urls]
    print(f"charts in DOM: {dict(Counter(k for k, _ in dom.plots))}; chromium-internal requests ignored: {internal}")
    return problems


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("html", type=Path)
    ap.add_argument("png", type=Path)
    ap.add_argument("--chromium", default=CHROMIUM)
    ap.add_argument("--width", type=int, default=1400)
    ap.add_argument("--height", type=int, default=3000)
    args = ap.parse_args(argv)
    if not args.html.is_file():
        print(f"error: {args.html} not found", file=sys.stderr)
        return 2
    if not Path(args.chromium).exists():
        print(f"error: {args.chromium} not found (apt-get install chromium)", file=sys.stderr)
        return 2
    problems = check(args.html, args.png, args.chromium, args.width, args.height)
    for p in problems:
        print(f"FAIL: {p}")
    if not problems:
        print(f"OK: {args.html} renders offline with all its charts; screenshot {args.png}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
