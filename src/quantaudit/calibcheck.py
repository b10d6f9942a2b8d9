"""``quantaudit calib-check``: judge a calibration set against production-like text before quantizing.

A static activation scale (``fp8``, ``int8_sq_static``, ``w4a8_awq``) is ``max|x| / qmax`` over the
calibration text; every later activation above that maximum is clipped. So the first question
about a calibration set is how much of the production text's activations it covers. Measured on
the unquantized model, for each quantized linear input (one per group of linears that read the
same input and share a calibrated scale, as ``quantize()`` calibrates them):

* **range coverage**: the share of eval activation values above the calibration's per-tensor
  maximum (exactly what a static per-tensor scale clips), the share above their own channel's
  calibration maximum (what a per-channel smoothing scale was not fitted to), and the share of
  channels whose eval maximum exceeds the calibration one;
* **token coverage**: share of eval tokens that never occur in the calibration text, the
  Jensen-Shannon divergence of the two unigram distributions (bits, 0 = identical, 1 = disjoint),
  and the share of eval tokens at positions beyond the calibration sample length;
* **sample-count adequacy**: how much each input's calibration maximum still grew over the second
  half of the samples, and the median running maximum (as a share of the final one) after
  1, 2, 4, ... samples. Still growing at the end means too few samples;
* **the practical test**: quantize with the calibration set (and with ``--calib2``) to ``--format``
  (default ``fp8``, the static-activation format) and measure the KLD on the eval text.

"better" (with ``--calib2``) is decided from coverage alone, never from the KLD, so that the KLD is
an independent check of the ranking. The rule, in order: the lower share of clipped eval
activation values wins when the two differ by more than ``CLEAR_DIFFERENCE`` (relative) and the
larger is material (``MATERIAL_CLIP_SHARE``); else the lower unigram JS divergence wins when they
so differ; else the lower share of unseen eval tokens. The KLD check reports whether the measured
difference agrees, disagrees, or is within ``SIGNIFICANT_SIGMAS`` standard errors; the two KLDs
are measured on the same eval tokens against the same baseline, so the error is that of the
per-token paired difference (:func:`quantaudit.metrics.paired_difference`).

Activation maxima are collected with forward pre-hooks and
:class:`quantaudit.measure.outliers.Moments` (the outlier audit's per-channel maxima), over real
tokens only (padded positions of the eval windows are excluded).
"""

from __future__ import annotations

import argparse
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import EXIT_BUDGET_FAILED, EXIT_OK
from .progress import console
from .quant.formats import get_format
from .session import EvalSettings, add_arguments, flag

if TYPE_CHECKING:  # torch is imported when a command runs, not with the CLI
    import torch

CLIP_REASON_SHARE = 1e-3  # an input with more than 0.1 % of its eval values clipped is named
MATERIAL_CLIP_SHARE = 1e-5  # below 1 clipped value in 100,000 the clip shares cannot rank two sets
# Token figures depend on the sample size: a same-domain sample of 32 x 512 tokens (WikiText-2
# valid for WikiText-2 test, SmolLM2's 49k vocabulary) leaves ~30 % of eval tokens unseen at a JS
# divergence of ~0.43 bits; Penn Treebank for the same text gives ~46 % and ~0.61 bits (measured,
# bench/bench_calibcheck.py). The thresholds sit between the two.
UNSEEN_REASON_SHARE = 0.40
JS_REASON_BITS = 0.50
GROWTH_REASON = 0.05  # a maximum that grew > 5 % over the second half of the samples is still growing
GROWING_REASON_SHARE = 0.25  # ... reported when more than a quarter of the inputs are still growing
CLEAR_DIFFERENCE = 0.10  # relative difference for one coverage figure to decide "better"
SIGNIFICANT_SIGMAS = 2.0  # a KLD difference within 2 standard errors does not rank two sets
REASONS_SHOWN = 5


