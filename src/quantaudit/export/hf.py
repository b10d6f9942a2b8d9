"""A :class:`~quantaudit.quant.engine.QuantizedModel` as a ModelOpt-style unified Hugging Face checkpoint.

The folder ModelOpt's ``export_hf_checkpoint`` writes (``unified_export_hf.py``): the original
config with ``quantization_config`` (``quant_method: modelopt``, ``convert_hf_config.py``), the legacy
``hf_quant_config.json``, and ``model.safetensors`` with HF tensor names plus ``weight_scale`` /
``input_scale`` / ``weight_scale_2`` / ``pre_quant_scale`` and ``k_proj.k_scale`` / ``v_proj.v_scale``
(:data:`quantaudit.export.layout.HF`). Loaders: TensorRT-LLM's PyTorch backend (LLM API,
``trtllm-serve``; FP8, FP8_PER_CHANNEL_PER_TOKEN, W8A16, W4A16_AWQ, W4A8_AWQ) and vLLM's ModelOpt
support (FP8 and FP8_PER_CHANNEL_PER_TOKEN only, FP8 KV cache only). KV-cache scales are written as the
engine has them, one per K and V (equal with ``--kv-scales shared``): vLLM's ``BaseKVCacheMethod`` uses
separate ``k_scale`` / ``v_scale``.

As ModelOpt does, the AWQ pre-quant scale of the linears fed by an RMSNorm (q/k/v, gate/up) is folded
into that norm's weight; o_proj/down_proj keep a ``pre_quant_scale`` tensor (ones for GPTQ/RTN INT4,
which TensorRT-LLM's loader reads there unconditionally). Refused: SmoothQuant formats (no unified
form either loader runs), mixed-precision plans, INT8 KV cache, more than one INT4 group size (the
loaders take one ``group_size``), and W4A8 with different ``weight_scale_2`` / ``input_scale`` across
linears TensorRT-LLM's PyTorch backend runs as one GEMM (q/k/v, gate/up: it asserts they are equal;
ModelOpt's export unifies them and so does our engine; the check guards that), likewise FP8's weight and
input scales (the loaders would re-quantize to the larger). Tensor parallelism is the runtime's job here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .. import __version__
from ..arch import Architecture, architecture
from ..errors import UserError
from ..quant.formats import get_format, get_kv_cache_format
from .layout import DTYPES, HF, HF_KV_ALGOS, HF_KV_SCALES, TRTLLM, TRTLLM_REFUSED, Storage, hf_writes
from .linears import PLAIN, Part, common_format, encode, parts_of, role_value


@dataclass
class HfCheckpoint:
    config: dict
    hf_quant_config: dict
    tensors: dict[str, torch.Tensor]
    notes: list[str] = field(default_factory=list)


def check_hf_request(formats: set[str], kv_algo: str | None, tp: int) -> None:
    """What an HF checkpoint cannot hold (checked before quantizing when the formats are known)."""
    if tp != 1:
        raise UserError("--tp applies to --target trtllm; an HF checkpoint is split by the runtime "
                        "(trtllm-serve --tp_size, vllm serve -tp)")
    formats = formats - {"none"}
    if len(formats) > 1:
        raise UserError(f"mixed-precision plans ({', '.join(sorted(formats))}) export only to --target trtllm")
    for fmt in sorted(formats - set(HF)):
        if get_format(fmt).weight.block is not None:
            where = "export it with --target trtllm" if fmt in TRTLLM else f"and {TRTLLM_REFUSED[fmt]}"
            raise UserError(f"--target hf: quantaudit does not write {fmt} as a unified HF checkpoint (ModelOpt's "
                            f"block-scaled layouts) yet; {where}")
        raise UserError(f"{fmt} has no ModelOpt unified-checkpoint form that TensorRT-LLM's PyTorch backend or vLLM "
                        "loads (SmoothQuant INT8 runs only in TensorRT engines); export it with --target trtllm")
    if kv_algo and kv_algo not in HF_KV_ALGOS:
        raise UserError(f"--target hf supports KV cache {', '.join(HF_KV_ALGOS)} only (vLLM's ModelOpt loader); "
                        f"got {kv_algo}")


def hf_architecture(model) -> Architecture:
    """The table entry of ``model`` if ``--target hf`` writes its layout (:func:`hf_writes`)."""
    arch = architecture(model)
    if not hf_writes(arch):
        raise UserError(f"--target hf: {arch.family} checkpoints hold the experts as 3-D tensors, whose quantized "
                        "layout quantaudit does not write yet; export a dense family, mixtral or qwen3_moe")
    return arch


def _storage(qm, tp: int) -> tuple[str, Storage, int | None]:
    quantized = [r for r in qm.layers.values() if r.quantized]
    if not quantized:
        raise UserError("nothing is quantized: export a quantized format (see `quantaudit formats`)")
    check_hf_request({r.format for r in quantized}, get_kv_cache_format(qm.spec.kv_cache).trtllm_kv_cache_quant_algo, tp)
    fmt = quantized[0].format
    groups = sorted({r.group_size for r in quantized if r.group_size})
    if len(groups) > 1:
        raise UserError(f"--target hf takes one INT4 group size but the layers use {groups} (a layer fell back to "
                        f"{groups[0]}); quantize with --group-size {groups[0]}")
    return fmt, HF[fmt], groups[0] if groups else None


def _linear(name: str, parts_group: list[Part], part: Part, storage: Storage, dtype: torch.dtype, fused: bool) -> dict:
    """``name``'s tensors; ``fused``: fed by a norm (its pre-quant scale is folded there)."""
    out = {} if part.record.bias is None else {f"{name}.bias": part.record.bias.detach().to(dtype)}
    parent = parts_group[0].name.rpartition(".")[0]  # "" for a top-level linear (an untied lm_head)
    group_name = f"{parent + '.' if parent else ''}{{{','.join(p.name.rpartition('.')[2] for p in parts_group)}}}"
    for spec in storage.tensors:
        if spec.unfused_only and fused:
            continue
        shared = spec.role in storage.shared_in_fused
        what = f"{group_name} (one GEMM in TensorRT-LLM's PyTorch backend)" if shared else name
        value = role_value(spec, parts_group if shared else [part], what)
        out[f"{name}.{spec.suffix}"] = encode(value[0] if isinstance(value, list) else value, spec, dtype)
    return out


