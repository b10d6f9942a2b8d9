"""The exported checkpoint layouts as data: which tensors a quantized linear becomes, per format.

Two targets, both as NVIDIA ModelOpt 0.47 writes them and as their loaders read them:

* ``trtllm``: the TensorRT-LLM checkpoint (``docs/source/architecture/checkpoint.md``), written
  by ModelOpt's ``export_tensorrt_llm_checkpoint`` (``model_config_export.py``,
  ``model_config_utils.pack_linear_weights``, ``quant_utils.to_quantized_weight`` /
  ``pack_int4_in_uint8`` / ``postprocess_tensors``) and read by TensorRT-LLM's
  ``models/modeling_utils.preprocess_weights`` + the layers of ``quantization/layers.py``.
  Q, K and V are one ``attention.qkv`` linear (rows concatenated), gate_proj is ``mlp.fc`` (the
  activation branch), up_proj is ``mlp.gate``, down_proj is ``mlp.proj``.
* ``hf``: ModelOpt's unified Hugging Face checkpoint (``unified_export_hf.py``): original HF
  names plus ``weight_scale`` / ``input_scale`` / ``weight_scale_2`` / ``pre_quant_scale`` /
  ``k_proj.k_scale`` / ``v_proj.v_scale``, read by TensorRT-LLM's PyTorch backend
  (``_torch/modules/linear.py``) and vLLM (``quantization/modelopt.py``).

A tensor is described by its *role* (what it holds from :class:`~quantaudit.quant.engine.LayerRecord`),
its dtype (``None``: the checkpoint dtype, ``config.json`` ``dtype``) and its shape in symbolic
dimensions (``out``, ``in``, ``out/2``, ``in/g``, ``1``). Tensor parallelism splits a
column-parallel linear along its ``out*`` dimension and a row-parallel one along its ``in*``
dimension; dimensions of size 1 are replicated.

Where ModelOpt and TensorRT-LLM differ we follow what TensorRT-LLM loads:

* int8_sq (dynamic per-token INT8 activations) is not ModelOpt's ``W8A8_SQ_PER_CHANNEL``: that
  algo makes TensorRT-LLM build ``Int8SmoothQuantLinear`` with one *static* per-tensor activation
  scale. Per-token activations are TensorRT-LLM's own SmoothQuant plugin layout
  (``W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN``, ``models/llama/convert.py`` ``get_tllm_linear_sq_weight``):
  ``per_channel_scale`` (1, out), ``smoother`` (1, in) on dense/proj (applied as ``x / smoother``),
  ``scale_to_int`` = 1 on the norms, smoothing folded into the norm weights - as our engine does.
  int8_sq_static (one static scale) is ModelOpt's ``W8A8_SQ_PER_CHANNEL``.
* int4_wo and int4_gptq are per-group INT4 without a pre-quant scale. TensorRT-LLM's ``W4A16`` is
  per-channel and quantized by TensorRT-LLM itself at load, and a ``W4A16_GPTQ`` checkpoint must
  already hold weights preprocessed by TensorRT-LLM's compiled, GPU-architecture-specific
  ``preprocess_weights_for_mixed_gemm`` (``preprocess_weights`` does not touch it). Both are
  therefore written through the ``W4A16_AWQ`` path with ``pre_quant_scale: false``: the same packed
  (out/2, in) int8 weight and (out, in/group) scales, packed by TensorRT-LLM when it loads them.
* int8_wo is ``W8A16`` as ModelOpt's flow writes it (``quantize_by_modelopt``: ``int8_wo`` is
  exported unquantized and TensorRT-LLM quantizes at load): a weight in the checkpoint dtype, which
  TensorRT-LLM quantizes with ``symmetric_quantize`` (nothing pre-quantized loads without its compiled
  preprocessing op). The engine's int8_wo is exactly that quantization (:mod:`quantaudit.quant.weightonly`)
  and the checkpoint holds ``load_source`` of its codes, whose load-time quantization gives them back;
  the exporter checks this on the tensors it writes (per rank) and says where it does not hold.

The NVFP4 family as ModelOpt's TensorRT-LLM export writes it (``quant_utils.get_weight_scaling_factor``
/ ``_2`` / ``get_activation_scaling_factor``, ``to_quantized_weight`` -> ``NVFP4QTensor.quantize``,
``process_layer_quant_config``) and TensorRT-LLM's ``preprocess_weights`` (NVFP4 branch) + ``FP4Linear``
read it: ``weight`` uint8 (out, in/2), two E2M1 codes per byte along the input (low nibble first);
``weights_scaling_factor`` float8_e4m3fn (out, in/block); ``weights_scaling_factor_2`` float32 (1,)
(NVFP4: weight amax / (6 * 448); W4A8_NVFP4_FP8: amax / 448); ``activation_scaling_factor`` float32 (1,)
(NVFP4: input amax / (6 * 448), the activation global scale; W4A8_NVFP4_FP8: the FP8 scale amax / 448).
Per-tensor scales are (1,) as in ModelOpt's FP8 export (../shared/reference) and FP4Linear's parameters.
The layer config carries ``group_size`` = the block (16; 32 for W4A8_NVFP4_FP8) and, for NVFP4_AWQ and
W4A8_NVFP4_FP8, ``has_zero_point: false, pre_quant_scale: true`` - exactly ModelOpt's keys, although
W4A8_NVFP4_FP8 (no AWQ) has no pre-quant scale tensor. NVFP4_AWQ's ``prequant_scaling_factor`` is
written per linear as W4A16_AWQ's. Only NVFP4 is read by TensorRT-LLM's TensorRT-engine loader;
the other two carry a caveat (:data:`TRTLLM` ``caveat``). MXFP4, MXFP8 and FP8 2-D block weights have
no TensorRT-LLM checkpoint layout: :data:`TRTLLM_REFUSED` says why.

MoE experts (Mixtral's ``mlp.fc`` / ``mlp.proj``, :class:`~quantaudit.arch.TrtllmMoE`): every expert's tensors
stacked on a leading ``e`` axis, as ModelOpt's ``layer_utils._build_stacked_linear`` stacks them and TensorRT-LLM's
``MOEWeightWrapper`` (``layers/moe.py``) declares its parameters after ``preprocess_weights``; the activation
scale is one for all experts (ModelOpt: ``activation_scaling_factor.max()``, "the moe plugin only supports a
single activation scaling factor"), which the engine's unified expert input scales are. :data:`TRTLLM_EXPERTS`
holds the formats that layer runs as audited:

* fp8: ``weight`` (e, out, in) E4M3, ``weights_scaling_factor`` (e, 1) - each expert's (1,) per-tensor scale
  (``export_amax`` unsqueezes it), one for its up and gate rows, as fc1 has one GEMM per expert -,
  ``activation_scaling_factor`` (1,);
* int8_wo (W8A16): ``weight`` (e, out, in) in the checkpoint dtype, which TensorRT-LLM quantizes per expert and
  output channel (``convert_utils.weight_only_quantize`` transposes a 3-D weight's last two axes for
  ``symmetric_quantize_last_axis_of_batched_matrix``) to the wrapper's (e, in, out) int8 and (e, out) scales;
* int4_wo / int4_gptq (W4A16_AWQ without pre-quant scale): ``weight`` (e, out/2, in) packed as a dense one
  (``pack_int4_in_uint8``'s 3-D branch), ``weights_scaling_factor`` (e, out, in/g);
  ``preprocess_perlayer_weights`` transposes both to the wrapper's (e, in, out/4) and (e, in/g, out), and
  ``quantize.weight_only_groupwise_quantize`` gives the ``MixtureOfExperts`` the group size;
* nvfp4: ``weight`` (e, out, in/2), ``weights_scaling_factor`` (e, out, in/16) E4M3, ``weights_scaling_factor_2``
  (e,) - each expert's is 0-d (``NVFP4QTensor.get_weights_scaling_factor_2_from_quantizer``), and
  ``preprocess_weights`` multiplies the stack by the (1,) ``activation_scaling_factor`` into the wrapper's (e,)
  ``alpha``.

Not held (:data:`TRTLLM_EXPERTS_LIMITS`): pre-quant scales (int4_awq, w4a8_awq, nvfp4_awq):
``preprocess_perlayer_weights`` keeps expert 0's ``prequant_scaling_factor`` for every expert ("MoE experts share
the same scaling factor") and the wrapper holds one (1, in), while the audit applies each expert's own (ModelOpt
re-smooths all experts to one, ``build_stacked_experts``, which changes their weights); SmoothQuant and FP8
per-channel formats (``MixtureOfExperts`` has no SmoothQuant path and raises "MOE Does not support FP8 rowwise");
W4A8_NVFP4_FP8 (no MoE path). ModelOpt itself warns "TensorRT-LLM may not support MOE quantization" for every
format but FP8 (``build_decoder_config``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from ..arch import Architecture, TrtllmSlot
from ..quant.formats import get_format

# Per family, a decoder layer's linears and norms under their TensorRT-LLM names: arch.TrtllmDecoder.
LM_HEAD_SLOT = TrtllmSlot("lm_head", ("lm_head",), "column")
# ModelOpt writes use_parallel_embedding=true, embedding_sharding_dim=0: the vocabulary is split across ranks.
EMBEDDING = ("transformer.vocab_embedding.weight", "model.embed_tokens.weight", 0)
FINAL_NORM = ("transformer.ln_f.weight", "model.norm.weight")
# (1,) float32: the engine's one K/V scale of the layer (QuantSpec.kv_scales "shared"), what TensorRT-LLM runs
KV_CACHE_SCALE = "attention.kv_cache_scaling_factor"
# ModelOpt writes these too; TensorRT-LLM's preprocess_weights replaces them by their max (equal here)
KV_SEPARATE_SCALES = ("attention.k_cache_scaling_factor", "attention.v_cache_scaling_factor")


@dataclass(frozen=True)
class TensorSpec:
    """One stored tensor of a quantized linear.

    ``role``: ``codes`` (int8 / float8 codes, ``packed`` two INT4 per byte: adjacent output channels,
    low nibble first), ``load_source`` (W8A16: the float weight TensorRT-LLM quantizes back to the codes at
    load, :func:`quantaudit.quant.weightonly.load_source`), ``weight_scale``, ``act_scale``, ``pqs``
    (input multiplier; ones where the engine has none), ``smoother`` (SmoothQuant's s: the input is
    divided by it), ``weight_scale_2`` (W4A8: the per-tensor FP8 scale the kernel converts codes * scale with).
    """

    suffix: str
    role: str
    dtype: torch.dtype | None  # None: the checkpoint dtype
    shape: tuple[str, ...]
    packed: bool = False
    pack_axis: str = "out"  # packing.PACKINGS: INT4 pairs outputs, FP4 pairs inputs
    row_only: bool = False  # only on row-parallel linears (SmoothQuant smoother)
    unfused_only: bool = False  # HF: only on linears not fed by a norm (elsewhere folded into the norm)


@dataclass(frozen=True)
class Storage:
    """How one format is stored: the algo name the loader dispatches on and the tensors."""

    quant_algo: str
    reader_format: str  # the engine format that computes what the loader computes
    tensors: tuple[TensorSpec, ...]
    grouped: bool = False  # config carries group_size / has_zero_point / pre_quant_scale
    pre_quant_scale: bool = False
    whole_blocks: bool = False  # TensorRT-LLM swaps whole attention/MLP blocks: no per-linear exclusion or mixing
    norm_tensors: tuple[TensorSpec, ...] = ()  # on norms feeding a linear of this format
    shared_in_fused: tuple[str, ...] = ()  # HF: roles the loader requires equal across fused q/k/v and gate/up
    fold_pqs_into_norm: bool = False  # HF: the pre-quant scale of norm-fed linears is folded into the norm
    scale_cast: bool = False  # the loader holds the weight scale in the checkpoint dtype
    block_config: tuple[tuple[str, object], ...] | None = None  # block formats: layer-config keys after group_size
    caveat: str | None = None  # why TensorRT-LLM may not load it (a warning of the export)

    @property
    def scale_in_model_dtype(self) -> bool:
        """TensorRT-LLM's groupwise INT4 layers always hold their scales in the model dtype."""
        return self.grouped or self.scale_cast


