"""``quantize()``: a causal LM of a family in :mod:`quantaudit.arch` to one TensorRT-LLM format, keeping every
stored number.

The input model is deep-copied and left untouched. In the copy every quantized ``nn.Linear`` is
replaced by a :class:`~quantaudit.quant.qlinear.QuantLinear` that computes with exactly the codes
and scales recorded in :attr:`QuantizedModel.layers`, which is what the exporter writes.

Which linears are quantized follows TensorRT-LLM / ModelOpt: all decoder-layer linears; lm_head is
excluded by default (ModelOpt's default disabled ``*lm_head*``; ``include_lm_head=True`` quantizes
it, untying it from the embedding first); embeddings and norms are never quantized. ``exclude``
takes fnmatch patterns on module names (``model.layers.0.mlp.down_proj``). Per-group formats use
``group_size`` (TensorRT-LLM supports 128 and 64); a layer whose input size it does not divide
falls back to 64, and a layer neither divides stays unquantized with the reason recorded. 64 is also
used where 128 would make TensorRT-LLM's groupwise INT4 layer pad the GEMM (in or out features not a
multiple of max(64, group), 128 for W4A8: ``WeightOnlyGroupwiseQuantLinear``), because it then cannot
load the checkpoint's unpadded tensors (SmolLM2's down_proj: 576 outputs). Block formats
use their own block (``BlockScale.size``: 16 for NVFP4, 32 for W4A8_NVFP4_FP8 and MX); a layer whose
input size it does not divide stays unquantized with the reason recorded too: ModelOpt would pad the
input dimension to whole blocks when exporting (``reduce_block_padding``), but TensorRT-LLM's FP4
linears assert ``in_features % 16 == 0``, so such a layer could not be deployed as audited.
"""

from __future__ import annotations

import copy
import fnmatch
import math
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from ..arch import Architecture, LinearGroup, architecture
from ..data import Windows
from ..errors import UserError
from ..progress import track
from .algorithms import ALGORITHMS, GroupJob
from .calibrate import LM_HEAD_GROUP, InputStats, collect, first_layer_inputs, propagate
from .formats import GROUP_SIZES, KV_SCALES, KVCacheFormat, QuantFormat, get_format, get_kv_cache_format
from .kvcache import install_kv_quantizers
from .qlinear import QuantizedWeight, QuantLinear, activation_scale

UNQUANTIZED_BYTES = 2  # an unquantized weight is held in fp16/bf16 by the engine


@dataclass(frozen=True)
class GPTQOptions:
    """llm-compressor's defaults (``actorder="static"``, MSE scale observer); ``act_order=False`` with
    ``scale_search="amax"`` is the IST-DASLab/gptq reference (quant.gptq)."""

    block_size: int = 128
    percdamp: float = 0.01
    act_order: bool = True
    scale_search: str = "mse"  # or "amax" (gptq.SCALE_SEARCHES)


@dataclass(frozen=True)
class AWQOptions:
    """llm-awq defaults: 20-point grids, clip shrink down to 50 %."""

    n_grid: int = 20
    max_shrink: float = 0.5


@dataclass(frozen=True)
class QuantSpec:
    """What to quantize and how; formats named as ModelOpt's ``--qformat``."""

    format: str = "int8_wo"
    kv_cache: str = "none"  # "none" | "fp8" | "int8" | "nvfp4"
    kv_scales: str = "shared"  # formats.KV_SCALES: one scale per layer for K and V (TensorRT-LLM) or separate
    group_size: int = 128
    exclude: tuple[str, ...] = ()
    include_lm_head: bool = False
    smoothquant_alpha: float | str = 0.5  # or "search": per-group grid search (quant.smoothquant)
    gptq: GPTQOptions = GPTQOptions()
    awq: AWQOptions = AWQOptions()
    plan: dict[str, str] | None = None  # {module name: format} overrides, for mixed precision
    search_tokens: int | None = None  # calibration tokens kept for the AWQ / alpha searches (None: all)
    calib_batch: int = 8  # calibration windows per forward pass

    def describe(self) -> dict:
        return asdict(self)