def build_hf(qm, base_config, dtype: str = "float16", tp: int = 1) -> HfCheckpoint:
    """The unified HF checkpoint of ``qm``: config.json, hf_quant_config.json and tensors."""
    if dtype not in DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(DTYPES)} (got {dtype!r})")
    torch_dtype = DTYPES[dtype]
    fmt, storage, group = _storage(qm, tp)
    arch = hf_architecture(qm.model)
    n_layers = len(qm.model.model.layers)  # checked against the table when it was quantized
    kv_algo = get_kv_cache_format(qm.spec.kv_cache).trtllm_kv_cache_quant_algo
    state = qm.model.state_dict()
    tensors = {"model.embed_tokens.weight": state["model.embed_tokens.weight"].to(torch_dtype),
               "model.norm.weight": state["model.norm.weight"].to(torch_dtype)}
    excluded = []
    for i in range(n_layers):
        prefix = f"model.layers.{i}."
        groups = arch.layer_groups(qm.model.model.layers[i])
        for names, norm in ((g.linears, g.norm) for g in groups if g.norm):  # fed by a norm: pqs folded there
            group_parts = parts_of(qm, [prefix + n for n in names])
            quantized = common_format(group_parts, f"{prefix}{{{','.join(names)}}}")[0] is not None
            norm_weight = state[f"{prefix}{norm}.weight"].float()
            if quantized and storage.fold_pqs_into_norm and group_parts[0].record.pre_quant_scale is not None:
                pqs = role_value(next(s for s in storage.tensors if s.role == "pqs"), group_parts, f"{prefix}{norm}")
                norm_weight = arch.multiplied_norm_weight(norm_weight, pqs)
            tensors[f"{prefix}{norm}.weight"] = norm_weight.to(torch_dtype)
            for part in group_parts:
                tensors.update(_linear(part.name, group_parts, part, storage if quantized else PLAIN, torch_dtype, True))
                excluded += [] if quantized else [part.name]
        for unfolded in (g for g in groups if not g.norm):
            group_parts = parts_of(qm, [prefix + n for n in unfolded.linears])
            for part in group_parts:
                shared = group_parts if unfolded.fused else [part]  # one GEMM: its shared scales checked across parts
                tensors.update(_linear(part.name, shared, part, storage if part.quantized else PLAIN, torch_dtype, False))
                excluded += [] if part.quantized else [part.name]
        if i in qm.kv_scales:
            for key, value in zip(HF_KV_SCALES, (qm.kv_scales[i].k_scale, qm.kv_scales[i].v_scale)):
                tensors[prefix + key] = value.float().reshape(())
    norms = {n: p for n, p in state.items() if n.endswith("norm.weight") and n not in tensors}
    tensors.update((n, p.to(torch_dtype)) for n, p in norms.items())  # norms no scale folds into (q_norm, post-norms)
    head = parts_of(qm, ["lm_head"])[0]
    tied = qm.model.lm_head.weight is qm.model.model.embed_tokens.weight
    if head.quantized or not tied:
        tensors.update(_linear("lm_head", [head], head, storage if head.quantized else PLAIN, torch_dtype, False))
    excluded = ([] if head.quantized else ["lm_head"]) + excluded
    for router in arch.router_names(qm.model.model.layers):  # MoE routers: 16 bit, excluded as ModelOpt lists them
        tensors.update((f"{router}.{n}", p.detach().to(torch_dtype)) for n, p in qm.model.get_submodule(router).named_parameters())
        excluded.append(router)
    # MoE: per-expert linears and routers under the names the family's checkpoints use (Mixtral's w1/w3/w2)
    tensors = {arch.checkpoint_name(n): t for n, t in tensors.items()}
    excluded = [arch.checkpoint_name(n) for n in excluded]

    quantization = {"quant_algo": storage.quant_algo, "kv_cache_quant_algo": kv_algo}
    if storage.grouped:
        quantization.update(group_size=group, has_zero_point=False, pre_quant_scale=storage.pre_quant_scale)
    quantization["exclude_modules"] = excluded
    producer = {"name": "quantaudit", "version": __version__}
    config = base_config.to_dict()
    config.update(dtype=dtype, tie_word_embeddings=tied and not head.quantized,
                  quantization_config=_quantization_config(quantization, producer))
    return HfCheckpoint(config, {"producer": producer, "quantization": quantization}, tensors,
                        _notes(qm, fmt, storage, dtype))


