"""The autotuner's view of a mixed-precision plan: units, per-linear expansion, effective bits.

Plan files themselves (shapes, checks against the model) are :mod:`quantaudit.quant.plan`.
The autotuner decides per *unit*:
the linears TensorRT-LLM runs as one GEMM or that read one input (q/k/v; gate/up) share a format,
as ModelOpt's ``auto_quantize`` groups them (its ``quant_grouping_rules``); o_proj and down_proj
are units of their own. A unit is therefore also what SmoothQuant folds into one norm.

Effective bits per weight (``effective_bits``) = 8 x stored bytes of the tuned linears / their
parameter count, where stored bytes are :meth:`LayerRecord.storage_bytes` (codes plus every
stored scale, unquantized layers at 16 bit). ModelOpt counts only ``num_bits`` per weight
(scales free); we count the scales because they are memory the engine holds.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..arch import architecture


@dataclass(frozen=True)
class PlanUnit:
    """Linears that always share one format (one GEMM in TensorRT-LLM, or one smoothing scale)."""

    name: str  # model.layers.3.self_attn.q_proj+k_proj+v_proj
    linears: tuple[str, ...]
    params: int  # weight elements of all its linears


def _unit_name(linears: tuple[str, ...]) -> str:
    parent = linears[0].rpartition(".")[0]
    return parent + "." + "+".join(name.rpartition(".")[2] for name in linears)


def plan_units(model: nn.Module) -> list[PlanUnit]:
    """The decoder's linears grouped as TensorRT-LLM fuses them (lm_head stays out, as ModelOpt leaves it)."""
    units = []
    arch = architecture(model)
    for i, layer in enumerate(arch.check_layers(model)):
        for group in arch.layer_groups(layer):
            linears = tuple(f"model.layers.{i}.{p}" for p in group.linears)
            params = sum(model.get_submodule(n).weight.numel() for n in linears)
            units.append(PlanUnit(_unit_name(linears), linears, params))
    return units


def expand_plan(units: list[PlanUnit], choice: dict[str, str]) -> dict[str, str]:
    """A per-unit choice as the per-linear plan quantize() takes."""
    return {linear: choice[u.name] for u in units for linear in u.linears}


def effective_bits(linear_bytes: int, params: int) -> float:
    """Stored bits per weight element of the tuned linears (see the module docstring)."""
    return 8.0 * linear_bytes / params
