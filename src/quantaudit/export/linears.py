"""What the exporters read from a :class:`~quantaudit.quant.engine.QuantizedModel`.

The architecture facts a TensorRT-LLM checkpoint config needs (the families :mod:`quantaudit.arch` gives a
:class:`~quantaudit.arch.TrtllmDecoder`, refused otherwise), the linears grouped the way a checkpoint stores
them, and the value of each tensor *role* of :mod:`quantaudit.export.layout` computed from the engine's
records - nothing is re-quantized: codes and scales are the audited ones. Values a fused TensorRT-LLM linear
holds once (the qkv weight scale of FP8, activation scales, pre-quant scales) must be identical across its HF
parts; if they are not, exporting would change the audited numbers, so it is refused.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..arch import ARCHITECTURES, ModelDims, SparseMoE, TrtllmDecoder, TrtllmSlot
from ..errors import UserError
from ..quant.weightonly import load_source
from .layout import Storage, TensorSpec, hf_writes
from .packing import PACKINGS

FULL_ATTENTION, SLIDING_ATTENTION = "full_attention", "sliding_attention"  # transformers' layer_types


@dataclass(frozen=True)
class ModelFacts(ModelDims):
    decoder: TrtllmDecoder
    model_type: str
    eps: float
    rope_theta: float
    rotary_pct: float
    max_positions: int
    hidden_act: str  # TensorRT-LLM's name
    norm_offset: float  # norms are stored as norm_offset + w (Gemma's (1 + w)·x̂ RMSNorm: TensorRT-LLM's w·x̂)
    family_config: dict  # the family's own config.json keys
    sliding_window: int | None  # the window of the model's sliding layers (None: none), >= the engine's tokens
    sparse: SparseMoE | None  # where the HF layers keep their experts and router (decoder.moe: stacked slots)
    moe_config: dict | None  # config.json "moe": num_experts, top_k, normalization_mode


def trtllm_writable() -> str:
    return ", ".join(t for a in ARCHITECTURES if a.trtllm for t in a.model_types)


def _ropes(config) -> dict[str, dict]:
    """The RoPE parameters per attention kind (transformers 5 nests them by layer type for Gemma 3)."""
    rope = dict(getattr(config, "rope_parameters", None) or {})
    if rope and all(isinstance(v, dict) for v in rope.values()):
        return rope
    rope.setdefault("rope_theta", getattr(config, "rope_theta", None) or 10000.0)
    return {FULL_ATTENTION: rope}


def _layer_types(config) -> list[str]:
    """Each layer's attention kind: the config's layer_types, else every layer sliding where it names a window
    (Mistral)."""
    types = getattr(config, "layer_types", None)
    if types:
        return list(types)
    sliding = getattr(config, "sliding_window", None) is not None
    return [SLIDING_ATTENTION if sliding else FULL_ATTENTION] * config.num_hidden_layers


def _sliding_pattern(types: list[str], model_type: str) -> int:
    """Gemma 3's ``_sliding_window_pattern`` P: TensorRT-LLM makes layer i local iff (i + 1) % P
    (models/gemma/model.py), so the model's layer types must follow that period."""
    pattern = types.index(FULL_ATTENTION) + 1 if FULL_ATTENTION in types else len(types) + 1
    if any((t == SLIDING_ATTENTION) != bool((i + 1) % pattern) for i, t in enumerate(types)):
        raise UserError(f"--target trtllm: this {model_type} model's sliding/full layer order is not one full layer "
                        f"every {pattern} layers, the only order TensorRT-LLM's gemma3 decoder states; use --target hf")
    return pattern


