"""Architecture facts as data: where each supported family keeps its decoder linears, and how a scale folds.

One entry per family (llm-compressor's ``MAPPINGS_REGISTRY`` and ModelOpt's per-model layer detection keep
the same facts): the groups of linears that read one input, the module that really produces that input
(the norm a SmoothQuant / AWQ scale folds into, or None where no exact fold exists), which groups
TensorRT-LLM runs as one GEMM, how the family's RMSNorm applies its weight, and what the logits do after
``lm_head``. Calibration, the engine, the outlier audit, sensitivity, layer streaming and both exporters
read this table; adding a family is one entry here and its test (tests/test_arch.py).

Fold rules. A per-channel scale ``s`` moved from the activations into the weights (``x / s`` feeds ``W * s``)
is exact only if the module producing ``x`` can absorb ``1 / s``:

* ``w·x̂`` RMSNorm (Llama, Qwen, Mistral, Phi-3, Granite): ``w' = w / s``;
* ``(1 + w)·x̂`` RMSNorm (Gemma 1/2/3: ``GemmaRMSNorm`` computes ``x̂ * (1 + w)``): ``w' = (1 + w) / s − 1``;
* no norm in front (OLMo 2's post-norm layers read the residual stream; o_proj, down_proj): no exact fold,
  the scale stays an explicit per-channel input multiplier, as TensorRT-LLM's AWQ ``prequant_scaling_factor``
  and SmoothQuant ``smoother`` hold it.

Mixture-of-Experts families (Mixtral, Qwen3-MoE, GPT-OSS) keep their experts as 3-D parameters in
transformers 5, which the engine does not quantize yet: they are refused with one line, like every
family not in the table, never audited with a layer silently skipped.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .errors import UserError


@dataclass(frozen=True)
class LinearGroup:
    """Linears of one decoder layer that read the same input, paths relative to the layer."""

    linears: tuple[str, ...]
    norm: str | None  # the norm producing their input, where a scale folds exactly (None: no fold)
    # TensorRT-LLM runs them as one GEMM (qkv; gate/up in its fused gated MLP and PyTorch backend): one
    # activation scale and one per-tensor weight scale for all of them (quant.algorithms)
    fused: bool = False
    # SmoothQuant applies (folded into ``norm``, or as TensorRT-LLM's ``smoother`` on mlp.proj)
    smoothable: bool = False


@dataclass(frozen=True)
class Architecture:
    """One family's layout. Paths are relative to a decoder layer unless they say otherwise."""

    family: str
    model_types: tuple[str, ...]
    groups: tuple[LinearGroup, ...]
    norm_offset: float = 0.0  # the RMSNorm multiplies x̂ by (norm_offset + w): Gemma's 1
    # llm-awq's auto_clip skips the query and key projections: the softmax amplifies their errors
    no_clip: tuple[str, ...] = ("self_attn.q_proj", "self_attn.k_proj")
    attention: str = "self_attn"  # the module computing attention (the KV cache hook sits there)
    final_softcap: str | None = None  # config key: logits = cap * tanh(logits / cap) (Gemma 2/3)
    logits_divisor: str | None = None  # config key: logits / value (Granite's logits_scaling)
    trtllm: bool = False  # export --target trtllm writes it (ModelOpt's llama decoder layout)

    def check_layers(self, model: nn.Module) -> nn.ModuleList:
        """``model.model.layers``, every layer checked to hold this entry's linears and norms."""
        layers = getattr(getattr(model, "model", None), "layers", None)
        if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
            raise UserError(f"cannot quantize {type(model).__name__}: no decoder layers at model.model.layers")
        for i, layer in enumerate(layers):
            for group in self.groups:
                for path in group.linears:
                    if not isinstance(_get(layer, path), nn.Linear):
                        raise UserError(f"{self.family} model: model.layers.{i}.{path} is not a linear layer "
                                        f"({type(_get(layer, path)).__name__}); the {self.family} layout expects one")
                if group.norm and getattr(_get(layer, group.norm), "weight", None) is None:
                    raise UserError(f"{self.family} model: model.layers.{i}.{group.norm} is not a norm with a weight; "
                                    f"the {self.family} layout expects the norm feeding {', '.join(group.linears)} there")
        if not isinstance(_get(model, "lm_head"), nn.Linear) or getattr(_get(model, "model.norm"), "weight", None) is None:
            raise UserError(f"{self.family} model: no lm_head linear or final norm at model.model.norm")
        return layers

    def linear_names(self, n_layers: int) -> list[str]:
        """Every decoder linear's module name, in model order."""
        return [f"model.layers.{i}.{p}" for i in range(n_layers) for g in self.groups for p in g.linears]

    def group_of(self, name: str) -> tuple[LinearGroup, str] | None:
        """The group holding linear ``name`` (a full module name) and the layer prefix, else None."""
        for group in self.groups:
            for path in group.linears:
                if name.endswith("." + path) and name.startswith("model.layers."):
                    return group, name[: -len(path)]
        return None

    def divided_norm_weight(self, weight: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """The norm weight whose output is the old output divided by ``s`` (per channel): SmoothQuant's exact
        fold into ``w·x̂`` (``w / s``) or ``(1 + w)·x̂`` (``(1 + w) / s − 1``) RMSNorm."""
        s = s.to(weight.dtype)
        if self.norm_offset == 0:
            return weight / s
        return (weight + self.norm_offset) / s - self.norm_offset

    def multiplied_norm_weight(self, weight: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        """The norm weight whose output is the old output times ``m``: a pre-quant scale folded on export."""
        m = m.to(weight.dtype)
        if self.norm_offset == 0:
            return weight * m
        return (weight + self.norm_offset) * m - self.norm_offset

    def final_logits(self, config, logits: torch.Tensor) -> torch.Tensor:
        """What the causal-LM head does after ``lm_head`` (streaming computes the logits itself)."""
        divisor = getattr(config, self.logits_divisor, None) if self.logits_divisor else None
        if divisor:
            logits = logits / divisor
        cap = getattr(config, self.final_softcap, None) if self.final_softcap else None
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits


def _get(module: nn.Module, path: str) -> nn.Module | None:
    try:
        return module.get_submodule(path)
    except AttributeError:
        return None


_QKV = LinearGroup(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "input_layernorm",
                   fused=True, smoothable=True)
_O = LinearGroup(("self_attn.o_proj",), None)
_DOWN = LinearGroup(("mlp.down_proj",), None, smoothable=True)


def _gated_mlp(norm: str | None) -> tuple[LinearGroup, ...]:
    return (LinearGroup(("mlp.gate_proj", "mlp.up_proj"), norm, fused=True, smoothable=True), _DOWN)


LLAMA_GROUPS = (_QKV, _O, *_gated_mlp("post_attention_layernorm"))

ARCHITECTURES = (
    # Llama 2/3.x (any RoPE scaling: the rotary embedding is the model's own), SmolLM2, TinyLlama
    Architecture("llama", ("llama",), LLAMA_GROUPS, trtllm=True),
    Architecture("mistral", ("mistral",), LLAMA_GROUPS, trtllm=True),
    Architecture("qwen2", ("qwen2",), LLAMA_GROUPS),  # q/k/v biases: kept in 16 bit, added after the GEMM
    Architecture("qwen3", ("qwen3",), LLAMA_GROUPS),  # q_norm/k_norm act after q/k_proj: no effect on folds
    Architecture("granite", ("granite",), LLAMA_GROUPS, logits_divisor="logits_scaling"),
    Architecture("gemma", ("gemma",), LLAMA_GROUPS, norm_offset=1.0),
    # Gemma 2/3: the MLP reads pre_feedforward_layernorm; post_attention_layernorm normalises o_proj's output
    Architecture("gemma2", ("gemma2",), (_QKV, _O, *_gated_mlp("pre_feedforward_layernorm")), norm_offset=1.0,
                 final_softcap="final_logit_softcapping"),
    Architecture("gemma3_text", ("gemma3_text",), (_QKV, _O, *_gated_mlp("pre_feedforward_layernorm")),
                 norm_offset=1.0, final_softcap="final_logit_softcapping"),
    # OLMo 2 normalises the outputs (post-norm): q/k/v and gate/up read the residual stream, no exact fold
    Architecture("olmo2", ("olmo2",), (LinearGroup(_QKV.linears, None, fused=True, smoothable=True), _O,
                                       *_gated_mlp(None))),
    # Phi-3/4: fused qkv_proj and gate_up_proj (one nn.Linear each, as TensorRT-LLM stores them)
    Architecture("phi3", ("phi3",), (LinearGroup(("self_attn.qkv_proj",), "input_layernorm", fused=True, smoothable=True),
                                     LinearGroup(("self_attn.o_proj",), None),
                                     LinearGroup(("mlp.gate_up_proj",), "post_attention_layernorm", fused=True,
                                                 smoothable=True),
                                     _DOWN),
                 no_clip=("self_attn.qkv_proj",)),
)
_BY_MODEL_TYPE = {t: a for a in ARCHITECTURES for t in a.model_types}
MOE_MODEL_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe", "gpt_oss", "deepseek_v3", "dbrx", "olmoe", "granitemoe")


def supported() -> str:
    return ", ".join(t for a in ARCHITECTURES for t in a.model_types)


def architecture_for_config(config) -> Architecture:
    """The table entry of a transformers config, or a one-line refusal naming the supported families."""
    model_type = getattr(config, "model_type", None)
    arch = _BY_MODEL_TYPE.get(model_type)
    if arch is not None:
        return arch
    if model_type in MOE_MODEL_TYPES:
        raise UserError(f"model type {model_type!r} is a Mixture-of-Experts model, which quantaudit does not quantize "
                        f"yet (its experts are 3-D parameters); supported: {supported()}")
    raise UserError(f"model type {model_type!r} is not supported; supported: {supported()}")


def architecture(model: nn.Module) -> Architecture:
    """The table entry of ``model`` (a transformers causal LM), refused with one line if absent."""
    return architecture_for_config(getattr(model, "config", None))


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """``model.model.layers``, checked layer by layer against the model's table entry."""
    return architecture(model).check_layers(model)
