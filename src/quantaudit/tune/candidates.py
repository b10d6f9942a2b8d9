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
class Candidates:
    base: nn.Module
    units: list[PlanUnit]
    models: dict[str, QuantizedModel]  # format -> the whole model quantized uniformly to it

    def quantizes(self, unit: PlanUnit, fmt: str) -> bool:
        return fmt != NONE and all(self.models[fmt].layers[n].quantized for n in unit.linears)

    def replacements(self, unit: PlanUnit, fmt: str) -> dict[str, nn.Module]:
        """Modules that put ``unit`` in ``fmt`` into the baseline (nothing for 16-bit)."""
        if not self.quantizes(unit, fmt):
            return {}
        qm = self.models[fmt]
        out = {}
        for name in unit.linears:
            module, details = qm.model.get_submodule(name), qm.layers[name].details
            out[name] = InputScaled(module, 1.0 / details["smoothing_scale"]) if details.get("smoothed_into") else module
        return out

    def unit_bytes(self, unit: PlanUnit, fmt: str) -> int:
        """Stored bytes of the unit's linears in ``fmt`` (16-bit where the engine leaves them unquantized)."""
        if self.quantizes(unit, fmt):
            return sum(self.models[fmt].layers[n].storage_bytes() for n in unit.linears)
        total = 0
        for name in unit.linears:
            linear = self.base.get_submodule(name)
            total += LayerRecord(name, NONE, linear.in_features, linear.out_features, bias=linear.bias).storage_bytes()
        return total

    def fixed_bytes(self) -> int:
        """Weight bytes outside the tuned linears (embeddings, norms, lm_head): the same in every plan."""
        qm = next(iter(self.models.values()))
        tuned = {n for u in self.units for n in u.linears}
        return qm.weight_bytes() - sum(r.storage_bytes() for n, r in qm.layers.items() if n in tuned)

    def options(self, ladder: list[str]) -> dict[str, list[str]]:
        """Per unit, the ladder formats that really quantize it; 16-bit ``none`` where none does."""
        out = {}
        for unit in self.units:
            usable = [f for f in ladder if f == NONE or self.quantizes(unit, f)]
            out[unit.name] = usable or [NONE]
        return out

    def sensitivities(self, options: dict[str, list[str]], windows: Windows) -> dict[tuple[str, str], float]:
        """KLD with only one unit in one format (the audit's sensitivity); 0 for 16-bit."""
        by_name = {u.name: u for u in self.units}
        swaps = {(u, f): self.replacements(by_name[u], f) for u, fmts in options.items() for f in fmts if f != NONE}
        labels = {f"{u} @ {f}": (u, f) for u, f in swaps}
        measured = sensitivity_kld(self.base, {label: swaps[k] for label, k in labels.items()}, windows,
                                   description="unit sensitivity") if swaps else {}
        out = {(u, f): 0.0 for u, fmts in options.items() for f in fmts}
        out.update({labels[label]: value for label, value in measured.items()})
        return out

    def table(self, ladder: list[str], windows: Windows) -> dict[str, list[Option]]:
        options = self.options(ladder)
        sens = self.sensitivities(options, windows)
        by_name = {u.name: u for u in self.units}
        return {u: [Option(f, self.unit_bytes(by_name[u], f), sens[(u, f)]) for f in fmts] for u, fmts in options.items()}

    def composed(self, plan: dict[str, Option]):
        """Context manager: the baseline with every unit of ``plan`` swapped to its format."""
        by_name = {u.name: u for u in self.units}
        replacements = {}
        for unit, option in plan.items():
            replacements.update(self.replacements(by_name[unit], option.format))
        return swapped(self.base, replacements)