def model_facts(config, max_seq_len: int) -> ModelFacts:
    """What TensorRT-LLM's decoder of this HF config runs, as ModelOpt's ``export_tensorrt_llm_checkpoint`` writes
    it (``tensorrt_llm_utils.convert_to_tensorrt_llm_config`` + the family's TensorRT-LLM config class); refused
    with one line where TensorRT-LLM would compute something else. ``max_seq_len``: the longest sequence the
    engine is built for (trtllm-build ``--max_seq_len``), which decides whether a sliding window can bind."""
    model_type = getattr(config, "model_type", None)
    arch = next((a for a in ARCHITECTURES if model_type in a.model_types), None)
    if arch is None or arch.trtllm is None:
        other = ("quantaudit does not audit that family" if arch is None else
                 "use --target hf (TensorRT-LLM's PyTorch backend and vLLM read it)" if hf_writes(arch) else
                 "quantaudit exports it to neither target yet")
        raise UserError(f"--target trtllm writes the model types {trtllm_writable()} (the decoders ModelOpt exports "
                        f"for TensorRT-LLM's TensorRT engines); this model is {model_type!r}: {other}")
    decoder = arch.trtllm
    ropes = _ropes(config)
    odd = next((r.get("rope_type", "default") for r in ropes.values() if r.get("rope_type", "default") != "default"), None)
    if odd:
        raise UserError(f"export of RoPE scaling {odd!r} is not supported yet (default RoPE only)")
    thetas = {kind: float(r["rope_theta"]) for kind, r in ropes.items()}
    if len(set(thetas.values())) > 1 and not decoder.local_rope:
        raise UserError(f"--target trtllm: this {model_type} model's layers use RoPE bases {thetas}, TensorRT-LLM's "
                        f"{decoder.decoder} decoder one; use --target hf")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise UserError(f"export of {model_type} models with attention/MLP biases is not supported yet")
    hf_act = getattr(config, "hidden_activation", None) or config.hidden_act
    trt_act = dict(decoder.hidden_act).get(hf_act)
    if trt_act is None:
        raise UserError(f"--target trtllm: TensorRT-LLM's {decoder.decoder} decoder runs the activations "
                        f"{', '.join(a for a, _ in decoder.hidden_act)}; this model uses {hf_act!r}; use --target hf")
    eps = float(config.rms_norm_eps)
    if decoder.qk_norm_eps is not None and eps != decoder.qk_norm_eps:
        raise UserError(f"--target trtllm: TensorRT-LLM's {decoder.decoder} decoder normalises queries and keys with eps "
                        f"{decoder.qk_norm_eps} whatever the config says (layers/attention.py), this model with {eps}: "
                        "its engine would compute other attention scores; use --target hf")
    types = _layer_types(config)
    window = getattr(config, "sliding_window", None)
    sliding = types.count(SLIDING_ATTENTION) if window is not None else 0  # no window: transformers attends to all
    if sliding and window < max_seq_len:
        raise UserError(f"--target trtllm: {sliding} of the {len(types)} layers of this {model_type} model attend to a "
                        f"sliding window of {window} tokens, which a TensorRT-LLM checkpoint cannot state (its engine "
                        f"attends to every token it holds); build for at most {window} tokens (--max-input-len + "
                        f"--max-output-len, now {max_seq_len}) or use --target hf")
    family = dict(decoder.config) | {k: getattr(config, k) for k in decoder.copied}
    full_theta = thetas.get(FULL_ATTENTION, next(iter(thetas.values())))
    if decoder.local_rope:  # models/modeling_utils.py Gemma3ConfigGroup
        family.update(_sliding_window_pattern=_sliding_pattern(types, model_type),
                      rope_local_base_freq=thetas.get(SLIDING_ATTENTION, full_theta), sliding_window=window)
    rotary_pct = next(iter(ropes.values())).get("partial_rotary_factor") or getattr(config, "partial_rotary_factor", None)
    moe_config = None
    if decoder.moe:
        moe_config = {key: getattr(config, hf_key) for key, hf_key in decoder.moe.hf_keys}
        moe_config["normalization_mode"] = decoder.moe.normalization_mode
    return ModelFacts(
        **asdict(ModelDims.of(config, f"the {model_type} config")), decoder=decoder, model_type=model_type, eps=eps,
        rope_theta=full_theta,
        rotary_pct=float(rotary_pct or 1.0), max_positions=config.max_position_embeddings, hidden_act=trt_act,
        norm_offset=arch.norm_offset, family_config=family, sliding_window=window if sliding else None,
        sparse=arch.moe if decoder.moe else None, moe_config=moe_config,
    )


