"""Mixed-precision plans: which format each linear layer gets, checked against the model.

A plan maps linear-module names (``model.layers.3.mlp.down_proj``) to format names, exactly as
:class:`~quantaudit.quant.engine.QuantSpec` ``plan`` takes it. The autotuner decides per *unit*:
the linears TensorRT-LLM runs as one GEMM or that read one input (q/k/v; gate/up) share a format,
as ModelOpt's ``auto_quantize`` groups them (its ``quant_grouping_rules``); o_proj and down_proj
are units of their own. A unit is therefore also what SmoothQuant folds into one norm.

Effective bits per weight (``effective_bits``) = 8 x stored bytes of the tuned linears / their
parameter count, where stored bytes are :meth:`LayerRecord.storage_bytes` (codes plus every
stored scale, unquantized layers at 16 bit). ModelOpt counts only ``num_bits`` per weight
(scales free); we count the scales because they are memory the engine holds.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from ..errors import UserError
from ..quant.calibrate import DECODER_GROUPS, decoder_layers
from ..quant.formats import FORMATS

PLAN_EXAMPLE = '{"plan": {"model.layers.0.mlp.down_proj": "fp8", ...}}'


@dataclass(frozen=True)
class PlanUnit:
    """Linears that always share one format (one GEMM in TensorRT-LLM, or one smoothing scale)."""

    name: str  # model.layers.3.self_attn.q_proj+k_proj+v_proj
    linears: tuple[str, ...]
    params: int  # weight elements of all its linears


def plan_layer_names(model: nn.Module) -> list[str]:
    """Every name a plan may use, in quantize()'s order: all decoder linears, then lm_head."""
    n_layers = len(decoder_layers(model))
    return [f"model.layers.{i}.{p}" for i in range(n_layers) for g in DECODER_GROUPS for p in g.linears] + ["lm_head"]


def _unit_name(linears: tuple[str, ...]) -> str:
    parent = linears[0].rpartition(".")[0]
    return parent + "." + "+".join(name.rpartition(".")[2] for name in linears)


def plan_units(model: nn.Module) -> list[PlanUnit]:
    """The decoder's linears grouped as TensorRT-LLM fuses them (lm_head stays out, as ModelOpt leaves it)."""
    units = []
    for i in range(len(decoder_layers(model))):
        for group in DECODER_GROUPS:
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


def validate_plan(plan: object, model: nn.Module, where: str = "plan") -> dict[str, str]:
    """Check a {layer: format} mapping against ``model``; a UserError names the first problem."""
    if not isinstance(plan, dict) or not plan:
        raise UserError(f"{where} holds no plan: expected a JSON object mapping layer names to formats, e.g. {PLAN_EXAMPLE}")
    names = plan_layer_names(model)
    known = set(names)
    unknown = [name for name in plan if name not in known]
    if unknown:
        raise UserError(f"{where} names layer {unknown[0]!r}, which this model does not have; "
                        f"layer names look like {names[0]!r} ({len(names)} layers)")
    for name, fmt in plan.items():
        if not isinstance(fmt, str) or fmt not in FORMATS:
            raise UserError(f"{where} gives {name} the unknown format {fmt!r}; valid formats: {', '.join(FORMATS)}")
    return dict(plan)


def load_plan(path: str | Path, model: nn.Module) -> dict[str, str]:
    """Read a plan file: ``{"plan": {layer: format}}`` (what autotune writes) or a bare ``{layer: format}``."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"plan file not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"plan file {path} is not valid JSON ({exc}); expected {PLAN_EXAMPLE}") from None
    if isinstance(data, dict) and isinstance(data.get("plan"), dict):
        data = data["plan"]
    return validate_plan(data, model, where=f"plan file {path}")
