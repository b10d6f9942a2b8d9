"""Every unit in every candidate format, from one whole-model quantization per format.

``quantize()`` runs once per format for the whole model; a unit's module in that format is then
taken from that model and swapped into the baseline to measure a mixed plan, with no further
quantization. Three approximations, all checked by the final ``quantize(spec with plan)``:

* calibration is sequential, so a unit taken from the uniform model was calibrated on the outputs
  of earlier layers quantized in *that* format, not in the plan's formats;
* a SmoothQuant scale folded into a norm is undone the way the audit's sensitivity does it
  (:func:`quantaudit.audit.in_memory.sensitivity_swaps`): the swapped linear gets its input divided by
  the smoothing scale (:class:`~quantaudit.measure.sensitivity.InputScaled`);
* with ``--kv-cache``, the units are swapped into the 16-bit model with its KV cache quantized, its scales
  calibrated on that model's own keys and values rather than on the plan's.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..data import Windows
from ..measure.sensitivity import InputScaled, sensitivity_kld, swapped
from ..quant import QuantizedModel
from ..quant.engine import LayerRecord
from ..quant.plan import PlanUnit
from .search import Option
from .settings import NONE


@dataclass
class FormatParts:
    """What a plan takes from one format's whole-model quantization: each linear's record (its bytes, whether the
    engine quantizes it) and the module that puts it, quantized, into the baseline. Only the linears travel: a Ray
    worker sends this back, not the whole model."""

    layers: dict[str, LayerRecord]
    modules: dict[str, nn.Module]  # the quantized linears of the plan units, ready to swap in
    weight_bytes: int  # the whole uniform model's

    @classmethod
    def of(cls, qm: QuantizedModel, units: list[PlanUnit]) -> FormatParts:
        modules = {}
        for name in (n for u in units for n in u.linears):
            record = qm.layers[name]
            if record.quantized:
                module, details = qm.model.get_submodule(name), record.details
                modules[name] = InputScaled(module, 1.0 / details["smoothing_scale"]) if details.get("smoothed_into") else module
        return cls(dict(qm.layers), modules, qm.weight_bytes())


@dataclass
class Candidates:
    base: nn.Module
    units: list[PlanUnit]
    parts: dict[str, FormatParts]  # format -> what the whole model quantized uniformly to it gives a plan

    def quantizes(self, unit: PlanUnit, fmt: str) -> bool:
        return fmt != NONE and all(self.parts[fmt].layers[n].quantized for n in unit.linears)

    def replacements(self, unit: PlanUnit, fmt: str) -> dict[str, nn.Module]:
        """Modules that put ``unit`` in ``fmt`` into the baseline (nothing for 16-bit)."""
        if not self.quantizes(unit, fmt):
            return {}
        return {name: self.parts[fmt].modules[name] for name in unit.linears}

    def unit_bytes(self, unit: PlanUnit, fmt: str) -> int:
        """Stored bytes of the unit's linears in ``fmt`` (16-bit where the engine leaves them unquantized)."""
        if self.quantizes(unit, fmt):
            return sum(self.parts[fmt].layers[n].storage_bytes() for n in unit.linears)
        total = 0
        for name in unit.linears:
            linear = self.base.get_submodule(name)
            total += LayerRecord(name, NONE, linear.in_features, linear.out_features, bias=linear.bias).storage_bytes()
        return total

    def fixed_bytes(self) -> int:
        """Weight bytes outside the tuned linears (embeddings, norms, lm_head): the same in every plan."""
        parts = next(iter(self.parts.values()))
        tuned = {n for u in self.units for n in u.linears}
        return parts.weight_bytes - sum(r.storage_bytes() for n, r in parts.layers.items() if n in tuned)

    def options(self, ladder: list[str]) -> dict[str, list[str]]:
        """Per unit, the ladder formats that really quantize it; 16-bit ``none`` where none does."""
        out = {}
        for unit in self.units:
            usable = [f for f in ladder if f == NONE or self.quantizes(unit, f)]
            out[unit.name] = usable or [NONE]
        return out

    def sensitivities(self, fmt: str, windows: Windows) -> dict[str, float]:
        """Per unit ``fmt`` quantizes: the KLD with only that unit in ``fmt`` (the audit's sensitivity)."""
        swaps = {u.name: self.replacements(u, fmt) for u in self.units if self.quantizes(u, fmt)}
        return sensitivity_kld(self.base, swaps, windows, description=f"unit sensitivity, {fmt}") if swaps else {}

    def table(self, ladder: list[str], sensitivity: dict[str, dict[str, float]]) -> dict[str, list[Option]]:
        """Per unit, its options: each usable format's bytes and sensitivity (``sensitivity[format][unit]``; 0 for
        16-bit)."""
        by_name = {u.name: u for u in self.units}
        return {u: [Option(f, self.unit_bytes(by_name[u], f), 0.0 if f == NONE else sensitivity[f][u]) for f in fmts]
                for u, fmts in self.options(ladder).items()}

    def composed(self, plan: dict[str, Option]):
        """Context manager: the baseline with every unit of ``plan`` swapped to its format."""
        by_name = {u.name: u for u in self.units}
        replacements = {}
        for unit, option in plan.items():
            replacements.update(self.replacements(by_name[unit], option.format))
        return swapped(self.base, replacements)
