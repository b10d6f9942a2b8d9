"""Coverage of an evaluation text by a calibration set: the explanations calib-check prints next to its
measurement (:mod:`quantaudit.calibcheck.command`).

A static activation scale (``fp8``, ``int8_sq_static``, ``w4a8_awq``) is ``max|x| / qmax`` over the
calibration text; every later activation above that maximum is clipped. Measured on the unquantized model,
for each quantized linear input (one per group of linears that read the same input and share a calibrated
scale, as ``quantize()`` calibrates them):

* **range coverage**: the share of eval activation values above the calibration's per-tensor maximum
  (exactly what a static per-tensor scale clips), the share above their own channel's calibration maximum
  (what a per-channel smoothing scale was not fitted to), and the share of channels whose eval maximum
  exceeds the calibration one;
* **token coverage**: share of eval tokens that never occur in the calibration text, the Jensen-Shannon
  divergence of the two unigram distributions (bits, 0 = identical, 1 = disjoint), and the share of eval
  tokens at positions beyond the calibration sample length;
* **range growth**: how much each input's calibration maximum still grew over the second half of the
  samples, and the median running maximum (as a share of the final one) after 1, 2, 4, ... samples.

:func:`coverage_prefers` ranks two sets from these figures alone, never from a KLD, so that the measured
KLDs are an independent check of whether coverage predicts anything (calib-check reports the agreement).
The rule, in order: the lower share of clipped eval activation values wins when the two differ by more
than ``CLEAR_DIFFERENCE`` (relative) and the larger is material (``MATERIAL_CLIP_SHARE``); else the lower
unigram JS divergence wins when they so differ; else the lower share of unseen eval tokens.

Activation maxima are collected with forward pre-hooks and :class:`quantaudit.measure.outliers.Moments`
(the outlier audit's per-channel maxima), over real tokens only (padded eval positions are excluded).
"""

from __future__ import annotations

import math

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
REASONS_SHOWN = 5


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

        from ..measure.outliers import Moments

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

        from ..measure.outliers import Moments

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

    from ..progress import track

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


def reasons(coverage: dict) -> list[str]:
    """Readable reasons this calibration set may not cover the eval text (empty: nothing to note)."""
    out = []
    clipped = sorted((r for r in coverage["ranges"] if r["clip_share"] > CLIP_REASON_SHARE), key=lambda r: -r["clip_share"])
    for r in clipped[:REASONS_SHOWN]:
        out.append(f"{_layer_label(r['name'])}: {100 * r['clip_share']:.2g}% of eval activations exceed the calibration "
                   "range; static activation scales (fp8, int8_sq_static, w4a8_awq) clip them")
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
        out.append(f"activation ranges still growing: the calibration maximum of {100 * a['still_growing_share']:.0f}% of "
                   f"inputs grew by more than {100 * GROWTH_REASON:g}% over the second half of the {a['samples']} samples")
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


def coverage_prefers(first: dict, second: dict) -> tuple[int, str]:
    """(0 for ``first`` or 1 for ``second``, the figure that decided) from coverage only (see RANKING_RULE)."""
    clip = first["summary"]["clip_share"], second["summary"]["clip_share"]
    figures = [("clip_share", *clip) if max(clip) > MATERIAL_CLIP_SHARE else None,
               ("js_divergence_bits", first["tokens"]["js_divergence_bits"], second["tokens"]["js_divergence_bits"])]
    for name, a, b in filter(None, figures):
        lower = _clearly_lower(a, b)
        if lower:
            return (0 if lower == "a" else 1), name
    a, b = first["tokens"]["unseen_token_share"], second["tokens"]["unseen_token_share"]
    return (0 if a <= b else 1), "unseen_token_share"


def set_coverage(model, units, calib, eval_windows, batch_size: int) -> dict:
    """Every coverage figure of one calibration set over ``eval_windows``, and the reasons it gives."""
    ranges = calibration_ranges(model, units, calib, batch_size)
    coverage = {
        "ranges": range_coverage(model, units, ranges, eval_windows, batch_size),
        "tokens": token_coverage(calib, eval_windows, model.get_input_embeddings().weight.shape[0]),
        "adequacy": sample_adequacy(ranges),
    }
    coverage["summary"] = coverage_summary(coverage["ranges"])
    coverage["reasons"] = reasons(coverage)
    return coverage
