"""``quantaudit calib-check``: what calibration costs, per format, measured; and when it does not matter.

For each calibration set (``--calib`` and every ``--calib2``) and each of ``--formats``: quantize with that
set and measure the KLD on ``--eval`` against one baseline pass (the audit's baseline cache). From the
per-token KLDs (:mod:`.verdict`): which formats are calibration-sensitive on this text (some pair of sets
more than two paired standard errors apart) and, only for those, which set is best and worst; and for
``--calib``, the KLD after 1, 4, 16, 64 samples (``--sample-counts``, up to what the set holds), with the
count where the curve flattens. The coverage figures of :mod:`.coverage` stay beside the measurement as
explanations, and the result says whether they predicted the measured order.

Exit code 3 when the measurement says ``--calib`` is not good enough: another set measured significantly
better for some format, or its own curve still improving at the largest count. Coverage never decides it.
"""

from __future__ import annotations

import argparse
import filecmp
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from ..cluster import ClusterSettings
from ..errors import EXIT_BUDGET_FAILED, EXIT_OK, UserError
from ..progress import console
from ..quant.formats import get_format
from ..session import EvalSettings, add_arguments, flag

# The calibration-dependent formats of the audit's default list, and int8_sq_static (ModelOpt's int8_sq).
CALIBRATED_FORMATS = ["int4_awq", "int4_gptq", "w4a8_awq", "int8_sq_static", "fp8"]
SAMPLE_COUNTS = ["1", "4", "16", "64"]


@dataclass
class CalibCheckSettings(EvalSettings, ClusterSettings):
    calib2: list[str] = flag("--calib2", [], "further calibration texts to compare with --calib (one or more files; "
                             "the flag may repeat)", nargs="+", action="extend", metavar="FILE")
    formats: list[str] = flag("--formats", CALIBRATED_FORMATS, "formats quantized with every set, comma-separated "
                              "(default: the calibration-dependent ones, %(default)s)", metavar="LIST")
    sample_counts: list[str] = flag("--sample-counts", SAMPLE_COUNTS, "calibration samples of --calib for the "
                                    "sample-count curve, up to what it holds (--calib-size); 'none' skips the curve "
                                    "(default: %(default)s)", metavar="LIST")
    curve_formats: list[str] = flag("--curve-formats", [], "formats whose sample-count curve is measured "
                                    "(default: every one of --formats)", metavar="LIST")
    batch_size: int | None = flag("--batch-size", 4, "windows per forward (default: %(default)s)", type=int)

    def check(self) -> None:
        super().check()
        if not self.formats:
            raise UserError("--formats is empty: name at least one format, e.g. --formats fp8,int4_awq")
        for name in [*self.formats, *self.curve_formats]:
            if get_format(name).weight is None:
                raise UserError(f"--formats {name}: the unquantized baseline has nothing to calibrate; name a quantized format")
        if unknown := [f for f in self.curve_formats if f not in self.formats]:
            raise UserError(f"--curve-formats {','.join(unknown)} not in --formats: a curve needs the format's table entry")
        self.counts()
        sets = self.calib_sets()
        for i, a in enumerate(sets):
            for b in sets[i + 1:]:
                if _same_file(a, b):
                    raise UserError(f"--calib2 {b} is the same file as {a}: give two or more different calibration "
                                    "sets to compare")

    def counts(self) -> list[int]:
        """``--sample-counts`` as integers (empty: no curve)."""
        if [c.lower() for c in self.sample_counts] == ["none"]:
            return []
        try:
            counts = sorted({int(c) for c in self.sample_counts})
        except ValueError:
            raise UserError(f"--sample-counts {','.join(self.sample_counts)}: give whole numbers, e.g. 1,4,16,64, or "
                            "none") from None
        if counts and counts[0] < 1:
            raise UserError(f"--sample-counts must be at least 1 (got {counts[0]})")
        return counts

    def calib_sets(self) -> list[str | None]:
        """``--calib`` then every ``--calib2`` (None: the embedded calibration text)."""
        return [self.calib, *self.calib2]


def _same_file(a: str | None, b: str | None) -> bool:
    if a is None or b is None:
        return a is b
    pa, pb = Path(a), Path(b)
    return pa.resolve() == pb.resolve() or (pa.is_file() and pb.is_file() and filecmp.cmp(pa, pb, shallow=False))