@dataclass
class LayerRecord:
    """One linear layer as quantized: the exact stored tensors, or why it was left unquantized."""

    name: str
    format: str  # the format asked for this layer
    in_features: int
    out_features: int
    bits: int | None = None  # bits per stored weight code
    codes: torch.Tensor | None = None  # int8 (INT8/INT4 codes) or float8_e4m3fn
    weight_scale: torch.Tensor | None = None  # [] / [out, 1] float32, or [out, in // group] fp16
    weight_scale_2: torch.Tensor | None = None  # W4A8: per-tensor FP8 scale of codes * weight_scale
    requant: str | None = None  # kind of that second stage ("fp8"), see qlinear.QuantizedWeight
    group_size: int | None = None  # the group size actually used (block formats: the block size)
    block_rows: int = 1  # output rows sharing one scale (FP8 2-D blocks: 128)
    act_scale: torch.Tensor | None = None  # static activation scale (None: dynamic or no act quant)
    pre_quant_scale: torch.Tensor | None = None  # input multiplier before quantization
    bias: torch.Tensor | None = None
    fallback_reason: str | None = None  # why the layer is not quantized
    details: dict = field(default_factory=dict)  # algorithm facts: alpha, smoothed_into, tokens

    @property
    def quantized(self) -> bool:
        return self.codes is not None

    def dequantized_weight(self) -> torch.Tensor:
        return QuantizedWeight(self.codes, self.weight_scale, self.group_size, self.requant, self.weight_scale_2,
                               self.block_rows).dequantize()

    def storage_bytes(self) -> int:
        """Bytes in the engine: packed codes plus every stored scale; unquantized at 16 bit."""
        bias = 0 if self.bias is None else self.bias.numel() * UNQUANTIZED_BYTES
        if not self.quantized:
            return self.in_features * self.out_features * UNQUANTIZED_BYTES + bias
        extras = (self.weight_scale, self.weight_scale_2, self.act_scale, self.pre_quant_scale)
        return math.ceil(self.codes.numel() * self.bits / 8) + sum(t.numel() * t.element_size() for t in extras if t is not None) + bias


@dataclass
class KVScales:
    """Per-layer KV-cache scales (key after RoPE) and the calibration maxima they came from; with
    ``QuantSpec.kv_scales == "shared"`` both scales are the one from max(k_amax, v_amax)."""

    format: str
    k_scale: torch.Tensor
    v_scale: torch.Tensor
    k_amax: torch.Tensor
    v_amax: torch.Tensor