def block_rows(block: str | None, out_features: int, heads: int, kv_heads: int, head_dim: int) -> slice:
    """The rows of ``block`` (:class:`~quantaudit.arch.TrtllmSlot`) in a fused HF linear of ``out_features``."""
    q, kv = heads * head_dim, kv_heads * head_dim
    if block in ("q", "k", "v") and q + 2 * kv != out_features:
        raise UserError(f"a fused qkv linear of {out_features} outputs is not the q, k and v rows of {heads} and "
                        f"{kv_heads} heads of {head_dim}")
    blocks = {None: slice(0, out_features), "q": slice(0, q), "k": slice(q, q + kv), "v": slice(q + kv, q + 2 * kv),
              "gate": slice(0, out_features // 2), "up": slice(out_features // 2, out_features)}
    return blocks[block]


@dataclass
class Part:
    """One HF linear of the quantized model (or a row block of a fused one): its record and module."""

    name: str
    record: object  # LayerRecord
    module: nn.Module
    rows: slice | None = None  # a row block of a fused linear (None: all its rows)

    @property
    def quantized(self) -> bool:
        return self.record.quantized

    @property
    def out_features(self) -> int:
        return self.record.out_features if self.rows is None else self.rows.stop - self.rows.start

    def own(self, t: torch.Tensor | None) -> torch.Tensor | None:
        """This part's rows of a per-output-channel tensor of the whole linear (others as they are)."""
        if t is None or self.rows is None or t.dim() == 0 or t.shape[0] != self.record.out_features:
            return t
        return t[self.rows]

    def dequantized_weight(self) -> torch.Tensor:
        return self.own(self.record.dequantized_weight())


def slot_paths(slot: TrtllmSlot, layer: int, facts: ModelFacts) -> list[str]:
    """The HF linears (``path`` or ``path:block``, full module names) slot ``slot`` of decoder layer ``layer`` holds:
    an experts slot's projections expert by expert."""
    prefix = f"model.layers.{layer}."
    if not slot.experts:
        return [prefix + p for p in slot.parts]
    return [f"{prefix}{facts.sparse.experts}.{e}.{p}" for e in range(facts.moe_config["num_experts"]) for p in slot.parts]


def parts_of(qm, names: list[str], facts: ModelFacts | None = None) -> list[Part]:
    """The parts ``names`` (``path`` or ``path:block``, full module names) of the quantized model."""
    parts = []
    for spec in names:
        name, _, block = spec.partition(":")
        record = qm.layers[name]
        rows = block_rows(block, record.out_features, facts.heads, facts.kv_heads, facts.head_dim) if block else None
        parts.append(Part(name, record, qm.model.get_submodule(name), rows))
    return parts


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
    scale = part.own(part.record.weight_scale).float()
    if "in/g" in shape:
        return scale
    return scale.reshape(1, -1) if shape == ("1", "out") else scale.reshape(-1)


# role -> (per_part, value): per_part roles give one tensor per HF part (concatenated on ``out``).
PER_PART_ROLES = {
    "codes": lambda p, shape: p.own(p.record.codes),
    "load_source": lambda p, shape: load_source(p.own(p.record.codes), p.own(p.record.weight_scale)),
    "weight_scale": _weight_scale,
    "float_weight": lambda p, shape: p.own(p.module.weight.detach().float()),
    "bias": lambda p, shape: p.own(p.record.bias.detach().float()),
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
