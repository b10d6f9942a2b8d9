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

Mixture-of-Experts families (Mixtral, Qwen3-MoE, GPT-OSS): :class:`SparseMoE` says where the sparse block
keeps its experts and router. The loaded model's 3-D experts are turned into one linear per expert projection
(:mod:`quantaudit.moe`), so a sparse layer's groups are the attention groups plus, per expert, gate/up (one
fused GEMM, as TensorRT-LLM's fused MoE runs ``fc1``) and down. No exact fold exists for the experts: the
norm also feeds the router, and one scale cannot suit every expert, so SmoothQuant / AWQ scales stay explicit
per-expert input multipliers. The router stays in 16 bit (ModelOpt disables ``*router*`` / ``*mlp.gate.*``)
and is listed as such. Layers without experts (Qwen3-MoE's ``mlp_only_layers``) use the dense groups.
Other MoE families (DeepSeek MLA, Qwen2-MoE's shared experts, DBRX, ...) are refused with one line.

TensorRT-LLM checkpoints (``export --target trtllm``): :class:`TrtllmDecoder` holds, per family that NVIDIA
ModelOpt's ``export_tensorrt_llm_checkpoint`` writes, what its TensorRT-LLM model class
reads: the ``architecture`` (``tensorrt_llm/models/__init__.py`` ``MODEL_MAP``), ModelOpt's decoder type
(``model_utils.MODEL_NAME_TO_TYPE``), the linears and norms of a layer under their TensorRT-LLM names
(``layer_utils.build_decoder_config`` / ``build_attention_config`` / ``build_mlp_config``) and the family's
config keys (``models/{qwen,gemma,phi3}/config.py``); for Mixtral also the sparse block as TensorRT-LLM's
``MixtureOfExperts`` holds it (:class:`TrtllmMoE`). Families without one (Granite, OLMo 2, Qwen3-MoE, GPT-OSS)
are refused by that exporter with one line naming those that have one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .errors import UserError
from .moe import LinearExperts


@dataclass(frozen=True)
class ModelDims:
    """A decoder's dimensions as its Hugging Face config states them, read in one place for the advisor's sizing
    (:mod:`quantaudit.advise.model_shape`) and the TensorRT-LLM exporter (:mod:`quantaudit.export.linears`)."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int

    @classmethod
    def of(cls, config, where: str, hint: str = "") -> ModelDims:
        """From ``config`` (the text config of a multimodal one); a missing dimension is refused naming ``where``
        (and ``hint``: what to do instead)."""
        cfg = config.get_text_config() if hasattr(config, "get_text_config") else config

        def required(key: str):
            value = getattr(cfg, key, None)
            if value is None:
                raise UserError(f"{where} has no {key}" + (f": {hint}" if hint else ""))
            return value

        heads, hidden = required("num_attention_heads"), required("hidden_size")
        return cls(layers=required("num_hidden_layers"), hidden=hidden, heads=heads,
                   kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
                   head_dim=getattr(cfg, "head_dim", None) or hidden // heads,
                   intermediate=required("intermediate_size"), vocab=required("vocab_size"))


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
class SparseMoE:
    """Where a family's sparse MoE block keeps its experts (:class:`quantaudit.moe.LinearExperts` once loaded)
    and its router, paths relative to the decoder layer."""

    experts: str = "mlp.experts"
    router: str = "mlp.gate"
    # How checkpoints store them (transformers' save_pretrained, and the quantized checkpoints ModelOpt writes):
    # per expert, "{e}" and the gate/up/down projection names filled in (Mixtral: block_sparse_moe.experts.{e}.w1
    # / w3 / w2), or None: as the 3-D parameters of the loaded experts module (GPT-OSS).
    checkpoint_experts: str | None = "mlp.experts.{e}"
    checkpoint_projections: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    checkpoint_router: str = "mlp.gate"

    @property
    def block(self) -> str:
        """The sparse block (router + experts), e.g. ``mlp``."""
        return self.experts.rpartition(".")[0]

    def checkpoint_name(self, name: str) -> str:
        """The checkpoint's name of a layer-relative module or tensor of the loaded model (router and per-expert
        linears renamed, anything else as it is)."""
        if name == self.router or name.startswith(self.router + "."):
            return self.checkpoint_router + name[len(self.router):]
        if self.checkpoint_experts and name.startswith(self.experts + "."):
            expert, projection, *tail = name[len(self.experts) + 1:].split(".")
            disk = dict(zip(("gate_proj", "up_proj", "down_proj"), self.checkpoint_projections))[projection]
            return ".".join([self.checkpoint_experts.format(e=expert), disk, *tail])
        return name

    def expert_groups(self, e: int) -> tuple[LinearGroup, LinearGroup]:
        """Expert ``e``'s gate/up (TensorRT-LLM's fused ``fc1``: one GEMM, one weight range) and down."""
        prefix = f"{self.experts}.{e}."
        return (LinearGroup((prefix + "gate_proj", prefix + "up_proj"), None, fused=True),
                LinearGroup((prefix + "down_proj",), None))

    def groups(self, n_experts: int) -> tuple[LinearGroup, ...]:
        """Every expert's groups, in expert order."""
        return tuple(g for e in range(n_experts) for g in self.expert_groups(e))