@dataclass
class CalibCheckSettings(EvalSettings):
    calib2: str | None = flag("--calib2", None, "an alternative calibration text to compare with", metavar="FILE")
    format: str = flag("--format", "fp8", "format quantized for the KLD test (default: %(default)s, static activations)")
    batch_size: int | None = flag("--batch-size", 4, "windows per forward (default: %(default)s)", type=int)

    def check(self) -> None:
        super().check()
        get_format(self.format)


# ---------------------------------------------------------------- pure statistics


def js_divergence(p_counts, q_counts) -> float:
    """Jensen-Shannon divergence in bits of two count vectors over the same support (0..1)."""
    import torch

    p = torch.as_tensor(p_counts, dtype=torch.float64)
    q = torch.as_tensor(q_counts, dtype=torch.float64)
    if p.sum() <= 0 or q.sum() <= 0:
        raise ValueError("both distributions need at least one count")
    p, q = p / p.sum(), q / q.sum()
    m = (p + q) / 2

    def kl(a):
        nz = a > 0
        return float((a[nz] * torch.log2(a[nz] / m[nz])).sum())

    return max(0.0, 0.5 * kl(p) + 0.5 * kl(q))


def _real_tokens(windows):
    """The ids of real (unpadded) tokens of every window, flattened, and their positions."""
    import torch

    positions = torch.arange(windows.seq_len)
    mask = positions[None, :] < windows.lengths[:, None]
    return windows.ids[mask], positions.expand_as(windows.ids)[mask]


def token_coverage(calib, eval_windows, vocab_size: int) -> dict:
    """Unseen-token shares, unigram JS divergence and position coverage of ``eval_windows`` by ``calib``."""
    import torch

    calib_ids, _ = _real_tokens(calib)
    eval_ids, eval_pos = _real_tokens(eval_windows)
    pc = torch.bincount(calib_ids, minlength=vocab_size)
    pe = torch.bincount(eval_ids, minlength=vocab_size)
    unseen = pc == 0
    types = pe > 0
    return {
        "calib_tokens": int(pc.sum()),
        "eval_tokens": int(pe.sum()),
        "unseen_token_share": float(pe[unseen].sum() / pe.sum()),
        "unseen_type_share": float((types & unseen).sum() / types.sum()),
        "js_divergence_bits": js_divergence(pc, pe),
        "calib_seq_len": calib.seq_len,
        "eval_max_position": int(eval_pos.max()),
        "beyond_calib_length_share": float((eval_pos >= calib.seq_len).double().mean()),
    }


# ---------------------------------------------------------------- activation ranges


class _CalibRange:
    """One linear input on the calibration text: per-channel maxima, per sample and after half the samples."""

    def __init__(self, channels: int, samples: int, device):
        import torch

        from .measure.outliers import Moments

        self.moments = Moments(torch.zeros(channels, device=device))
        self.half_channel_max = torch.zeros(channels, device=device)
        self.sample_max = torch.zeros(samples, dtype=torch.float64)
        self.half = samples // 2

    def add(self, x, first: int, mask) -> None:
        """``x`` [b, seq, ch] for windows ``first .. first + b - 1`` (``mask``: real tokens)."""
        import torch

        a = x.detach().abs().float() * mask[..., None]
        self.moments.add(x[mask])
        self.sample_max[first : first + x.shape[0]] = a.amax(dim=(1, 2)).double().cpu()
        early = max(0, min(x.shape[0], self.half - first))
        if early:
            torch.maximum(self.half_channel_max, a[:early].amax(dim=(0, 1)), out=self.half_channel_max)

    @property
    def channel_max(self):
        return self.moments.channel_max