FP32, INT8, FP8, UINT8 = torch.float32, torch.int8, torch.float8_e4m3fn, torch.uint8
OUT_IN = ("out", "in")
PACKED = ("out/2", "in")
FP4_PACKED = ("out", "in/2")
GROUPS = ("out", "in/g")
ONE = ("1",)
# A linear's bias (Qwen 2's q/k/v), in the checkpoint dtype whatever the format, as ModelOpt's postprocess_tensors
# casts it and TensorRT-LLM's linears add it after the GEMM.
BIAS = TensorSpec("bias", "bias", None, ("out",))



def _algo(fmt: str) -> str:
    """The quant_algo a format's checkpoint declares: the registry's (quant.formats), never a second mapping."""
    return get_format(fmt).trtllm_quant_algo


TRTLLM: dict[str, Storage] = {
    "fp8": Storage(_algo("fp8"), "fp8", (
        TensorSpec("weight", "codes", FP8, OUT_IN),
        TensorSpec("weights_scaling_factor", "weight_scale", FP32, ONE),
        TensorSpec("activation_scaling_factor", "act_scale", FP32, ONE),
    )),
    "fp8_pc_pt": Storage(_algo("fp8_pc_pt"), "fp8_pc_pt", (
        TensorSpec("weight", "codes", FP8, OUT_IN),
        TensorSpec("per_channel_scale", "weight_scale", FP32, ("out",)),
    ), whole_blocks=True),
    "int8_wo": Storage(_algo("int8_wo"), "int8_wo", (
        TensorSpec("weight", "load_source", None, OUT_IN),
    )),
    "int4_wo": Storage(_algo("int4_wo"), "int4_wo", (
        TensorSpec("weight", "codes", INT8, PACKED, packed=True),
        TensorSpec("weights_scaling_factor", "weight_scale", FP32, GROUPS),
    ), grouped=True),
    "int4_gptq": Storage(_algo("int4_gptq"), "int4_wo", (
        TensorSpec("weight", "codes", INT8, PACKED, packed=True),
        TensorSpec("weights_scaling_factor", "weight_scale", FP32, GROUPS),
    ), grouped=True),
    "int4_awq": Storage(_algo("int4_awq"), "int4_awq", (
        TensorSpec("weight", "codes", INT8, PACKED, packed=True),
        TensorSpec("weights_scaling_factor", "weight_scale", FP32, GROUPS),
        TensorSpec("prequant_scaling_factor", "pqs", None, ("in",)),
    ), grouped=True, pre_quant_scale=True),
    "w4a8_awq": Storage(_algo("w4a8_awq"), "w4a8_awq", (
        TensorSpec("weight", "codes", INT8, PACKED, packed=True),
        TensorSpec("weights_scaling_factor", "weight_scale", FP32, GROUPS),
        TensorSpec("weights_scaling_factor_2", "weight_scale_2", FP32, ONE),
        TensorSpec("activation_scaling_factor", "act_scale", FP32, ONE),
        TensorSpec("prequant_scaling_factor", "pqs", None, ("in",)),
    ), grouped=True, pre_quant_scale=True),
    "int8_sq": Storage(_algo("int8_sq"), "int8_sq", (
        TensorSpec("weight", "codes", INT8, OUT_IN),
        TensorSpec("per_channel_scale", "weight_scale", FP32, ("1", "out")),
        TensorSpec("smoother", "smoother", FP32, ("1", "in"), row_only=True),
    ), whole_blocks=True, norm_tensors=(TensorSpec("scale_to_int", "one", FP32, ONE),)),
    "int8_sq_static": Storage(_algo("int8_sq_static"), "int8_sq_static", (
        TensorSpec("weight", "codes", INT8, OUT_IN),
        TensorSpec("weights_scaling_factor", "weight_scale", FP32, ("out",)),
        TensorSpec("activation_scaling_factor", "act_scale", FP32, ONE),
        TensorSpec("prequant_scaling_factor", "pqs", None, ("in",)),
    )),
}
TRTLLM["int8_w8a8_nosmooth"] = TRTLLM["int8_sq"]  # the same kernels with smoother = 1