@dataclass(frozen=True)
class TrtllmSlot:
    """One linear of a TensorRT-LLM decoder layer and the HF linear rows it holds, in order (paths below the
    decoder layer). A part ``path:block`` is a row block of a fused HF linear: ``q``/``k``/``v`` of a
    ``qkv_proj`` (rows in that order, sized by the heads), ``gate``/``up`` of a ``gate_up_proj`` (halves in
    that order, as Phi-3's MLP chunks them)."""

    name: str  # below transformer.layers.N (or top level for lm_head)
    parts: tuple[str, ...]
    parallel: str  # "column": outputs split across ranks; "row": inputs split
    norm: str | None = None  # the TensorRT-LLM norm producing its input (SmoothQuant's scale_to_int sits there)
    # every expert of the layer's sparse block, stacked on a leading axis: parts are expert projections (below
    # SparseMoE.experts.{e}), expert by expert
    experts: bool = False


_NORMS = (("input_layernorm", "input_layernorm"), ("post_layernorm", "post_attention_layernorm"))
_QK_NORMS = (("attention.q_layernorm", "self_attn.q_norm"), ("attention.k_layernorm", "self_attn.k_norm"))


def _trtllm_slots(qkv: tuple[str, ...], mlp_fc: tuple[str, ...], mlp_gate: tuple[str, ...] | None,
                  mlp_norm: str) -> tuple[TrtllmSlot, ...]:
    slots = [TrtllmSlot("attention.qkv", qkv, "column", "input_layernorm"),
             TrtllmSlot("attention.dense", ("self_attn.o_proj",), "row"),
             TrtllmSlot("mlp.fc", mlp_fc, "column", mlp_norm)]
    if mlp_gate:
        slots.append(TrtllmSlot("mlp.gate", mlp_gate, "column", mlp_norm))
    return (*slots, TrtllmSlot("mlp.proj", ("mlp.down_proj",), "row"))


# TensorRT-LLM's GatedMLP computes proj(act(fc(x)) * gate(x)): gate_proj is mlp.fc, up_proj is mlp.gate
_LLAMA_SLOTS = _trtllm_slots(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj",),
                             ("mlp.up_proj",), "post_layernorm")


