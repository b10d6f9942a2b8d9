"""A :class:`~quantaudit.quant.engine.QuantizedModel` as a TensorRT-LLM checkpoint.

``config.json`` has the keys, order and values ModelOpt 0.47's ``export_tensorrt_llm_checkpoint``
writes for a Llama model without ``tensorrt_llm`` installed (``tensorrt_llm_utils
.convert_to_tensorrt_llm_config``; compared with /work/shared/reference in the tests), its
``architecture`` and ``decoder`` those of the model's family (:class:`~quantaudit.arch.TrtllmDecoder`),
followed by the keys the family's TensorRT-LLM config class reads (Qwen's ``qwen_type`` / ``attn_bias``,
Gemma 2/3's ``query_pre_attn_scalar`` and soft-capping, Gemma 3's ``_sliding_window_pattern`` /
``rope_local_base_freq`` / ``sliding_window``; ModelOpt takes those from TensorRT-LLM's
``config_cls.from_hugging_face`` where ``tensorrt_llm`` is installed and writes no checkpoint for these
families without it). Two deliberate differences: ``producer`` names quantaudit, and ``rotary_base`` (Gemma
3's ``rope_local_base_freq`` too) is the model's - ModelOpt 0.47 and TensorRT-LLM's ``from_hugging_face``
read ``rope_theta``, which transformers 5 moved into ``rope_parameters``, and fall back to a default (10000;
SmolLM2 uses 100000, Gemma 3's global layers 1e6). ``rank`` is 0 (ModelOpt writes the rank of the last
writer; TensorRT-LLM sets the rank itself). Tensors follow :mod:`quantaudit.export.layout`; per rank,
column-parallel linears are split on their outputs (Q, K and V each by whole heads, so GQA groups stay on
one rank), row-parallel ones on their inputs, the vocabulary embedding and lm_head on the vocabulary.
Gemma's ``(1 + w)`` norms are stored as ``1 + w`` (TensorRT-LLM's RmsNorm multiplies by its weight); a
Gemma lm_head tied to the embedding and left unquantized is not written (``share_embedding_table``, as
ModelOpt forces for the gemma decoders). Linears left unquantized are listed in ``exclude_modules`` (with
``lm_head`` unless it is quantized); a model whose quantized linears need more than one layer config
(formats, or the INT4 group size where a layer fell back to 64) is ``MIXED_PRECISION`` with
``quant_cfg.json``, as ModelOpt's ``process_layer_quant_config`` writes it.

Mixtral (:class:`~quantaudit.arch.TrtllmMoE`): the experts of each sparse layer are stacked into ``mlp.fc`` / ``mlp.proj``
(:data:`~quantaudit.export.layout.TRTLLM_EXPERTS`), the router is ``mlp.router`` in float32 and listed in
``exclude_modules`` (else TensorRT-LLM's ``quantize_layers`` would quantize it: a written list replaces its default
``*router``), and ``config.json`` gets the ``moe`` section and ``moe_tp_size`` / ``moe_ep_size``. TensorRT-LLM builds
every ``MixtureOfExperts`` in the model-wide quant mode (``LLaMADecoderLayer`` passes ``config.quant_mode``), so a
Mixtral checkpoint is one format, every expert quantized; only ``--tp 1`` is written.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from .. import __version__
from ..arch import TrtllmSlot
from ..errors import UserError
from ..quant.formats import get_format, get_kv_cache_format
from ..quant.weightonly import trtllm_weight_only_quantize
from .layout import (
    BIAS,
    DTYPES,
    EMBEDDING,
    EXPERTS,
    FINAL_NORM,
    KV_CACHE_SCALE,
    KV_SEPARATE_SCALES,
    LM_HEAD_SLOT,
    TRTLLM,
    TRTLLM_EXPERTS,
    TRTLLM_EXPERTS_LIMITS,
    TRTLLM_REFUSED,
    Dims,
    Storage,
    split_axis,
    trtllm_layer_config,
)
from .linears import (
    PLAIN,
    ModelFacts,
    Part,
    common_format,
    encode,
    model_facts,
    out_axis,
    parts_of,
    role_value,
    slot_paths,
)
from .packing import shard


@dataclass
class PlacedSlot:
    """One TensorRT-LLM linear of this model: where it goes and how it is stored."""

    name: str  # full TensorRT-LLM name
    slot: TrtllmSlot
    parts: list[Part]
    format: str | None  # None: unquantized
    group_size: int | None
    experts: int = 0  # an experts slot: the parts of this many experts, expert by expert (0: one linear)

    @property
    def storage(self) -> Storage:
        return (TRTLLM_EXPERTS if self.experts else TRTLLM)[self.format] if self.format else PLAIN

    def expert_parts(self) -> list[list[Part]]:
        """The parts of each expert (one list for a plain slot)."""
        n = len(self.parts) // max(self.experts, 1)
        return [self.parts[k: k + n] for k in range(0, len(self.parts), n)]

    def dims(self) -> Dims:
        """The sizes of the linear (of one expert's, in an experts slot)."""
        own = self.expert_parts()[0]
        return Dims(sum(p.out_features for p in own), own[0].record.in_features, self.group_size)

    def layer_config(self) -> dict | None:
        return trtllm_layer_config(self.storage, self.group_size) if self.format else None


@dataclass
class TrtllmCheckpoint:
    config: dict
    quant_cfg: dict | None  # MIXED_PRECISION only
    ranks: list[dict[str, torch.Tensor]]
    slots: list[PlacedSlot]
    notes: list[str] = field(default_factory=list)  # where what TensorRT-LLM runs differs from the audit
    warnings: list[str] = field(default_factory=list)  # what TensorRT-LLM may not load


def place_slots(qm, facts: ModelFacts) -> list[PlacedSlot]:
    placed = []
    for i in range(facts.layers):
        for slot in facts.decoder.slots:
            name = f"transformer.layers.{i}.{slot.name}"
            parts = parts_of(qm, slot_paths(slot, i, facts), facts)
            biased = slot.name in facts.decoder.biased
            odd = next((p for p in parts if (p.record.bias is not None) != biased), None)
            if odd:
                raise UserError(f"{odd.name} has {'no ' if biased else 'a '}bias, but TensorRT-LLM's {facts.decoder.decoder} "
                                f"decoder {'adds one to' if biased else 'has none in'} {slot.name}; use --target hf")
            experts = facts.moe_config["num_experts"] if slot.experts else 0
            placed.append(PlacedSlot(name, slot, parts, *common_format(parts, name), experts=experts))
    head = parts_of(qm, ["lm_head"])
    placed.append(PlacedSlot("lm_head", LM_HEAD_SLOT, head, *common_format(head, "lm_head")))
    check_trtllm_formats({p.format for p in placed if p.format})
    return placed


def check_trtllm_formats(formats: set[str]) -> None:
    """Every format has a TensorRT-LLM checkpoint layout; else a UserError saying why not (checked before quantizing)."""
    for fmt in sorted(formats - {"none"}):
        if fmt in TRTLLM_REFUSED:
            raise UserError(f"{fmt} cannot be exported as a TensorRT-LLM checkpoint: {TRTLLM_REFUSED[fmt]}")
        if fmt not in TRTLLM:
            raise UserError(f"format {fmt} has no TensorRT-LLM checkpoint layout")


def _check_family_formats(facts: ModelFacts, formats: set[str]) -> None:
    """Formats TensorRT-LLM applies to whole attention/MLP blocks need a decoder whose norms all feed a linear: their
    quantization (quantization/quantize.py ``smooth_quantize_plugin``, ``fp8_rowwise_quantize``) replaces every
    RmsNorm of the model but ln_f with one that quantizes its output, and its Attention with one built without
    q/k norms."""
    extra = [n for n, _ in facts.decoder.norms if n not in facts.decoder.norm_fed]
    blocky = sorted(f for f in formats if f in TRTLLM and TRTLLM[f].whole_blocks)
    if blocky and extra:
        raise UserError(f"{blocky[0]} ({TRTLLM[blocky[0]].quant_algo}) makes TensorRT-LLM swap every RmsNorm of the decoder "
                        f"for a quantizing one, but {facts.decoder.decoder}'s {', '.join(extra)} feed no linear: it would "
                        "not run as audited; choose another format")


def _check_blocks(placed: list[PlacedSlot]) -> None:
    """Formats TensorRT-LLM applies to whole attention/MLP blocks admit no exclusion or mixing."""
    decoder = [p for p in placed if p.slot is not LM_HEAD_SLOT]
    head = placed[-1]
    if head.format and head.storage.whole_blocks:
        raise UserError(f"TensorRT-LLM's {head.storage.quant_algo} leaves lm_head unquantized; export without quantizing lm_head")
    for p in decoder:
        if p.format and p.storage.whole_blocks and any(q.format != p.format for q in decoder):
            odd = next(q for q in decoder if q.format != p.format)
            raise UserError(
                f"{p.storage.quant_algo} quantizes whole attention/MLP blocks in TensorRT-LLM, but {odd.name} is "
                f"{odd.format or 'unquantized'}; quantize every decoder linear to {p.format} (no exclusions or plans)"
            )


def _one_expert_format(facts: ModelFacts) -> UserError:
    return UserError(f"--target trtllm: TensorRT-LLM builds the MoE layers of a {facts.model_type} model in the "
                     "checkpoint's one quant_algo (models/llama/model.py passes config.quant_mode to MixtureOfExperts): "
                     "quantize every expert, in one format and group size (no mixed-precision plan, no expert left "
                     "unquantized), or export --target hf")


def _check_expert_formats(facts: ModelFacts, formats: set[str]) -> None:
    """The experts' formats are ones TensorRT-LLM's MoE layer runs as audited (:data:`TRTLLM_EXPERTS`), one for the
    whole checkpoint."""
    formats = formats - {"none"}
    odd = sorted(formats - set(TRTLLM_EXPERTS))
    if odd:
        raise UserError(f"--target trtllm: TensorRT-LLM's MoE layer (layers/moe.py) runs {facts.model_type} experts as "
                        f"audited in {', '.join(TRTLLM_EXPERTS)} only, not {odd[0]}: {TRTLLM_EXPERTS_LIMITS}; export one "
                        "of those, or --target hf")
    if len(formats) > 1:
        raise _one_expert_format(facts)


def check_trtllm_request(config, tp: int, max_seq_len: int, formats: set[str]) -> ModelFacts:
    """The model is exportable in ``formats`` for an engine of ``max_seq_len`` tokens and ``tp`` splits it (checked
    before quantizing)."""
    facts = model_facts(config, max_seq_len)
    if facts.decoder.moe:
        _check_expert_formats(facts, formats)
    _check_family_formats(facts, formats)
    if tp < 1:
        raise UserError(f"--tp must be at least 1 (got {tp})")
    if tp > 1 and facts.decoder.single_rank:
        raise UserError(f"--tp {tp}: quantaudit writes {facts.model_type} models for one rank only: "
                        f"{facts.decoder.single_rank}; export with --tp 1")
    sizes = {"attention heads": facts.heads, "KV heads": facts.kv_heads, "intermediate size": facts.intermediate,
             "vocabulary": facts.vocab}
    for what, n in sizes.items():
        if n % tp:
            raise UserError(f"--tp {tp} does not divide the {n} {what}; choose a tensor-parallel size that does")
    return facts


def _check_groups(placed: list[PlacedSlot], tp: int) -> None:
    for p in placed:
        if p.group_size and p.slot.parallel == "row" and (p.dims().inp // tp) % p.group_size:
            raise UserError(f"--tp {tp}: {p.name} would split its {p.dims().inp} inputs into shards that are not whole "
                            f"groups of {p.group_size}")


def _tensor(spec, placed: PlacedSlot, tp: int, dtype: torch.dtype) -> list[torch.Tensor]:
    """Every rank's ``placed.<suffix>`` tensor."""
    value = role_value(spec, placed.parts, placed.name)
    axis = split_axis(spec.shape, placed.slot.parallel)
    ranks = []
    for r in range(tp):
        if isinstance(value, torch.Tensor):
            t = shard(value, axis, tp, r)
        elif placed.slot.parallel == "column":  # each of Q, K, V split by heads, then concatenated
            t = torch.cat([shard(v, axis, tp, r) for v in value], dim=out_axis(spec))
        else:
            t = shard(torch.cat(value, dim=out_axis(spec)), axis, tp, r)
        ranks.append(encode(t, spec, dtype))
    return ranks


def _expert_tensor(spec, placed: PlacedSlot, dtype: torch.dtype) -> torch.Tensor:
    """An experts slot's ``placed.<suffix>`` tensor: each expert's stacked, or one for all experts."""
    if spec.shape[:1] != (EXPERTS,):
        return encode(role_value(spec, placed.parts, placed.name), spec, dtype)
    own = replace(spec, shape=spec.shape[1:])
    stacked = []
    for parts in placed.expert_parts():
        value = role_value(own, parts, placed.name)
        stacked.append(encode(torch.cat(value, dim=out_axis(own)) if isinstance(value, list) else value, own, dtype))
    return torch.stack(stacked)


def _linear_tensors(placed: PlacedSlot, tp: int, dtype: torch.dtype) -> dict[str, list[torch.Tensor]]:
    specs = [s for s in placed.storage.tensors if not (s.row_only and placed.slot.parallel != "row")]
    if placed.parts[0].record.bias is not None:
        specs.append(BIAS)
    if placed.experts:  # written for one rank (the MoE decoder's single_rank)
        return {f"{placed.name}.{s.suffix}": [_expert_tensor(s, placed, dtype)] for s in specs}
    return {f"{placed.name}.{s.suffix}": _tensor(s, placed, tp, dtype) for s in specs}


def _quantization(placed: list[PlacedSlot], kv_algo: str | None, unquantized: list[str]) -> tuple[dict, dict | None]:
    """The quantization config (and quant_cfg.json where mixed); ``unquantized``: modules to exclude besides the
    placed linears left unquantized (MoE routers)."""
    configs = [p.layer_config() for p in placed if p.format]
    if not configs:
        raise UserError("nothing is quantized: export a quantized format (see `quantaudit formats`)")
    distinct = {str(c): c for c in configs}
    if len(distinct) == 1:
        layer = next(iter(distinct.values()))
        extra = {k: v for k, v in layer.items() if k != "quant_algo"}
        excluded = sorted([p.name for p in placed if not p.format] + unquantized)
        return {"quant_algo": layer["quant_algo"], "kv_cache_quant_algo": kv_algo, **extra,
                "exclude_modules": excluded}, None
    blocky = next((p for p in placed if p.format and p.storage.whole_blocks), None)
    if blocky:
        raise UserError(f"{blocky.storage.quant_algo} cannot be part of a mixed-precision TensorRT-LLM checkpoint")
    layers = {p.name: p.layer_config() for p in placed if p.format}
    return ({"quant_algo": "MIXED_PRECISION", "kv_cache_quant_algo": kv_algo},
            {"quant_algo": "MIXED_PRECISION", "kv_cache_quant_algo": kv_algo, "quantized_layers": layers})


def _config(facts: ModelFacts, dtype_name: str, tp: int, quantization: dict, shared_embedding: bool) -> dict:
    config = {
        "producer": {"name": "quantaudit", "version": __version__},
        "architecture": facts.decoder.architecture,
        "dtype": dtype_name,
        "logits_dtype": "float16" if dtype_name == "bfloat16" else dtype_name,
        "num_hidden_layers": facts.layers,
        "num_attention_heads": facts.heads,
        "num_key_value_heads": facts.kv_heads,
        "hidden_size": facts.hidden,
        "norm_epsilon": facts.eps,
        "vocab_size": facts.vocab,
        "max_position_embeddings": facts.max_positions,
        "hidden_act": facts.hidden_act,
        "use_parallel_embedding": True,
        "embedding_sharding_dim": 0,
        "head_size": facts.head_dim,
        "intermediate_size": facts.intermediate,
        "position_embedding_type": "rope_gpt_neox",
        "share_embedding_table": shared_embedding,
        "residual_mlp": False,
        "bias": False,
        "rotary_pct": facts.rotary_pct,
        "rank": 0,
        "decoder": facts.decoder.decoder,
        "rmsnorm": True,
        "lm_head_bias": False,
        "rotary_base": facts.rope_theta,
        **facts.family_config,
        "mapping": {"world_size": tp, "tp_size": tp, "pp_size": 1},
        "quantization": quantization,
    }
    if facts.moe_config:  # tensorrt_llm_utils.convert_to_tensorrt_llm_config ("For Mixtral and Arctic")
        config["moe"] = facts.moe_config
        config["mapping"].update(moe_tp_size=tp, moe_ep_size=1)
    return config


def check_trtllm_kv(kv_cache: str, kv_scales: str) -> None:
    """A TensorRT-LLM checkpoint holds one KV-cache scale per attention layer (checked before quantizing)."""
    if get_kv_cache_format(kv_cache).kind and kv_scales != "shared":
        raise UserError(f"--kv-scales {kv_scales}: a TensorRT-LLM checkpoint holds one KV-cache scale per attention "
                        "layer (kv_cache_scaling_factor), so TensorRT-LLM would not run separate K and V scales; "
                        "quantize with --kv-scales shared, or export --target hf")


def _load_time_changes(placed: list[PlacedSlot], ranks: list[dict[str, torch.Tensor]], tp: int,
                       dtype: torch.dtype) -> tuple[int, int]:
    """(changed, all) weight rows of the layers TensorRT-LLM quantizes at load (W8A16) whose codes x scale its
    load-time quantization of the written tensors - each rank's shard on its own, the scale in the checkpoint
    dtype - does not give back as audited. Checked, not assumed: with --tp a row-parallel shard gets its own
    per-channel scale, and a float16 scale cannot hold every channel scale below 2^-14 (its subnormals). Stacked
    experts are quantized matrix by matrix (one rank)."""
    changed = total = 0
    for p in placed:
        if not (p.format and get_format(p.format).weight.quantized_at_load):
            continue
        if p.experts:
            written = ranks[0][f"{p.name}.weight"]
            pairs = [(torch.cat([part.dequantized_weight() for part in parts]), written[k])
                     for k, parts in enumerate(p.expert_parts())]
        else:
            audited = [part.dequantized_weight() for part in p.parts]
            pairs = [((torch.cat([shard(a, 0, tp, r) for a in audited]) if p.slot.parallel == "column"
                       else shard(torch.cat(audited), 1, tp, r)), ranks[r][f"{p.name}.weight"]) for r in range(tp)]
        for expected, stored in pairs:
            codes, scale = trtllm_weight_only_quantize(stored)
            loaded = codes.float() * scale.to(dtype).float()
            changed += int((loaded != expected).any(dim=1).sum())
            total += expected.shape[0]
    return changed, total


def _notes(placed: list[PlacedSlot], ranks: list[dict[str, torch.Tensor]], dtype_name: str, tp: int) -> list[str]:
    """Where what TensorRT-LLM loads or runs differs from the audited model."""
    notes = []
    used = {p.storage.quant_algo: p.storage for p in placed if p.format}
    if dtype_name != "float32":
        notes.append(f"embeddings, norms, unquantized linears and pre-quant scales are stored in {dtype_name} "
                     "(the audit computed with their float32 values)")
    if dtype_name == "bfloat16" and any(p.group_size and p.storage.scale_in_model_dtype for p in placed):
        notes.append("TensorRT-LLM casts INT4 group scales to bfloat16; the audited scales are float16 values")
    if "W4A8_AWQ" in used:
        notes.append("W4A8_AWQ: TensorRT-LLM's loader stores weights_scaling_factor / weights_scaling_factor_2 in float16 "
                     "for the kernel (up to 2^-11 relative per group scale); the audit used the float32 ratio")
    changed, rows = _load_time_changes(placed, ranks, tp, DTYPES[dtype_name])
    if changed:
        notes.append(f"W8A16: TensorRT-LLM's load-time quantization of the written weights changes {changed} of {rows} "
                     "weight rows from the audited codes x scales" + (
                         f" (with --tp {tp} each rank's shard of attention.dense / mlp.proj gets its own per-channel "
                         "scale)" if tp > 1 else ""))
    return notes


def _warnings(placed: list[PlacedSlot], tp: int, facts: ModelFacts, max_seq_len: int) -> list[str]:
    """Loadability caveats: TensorRT-LLM's groupwise INT4 layers pad in/out features to a multiple of
    max(``WeightQuant.pad_multiple``, group) * tp (64; 128 for W4A8: ``quantization/layers.py``
    ``WeightOnlyGroupwiseQuantLinear``) and then require checkpoint tensors of the padded shape
    (``Parameter.value`` asserts the shape; ``postprocess_weight_only_groupwise`` raises "Auto-padding is not
    Implemented for ModelOpt HF-AWQ"). ModelOpt writes them unpadded, as we do. The engine already picks a
    group size that avoids the padding where one exists (``engine.group_size_for``); what remains are sizes
    no group size helps (SmolLM2's 576 under W4A8's 128, stories260K's 172 outputs) and uneven --tp splits.
    MoE experts are not padded (``MOEWeightWrapper``). Formats TensorRT-LLM's engine loader does not read at all
    carry their layout's ``caveat``. A model with sliding-window layers is exact only in engines of at most its
    window (checked against ``max_seq_len``)."""
    odd = []
    for p in placed:
        multiple = get_format(p.format).weight.pad_multiple if p.format and not p.experts else None
        if multiple and any(n % (max(multiple, p.group_size) * tp) for n in (p.dims().out, p.dims().inp)):
            odd.append(f"{p.name} ({p.dims().out}x{p.dims().inp}, multiple {max(multiple, p.group_size) * tp})")
    caveats = list(dict.fromkeys(f"{p.storage.quant_algo}: {p.storage.caveat}" for p in placed if p.format and p.storage.caveat))
    if facts.sliding_window:
        caveats.append(f"the audited model's sliding-window layers attend to the last {facts.sliding_window} tokens, "
                       "TensorRT-LLM's to every token the engine holds: the same for engines of at most "
                       f"{facts.sliding_window} tokens (build.sh builds {max_seq_len}); a longer --max_seq_len differs")
    if not odd:
        return caveats
    return caveats + [(f"{len(odd)} INT4 linears have sizes TensorRT-LLM's groupwise layer pads (it then expects padded "
                       f"checkpoint tensors; this checkpoint, like ModelOpt's, is unpadded), e.g. {odd[0]}: trtllm-build "
                       "is expected to reject them")]


def build_trtllm(qm, base_config, dtype: str, tp: int, max_seq_len: int) -> TrtllmCheckpoint:
    """The TensorRT-LLM checkpoint of ``qm`` for engines of at most ``max_seq_len`` tokens: config, per-rank
    tensors and fidelity notes."""
    if dtype not in DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(DTYPES)} (got {dtype!r})")
    torch_dtype = DTYPES[dtype]
    facts = check_trtllm_request(base_config, tp, max_seq_len, {r.format for r in qm.layers.values() if r.quantized})
    placed = place_slots(qm, facts)
    _check_blocks(placed)
    _check_groups(placed, tp)
    check_trtllm_kv(qm.spec.kv_cache, qm.spec.kv_scales)
    kv_algo = get_kv_cache_format(qm.spec.kv_cache).trtllm_kv_cache_quant_algo
    moe = facts.decoder.moe
    routers = [f"transformer.layers.{i}.{moe.router}" for i in range(facts.layers)] if moe else []
    quantization, quant_cfg = _quantization(placed, kv_algo, routers)
    if moe and (quant_cfg or any(p.experts and not p.format for p in placed)):
        raise _one_expert_format(facts)

    ranks: list[dict[str, torch.Tensor]] = [{} for _ in range(tp)]

    def put(name: str, per_rank: list[torch.Tensor]) -> None:
        for r, t in enumerate(per_rank):
            ranks[r][name] = t

    def replicated(t: torch.Tensor, axis: int | None = None) -> list[torch.Tensor]:
        return [shard(t, axis, tp, r).contiguous() for r in range(tp)]

    state = qm.model.state_dict()

    def norm(hf_name: str) -> list[torch.Tensor]:  # TensorRT-LLM's RmsNorm multiplies by the stored weight
        return replicated((state[hf_name].float() + facts.norm_offset).to(torch_dtype))

    embedding, hf_embedding, axis = EMBEDDING
    put(embedding, replicated(state[hf_embedding].to(torch_dtype), axis))
    put(FINAL_NORM[0], norm(FINAL_NORM[1]))
    head = placed[-1]
    shared = (facts.decoder.shares_embedding and not head.format  # ModelOpt: torch.equal(lm_head, vocab_embedding)
              and torch.equal(state["lm_head.weight"], state[hf_embedding]))
    by_layer: dict[str, list[PlacedSlot]] = {}
    for p in placed if not shared else placed[:-1]:
        by_layer.setdefault(p.name.rsplit(".", 2)[0], []).append(p)
        for suffix, per_rank in _linear_tensors(p, tp, torch_dtype).items():
            put(suffix, per_rank)
    for i in range(facts.layers):
        prefix = f"transformer.layers.{i}"
        for trt_norm, hf_norm in facts.decoder.norms:
            put(f"{prefix}.{trt_norm}.weight", norm(f"model.layers.{i}.{hf_norm}.weight"))
            fed = [p for p in by_layer[prefix] if p.slot.norm == trt_norm and p.format]
            for spec in {s.suffix: s for p in fed for s in p.storage.norm_tensors}.values():
                put(f"{prefix}.{trt_norm}.{spec.suffix}", replicated(torch.ones(1, dtype=spec.dtype)))
        if i in qm.kv_scales:  # shared: k_scale == v_scale, the one scale TensorRT-LLM runs (check_trtllm_kv)
            k, v = qm.kv_scales[i].k_scale.float().reshape(1), qm.kv_scales[i].v_scale.float().reshape(1)
            put(f"{prefix}.{KV_CACHE_SCALE}", replicated(k.clone()))  # its own storage: safetensors refuses sharing
            for suffix, value in zip(KV_SEPARATE_SCALES, (k, v)):
                put(f"{prefix}.{suffix}", replicated(value))
    for i, router in enumerate(routers):  # float32, as TensorRT-LLM's router RowLinear (TrtllmMoE)
        put(f"{router}.weight", replicated(state[f"model.layers.{i}.{facts.sparse.router}.weight"].float().clone()))
    config = _config(facts, dtype, tp, quantization, shared)
    return TrtllmCheckpoint(config, quant_cfg, ranks, placed, notes=_notes(placed, ranks, dtype, tp),
                            warnings=_warnings(placed, tp, facts, max_seq_len))
