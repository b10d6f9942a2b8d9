"""Mixed-precision plan files, read and checked in one place for ``audit``, ``autotune`` and ``export``.

A plan maps linear-module names (``model.layers.3.mlp.down_proj``) to format names, exactly as
:class:`~quantaudit.quant.engine.QuantSpec` ``plan`` takes it. Three file shapes are accepted:
``{"plan": {layer: format}}`` (what ``autotune`` writes, as ``plan.json`` and inside
``autotune.json``), ``{"format": DEFAULT, "layers": {layer: format}}``, and a bare
``{layer: format}``. Layers a plan does not name get ``DEFAULT`` when given, else stay unquantized,
as in TensorRT-LLM's ``MIXED_PRECISION`` checkpoints, where a layer absent from ``quant_cfg.json``
is not quantized.
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