@dataclass(frozen=True)
class TrtllmMoE:
    """A sparse block as TensorRT-LLM's ``MixtureOfExperts`` (``layers/moe.py``) reads it from a checkpoint that ModelOpt's
    ``export_tensorrt_llm_checkpoint`` writes (``layer_utils.build_moe_config`` / ``build_stacked_experts``).

    The experts are two stacked slots (:attr:`TrtllmSlot.experts`): ``mlp.fc`` [experts, 2·inter, hidden] holding
    per expert up_proj then gate_proj rows (ModelOpt concatenates ``[w3, w1]``; ``MOEWeightWrapper`` calls the left
    half the linear projection and the right half, activated, the gate: "the inverse of GatedMLP") and ``mlp.proj``
    [experts, hidden, inter]; ``hidden_act`` ``swiglu`` (``MOEConfig.hidden_act``; TensorRT-LLM's
    ``LLaMAConfig.from_hugging_face`` makes Mixtral's gated activation explicit the same way), ``intermediate_size``
    the expert's. The router is ``mlp.router``, a ``RowLinear`` TensorRT-LLM builds in float32, unsplit ("routing
    is sensitive"); ModelOpt casts it so (``config.router.weight.type(torch.float)``, ``postprocess_tensors`` skips
    ``router``) and lists it unquantized in ``exclude_modules``, which TensorRT-LLM's ``quantize_layers`` then skips.
    ``config.json`` gets ``moe`` {``num_experts``, ``top_k``, ``normalization_mode``} and ``mapping``
    ``moe_tp_size`` = ``tp_size``, ``moe_ep_size`` 1 (``tensorrt_llm_utils.convert_to_tensorrt_llm_config``).
    """

    router: str = "mlp.router"  # below transformer.layers.N; weight [experts, hidden]
    # config.json moe keys read from the HF config (LLaMAConfig.from_hugging_face: num_local_experts, num_experts_per_tok)
    hf_keys: tuple[tuple[str, str], ...] = (("num_experts", "num_local_experts"), ("top_k", "num_experts_per_tok"))
    # MoeConfig.ExpertScaleNormalizationMode.RENORMALIZE (1), what ModelOpt and LLaMAConfig write for Mixtral: the
    # softmax of the top-k router logits, equal to transformers' top-k of the softmax renormalised to sum 1
    normalization_mode: int = 1


@dataclass(frozen=True)
class TrtllmDecoder:
    """A family as ModelOpt's ``export_tensorrt_llm_checkpoint`` writes it and TensorRT-LLM's model class reads it."""

    architecture: str  # config.json "architecture": the HF architecture, a key of TensorRT-LLM's MODEL_MAP
    decoder: str  # ModelOpt's decoder type (config.json "decoder")
    slots: tuple[TrtllmSlot, ...] = _LLAMA_SLOTS
    norms: tuple[tuple[str, str], ...] = _NORMS  # TensorRT-LLM norm -> HF norm, below the decoder layer
    config: tuple[tuple[str, object], ...] = ()  # the family's own config.json keys, fixed values
    copied: tuple[str, ...] = ()  # the family's own config.json keys, the HF config's value of the same name
    # HF activation -> config.json hidden_act (TensorRT-LLM's ACT2FN name computing the same function)
    hidden_act: tuple[tuple[str, str], ...] = (("silu", "silu"), ("gelu_pytorch_tanh", "gelu_pytorch_tanh"))
    biased: tuple[str, ...] = ()  # slots whose linears have a bias (the HF layer must have it there, nowhere else)
    qk_norm_eps: float | None = None  # the eps TensorRT-LLM's q/k RmsNorms use, whatever the config says
    local_rope: bool = False  # sliding layers have their own RoPE base, chosen by _sliding_window_pattern
    shares_embedding: bool = False  # a tied, unquantized lm_head is not written (share_embedding_table)
    single_rank: str | None = None  # why only --tp 1 is written, where that is so
    moe: TrtllmMoE | None = None  # the sparse block's router and config, where the slots stack experts

    @property
    def norm_fed(self) -> set[str]:
        """The TensorRT-LLM norms that feed a linear (the others normalise outputs or q/k)."""
        return {s.norm for s in self.slots if s.norm}


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
    trtllm: TrtllmDecoder | None = None  # export --target trtllm writes it so (None: refused)
    moe: SparseMoE | None = None  # its sparse layers, where the family has experts

    def experts_of(self, layer: nn.Module) -> LinearExperts | None:
        """The layer's experts (a sparse layer), or None (a dense one)."""
        found = _get(layer, self.moe.experts) if self.moe else None
        return found if isinstance(found, LinearExperts) else None

    def layer_groups(self, layer: nn.Module) -> tuple[LinearGroup, ...]:
        """The groups of one decoder layer: ``groups``, the dense MLP replaced by the experts in a sparse layer."""
        experts = self.experts_of(layer)
        if experts is None:
            return self.groups
        attention = tuple(g for g in self.groups if not g.linears[0].startswith("mlp."))
        return attention + self.moe.groups(len(experts))

    def check_layers(self, model: nn.Module) -> nn.ModuleList:
        """``model.model.layers``, every layer checked to hold this entry's linears and norms."""
        layers = getattr(getattr(model, "model", None), "layers", None)
        if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
            raise UserError(f"cannot quantize {type(model).__name__}: no decoder layers at model.model.layers")
        for i, layer in enumerate(layers):
            if self.moe and _get(layer, self.moe.experts) is not None and self.experts_of(layer) is None:
                raise UserError(f"{self.family} model: model.layers.{i}.{self.moe.experts} is "
                                f"{type(_get(layer, self.moe.experts)).__name__}, not per-expert linears "
                                "(load the model with quantaudit.models, which converts them)")
            for group in self.layer_groups(layer):
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

    def linear_names(self, layers: nn.ModuleList) -> list[str]:
        """Every decoder linear's module name, in model order."""
        return [f"model.layers.{i}.{p}" for i, layer in enumerate(layers) for g in self.layer_groups(layer)
                for p in g.linears]

    def checkpoint_name(self, name: str) -> str:
        """A full module or tensor name of the loaded model as the family's checkpoints name it (MoE experts and
        routers: :meth:`SparseMoE.checkpoint_name`; everything else is named as loaded)."""
        if not self.moe or not name.startswith("model.layers."):
            return name
        index, rest = name[len("model.layers."):].split(".", 1)
        return f"model.layers.{index}.{self.moe.checkpoint_name(rest)}"

    def drift_point(self, name: str) -> str:
        """Where the drift of linear ``name`` (full or layer-relative) is measured: at the linear, or for an MoE
        expert at its sparse block's output, since the base and quantized models may route a token to different
        experts, whose outputs therefore do not pair token by token."""
        marker = (self.moe.experts + ".") if self.moe else None
        if marker and (name.startswith(marker) or "." + marker in name):
            return name[: name.index(marker)] + self.moe.block
        return name

    def router_names(self, layers: nn.ModuleList) -> list[str]:
        """The router of every sparse layer (kept in 16 bit)."""
        return [f"model.layers.{i}.{self.moe.router}" for i, layer in enumerate(layers) if self.experts_of(layer)]

    def group_of(self, name: str) -> tuple[LinearGroup, str] | None:
        """The group holding linear ``name`` (a full module name) and the layer prefix, else None."""
        if not name.startswith("model.layers."):
            return None
        groups = self.groups
        if self.moe and f".{self.moe.experts}." in name:  # model.layers.{i}.mlp.experts.{e}.{projection}
            expert = int(name.split(f".{self.moe.experts}.", 1)[1].split(".", 1)[0])
            groups = self.moe.expert_groups(expert)
        for group in groups:
            for path in group.linears:
                if name.endswith("." + path):
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