_TRT_ENGINE_LOADER_NVFP4_ONLY = (
    "TensorRT-LLM's TensorRT-engine loader (models/modeling_utils.preprocess_weights) converts block-scaled FP4 "
    "weights only for quant_algo NVFP4, so trtllm-build is expected to reject this checkpoint; TensorRT-LLM runs "
    "{algo} from ModelOpt unified HF checkpoints in its PyTorch backend, which quantaudit does not write for it"
)
_NVFP4_TENSORS = (
    TensorSpec("weight", "codes", UINT8, FP4_PACKED, packed=True, pack_axis="in"),
    TensorSpec("weights_scaling_factor", "weight_scale", FP8, GROUPS),
    TensorSpec("weights_scaling_factor_2", "weight_scale_2", FP32, ONE),
    TensorSpec("activation_scaling_factor", "act_scale", FP32, ONE),
)
TRTLLM["nvfp4"] = Storage("NVFP4", "nvfp4", _NVFP4_TENSORS, block_config=())
TRTLLM["nvfp4_awq"] = Storage(
    "NVFP4_AWQ", "nvfp4_awq", (*_NVFP4_TENSORS, TensorSpec("prequant_scaling_factor", "pqs", None, ("in",))),
    pre_quant_scale=True, block_config=(("has_zero_point", False), ("pre_quant_scale", True)),
    caveat=_TRT_ENGINE_LOADER_NVFP4_ONLY.format(algo="NVFP4_AWQ"))
