"""``quantaudit autotune``'s settings: the shared ones (:mod:`quantaudit.session`) and the tuner's own."""

from __future__ import annotations

from dataclasses import dataclass

from ..cluster import ClusterSettings
from ..errors import UserError
from ..measure.budget import METRICS, Limit, parse_budget
from ..quant.formats import get_format
from ..session import EvalSettings, at_least, flag

NONE = "none"  # 16-bit: the format that leaves a layer unquantized


@dataclass
class AutotuneSettings(EvalSettings, ClusterSettings):
    formats: list[str] = flag("--formats", ["int4_awq"], "most aggressive format(s) every layer starts from, "
                              "comma-separated (default: %(default)s)")
    fallback: list[str] = flag("--fallback", ["fp8", NONE], "formats a layer may be raised to, comma-separated; none "
                               "= 16-bit (default: %(default)s)")
    budget: str | None = flag("--budget", None, 'accuracy budget to meet, e.g. "kld<=0.02" (see `audit --help`)')
    effective_bits: float | None = flag("--effective-bits", None, "size target instead: stored bits per weight of "
                                        "the tuned linears, scales included (ModelOpt auto_quantize's "
                                        "effective_bits); minimises KLD within it", type=float, metavar="BITS")
    sensitivity_windows: int = flag("--sensitivity-windows", 1, "evaluation windows for the per-unit sensitivity "
                                    "(default: %(default)s)", type=int)
    refine: int = flag("--refine", 8, "second pass: units tried one rung lower again, each measured "
                       "(default: %(default)s)", type=int)
    probes: int = 4  # greedy prefixes measured besides the fill (effective-bits mode)
    verify_attempts: int = 3

    @property
    def ladder(self) -> list[str]:
        return list(dict.fromkeys([*self.formats, *self.fallback]))

    def check(self) -> None:
        super().check()
        at_least("--refine", self.refine, 0)
        at_least("--sensitivity-windows", self.sensitivity_windows, 1)
        if not self.formats:
            raise UserError("--formats is empty: name the most aggressive format(s) to start from, e.g. int4_awq")
        for name in self.ladder:
            get_format(name)
        if all(f == NONE for f in self.ladder):
            raise UserError("--formats/--fallback name no quantized format: nothing to tune")
        if self.budget is None and self.effective_bits is None:
            raise UserError('give an accuracy budget (--budget "kld<=0.02") or a size target (--effective-bits 5.0)')
        if self.effective_bits is not None and not 0 < self.effective_bits <= 16:
            raise UserError(f"--effective-bits must be in (0, 16] bits per weight (got {self.effective_bits})")

    def limits(self) -> list[Limit]:
        """The budget's terms; autotune measures KLD, PPL and top-1, not tasks."""
        limits = parse_budget(self.budget) if self.budget is not None else []
        unmeasured = [l for l in limits if METRICS[l.metric][0][0] == "tasks_summary"]
        if unmeasured:
            raise UserError(f"autotune measures KLD, PPL and top-1 only; the budget term {unmeasured[0]} needs "
                            "`audit --tasks`")
        return limits
