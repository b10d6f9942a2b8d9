"""What the exporters read from a :class:`~quantaudit.quant.engine.QuantizedModel`.

The architecture facts a TensorRT-LLM checkpoint config needs (Llama only, refused otherwise), the
linears grouped the way a checkpoint stores them, and the value of each tensor *role* of
:mod:`quantaudit.export.layout` computed from the engine's records - nothing is re-quantized:
codes and scales are the audited ones. Values a fused TensorRT-LLM linear holds once (the qkv
weight scale of FP8, activation scales, pre-quant scales) must be identical across its HF parts;
if they are not, exporting would change the audited numbers, so it is refused.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..arch import ARCHITECTURES
from ..errors import UserError
from ..quant.weightonly import load_source
from .layout import Storage, TensorSpec
from .packing import PACKINGS


@dataclass(frozen=True)
class ModelFacts:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    eps: float
    rope_theta: float
    max_positions: int
    hidden_act: str


def model_facts(config) -> ModelFacts:
    """The sizes of an HF config TensorRT-LLM's ``llama`` decoder runs (the families ``arch`` marks ``trtllm``:
    Llama, and Mistral without a sliding window, which ModelOpt also exports as ``llama``); else refused."""
    model_type = getattr(config, "model_type", None)
    writable = [t for a in ARCHITECTURES if a.trtllm for t in a.model_types]
    if model_type not in writable:
        raise UserError(
            f"--target trtllm writes the model types {', '.join(writable)} so far; this model is {model_type!r}: "
            "use --target hf, which writes every family quantaudit audits"
        )
    if getattr(config, "sliding_window", None) is not None:
        raise UserError(f"--target trtllm: this {model_type} model uses a sliding attention window "
                        f"({config.sliding_window}), which the llama checkpoint layout cannot state; use --target hf")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise UserError("export of Llama models with attention/MLP biases is not supported yet")
    rope = dict(getattr(config, "rope_parameters", None) or {})
    if rope.get("rope_type", "default") != "default":
        raise UserError(f"export of RoPE scaling {rope.get('rope_type')!r} is not supported yet (default RoPE only)")
    theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    return ModelFacts(
        layers=config.num_hidden_layers, hidden=config.hidden_size, heads=config.num_attention_heads,
        kv_heads=config.num_key_value_heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads,
        intermediate=config.intermediate_size, vocab=config.vocab_size, eps=float(config.rms_norm_eps),
        rope_theta=float(theta), max_positions=config.max_position_embeddings, hidden_act=config.hidden_act,
    )


@dataclass
class Part:
    """One HF linear of the quantized model: its record and module."""

    name: str
    record: object  # LayerRecord
    module: nn.Module

    @property
    def quantized(self) -> bool:
        return self.record.quantized


def parts_of(qm, names: list[str]) -> list[Part]:
    return [Part(n, qm.layers[n], qm.model.get_submodule(n)) for n in names]


def common_format(parts: list[Part], what: str) -> tuple[str | None, int | None]:
    """The one format (None: all unquantized) and group size of linears stored as one tensor."""
    kinds = {(p.record.format, p.record.group_size) if p.quantized else (None, None) for p in parts}
    if len(kinds) > 1:
        shown = ", ".join(f"{p.name}={p.record.format if p.quantized else 'unquantized'}" for p in parts)
        raise UserError(f"{what} is one linear in the checkpoint but its parts differ ({shown}); quantize them alike")
    return kinds.pop()


def _shared(values: list[torch.Tensor | None], role: str, what: str) -> torch.Tensor | None:
    first = values[0]
    for v in values[1:]:
        if (v is None) != (first is None) or (v is not None and not torch.equal(v, first)):
            raise UserError(
                f"{what}: its parts have different {role} values, but the checkpoint holds one for all of them; "
                "exporting would change the audited numbers"
            )
    return first


def _smoother(part: Part) -> torch.Tensor:
    """SmoothQuant's s of a row-parallel linear (the engine applies x * (1/s)); ones without smoothing."""
    r = part.record
    if r.pre_quant_scale is None:
        return torch.ones(r.in_features)
    s = r.details.get("smoothing_scale")
    if s is None or not torch.equal(1.0 / s, r.pre_quant_scale):
        raise UserError(f"{part.name}: its input multiplier is not 1/s of a recorded smoothing scale; cannot write a smoother")
    return s


def _weight_scale(part: Part, shape: tuple[str, ...]) -> torch.Tensor:
    scale = part.record.weight_scale.float()
    if "in/g" in shape:
        return scale
    return scale.reshape(1, -1) if shape == ("1", "out") else scale.reshape(-1)


# role -> (per_part, value): per_part roles give one tensor per HF part (concatenated on ``out``).
PER_PART_ROLES = {
    "codes": lambda p, shape: p.record.codes,
    "load_source": lambda p, shape: load_source(p.record.codes, p.record.weight_scale),
    "weight_scale": _weight_scale,
    "float_weight": lambda p, shape: p.module.weight.detach().float(),
}
SHARED_ROLES = {
    "weight_scale": lambda parts: [p.record.weight_scale.float() for p in parts],
    "act_scale": lambda parts: [p.record.act_scale for p in parts],
    "pqs": lambda parts: [p.record.pre_quant_scale for p in parts],
    "smoother": lambda parts: [_smoother(p) for p in parts],
    "weight_scale_2": lambda parts: [p.record.weight_scale_2 for p in parts],  # W4A8's FP8 stage, shared by fused qkv
}


def role_value(spec: TensorSpec, parts: list[Part], what: str) -> list[torch.Tensor] | torch.Tensor:
    """The full (unsplit) value of ``spec`` for the linear made of ``parts``: a list of per-part
    tensors for roles stored per output channel, else one tensor shaped like ``spec``."""
    if spec.role in PER_PART_ROLES and any(d.startswith("out") for d in spec.shape):
        return [PER_PART_ROLES[spec.role](p, spec.shape) for p in parts]
    if spec.role == "one":
        value = torch.ones(())
    else:
        value = _shared(SHARED_ROLES[spec.role](parts), spec.role.replace("_", " "), what)
        if value is None:  # only pqs may be absent: the engine multiplies by nothing, the checkpoint by ones
            value = torch.ones(parts[0].record.in_features)
    return value.float().reshape([1 if d == "1" else -1 for d in spec.shape] if spec.shape else [])


def out_axis(spec: TensorSpec) -> int:
    return next(i for i, d in enumerate(spec.shape) if d.startswith("out"))


def encode(t: torch.Tensor, spec: TensorSpec, ckpt_dtype: torch.dtype) -> torch.Tensor:
    """Codes packed two per byte where the layout says so; then the stored dtype."""
    if spec.packed:
        t = PACKINGS[spec.pack_axis][0](t)
        return t.view(spec.dtype) if spec.dtype == torch.int8 else t
    return t.to(spec.dtype or ckpt_dtype).contiguous().clone()  # owns its memory: safetensors refuses shared storage


PLAIN = Storage(None, None, (TensorSpec("weight", "float_weight", None, ("out", "in")),))  # an unquantized linear