TRTLLM["w4a8_nvfp4_fp8"] = Storage(
    "W4A8_NVFP4_FP8", "w4a8_nvfp4_fp8", _NVFP4_TENSORS,
    block_config=(("has_zero_point", False), ("pre_quant_scale", True)),
    caveat=_TRT_ENGINE_LOADER_NVFP4_ONLY.format(algo="W4A8_NVFP4_FP8"))

# MoE experts: the dense layout stacked on a leading experts axis, but for the tensors one for all experts or shaped
# otherwise (module docstring)
EXPERTS = "e"


def _experts(fmt: str, shapes: dict[str, tuple[str, ...]]) -> Storage:
    dense = TRTLLM[fmt]
    return replace(dense, tensors=tuple(replace(s, shape=shapes.get(s.suffix, (EXPERTS, *s.shape))) for s in dense.tensors))


_ONE_FOR_ALL = {"activation_scaling_factor": ONE}
TRTLLM_EXPERTS: dict[str, Storage] = {
    "fp8": _experts("fp8", _ONE_FOR_ALL),
    "int8_wo": _experts("int8_wo", {}),
    "int4_wo": _experts("int4_wo", {}),
    "int4_gptq": _experts("int4_gptq", {}),
    "nvfp4": _experts("nvfp4", {**_ONE_FOR_ALL, "weights_scaling_factor_2": (EXPERTS,)}),
}
TRTLLM_EXPERTS_LIMITS = ("it has no SmoothQuant, FP8 per-channel or W4A8_NVFP4_FP8 path and applies one AWQ pre-quant "
                         "scale to every expert (modeling_utils.preprocess_perlayer_weights), where the audit applies "
                         "each expert's own")