def _labels(sources: list[str]) -> list[str]:
    """Short unique names for the sets: the file names, or the whole sources where two names collide."""
    names = [Path(s).name for s in sources]
    return names if len(set(names)) == len(names) else list(sources)


@dataclass
class _Set:
    label: str
    windows: object  # data.Windows


def _load_sets(s: CalibCheckSettings, session) -> tuple[list[_Set], list[str]]:
    """Every calibration set, tokenized (a set shorter than one sample is refused by ``load_windows``, naming
    the file and its tokens), and the warnings about them."""
    from ..data import load_windows

    windows = [session.calib] + [load_windows(path, session.tokenizer, s.calib_seq, s.calib_size, s.bos, role="calib")
                                 for path in s.calib2]
    warnings = []
    for w in windows:
        if w.n < s.calib_size:
            warnings.append(f"{w.source} holds {w.n} samples of {s.calib_seq} tokens, fewer than --calib-size "
                            f"{s.calib_size}: it is compared with what it has")
    for path in s.calib_sets():
        if _same_file(path, s.eval) and path is not None:
            warnings.append(f"{path} is also the --eval text: the measurement is in-sample (calibrated on the very "
                            "tokens it is scored on)")
    return [_Set(label, w) for label, w in zip(_labels([w.source for w in windows]), windows)], warnings


def _measure(lm, spec, calib, baseline, eval_windows, batch_size) -> tuple[dict, object]:
    """Quantize ``lm`` as ``spec`` with ``calib`` and compare with the baseline: the summary and per-token KLDs."""
    from ..evaluate import compare_to_baseline
    from ..metrics import PairedAccumulator
    from ..quant import quantize

    qm = quantize(lm.model, spec, calib)
    acc = PairedAccumulator()
    stats = compare_to_baseline(baseline, qm.model, eval_windows, batch_size=batch_size, acc=acc)
    summary = {"kld": stats["kld"]["mean"], "kld_unc": stats["kld"]["unc"], "ppl_ratio": stats["ppl_ratio"],
               "top1": stats["top1"], "quantize_seconds": qm.seconds}
    return summary, acc.per_token("kld")


@dataclass(frozen=True)
class Job:
    """One quantize-and-measure: ``format`` calibrated on set ``set`` (its index: --calib is 0), on its first
    ``samples`` samples (None: all of them)."""

    format: str
    set: int
    samples: int | None = None

    @property
    def name(self) -> str:
        return f"{self.format}.set{self.set}" + ("" if self.samples is None else f".first{self.samples}")


def _jobs(s: CalibCheckSettings, n_sets: int, calibrated: dict[str, bool], counts: list[int]) -> list[Job]:
    """Every set x format (once for a format that reads no calibration), then the curves' smaller counts."""
    jobs = [Job(name, i) for name in s.formats for i in range(n_sets if calibrated[name] else 1)]
    curves = [name for name in (s.curve_formats or s.formats) if calibrated[name]]
    return jobs + [Job(name, 0, count) for name in curves for count in counts[:-1]]


def _label(job: Job, sets: list[_Set]) -> str:
    where = sets[job.set].label
    return where if job.samples is None else f"the first {job.samples} sample(s) of {where}"


def _run_here(jobs: list[Job], lm, sets: list[_Set], baseline, eval_windows, s: CalibCheckSettings) -> dict:
    """The jobs one after another in this process, on the model it holds."""
    results = {}
    for job in jobs:
        console.print(f"[bold]{job.format}[/bold] calibrated on {_label(job, sets)}")
        calib = sets[job.set].windows
        results[job] = _measure(lm, s.quant_spec(job.format), calib if job.samples is None else calib.subset(job.samples),
                                baseline, eval_windows, s.batch_size)
    return results


def run_job(s: CalibCheckSettings, job: Job, baseline_path: Path, attempts: Path) -> tuple[dict, object]:
    """One job in a Ray worker: the model and texts read again from the settings, the published baseline opened."""
    from ..baseline import open_shared_baseline
    from ..cluster import record_attempt
    from ..session import open_session

    record_attempt(attempts, job.name)
    one = replace(s, calib=s.calib_sets()[job.set], calib2=[])
    session = open_session(one)
    calib = session.calib if job.samples is None else session.calib.subset(job.samples)
    return _measure(session.lm, one.quant_spec(job.format), calib, open_shared_baseline(baseline_path), session.eval,
                    s.batch_size)