class _EvalCoverage:
    """One linear input on the eval text: how many values exceed the calibration maxima."""

    def __init__(self, calib: _CalibRange):
        import torch

        from .measure.outliers import Moments

        self.channel_limit = calib.channel_max
        self.tensor_limit = calib.channel_max.max()
        self.moments = Moments(torch.zeros_like(calib.channel_max))
        self.values = self.over_tensor = self.over_channel = 0

    def add(self, x, first: int, mask) -> None:
        real = x.detach()[mask].float()
        a = real.abs()
        self.values += a.numel()
        self.over_tensor += int((a > self.tensor_limit).sum())
        self.over_channel += int((a > self.channel_limit).sum())
        self.moments.add(real)


def _inputs_pass(model, points: dict, windows, batch_size: int, description: str) -> None:
    """Run the decoder (no LM head) over ``windows``; each point's module input goes to its ``add``."""
    import torch

    from .progress import track

    device = next(model.parameters()).device
    current: dict = {}

    def hook(recorder):
        return lambda _module, args: recorder.add(args[0], current["first"], current["mask"])

    handles = [module.register_forward_pre_hook(hook(recorder)) for module, recorder in points.values()]
    try:
        with torch.inference_mode():
            starts = range(0, windows.n, batch_size)
            for start in track(starts, description, total=len(starts)):
                part = slice(start, min(start + batch_size, windows.n))
                width = int(windows.lengths[part].max())
                positions = torch.arange(width, device=device)
                current["first"] = start
                current["mask"] = positions[None, :] < windows.lengths[part, None].to(device)
                model.model(input_ids=windows.ids[part, :width].to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()


def calibration_ranges(model, units, calib, batch_size: int = 4) -> dict:
    """Per unit (its first linear's input): the calibration maxima, sample by sample."""
    device = next(model.parameters()).device
    points = {}
    for u in units:
        module = model.get_submodule(u.linears[0])
        points[u.name] = (module, _CalibRange(module.in_features, calib.n, device))
    _inputs_pass(model, points, calib, batch_size, "calibration ranges")
    return {name: recorder for name, (_, recorder) in points.items()}


def range_coverage(model, units, ranges: dict, eval_windows, batch_size: int = 4) -> list[dict]:
    """Per unit: shares of eval activation values and channel maxima beyond the calibration maxima."""
    points = {u.name: (model.get_submodule(u.linears[0]), _EvalCoverage(ranges[u.name])) for u in units}
    _inputs_pass(model, points, eval_windows, batch_size, "eval coverage")
    out = []
    for u in units:
        cal, ev = ranges[u.name], points[u.name][1]
        eval_max = ev.moments.channel_max
        out.append({
            "name": u.name,
            "linears": list(u.linears),
            "values": ev.values,
            "clip_share": ev.over_tensor / ev.values,  # beyond the calibration per-tensor max
            "channel_exceed_share": ev.over_channel / ev.values,  # beyond its channel's calibration max
            "channels_exceeded": float((eval_max > cal.channel_max).float().mean()),
            "calib_max": float(cal.channel_max.max()),
            "eval_max": float(eval_max.max()),
            "calib_kurtosis": cal.moments.kurtosis(),
            "eval_kurtosis": ev.moments.kurtosis(),
        })
    return out


def sample_adequacy(ranges: dict) -> dict:
    """How the calibration maxima still move as samples are added (see the module docstring)."""
    import torch

    names = list(ranges)
    samples = next(iter(ranges.values())).sample_max.numel()
    if samples < 2:
        return {"samples": samples, "judged": False, "note": "one calibration sample: growth cannot be judged"}
    running = torch.stack([ranges[n].sample_max.cummax(dim=0).values for n in names])  # [points, samples]
    final = running[:, -1].clamp_min(1e-30)
    half = running[:, samples // 2 - 1].clamp_min(1e-30)
    growth = (final / half - 1).tolist()
    steps = sorted({min(2**k, samples) for k in range(int(math.log2(samples)) + 2)})
    curve = [{"samples": k, "median_share_of_final_max": float((running[:, k - 1] / final).median())} for k in steps]
    growing = [n for n, g in zip(names, growth) if g > GROWTH_REASON]
    return {
        "samples": samples, "judged": True,
        "second_half_growth": {n: g for n, g in zip(names, growth)},
        "median_second_half_growth": float(torch.tensor(growth).median()),
        "still_growing": growing,
        "still_growing_share": len(growing) / len(names),
        "curve": curve,
    }


# ---------------------------------------------------------------- verdict and ranking


def _layer_label(unit_name: str) -> str:
    """``model.layers.12.mlp.down_proj`` -> ``layer 12 mlp.down_proj``."""
    parts = unit_name.split(".")
    if len(parts) > 3 and parts[0] == "model" and parts[1] == "layers":
        return f"layer {parts[2]} {'.'.join(parts[3:])}"
    return unit_name


def reasons(coverage: dict, fmt_name: str) -> list[str]:
    """Readable reasons this calibration set does not cover the eval text (empty: it does)."""
    from .quant.formats import get_format

    act = get_format(fmt_name).act
    static = act is not None and not act.dynamic
    clipper = f"{fmt_name.upper()} static scales will clip them" if static else "static activation scales (fp8, int8_sq_static, w4a8_awq) would clip them"
    out = []
    clipped = sorted((r for r in coverage["ranges"] if r["clip_share"] > CLIP_REASON_SHARE), key=lambda r: -r["clip_share"])
    for r in clipped[:REASONS_SHOWN]:
        out.append(f"{_layer_label(r['name'])}: {100 * r['clip_share']:.2g}% of eval activations exceed the calibration range; {clipper}")
    if len(clipped) > REASONS_SHOWN:
        out.append(f"... and {len(clipped) - REASONS_SHOWN} more inputs with over {100 * CLIP_REASON_SHARE:g}% of eval activations out of range")
    t = coverage["tokens"]
    if t["unseen_token_share"] > UNSEEN_REASON_SHARE:
        out.append(f"{100 * t['unseen_token_share']:.1f}% of eval tokens never occur in the calibration text")
    if t["js_divergence_bits"] > JS_REASON_BITS:
        out.append(f"token distributions differ: unigram JS divergence {t['js_divergence_bits']:.3f} bits (> {JS_REASON_BITS})")
    if t["beyond_calib_length_share"] > 0:
        out.append(f"{100 * t['beyond_calib_length_share']:.1f}% of eval tokens sit beyond position {t['calib_seq_len'] - 1}, "
                   "longer than any calibration sample")
    a = coverage["adequacy"]
    if a.get("judged") and a["still_growing_share"] > GROWING_REASON_SHARE:
        out.append(f"too few samples: the calibration maximum of {100 * a['still_growing_share']:.0f}% of inputs still grew by "
                   f"more than {100 * GROWTH_REASON:g}% over the second half of the {a['samples']} samples")
    return out


def coverage_summary(ranges: list[dict]) -> dict:
    values = sum(r["values"] for r in ranges)
    return {
        "clip_share": sum(r["clip_share"] * r["values"] for r in ranges) / values,
        "channel_exceed_share": sum(r["channel_exceed_share"] * r["values"] for r in ranges) / values,
        "worst_clip_share": max(r["clip_share"] for r in ranges),
        "inputs_clipping": sum(r["clip_share"] > CLIP_REASON_SHARE for r in ranges),
    }


RANKING_RULE = ("lower share of eval activation values beyond the calibration per-tensor maximum, when the two differ by "
                f"more than {100 * CLEAR_DIFFERENCE:g}% (relative) and the larger exceeds {MATERIAL_CLIP_SHARE:g}; else lower "
                "unigram JS divergence, when so different; else lower share of unseen eval tokens")


def _clearly_lower(a: float, b: float) -> str | None:
    """'a' or 'b' when one is lower by more than CLEAR_DIFFERENCE relative to the larger, else None."""
    top = max(a, b)
    if top <= 0 or abs(a - b) <= CLEAR_DIFFERENCE * top:
        return None
    return "a" if a < b else "b"


def rank(first: dict, second: dict) -> tuple[str, str]:
    """("calib" | "calib2", which figure decided) from coverage only (see RANKING_RULE)."""
    clip = first["summary"]["clip_share"], second["summary"]["clip_share"]
    figures = [("clip_share", *clip) if max(clip) > MATERIAL_CLIP_SHARE else None,
               ("js_divergence_bits", first["tokens"]["js_divergence_bits"], second["tokens"]["js_divergence_bits"])]
    for name, a, b in filter(None, figures):
        lower = _clearly_lower(a, b)
        if lower:
            return ("calib" if lower == "a" else "calib2"), name
    a, b = first["tokens"]["unseen_token_share"], second["tokens"]["unseen_token_share"]
    return ("calib" if a <= b else "calib2"), "unseen_token_share"


def kld_check(better: torch.Tensor, worse: torch.Tensor) -> dict:
    """Does the measured KLD agree with the coverage ranking? Per-token KLDs of the set ranked
    better and the other; ``kld_difference`` = mean(worse - better) with its paired standard error."""
    from .metrics import paired_difference

    diff, unc = paired_difference(better, worse)
    verdict = ("agrees" if diff > SIGNIFICANT_SIGMAS * unc else "disagrees" if diff < -SIGNIFICANT_SIGMAS * unc
               else "not significant")
    return {"kld_difference": diff, "kld_difference_unc": unc, "kld_agreement": verdict}


# ---------------------------------------------------------------- the command


def check_one(lm, units, calib, eval_windows, baseline, s: CalibCheckSettings) -> tuple[dict, "torch.Tensor"]:
    """Every coverage figure of one calibration set, its reasons, and the KLD it yields (with the per-token KLDs)."""
    from .evaluate import compare_to_baseline
    from .metrics import PairedAccumulator
    from .quant import quantize

    ranges = calibration_ranges(lm.model, units, calib, s.batch_size)
    coverage = {
        "source": calib.source, "samples": calib.n, "seq_len": calib.seq_len, "fingerprint": calib.fingerprint,
        "ranges": range_coverage(lm.model, units, ranges, eval_windows, s.batch_size),
        "tokens": token_coverage(calib, eval_windows, lm.model.get_input_embeddings().weight.shape[0]),
        "adequacy": sample_adequacy(ranges),
    }
    coverage["summary"] = coverage_summary(coverage["ranges"])
    qm = quantize(lm.model, s.quant_spec(s.format), calib)
    acc = PairedAccumulator()
    stats = compare_to_baseline(baseline, qm.model, eval_windows, acc=acc)
    found = reasons(coverage, s.format)
    return {"kld": stats["kld"]["mean"], "kld_unc": stats["kld"]["unc"], "ppl_ratio": stats["ppl_ratio"],
            "top1": stats["top1"], "verdict": "ok" if not found else "mismatch", "reasons": found,
            "coverage": coverage}, acc.per_token("kld")


def calib_check(s: CalibCheckSettings, out: Path | None = None) -> dict:
    """Judge ``s.calib`` (and ``s.calib2``) against ``s.eval``; writes DIR/calib_check.json when ``out`` is given."""
    from .data import load_windows
    from .evaluate import build_baseline
    from .fileio import atomic_write_json, check_out_dir, output_dir
    from .quant.plan import plan_units
    from .session import open_session

    s.check()  # every flag, before anything is read or written
    if out is not None:
        check_out_dir(out, force=True)  # calib_check.json is added to (or replaced in) the folder
    session = open_session(s)
    lm, eval_windows = session.lm, session.eval
    calibs = {"calib": session.calib}
    if s.calib2 is not None:
        calibs["calib2"] = load_windows(s.calib2, lm.tokenizer, s.calib_seq, s.calib_size, s.bos, role="calib")
    baseline = build_baseline(lm, eval_windows)
    units = plan_units(lm.model)
    result = {"model": {"name": lm.name, "source": lm.source, "fingerprint": lm.fingerprint},
              "eval": eval_windows.describe(), "format": s.format, "settings": asdict(s)}
    per_token = {}
    for role, windows in calibs.items():
        console.print(f"[bold]{role}[/bold]: {windows.source} ({windows.n} samples x {windows.seq_len} tokens)")
        result[role], per_token[role] = check_one(lm, units, windows, eval_windows, baseline, s)
    result["verdict"] = result["calib"]["verdict"]
    result["reasons"] = result["calib"]["reasons"]
    if "calib2" in result:
        better, decided_by = rank(result["calib"]["coverage"], result["calib2"]["coverage"])
        result.update({"better": better, "decided_by": decided_by, "ranking_rule": RANKING_RULE,
                       **kld_check(per_token[better], per_token["calib2" if better == "calib" else "calib"])})
    result["exit_code"] = EXIT_OK if result["verdict"] == "ok" else EXIT_BUDGET_FAILED
    if out is not None:
        with output_dir(out, merge=True) as work:
            atomic_write_json(work / "calib_check.json", result)
    return result


def coverage_table(result: dict):
    from rich.table import Table

    roles = [r for r in ("calib", "calib2") if r in result]
    table = Table(title=f"calibration coverage of {result['eval']['source']} ({result['format']} for the KLD)")
    table.add_column("figure")
    for r in roles:
        table.add_column(f"{r}: {result[r]['coverage']['source']}", justify="right")
    rows = [
        ("eval activation values beyond calib max", lambda c: f"{100 * c['coverage']['summary']['clip_share']:.4f} %"),
        ("  worst input", lambda c: f"{100 * c['coverage']['summary']['worst_clip_share']:.3f} %"),
        ("  values beyond their channel's calib max", lambda c: f"{100 * c['coverage']['summary']['channel_exceed_share']:.3f} %"),
        ("unseen eval tokens", lambda c: f"{100 * c['coverage']['tokens']['unseen_token_share']:.2f} %"),
        ("unigram JS divergence (bits)", lambda c: f"{c['coverage']['tokens']['js_divergence_bits']:.4f}"),
        ("eval tokens beyond calib length", lambda c: f"{100 * c['coverage']['tokens']['beyond_calib_length_share']:.1f} %"),
        ("inputs whose max still grows", lambda c: f"{100 * c['coverage']['adequacy'].get('still_growing_share', float('nan')):.0f} %"),
        (f"KLD with {result['format']}", lambda c: f"{c['kld']:.5f} ± {c['kld_unc']:.5f}"),
        ("verdict", lambda c: c["verdict"]),
    ]
    for label, cell in rows:
        table.add_row(label, *(cell(result[r]) for r in roles))
    return table


def add_calib_check_arguments(p: argparse.ArgumentParser) -> None:
    add_arguments(p, CalibCheckSettings)
    p.add_argument("--out", default=None, metavar="DIR", help="write DIR/calib_check.json")


def run_calib_check(args) -> int:
    s = CalibCheckSettings.from_args(args)
    result = calib_check(s, Path(args.out) if args.out else None)
    console.print(coverage_table(result))
    if "better" in result:
        console.print(f"better calibration set: [bold]{result['better']}[/bold] (decided by {result['decided_by']}); "
                      f"measured {result['format']} KLD of the other minus this one: {result['kld_difference']:.5f} "
                      f"± {result['kld_difference_unc']:.5f} ({result['kld_agreement']})")
    colour = "green" if result["verdict"] == "ok" else "red"
    console.print(f"[{colour}]verdict: {result['verdict']}[/{colour}]")
    for reason in result["reasons"]:
        console.print(f"  - {reason}")
    return result["exit_code"]
