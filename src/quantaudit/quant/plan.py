"""Mixed-precision plan files, read and checked in one place for ``audit``, ``autotune`` and ``export``.

A plan maps linear-module names (``model.layers.3.mlp.down_proj``) to format names, exactly as
:class:`~quantaudit.quant.engine.QuantSpec` ``plan`` takes it. Three file shapes are accepted:
``{"plan": {layer: format}}`` (what ``autotune`` writes, as ``plan.json`` and inside
``autotune.json``), ``{"format": DEFAULT, "layers": {layer: format}}``, and a bare
``{layer: format}``. Layers a plan does not name get ``DEFAULT`` when given, else stay unquantized,
as in TensorRT-LLM's ``MIXED_PRECISION`` checkpoints, where a layer absent from ``quant_cfg.json``
is not quantized.

The autotuner decides per *unit* (:func:`plan_units`): the linears TensorRT-LLM runs as one GEMM or that read
one input (q/k/v; gate/up) share a format, as ModelOpt's ``auto_quantize`` groups them (its
``quant_grouping_rules``); o_proj and down_proj are units of their own. A unit is therefore also what SmoothQuant
folds into one norm. Effective bits per weight (:func:`effective_bits`) = 8 x stored bytes of the tuned linears /
their parameter count, where stored bytes are :meth:`LayerRecord.storage_bytes` (codes plus every stored scale,
unquantized layers at 16 bit). ModelOpt counts only ``num_bits`` per weight (scales free); we count the scales
because they are memory the engine holds.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from ..arch import architecture
from ..errors import UserError
from .formats import FORMATS

PLAN_EXAMPLE = '{"plan": {"model.layers.0.mlp.down_proj": "fp8", ...}}'


@dataclass(frozen=True)
class MixedPlan:
    """A checked plan: ``layers`` {module: format}; ``default`` for every layer it does not name."""

    layers: dict[str, str]
    default: str = "none"


def plan_layer_names(model: nn.Module) -> list[str]:
    """Every name a plan may use, in quantize()'s order: all decoder linears, then lm_head."""
    arch = architecture(model)
    return arch.linear_names(arch.check_layers(model)) + ["lm_head"]


def _check_format(fmt: object, where: str, what: str) -> None:
    if not isinstance(fmt, str) or fmt not in FORMATS:
        raise UserError(f"{where} gives {what} the unknown format {fmt!r}; valid formats: {', '.join(FORMATS)}")


def _check_entries(plan: object, where: str) -> dict[str, str]:
    if not isinstance(plan, dict) or not plan:
        raise UserError(f"{where} holds no plan: expected a JSON object mapping layer names to formats, e.g. {PLAN_EXAMPLE}")
    for name, fmt in plan.items():
        _check_format(fmt, where, name)
    return dict(plan)


def check_layers(plan: MixedPlan, model: nn.Module, where: str = "plan") -> MixedPlan:
    """``plan`` if every layer it names exists in ``model``; else a UserError naming the first that does not."""
    names = plan_layer_names(model)
    known = set(names)
    unknown = [name for name in plan.layers if name not in known]
    if unknown:
        raise UserError(f"{where} names layer {unknown[0]!r}, which this model does not have; "
                        f"layer names look like {names[0]!r} ({len(names)} layers)")
    return plan


def read_plan(path: str | Path) -> MixedPlan:
    """A plan file in any of the three shapes (module docstring), its formats checked; layer names are
    checked against a model by :func:`check_layers` (or :func:`load_plan`), once the model is loaded."""
    path = Path(path)
    where = f"plan file {path}"
    if not path.is_file():
        raise UserError(f"plan file not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{where} is not valid JSON ({exc}); expected {PLAN_EXAMPLE}") from None
    default = "none"
    if isinstance(data, dict) and isinstance(data.get("plan"), dict):
        data = data["plan"]
    elif isinstance(data, dict) and isinstance(data.get("layers"), dict):
        default = data.get("format", "none")
        _check_format(default, where, 'the default ("format")')
        data = data["layers"]
    return MixedPlan(_check_entries(data, where), default)


def load_plan(path: str | Path, model: nn.Module) -> MixedPlan:
    """:func:`read_plan`, then :func:`check_layers` against ``model``."""
    return check_layers(read_plan(path), model, f"plan file {path}")


def check_fused_plan(layers: dict[str, str], default: str, model: nn.Module, where: str) -> None:
    """TensorRT-LLM runs q/k/v (and gate/up) of one decoder layer as one GEMM, with one format: a plan
    mixing formats inside one is refused (by ``audit --plan`` as by ``export --plan``)."""
    arch = architecture(model)
    for name in layers:
        found = arch.group_of(name)
        if found is None or not found[0].fused:
            continue
        group, prefix = found
        formats = {prefix + path: layers.get(prefix + path, default) for path in group.linears}
        if len(set(formats.values())) > 1:
            shown = ", ".join(f"{n}={f}" for n, f in formats.items())
            raise UserError(f"{where} mixes formats inside one fused TensorRT-LLM GEMM ({shown}), which no engine can "
                            "run: give these linears one format")


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