# TensorRT-LLM decoders, from ModelOpt's layer_utils (names), TensorRT-LLM's models/<family>/model.py and config.py
_UNBIASED = (("attn_bias", False), ("mlp_bias", False))
_QWEN = (("seq_length", 8192), ("use_logn_attn", False))
# Gemma 2/3 (models/gemma/model.py, inter_layernorms): post_layernorm normalises the attention output,
# pre_feedforward_layernorm feeds the MLP, post_feedforward_layernorm normalises its output
_GEMMA2_NORMS = (*_NORMS, ("pre_feedforward_layernorm", "pre_feedforward_layernorm"),
                 ("post_feedforward_layernorm", "post_feedforward_layernorm"))
_GEMMA2_SLOTS = _trtllm_slots(_LLAMA_SLOTS[0].parts, ("mlp.gate_proj",), ("mlp.up_proj",), "pre_feedforward_layernorm")
# layers/attention.py Attention(eps=1e-05): models/qwen and models/gemma build q/k_layernorm without passing eps
_TRTLLM_QK_NORM_EPS = 1e-5
TRTLLM_DECODERS = {
    "llama": TrtllmDecoder("LlamaForCausalLM", "llama"),
    # ModelOpt writes the HF architecture (MistralForCausalLM, in MODEL_MAP as LLaMAForCausalLM), decoder llama
    "mistral": TrtllmDecoder("MistralForCausalLM", "llama"),
    # models/qwen/config.py: qwen_type = the HF model_type; attn_bias (q/k/v only: dense_bias=False) for Qwen 2;
    # seq_length, which QWenDecoderLayer reads (logn scaling, off), from_hugging_face's default
    "qwen2": TrtllmDecoder("Qwen2ForCausalLM", "qwen", biased=("attention.qkv",),
                           config=(("qwen_type", "qwen2"), *_QWEN, ("attn_bias", True), ("mlp_bias", False))),
    # models/qwen/model.py: qk_layernorm for qwen3, RmsNorm over head_size (convert.py: q_norm -> q_layernorm)
    "qwen3": TrtllmDecoder("Qwen3ForCausalLM", "qwen", norms=(*_NORMS, *_QK_NORMS),
                           config=(("qwen_type", "qwen3"), *_QWEN, *_UNBIASED), qk_norm_eps=_TRTLLM_QK_NORM_EPS),
    # models/gemma: the embedding is scaled by sqrt(hidden) in the model; norms stored as 1 + w (ModelOpt's
    # build_layernorm_config, TensorRT-LLM's gemma/convert.py "param + 1.0"); ModelOpt shares the tied lm_head
    "gemma": TrtllmDecoder("GemmaForCausalLM", "gemma", config=_UNBIASED, shares_embedding=True),
    "gemma2": TrtllmDecoder("Gemma2ForCausalLM", "gemma2", _GEMMA2_SLOTS, _GEMMA2_NORMS, config=_UNBIASED,
                            copied=("query_pre_attn_scalar", "final_logit_softcapping", "attn_logit_softcapping"),
                            shares_embedding=True),
    "gemma3_text": TrtllmDecoder("Gemma3ForCausalLM", "gemma3", _GEMMA2_SLOTS, (*_GEMMA2_NORMS, *_QK_NORMS),
                                 config=_UNBIASED, copied=("query_pre_attn_scalar", "final_logit_softcapping"),
                                 qk_norm_eps=_TRTLLM_QK_NORM_EPS, local_rope=True, shares_embedding=True),
    # models/phi3: qkv_proj is attention.qkv as it is; gate_up_proj is mlp.fc with its halves swapped, [up; gate]
    # (convert.py, ModelOpt's build_mlp_config), which its MLP runs with hidden_act swiglu (config.py)
    "phi3": TrtllmDecoder("Phi3ForCausalLM", "phi3",
                          _trtllm_slots(("self_attn.qkv_proj:q", "self_attn.qkv_proj:k", "self_attn.qkv_proj:v"),
                                        ("mlp.gate_up_proj:up", "mlp.gate_up_proj:gate"), None, "post_layernorm"),
                          hidden_act=(("silu", "swiglu"),),
                          single_rank="TensorRT-LLM's own Phi-3 converter splits the fused [up; gate] mlp.fc in plain "
                                      "row halves across ranks (phi3/split_weights.py), not [up; gate] per rank; which "
                                      "of the two its swiglu MLP reads is not verified"),
    # models/llama with MOE (TrtllmMoE): ModelOpt writes the HF architecture (MixtralForCausalLM, in MODEL_MAP as
    # LLaMAForCausalLM), decoder llama (model_utils.MODEL_NAME_TO_TYPE); attention and norms as Llama's
    "mixtral": TrtllmDecoder("MixtralForCausalLM", "llama",
                             (*_LLAMA_SLOTS[:2],
                              TrtllmSlot("mlp.fc", ("up_proj", "gate_proj"), "column", "post_layernorm", experts=True),
                              TrtllmSlot("mlp.proj", ("down_proj",), "row", experts=True)),
                             hidden_act=(("silu", "swiglu"),), moe=TrtllmMoE(),
                             single_rank="TensorRT-LLM splits experts by moe_tp_size / moe_ep_size, and ModelOpt's own "
                                         "split (postprocess._split_model_config_for_tp) splits only the stacked expert "
                                         "weights, not their per-group or block scales; a split quantaudit could "
                                         "verify against both is not written"),
}