def _run_on_ray(jobs: list[Job], baseline, s: CalibCheckSettings) -> tuple[dict, dict]:
    """The jobs as Ray tasks (:mod:`quantaudit.cluster`); also what the result records of the run."""
    import tempfile

    from ..cluster import connected, run_description, run_jobs
    from ..models import cache_dir

    with tempfile.TemporaryDirectory(prefix="calib-check-jobs-", dir=cache_dir()) as attempts:
        with connected(s.ray, cache_dir()) as ray:
            settings = ray.put(s)
            arguments = {job.name: (settings, job, baseline.path, Path(attempts)) for job in jobs}
            by_name = {job.name: job for job in jobs}
            results = {by_name[name]: result for name, result in run_jobs(ray, run_job, arguments, device=s.device,
                                                                           what="calibration")}
            return results, run_description(s.ray, ray, Path(attempts), list(by_name))


def _curve_counts(requested: list[int], held: int) -> list[int]:
    """The requested counts the set can give, and the whole set as the last point."""
    return sorted({c for c in requested if c < held} | {held}) if requested else []


def calib_check(s: CalibCheckSettings, out: Path | None = None) -> dict:
    """Measure every set x format (and the sample-count curves); write DIR/calib_check.{json,md,html} with ``out``."""
    from ..evaluate import build_baseline
    from ..fileio import atomic_write_json, atomic_write_text, check_out_dir, output_dir
    from ..quant.plan import plan_units
    from ..report.calibcheck import render_calib_check_html, render_calib_check_markdown
    from ..session import open_session
    from .coverage import RANKING_RULE, coverage_prefers, set_coverage
    from .verdict import coverage_agreement

    s.check()  # every flag, before anything is read or written
    if out is not None:
        check_out_dir(out, force=True)  # calib_check.* are added to (or replaced in) the folder
    session = open_session(s)
    lm, eval_windows = session.lm, session.eval
    sets, warnings = _load_sets(s, session)
    calibrated = {name: session.check_spec(s.quant_spec(name)).calibrating for name in s.formats}
    for name, uses in calibrated.items():
        if not uses:
            warnings.append(f"{name} reads no calibration data (without a KV-cache format): every set gives the same "
                            "model, measured once")
    for w in warnings:
        console.print(f"[yellow]warning:[/yellow] {w}", highlight=False)

    s.use_shared_dir()  # with --ray: the baseline is published where every worker reads it
    baseline = build_baseline(lm, eval_windows, batch_size=s.batch_size)
    units = plan_units(lm.model)
    result = {"model": {"name": lm.name, "source": lm.source, "fingerprint": lm.fingerprint},
              "eval": eval_windows.describe(), "settings": asdict(s), "warnings": warnings, "sets": []}
    for cs in sets:
        w = cs.windows
        console.print(f"[bold]{cs.label}[/bold]: coverage of the eval text ({w.n} samples x {w.seq_len} tokens)")
        result["sets"].append({"label": cs.label, "source": w.source, "samples": w.n, "seq_len": w.seq_len,
                               "fingerprint": w.fingerprint,
                               "coverage": set_coverage(lm.model, units, w, eval_windows, s.batch_size)})
    coverage = {entry["label"]: entry["coverage"] for entry in result["sets"]}

    chosen = sets[0]
    counts = _curve_counts(s.counts(), chosen.windows.n)
    jobs = _jobs(s, len(sets), calibrated, counts)
    if s.ray:
        measured, result["ray"] = _run_on_ray(jobs, baseline, s)
    else:
        measured = _run_here(jobs, lm, sets, baseline, eval_windows, s)
    result["formats"] = [_format_entry(name, calibrated[name], sets, jobs, measured) for name in s.formats]

    def prefers(a: str, b: str) -> str:
        return (a, b)[coverage_prefers(coverage[a], coverage[b])[0]]

    result["coverage_prediction"] = coverage_agreement(result["formats"], prefers)
    result["ranking_rule"] = RANKING_RULE
    result["reasons"] = _reasons(result, chosen.label)
    result["verdict"] = "ok" if not result["reasons"] else "not the best measured"
    result["exit_code"] = EXIT_OK if not result["reasons"] else EXIT_BUDGET_FAILED
    if out is not None:
        with output_dir(out, merge=True) as work:
            atomic_write_json(work / "calib_check.json", result)
            atomic_write_text(work / "calib_check.md", render_calib_check_markdown(result))
            atomic_write_text(work / "calib_check.html", render_calib_check_html(result))
    return result