# Formats with no TensorRT-LLM checkpoint layout, and why (export refuses them before quantizing).
TRTLLM_REFUSED = {
    "mxfp4": "TensorRT-LLM's checkpoint format has no dense W4A16_MXFP4 layout: ModelOpt's TensorRT-LLM export "
             "writes the raw name 'mxfp4' as quant_algo (process_layer_quant_config), which TensorRT-LLM's QuantAlgo "
             "does not define, and its engine loader (preprocess_weights) converts no MX weights; TensorRT-LLM runs "
             "MXFP4 in its PyTorch backend (GPT-OSS experts)",
    "mxfp8": "TensorRT-LLM's checkpoint format has no MXFP8 layout: ModelOpt's exporter has no MXFP8 format (it "
             "classifies E4M3 block weights as fp8_pb_wo) and TensorRT-LLM's engine loader converts no MX weights",
    "fp8_pb_wo": "TensorRT-LLM's checkpoint format has no FP8_BLOCK_SCALES layout: ModelOpt's TensorRT-LLM export "
                 "writes the raw name 'fp8_pb_wo' as quant_algo, which TensorRT-LLM does not define; TensorRT-LLM runs "
                 "FP8 block scales in its PyTorch backend from Hugging Face checkpoints (DeepSeek style)",
}

_HF_AWQ_FAMILY = dict(grouped=True, fold_pqs_into_norm=True)
HF: dict[str, Storage] = {
    "fp8": Storage(_algo("fp8"), "fp8", (
        TensorSpec("weight", "codes", FP8, OUT_IN),
        TensorSpec("weight_scale", "weight_scale", FP32, ()),
        TensorSpec("input_scale", "act_scale", FP32, ()),
    ), shared_in_fused=("weight_scale", "act_scale")),  # else the loaders re-quantize to the larger (rescale_fused_weights)
    "fp8_pc_pt": Storage(_algo("fp8_pc_pt"), "fp8_pc_pt", (
        TensorSpec("weight", "codes", FP8, OUT_IN),
        TensorSpec("weight_scale", "weight_scale", FP32, ("out",)),
    )),
    "int8_wo": Storage(_algo("int8_wo"), "int8_wo", (
        TensorSpec("weight", "codes", INT8, OUT_IN),
        TensorSpec("weight_scale", "weight_scale", FP32, ("out",)),
    ), scale_cast=True),  # TensorRT-LLM's PyTorch backend takes the codes as they are, the scale in the model dtype
    "int4_awq": Storage(_algo("int4_awq"), "int4_awq", (
        TensorSpec("weight", "codes", UINT8, PACKED, packed=True),
        TensorSpec("weight_scale", "weight_scale", FP32, GROUPS),
        TensorSpec("pre_quant_scale", "pqs", None, ("in",), unfused_only=True),
    ), pre_quant_scale=True, **_HF_AWQ_FAMILY),
    "w4a8_awq": Storage(_algo("w4a8_awq"), "w4a8_awq", (
        TensorSpec("weight", "codes", UINT8, PACKED, packed=True),
        TensorSpec("weight_scale", "weight_scale", FP32, GROUPS),
        TensorSpec("weight_scale_2", "weight_scale_2", FP32, ()),
        TensorSpec("input_scale", "act_scale", FP32, ()),
        TensorSpec("pre_quant_scale", "pqs", None, ("in",), unfused_only=True),
    ), pre_quant_scale=True, shared_in_fused=("weight_scale_2", "act_scale"), **_HF_AWQ_FAMILY),
}
# GPTQ / RTN per-group INT4 go through W4A16_AWQ: TensorRT-LLM's PyTorch loader reads pre_quant_scale
# on o_proj/down_proj unconditionally, so they carry ones there (and nothing to fold elsewhere).
HF["int4_wo"] = HF["int4_gptq"] = Storage(_algo("int4_wo"), "int4_wo", HF["int4_awq"].tensors, **_HF_AWQ_FAMILY)