ARCHITECTURES = (
    # Llama 2/3.x (any RoPE scaling: the rotary embedding is the model's own), SmolLM2, TinyLlama
    Architecture("llama", ("llama",), LLAMA_GROUPS, trtllm=TRTLLM_DECODERS["llama"]),
    Architecture("mistral", ("mistral",), LLAMA_GROUPS, trtllm=TRTLLM_DECODERS["mistral"]),
    Architecture("qwen2", ("qwen2",), LLAMA_GROUPS, trtllm=TRTLLM_DECODERS["qwen2"]),  # q/k/v biases: kept in 16 bit, added after the GEMM
    Architecture("qwen3", ("qwen3",), LLAMA_GROUPS, trtllm=TRTLLM_DECODERS["qwen3"]),  # q_norm/k_norm act after q/k_proj: no effect on folds
    Architecture("granite", ("granite",), LLAMA_GROUPS, logits_divisor="logits_scaling"),
    Architecture("gemma", ("gemma",), LLAMA_GROUPS, norm_offset=1.0, trtllm=TRTLLM_DECODERS["gemma"]),
    # Gemma 2/3: the MLP reads pre_feedforward_layernorm; post_attention_layernorm normalises o_proj's output
    Architecture("gemma2", ("gemma2",), (_QKV, _O, *_gated_mlp("pre_feedforward_layernorm")), norm_offset=1.0,
                 final_softcap="final_logit_softcapping", trtllm=TRTLLM_DECODERS["gemma2"]),
    Architecture("gemma3_text", ("gemma3_text",), (_QKV, _O, *_gated_mlp("pre_feedforward_layernorm")),
                 norm_offset=1.0, final_softcap="final_logit_softcapping", trtllm=TRTLLM_DECODERS["gemma3_text"]),
    # OLMo 2 normalises the outputs (post-norm): q/k/v and gate/up read the residual stream, no exact fold
    Architecture("olmo2", ("olmo2",), (LinearGroup(_QKV.linears, None, fused=True, smoothable=True), _O,
                                       *_gated_mlp(None))),
    # Phi-3/4: fused qkv_proj and gate_up_proj (one nn.Linear each, as TensorRT-LLM stores them)
    Architecture("phi3", ("phi3",), (LinearGroup(("self_attn.qkv_proj",), "input_layernorm", fused=True, smoothable=True),
                                     LinearGroup(("self_attn.o_proj",), None),
                                     LinearGroup(("mlp.gate_up_proj",), "post_attention_layernorm", fused=True,
                                                 smoothable=True),
                                     _DOWN),
                 no_clip=("self_attn.qkv_proj",), trtllm=TRTLLM_DECODERS["phi3"]),
    # Mixture of Experts: attention as Llama's, per-expert linears in the sparse layers (SparseMoE). Qwen3-MoE's
    # mlp_only_layers are dense (LLAMA_GROUPS' MLP); GPT-OSS adds attention sinks and biases everywhere.
    Architecture("mixtral", ("mixtral",), LLAMA_GROUPS, trtllm=TRTLLM_DECODERS["mixtral"],
                 moe=SparseMoE(checkpoint_experts="block_sparse_moe.experts.{e}", checkpoint_projections=("w1", "w3", "w2"),
                               checkpoint_router="block_sparse_moe.gate")),
    Architecture("qwen3_moe", ("qwen3_moe",), LLAMA_GROUPS, moe=SparseMoE()),
    Architecture("gpt_oss", ("gpt_oss",), LLAMA_GROUPS,
                 moe=SparseMoE(router="mlp.router", checkpoint_experts=None, checkpoint_router="mlp.router")),
)
_BY_MODEL_TYPE = {t: a for a in ARCHITECTURES for t in a.model_types}
MOE_MODEL_TYPES = ("qwen2_moe", "deepseek_v3", "dbrx", "olmoe", "granitemoe")


def supported() -> str:
    return ", ".join(t for a in ARCHITECTURES for t in a.model_types)


def architecture_for_config(config) -> Architecture:
    """The table entry of a transformers config, or a one-line refusal naming the supported families."""
    model_type = getattr(config, "model_type", None)
    arch = _BY_MODEL_TYPE.get(model_type)
    if arch is not None:
        return arch
    if model_type in MOE_MODEL_TYPES:
        raise UserError(f"model type {model_type!r} is a Mixture-of-Experts layout quantaudit does not map "
                        f"yet; supported: {supported()}")
    raise UserError(f"model type {model_type!r} is not supported; supported: {supported()}")


def architecture(model: nn.Module) -> Architecture:
    """The table entry of ``model`` (a transformers causal LM), refused with one line if absent."""
    return architecture_for_config(getattr(model, "config", None))


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """``model.model.layers``, checked layer by layer against the model's table entry."""
    return architecture(model).check_layers(model)