def _format_entry(name: str, calibrated: bool, sets: list[_Set], jobs: list[Job], measured: dict) -> dict:
    """One format's KLD per set, its verdict, and its sample-count curve on --calib (set 0) where measured."""
    from .verdict import flattening, sensitivity

    klds, per_token = {}, {}
    for i, cs in enumerate(sets):
        klds[cs.label], per_token[cs.label] = measured[Job(name, i if calibrated else 0)]
    entry = {"format": name, "uses_calibration": calibrated, "klds": klds, **sensitivity(per_token)}
    points = {job.samples: measured[job] for job in jobs if job.format == name and job.samples is not None}
    if points:
        points[sets[0].windows.n] = measured[Job(name, 0)]
        flat = flattening({count: per_count for count, (_, per_count) in points.items()})
        for point in flat["points"]:
            summary = points[point["samples"]][0]
            point.update(kld=summary["kld"], kld_unc=summary["kld_unc"])
        entry["curve"] = {"set": sets[0].label, **flat}
    return entry


def _reasons(result: dict, chosen: str) -> list[str]:
    """Why ``--calib`` (``chosen``) is measurably not good enough: another set better, or its curve still rising."""
    out = []
    for f in result["formats"]:
        for p in f["pairs"]:
            if p["significant"] and chosen in (p["a"], p["b"]) and p["better"] != chosen:
                diff = p["difference"] if p["a"] == p["better"] else -p["difference"]
                out.append(f"{f['format']}: {p['better']} measured better than {chosen} by {diff:.4g} ± {p['unc']:.2g} KLD")
        curve = f.get("curve")
        if curve and curve["still_improving"]:
            out.append(f"{f['format']}: {curve['verdict']}")
    return out


def kld_table(result: dict):
    """Format x set: KLD ± s.e., the verdict and the best/worst sets of the sensitive formats."""
    from rich.table import Table

    from ..report.calibcheck import verdict_text

    labels = [entry["label"] for entry in result["sets"]]
    table = Table(title=f"KLD on {result['eval']['source']} per calibration set (mean ± s.e.; pairs are judged on paired differences)")
    table.add_column("format")
    for label in labels:
        table.add_column(label, justify="right")
    table.add_column("verdict")
    for f in result["formats"]:
        cells = [f"{f['klds'][label]['kld']:.5f} ± {f['klds'][label]['kld_unc']:.5f}" for label in labels]
        table.add_row(f["format"], *cells, verdict_text(f))
    return table


def curve_table(result: dict):
    from rich.table import Table

    curves = [f for f in result["formats"] if f.get("curve")]
    if not curves:
        return None
    counts = [p["samples"] for p in curves[0]["curve"]["points"]]
    table = Table(title=f"KLD by calibration samples of {curves[0]['curve']['set']}")
    table.add_column("format")
    for c in counts:
        table.add_column(str(c), justify="right")
    table.add_column("where it flattens")
    for f in curves:
        points = {p["samples"]: p for p in f["curve"]["points"]}
        table.add_row(f["format"], *(f"{points[c]['kld']:.5f}" if c in points else "-" for c in counts),
                      f["curve"]["verdict"])
    return table


def add_calib_check_arguments(p: argparse.ArgumentParser) -> None:
    add_arguments(p, CalibCheckSettings)
    p.add_argument("--out", default=None, metavar="DIR", help="write DIR/calib_check.json, .md and .html")


def run_calib_check(args) -> int:
    s = CalibCheckSettings.from_args(args)
    result = calib_check(s, Path(args.out) if args.out else None)
    console.print(kld_table(result))
    if (table := curve_table(result)) is not None:
        console.print(table)
    console.print(f"coverage heuristics: {result['coverage_prediction']['verdict']}")
    colour = "green" if result["verdict"] == "ok" else "red"
    console.print(f"[{colour}]--calib {result['sets'][0]['label']}: {result['verdict']}[/{colour}]")
    for reason in result["reasons"]:
        console.print(f"  - {reason}")
    return result["exit_code"]