@dataclass
class QuantizedModel:
    model: nn.Module  # a normal HF causal LM; forward(...).logits
    spec: QuantSpec
    layers: dict[str, LayerRecord]
    kv_scales: dict[int, KVScales]
    calib_info: dict
    seconds: float  # wall time of quantize()

    def weight_bytes_breakdown(self) -> dict[str, int]:
        """Weight storage as the engine holds it: quantized linears (codes + scales), unquantized
        linears and every other parameter (embeddings, norms) at 16 bit. A tied lm_head counts
        separately from the embedding, as TensorRT-LLM checkpoints store both."""
        quantized = sum(r.storage_bytes() for r in self.layers.values() if r.quantized)
        unquantized = sum(r.storage_bytes() for r in self.layers.values() if not r.quantized)
        other = sum(
            p.numel() * UNQUANTIZED_BYTES
            for name, p in self.model.named_parameters()
            if name.rsplit(".", 1)[0] not in self.layers
        )
        return {"quantized_linears": quantized, "unquantized_linears": unquantized, "other_16bit": other}

    def weight_bytes(self) -> int:
        return sum(self.weight_bytes_breakdown().values())

    def kv_bytes_per_token(self) -> int:
        """KV-cache bytes per token over all layers (K and V); 16 bit without KV quantization."""
        cfg = self.model.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        bits = get_kv_cache_format(self.spec.kv_cache).storage_bits  # NVFP4: 4 + 8 / 16 (its E4M3 block scales)
        return int(cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * head_dim * bits // 8)

    def fallbacks(self) -> dict[str, str]:
        """Layers left unquantized and why (for the report)."""
        return {name: r.fallback_reason for name, r in self.layers.items() if not r.quantized}


@dataclass
class _Assignment:
    fmt: QuantFormat
    group_size: int | None
    reason: str | None  # set: left unquantized


def _check_spec(spec: QuantSpec) -> None:
    if spec.group_size not in GROUP_SIZES:
        raise UserError(f"group size {spec.group_size} is not supported; TensorRT-LLM takes {' or '.join(map(str, GROUP_SIZES))}")
    alpha = spec.smoothquant_alpha
    if alpha != "search" and not (isinstance(alpha, (int, float)) and 0 <= alpha <= 1):
        raise UserError(f"SmoothQuant alpha must be in [0, 1] or 'search' (got {alpha!r})")
    if spec.calib_batch < 1:
        raise UserError(f"calibration batch must be at least 1 (got {spec.calib_batch})")
    if spec.kv_scales not in KV_SCALES:
        raise UserError(f"--kv-scales must be {' or '.join(KV_SCALES)} (got {spec.kv_scales!r})")


def _check_kv_cache(config, kv_format) -> None:
    """A block-scaled KV cache (NVFP4: blocks of 16 along head_dim, ModelOpt NVFP4_KV_CFG) needs whole blocks per head."""
    block = kv_format.block
    if block is None:
        return
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if head_dim % block.size:
        raise UserError(f"KV cache {kv_format.name} quantizes blocks of {block.size} along head_dim, but this model's "
                        f"head_dim is {head_dim}; use --kv-cache fp8, int8 or none")


def group_size_for(in_features: int, requested: int, out_features: tuple[int, ...] = (),
                    pad_multiple: int | None = None) -> tuple[int | None, str | None]:
    """``requested``, else 64, whichever divides the input size, preferring one TensorRT-LLM's groupwise INT4
    layer does not pad: it pads in and out features (``out_features``: every linear of the GEMM) that are not
    multiples of max(``pad_multiple``, group) and then cannot load the checkpoint's unpadded tensors."""
    candidates = list(dict.fromkeys(g for g in (requested, *GROUP_SIZES) if g <= requested))
    dividing = [g for g in candidates if in_features % g == 0]
    if not dividing:
        tried = " or ".join(map(str, candidates))
        return None, f"input size {in_features} is not a multiple of group size {tried}; kept unquantized (16-bit)"
    unpadded = [g for g in dividing if all(n % max(pad_multiple or 1, g) == 0 for n in (in_features, *out_features))]
    return (unpadded or dividing)[0], None


def _gemm_out_features(model: nn.Module, arch: Architecture, name: str) -> tuple[int, ...]:
    """Output sizes of the linears TensorRT-LLM runs in one GEMM with ``name`` (q/k/v, gate/up; else itself)."""
    found = arch.group_of(name)
    if found is not None and found[0].fused:
        group, prefix = found
        return tuple(model.get_submodule(prefix + p).out_features for p in group.linears)
    return (model.get_submodule(name).out_features,)


def block_size_for(in_features: int, fmt: QuantFormat) -> tuple[int | None, str | None]:
    block = fmt.weight.block
    if block.partial or in_features % block.size == 0:
        return block.size, None
    return None, (f"input size {in_features} is not a multiple of the {fmt.name} block of {block.size} "
                  "(TensorRT-LLM's FP4/MX linears need whole blocks); kept unquantized (16-bit)")


def _assign(model: nn.Module, arch: Architecture, names: list[str], spec: QuantSpec) -> dict[str, _Assignment]:
    plan = dict(spec.plan or {})
    unknown = sorted(set(plan) - set(names))
    if unknown:
        raise UserError(f"plan names unknown layer {unknown[0]!r}; layer names look like {names[0]!r}")
    out = {}
    for name in names:
        fmt = get_format(plan.get(name, spec.format))
        linear = model.get_submodule(name)
        reason = None
        pattern = next((p for p in spec.exclude if fnmatch.fnmatchcase(name, p)), None)
        if name == "lm_head" and not spec.include_lm_head:
            reason = "lm_head is excluded by default (TensorRT-LLM's exclude list); include_lm_head quantizes it"
        elif not isinstance(linear, nn.Linear):  # an MoE router (arch.SparseMoE)
            reason = "MoE router: kept in 16 bit (ModelOpt's configs disable *router* and *mlp.gate.*)"
        elif pattern is not None:
            reason = f"excluded by pattern {pattern!r}"
        elif fmt.weight is None:
            reason = "format none: kept in full precision"
        if reason and name in plan and fmt.weight is not None:
            raise UserError(f"plan quantizes {name} to {fmt.name}, but {reason.split(';')[0]}")
        group_size = None
        if reason is None and fmt.weight.granularity == "group":
            group_size, reason = group_size_for(linear.in_features, spec.group_size, _gemm_out_features(model, arch, name),
                                                 fmt.weight.pad_multiple)
        elif reason is None and fmt.weight.block is not None:
            group_size, reason = block_size_for(linear.in_features, fmt)
        out[name] = _Assignment(fmt, group_size, reason)
    return out


def _needs(fmt: QuantFormat, spec: QuantSpec) -> set[str]:
    """Calibration statistics a format needs: its algorithm's, plus max |x| for a static activation scale."""
    needs = set(ALGORITHMS[fmt.algorithm].needs(spec))
    if fmt.act is not None and not fmt.act.dynamic:
        needs.add("amax")
    return needs


def _jobs(root: nn.Module, prefix: str, groups: tuple[LinearGroup, ...], arch: Architecture, assignments, spec,
          total_tokens: int):
    """Per group of ``root``: the statistics to collect (keyed by the module whose input they watch) and the jobs."""
    stats: dict[nn.Module, InputStats] = {}
    jobs: list[tuple[list[str], GroupJob]] = []
    for group in groups:
        first = root.get_submodule(group.linears[0])
        by_format: dict[str, list[str]] = {}
        for path in group.linears:
            a = assignments[prefix + path]
            if a.reason is None:
                by_format.setdefault(a.fmt.name, []).append(path)
        needs = set().union(*(_needs(get_format(f), spec) for f in by_format))
        group_stats = InputStats(first.in_features, needs, total_tokens, spec.search_tokens) if needs else None
        if group_stats is not None:
            stats[first] = group_stats
        for fmt_name, paths in by_format.items():
            a = assignments[prefix + paths[0]]
            whole = len(paths) == len(group.linears) and group.norm is not None
            job = GroupJob(
                fmt=a.fmt, spec=spec, names=[prefix + p for p in paths], linears=[root.get_submodule(p) for p in paths],
                group_size=a.group_size, fused=group.fused, stats=group_stats,
                norm=root.get_submodule(group.norm) if whole else None, norm_name=prefix + group.norm if whole else None,
                arch=arch, no_clip=tuple(prefix + p for p in arch.no_clip),
            )
            jobs.append((paths, job))
    return stats, jobs


def _act_amax(job, result) -> torch.Tensor:
    amax = job.stats.amax if result.input_multiplier is None else job.stats.amax * result.input_multiplier
    return amax.amax()


def _run_jobs(root: nn.Module, jobs, records: dict[str, LayerRecord]) -> None:
    """Run each job's algorithm and install the results.

    A fused job (q/k/v, gate/up) gets what ModelOpt's export gives the linears TensorRT-LLM runs as one
    GEMM (``quant_utils.preprocess_linear_fusion``: max of the input amaxes, max of the per-tensor weight
    amax or of W4A8's FP8 second-stage amax, weights re-quantized with it; the per-tensor FP8 weight is
    re-quantized inside :mod:`.algorithms`). TensorRT-LLM would otherwise unify them itself at load, changing
    the numbers: ``models/modeling_utils.fuse_gate_mlp`` re-quantizes FP8 gate/up to the larger weight scale
    and takes the larger activation scale, the PyTorch backend's ``FP8QDQLinearMethod.rescale_fused_weights``
    does the same for q/k/v and gate/up, and its W4A8 / NVFP4 loaders require equal scales.
    """
    for paths, job in jobs:
        results = ALGORITHMS[job.fmt.algorithm].run(job)
        if job.fused and job.fmt.weight.requant is not None:  # one FP8 weight range for the fused GEMM
            shared = torch.stack([r.qweight.scale_2 for r in results]).amax()
            for r in results:
                r.qweight.scale_2 = shared
        act = job.fmt.act
        static = act is not None and not act.dynamic
        act_amax = [_act_amax(job, r) for r in results] if static else [None] * len(results)
        if static and job.fused:
            act_amax = [torch.stack(act_amax).amax()] * len(results)
        for path, name, linear, result, amax in zip(paths, job.names, job.linears, results, act_amax):
            act_scale = activation_scale(act, amax) if static else None
            module = QuantLinear(result.qweight, job.fmt, linear.bias, act_scale, result.pre_quant_scale)
            root.set_submodule(path, module)
            records[name] = LayerRecord(
                name, job.fmt.name, module.in_features, module.out_features, bits=job.fmt.weight.bits,
                codes=module.codes, weight_scale=module.weight_scale, weight_scale_2=module.weight_scale_2,
                requant=module.requant, group_size=module.group_size, block_rows=module.block_rows,
                act_scale=module.act_scale, pre_quant_scale=module.pre_quant_scale, bias=module.bias,
                details=result.details,
            )


def _untie_lm_head(model: nn.Module) -> None:
    """Give lm_head its own weight so quantizing it never touches the embedding."""
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    if head.weight is embedding.weight:
        head.weight = nn.Parameter(embedding.weight.detach().clone())
    model.config.tie_word_embeddings = False


def calib_info(calib: Windows | None, used: bool) -> dict:
    if calib is None:
        return {"used": used, "source": None, "samples": 0, "tokens": 0, "seq_len": None}
    return {
        "used": used,  # False: the format's numbers do not depend on calibration data
        "source": calib.source,
        "samples": calib.n,
        "tokens": int(calib.lengths.sum()),
        "seq_len": calib.seq_len,
        "fingerprint": calib.fingerprint,
    }


@dataclass
class LayerPlan:
    """What :func:`quantize` does to each linear, decided from shapes alone: a meta-device model will do,
    which is how layer streaming (:mod:`quantaudit.stream`) plans a model it never holds whole."""

    arch: Architecture
    assignments: dict[str, _Assignment]  # every quantizable linear in model order, lm_head last
    kv_format: KVCacheFormat
    calibrating: bool  # a statistic or the KV cache needs calibration text
    sequential: bool  # each layer calibrated on the quantized layers' outputs (quant.algorithms)

    def fallback_records(self, model: nn.Module) -> dict[str, LayerRecord]:
        """Records of the linears left unquantized, with the reason."""
        out = {}
        for name, a in self.assignments.items():
            if a.reason is not None:
                module = model.get_submodule(name)  # a linear, or an MoE router holding the same weight and bias
                out_features, in_features = module.weight.shape
                out[name] = LayerRecord(name, a.fmt.name, in_features, out_features, bias=getattr(module, "bias", None),
                                        fallback_reason=a.reason)
        return out


def plan_layers(model: nn.Module, spec: QuantSpec, calib: Windows | None) -> LayerPlan:
    """Check ``spec`` against ``model`` and decide every linear's format, group size or fallback."""
    get_format(spec.format)
    kv_format = get_kv_cache_format(spec.kv_cache)
    _check_spec(spec)
    _check_kv_cache(getattr(model, "config", None), kv_format)
    arch = architecture(model)
    layers = arch.check_layers(model)
    names = arch.linear_names(layers) + arch.router_names(layers) + ["lm_head"]
    assignments = _assign(model, arch, names, spec)
    quantized = [a.fmt for a in assignments.values() if a.reason is None]
    calibrating = bool(kv_format.kind) or any(_needs(f, spec) for f in quantized)
    if calibrating and (calib is None or calib.n == 0):
        raise UserError(f"{spec.format} with KV cache {spec.kv_cache} needs calibration text; give --calib")
    sequential = any(ALGORITHMS[f.algorithm].sequential for f in quantized)  # see quant.algorithms
    return LayerPlan(arch, assignments, kv_format, calibrating, sequential)


def quantize_layer(layer: nn.Module, index: int, plan: LayerPlan, spec: QuantSpec, inputs, total_tokens: int,
                   records: dict[str, LayerRecord], kv_quantizer=None, advance: bool = False) -> KVScales | None:
    """One step of :func:`quantize`: calibrate decoder layer ``index`` on ``inputs`` (``calibrate.LayerInputs``;
    None: nothing to calibrate), replace its linears by quantized ones and add their records. With ``advance``
    the same pass replaces ``inputs`` by the layer's full-precision outputs (``calibrate.collect``). Returns the
    KV-cache scales it calibrated, if any. Layer streaming runs this on one loaded layer at a time."""
    stats, jobs = _jobs(layer, f"model.layers.{index}.", plan.arch.layer_groups(layer), plan.arch, plan.assignments, spec,
                        total_tokens)
    if inputs is not None and (stats or kv_quantizer is not None or advance):
        collect(layer, index, stats, inputs, kv_quantizer, advance=advance)
    kv = None
    if kv_quantizer is not None:
        kv_quantizer.finish_calibration()
        kv = KVScales(plan.kv_format.name, kv_quantizer.k_scale, kv_quantizer.v_scale, kv_quantizer.k_amax,
                      kv_quantizer.v_amax)
    _run_jobs(layer, jobs, records)
    _unify_expert_input_scales(layer, f"model.layers.{index}.", plan.arch, records)
    return kv


def _unify_expert_input_scales(layer: nn.Module, prefix: str, arch: Architecture, records: dict[str, LayerRecord]) -> None:
    """One static input scale for all experts' gate/up and one for all their down projections, the largest.

    TensorRT-LLM's fused MoE runs ``fc1`` (gate/up) and ``fc2`` (down) of every expert with one activation
    scale: ModelOpt's TensorRT-LLM export takes the maximum over experts (``layer_utils.build_stacked_experts``,
    ``activation_scaling_factor.max()``), as TensorRT-LLM's PyTorch fused-MoE loaders do with a unified HF
    checkpoint's ``input_scale``. Set here, the audit computes what the engine will. Per format: a mixed plan's
    experts of different formats keep scales of their own (their units differ)."""
    experts = arch.experts_of(layer)
    if experts is None:
        return
    for projections in (("gate_proj", "up_proj"), ("down_proj",)):
        by_format: dict[str, list[str]] = {}
        for e in range(len(experts)):
            for projection in projections:
                path = f"{arch.moe.experts}.{e}.{projection}"
                record = records.get(prefix + path)
                if record is not None and record.act_scale is not None:
                    by_format.setdefault(record.format, []).append(path)
        for paths in by_format.values():
            shared = torch.stack([layer.get_submodule(p).act_scale for p in paths]).amax()
            for path in paths:
                module = layer.get_submodule(path)
                module.act_scale = shared.reshape(module.act_scale.shape).clone()
                records[prefix + path].act_scale = module.act_scale


@torch.no_grad()
def quantize(model: nn.Module, spec: QuantSpec, calib: Windows | None, progress: bool = True) -> QuantizedModel:
    """Quantize a copy of ``model`` as ``spec`` says, calibrating layer by layer on ``calib``: each
    layer on the full-precision model's activations, or, when an algorithm is ``sequential``
    (GPTQ), on the outputs of the layers already quantized (:mod:`quantaudit.quant.algorithms`)."""
    started = time.perf_counter()
    plan = plan_layers(model, spec, calib)
    assignments, calibrating, sequential = plan.assignments, plan.calibrating, plan.sequential

    qmodel = copy.deepcopy(model).eval()
    if assignments["lm_head"].reason is None:
        _untie_lm_head(qmodel)
    layers = qmodel.model.layers
    n_layers = len(layers)
    attentions = [layer.get_submodule(plan.arch.attention) for layer in layers]
    kv_quantizers = install_kv_quantizers(qmodel, attentions, plan.kv_format, spec.kv_scales) if plan.kv_format.kind else None
    total_tokens = int(calib.lengths.sum()) if calib is not None else 0
    inputs = first_layer_inputs(qmodel, layers, calib.ids, calib.lengths, spec.calib_batch) if calibrating else None

    records: dict[str, LayerRecord] = {}
    kv_scales: dict[int, KVScales] = {}
    head_stats, head_jobs = _jobs(qmodel, "", (LM_HEAD_GROUP,), plan.arch, assignments, spec, total_tokens)
    steps = track(list(enumerate(layers)), f"quantizing to {spec.format}", total=n_layers) if progress else enumerate(layers)
    for i, layer in steps:
        more = i + 1 < n_layers or bool(head_stats)  # does anything after this layer need its outputs?
        kvq = kv_quantizers[i] if kv_quantizers else None
        kv = quantize_layer(layer, i, plan, spec, inputs, total_tokens, records, kvq, advance=more and not sequential)
        if kv is not None:
            kv_scales[i] = kv
        if calibrating and more and sequential:
            propagate(layer, i, inputs)
    for group_stats in head_stats.values():  # lm_head reads the final norm's output
        for hidden, mask in zip(inputs.hidden, inputs.masks):
            group_stats.add(qmodel.model.norm(hidden)[mask])
    _run_jobs(qmodel, head_jobs, records)

    records.update(plan.fallback_records(qmodel))
    records = {name: records[name] for name in assignments}
    return QuantizedModel(qmodel, spec, records, kv_scales, calib_info(calib, calibrating), time.perf_counter() - started)
