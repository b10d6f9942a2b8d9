"""What the advisor takes from a ``quantaudit audit`` report.json: per format, the measured mean KL
divergence, top-1 agreement, the budget verdict and per-layer sensitivity.

Sensitivity comes from ``decoder_sensitivity`` (``{"model.layers.i": kld}``) when the audit measured
whole decoder layers, else from ``layers[].sensitivity_kld`` per linear.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError


@dataclass(frozen=True)
class FormatAudit:
    name: str
    kld_mean: float | None
    top1: float | None  # share of tokens where quantized and baseline argmax agree
    passed: bool | None
    sensitivity: dict[str, float]  # module name -> KL divergence when only it is quantized

    def sensitive_layers(self, factor: float) -> list[tuple[str, float]]:
        """Modules at least ``factor`` x the median module's sensitivity, most sensitive first."""
        if len(self.sensitivity) < 2:
            return []
        median = statistics.median(self.sensitivity.values())
        hits = [(n, v) for n, v in self.sensitivity.items() if v > 0 and v >= factor * median]
        return sorted(hits, key=lambda item: -item[1])

    def describe(self) -> dict:
        return {"kld_mean": self.kld_mean, "top1": self.top1, "passed": self.passed}


def load_audit_report(path: str | Path) -> dict[str, FormatAudit]:
    """Per-format measurements of ``path``; a file that is not an audit report is a UserError."""
    path = Path(path)
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"audit report not found: {path} (run `quantaudit audit` first)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"audit report {path} is not valid JSON: {exc}") from None
    formats = report.get("formats") if isinstance(report, dict) else None
    if not isinstance(formats, list):
        raise UserError(f"{path} has no formats list: is it a quantaudit report.json?")
    audits = {}
    for entry in formats:
        try:
            audits[entry["name"]] = _format_audit(entry)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            name = entry.get("name", "?") if isinstance(entry, dict) else repr(entry)
            raise UserError(f"{path}: malformed format entry {name} ({type(exc).__name__}: {exc})") from None
    return audits


def _number(value) -> float | None:
    return None if value is None else float(value)


def _format_audit(entry: dict) -> FormatAudit:
    if "decoder_sensitivity" in entry:
        sensitivity = {name: float(v) for name, v in entry["decoder_sensitivity"].items() if v is not None}
    else:
        sensitivity = {layer["name"]: float(layer["sensitivity_kld"])
                       for layer in entry.get("layers", []) if layer.get("sensitivity_kld") is not None}
    return FormatAudit(
        name=entry["name"],
        kld_mean=_number(entry["kld"]["mean"]),
        top1=_number(entry.get("top1")),
        passed=entry.get("passed"),
        sensitivity=sensitivity,
    )
