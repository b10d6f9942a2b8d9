"""Activation-outlier audit: which linear inputs have channels that per-tensor scales cannot serve.

With one scale per tensor (``fp8``, ``int8_sq_static``, ``w4a8_awq``), the largest channel sets the
step size for every channel. If the largest channel maximum is ``ratio`` times the median
channel's, an INT8 grid leaves the median channel only ``127 / ratio`` levels. This is the effect
SmoothQuant (Xiao et al., 2023) was designed for: it divides those channels by
``s_j = max|X_j|^a / max|W_j|^(1-a)`` and moves the range into the weights.

Per linear input this module measures, on the calibration windows: each channel's absolute
maximum, the ratio of the largest channel maximum to the median, the kurtosis of all values
(Pearson, 3 for a Gaussian; Bondarenko et al. 2023 use it to spot outlier-prone layers), and the
channels that dominate. One pass, forward pre-hooks, running float64 moments: memory is one
vector per layer, independent of the number of windows. MoE experts are measured on every token, as
calibration sees them (:func:`quantaudit.moe.set_all_tokens`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..arch import architecture
from ..data import Windows
from ..moe import set_all_tokens
from ..progress import track
from .sensitivity import decoder_index

# INT8 per-tensor: the median channel keeps 127 / ratio levels; below 8 levels (3 bits) its
# rounding error dominates the layer's error. FP8 E4M3 is floating point, so its relative step is
# constant; it degrades only when small channels fall below its normal range (2**-6 of 448, a
# ratio of ~28,700), which is where we flag FP8.
INT8_RISK_RATIO = 127 / 8
FP8_RISK_RATIO = 448 / 2**-6
# Past this ratio even SmoothQuant at alpha=0.5 leaves sqrt(ratio) spread in the activations.
KEEP_HIGH_PRECISION_RATIO = 1024.0
TOP_CHANNELS = 8


@dataclass
class Moments:
    channel_max: torch.Tensor
    count: int = 0
    sums: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0, 0.0])

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1])
        torch.maximum(self.channel_max, x.abs().amax(dim=0).to(self.channel_max), out=self.channel_max)
        flat = x.double().reshape(-1)
        sq = flat * flat
        self.count += flat.numel()
        for i, v in enumerate((flat.sum(), sq.sum(), (sq * flat).sum(), (sq * sq).sum())):
            self.sums[i] += float(v)

    def kurtosis(self) -> float:
        n = self.count
        m1, m2, m3, m4 = (s / n for s in self.sums)
        var = m2 - m1 * m1
        if var <= 0:
            return float("nan")
        central4 = m4 - 4 * m1 * m3 + 6 * m1 * m1 * m2 - 3 * m1**4
        return central4 / (var * var)


def _remedy(smoothable: bool, ratio: float) -> tuple[str, str]:
    if ratio < INT8_RISK_RATIO:
        return "ok", "per-tensor INT8/FP8 activations are fine here"
    if ratio >= KEEP_HIGH_PRECISION_RATIO:
        return "clip_risk", (
            f"keep this layer in higher precision (ratio {ratio:.0f} is beyond what smoothing can even out), "
            "or use per-token dynamic activations (fp8_pc_pt, int8_sq)"
        )
    if smoothable:
        return "clip_risk", "SmoothQuant (int8_sq) migrates these channels into the weights; or per-token activations"
    return "clip_risk", "no exact place to fold a smoothing scale: use per-token activations or keep it in higher precision"


@torch.inference_mode()
def activation_outliers(model: torch.nn.Module, linears: dict[str, torch.nn.Linear], calib: Windows,
                        batch_size: int = 4) -> list[dict]:
    """Per-linear-input outlier statistics on ``calib``, worst (highest ratio) first."""
    device = next(model.parameters()).device
    stats = {name: Moments(torch.zeros(m.in_features, device=device)) for name, m in linears.items()}
    hooks = [
        m.register_forward_pre_hook(lambda _m, args, s=stats[name]: s.add(args[0]))
        for name, m in linears.items()
    ]
    set_all_tokens(model, True)
    try:
        batches = range(0, calib.n, batch_size)
        for start in track(batches, "outlier audit", total=len(batches)):
            # logits of the last position only: the hooks need the linears' inputs, not a batch x vocabulary tensor
            model(input_ids=calib.ids[start : start + batch_size].to(device), use_cache=False, logits_to_keep=1)
    finally:
        set_all_tokens(model, False)
        for h in hooks:
            h.remove()
    return outlier_report(model, stats)


def outlier_report(model: torch.nn.Module, stats: dict[str, Moments]) -> list[dict]:
    """Per-linear-input outlier statistics from each input's ``Moments``, worst (highest ratio) first."""
    arch = architecture(model)
    report = []
    for name, s in stats.items():
        cmax = s.channel_max.float().cpu()
        median = float(cmax.median().clamp_min(1e-12))
        ratio = float(cmax.max()) / median
        top = torch.topk(cmax, min(TOP_CHANNELS, cmax.numel()))
        found = arch.group_of(name)
        flag, remedy = _remedy(found is not None and found[0].smoothable, ratio)
        report.append({
            "name": name,
            "decoder_layer": decoder_index(name),
            "channels": cmax.numel(),
            "max_abs": float(cmax.max()),
            "median_channel_max": median,
            "ratio": ratio,
            "kurtosis": s.kurtosis(),
            "int8_levels_median_channel": 127 / ratio,
            "fp8_risk": ratio >= FP8_RISK_RATIO,
            "top_channels": [[int(i), float(v)] for v, i in zip(top.values, top.indices)],
            "flag": flag,
            "remedy": remedy,
            "channel_max": [round(float(v), 5) for v in cmax],
        })
    return sorted(report, key=lambda r: -r["ratio"])