def _quantization_config(quantization: dict, producer: dict) -> dict:
    """config.json's ``quantization_config`` as ModelOpt's ``convert_hf_quant_config_format`` writes it,
    with the ``quant_method`` key vLLM and transformers dispatch on."""
    qc = {"quant_method": "modelopt", "quant_algo": quantization["quant_algo"]}
    if quantization["quant_algo"] == "FP8":
        fp8 = {"dynamic": False, "num_bits": 8, "type": "float"}
        qc["config_groups"] = {"group_0": {"input_activations": dict(fp8), "weights": dict(fp8)}}
    if "group_size" in quantization:
        qc["group_size"] = quantization["group_size"]
    qc["ignore"] = list(quantization["exclude_modules"])
    if quantization["kv_cache_quant_algo"]:
        qc["kv_cache_scheme"] = {"dynamic": False, "num_bits": 8, "type": "float"}
    qc.update(producer=producer, quant_library="modelopt")
    return qc


def _notes(qm, fmt: str, storage: Storage, dtype: str) -> list[str]:
    notes = []
    if dtype != "float32":
        notes.append(f"embeddings, norms, unquantized linears and pre-quant scales are stored in {dtype} "
                     "(the audit computed with their float32 values)")
    if storage.fold_pqs_into_norm and any(r.pre_quant_scale is not None for r in qm.layers.values()):
        notes.append("the AWQ pre-quant scales of q/k/v and gate/up are folded into the RMSNorm weights "
                     "(ModelOpt's unified export does the same): norm * scale is rounded once more")
    cast = [r for r in qm.layers.values() if r.quantized and storage.scale_cast
            and not torch.equal(r.weight_scale.to(DTYPES[dtype]).float(), r.weight_scale.float())]
    if cast:
        notes.append(f"{storage.quant_algo}: TensorRT-LLM's PyTorch backend holds weight_scale in {dtype}, which rounds "
                     f"the audited scales of {len(cast)} layers")
    if qm.kv_scales and get_kv_cache_format(qm.spec.kv_cache).kind == "fp8":
        notes.append("FP8 KV cache: TensorRT-LLM's PyTorch backend runs it with scale 1.0, not k_scale/v_scale (its "
                     "attention reads them for an NVFP4 KV cache only: _torch/attention_backend/trtllm.py); vLLM uses them")
    if fmt == "w4a8_awq":
        notes.append("W4A8_AWQ: TensorRT-LLM's loader holds weight_scale / weight_scale_2 in float16 for the kernel "
                     "(up to 2^-11 relative per group scale); the audit used the float32 ratio")
    return notes