HF_KV_SCALES = ("self_attn.k_proj.k_scale", "self_attn.v_proj.v_scale")  # shape (), float32
HF_KV_ALGOS = ("FP8",)  # vLLM's ModelOpt loader: FP8 (and NVFP4) KV caches only

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}

# trtllm-build options per quant_algo beyond the common ones (data for build.py).
BUILD_OPTIONS: dict[str, dict] = {
    "FP8": {"gemm_plugin": "auto", "fp8_context_fmha": True},
    "FP8_PER_CHANNEL_PER_TOKEN": {"gemm_plugin": "auto"},
    "W8A16": {"gemm_plugin": "auto"},
    "W4A16_AWQ": {"gemm_plugin": "auto"},
    "W4A8_AWQ": {"gemm_plugin": "auto"},
    "W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN": {"gemm_plugin": "auto"},
    "W8A8_SQ_PER_CHANNEL": {"gemm_plugin": "auto"},
    "MIXED_PRECISION": {"gemm_plugin": "auto"},
    # quantization/layers.py FP4Linear: the FP4 GEMM runs only with gemm_plugin nvfp4 (else it dequantizes to fp16).
    "NVFP4": {"gemm_plugin": "nvfp4"},
    "NVFP4_AWQ": {"gemm_plugin": "nvfp4"},
    "W4A8_NVFP4_FP8": {"gemm_plugin": "auto"},
}


@dataclass
class Dims:
    """The sizes the symbolic dimensions stand for, for one linear (whole, not per rank)."""

    out: int
    inp: int
    group: int | None = None
    values: dict = field(init=False)

    def __post_init__(self):
        self.values = {"out": self.out, "in": self.inp, "out/2": self.out // 2, "in/2": self.inp // 2, "1": 1}
        if self.group:
            self.values["in/g"] = self.inp // self.group

    def shape(self, spec_shape: tuple[str, ...], parallel: str | None = None, tp: int = 1) -> tuple[int, ...]:
        """The concrete shape of one rank's tensor."""
        axis = split_axis(spec_shape, parallel) if parallel else None
        return tuple(self.values[d] // (tp if i == axis else 1) for i, d in enumerate(spec_shape))


def split_axis(spec_shape: tuple[str, ...], parallel: str) -> int | None:
    """The dimension tensor parallelism splits: ``out*`` of a column-, ``in*`` of a row-parallel linear."""
    prefix = "out" if parallel == "column" else "in"
    return next((i for i, d in enumerate(spec_shape) if d.startswith(prefix)), None)


def trtllm_layer_config(storage: Storage, group_size: int | None) -> dict:
    """The per-layer quantization entry ModelOpt's ``process_layer_quant_config`` writes."""
    entry = {"quant_algo": storage.quant_algo}
    if storage.grouped:
        entry.update(group_size=group_size, has_zero_point=False, pre_quant_scale=storage.pre_quant_scale)
    elif storage.block_config is not None:
        entry.update(group_size=group_size, **dict(storage.block_config))
    return entry


def hf_writes(arch: Architecture) -> bool:
    """``--target hf`` writes ``arch``'s layout: every family whose checkpoints store MoE experts one linear each
    (GPT-OSS stores 3-D expert tensors, a quantized layout not written yet)."""
    return not (arch.moe and arch.moe.checkpoint_experts is None)
