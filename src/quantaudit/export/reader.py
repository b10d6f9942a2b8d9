"""Read an exported checkpoint back into a PyTorch model: the round-trip proof.

:func:`load_trtllm_checkpoint` and :func:`load_hf_checkpoint` rebuild a Hugging Face causal LM of
the checkpoint's family (the TensorRT-LLM ``architecture`` looked up in :mod:`quantaudit.arch`) from the
checkpoint files alone (config + safetensors; nothing from the quantized model): ranks are reassembled,
the qkv rows are split back into Q, K and V (per rank, by heads) and fused HF linears (Phi-3's
``qkv_proj``, ``gate_up_proj``) put back together in their own row order, INT4 and FP4 bytes unpacked,
Gemma's stored ``1 + w`` norms applied as stored, Mixtral's stacked experts taken apart into the
per-expert linears of :mod:`quantaudit.moe` (its float32 routers as stored), and every quantized linear
becomes a :class:`~quantaudit.quant.qlinear.QuantLinear` computing ``quant_act(x * pre_quant_scale) @
(codes * scale).T`` with the stored codes and scales. The TensorRT-LLM layout is interpreted from
its ``quant_algo`` through :mod:`quantaudit.export.layout`, the same table the exporter writes from.

What the guarantee covers: the rebuilt model computes what the checkpoint *defines* (for W4A8 the
FP8 conversion of codes * scale with ``weights_scaling_factor_2``, as the kernel does), including the
conversions TensorRT-LLM's loader applies to stored values - per-group scales cast to the checkpoint
dtype, W8A16 weights quantized by TensorRT-LLM's ``symmetric_quantize`` (per rank, as each rank
loads its shard; :mod:`quantaudit.quant.weightonly`), one KV-cache scale per layer in the legacy
checkpoint (``kv_cache_scaling_factor``, for K and V). It does not emulate
kernel arithmetic (fp16/bf16 activations and accumulation, W4A8's float16 ratio of the two weight scales),
so it proves the files hold the audited numbers, not that a GPU engine reproduces them bit for bit.
Non-quantized tensors come back as stored: exported in float16 they are the float16-rounded values.
"""

from __future__ import annotations

import fnmatch
import json
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from ..arch import ARCHITECTURES, TrtllmDecoder, TrtllmSlot, architecture
from ..errors import UserError
from ..moe import linearize_experts
from ..quant.formats import KV_CACHE_FORMATS, get_format
from ..quant.kvcache import install_kv_quantizers
from ..quant.qlinear import QuantizedWeight, QuantLinear
from ..quant.weightonly import trtllm_weight_only_quantize
from .layout import (
    BIAS,
    DTYPES,
    EMBEDDING,
    EXPERTS,
    FINAL_NORM,
    HF,
    HF_KV_SCALES,
    KV_CACHE_SCALE,
    LM_HEAD_SLOT,
    TRTLLM,
    TRTLLM_EXPERTS,
    Storage,
    TensorSpec,
    split_axis,
)
from .linears import FULL_ATTENTION, PLAIN, SLIDING_ATTENTION, block_rows
from .packing import PACKINGS, unshard


def _storage_for_algo(table: dict[str, Storage], entry: dict) -> Storage:
    algo = entry.get("quant_algo")
    for storage in table.values():
        if storage.quant_algo == algo and (not storage.grouped or storage.pre_quant_scale == bool(entry.get("pre_quant_scale"))):
            return storage
    raise UserError(f"cannot read quant_algo {algo!r} (pre_quant_scale={entry.get('pre_quant_scale')}): not a layout quantaudit writes")


def _causal_lm(cfg: dict, model_type: str = "llama") -> nn.Module:
    """An uninitialised causal LM of ``model_type`` (every parameter is then set from the checkpoint;
    :func:`_check_loaded`), with the attention implementation its family runs by default."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    with no_init_weights():
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **{"tie_word_embeddings": False, **cfg}))
    return model.eval()


def _check_loaded(model: nn.Module, loaded: set[str]) -> None:
    stale = [n for n, _ in model.named_parameters() if n not in loaded]
    if stale:
        raise UserError(f"checkpoint does not define {stale[0]} (and {len(stale) - 1} more parameters)")


def _decode(storage: Storage, full: dict[str, torch.Tensor], dims: tuple[int, int], group: int | None,
            dtype: torch.dtype, w8a16: tuple | None = None) -> nn.Module:
    """One HF linear from its full tensors (keyed by suffix; INT4/FP4 codes already unpacked; ``bias`` if any)."""
    out_f, in_f = dims
    bias = None if full.get("bias") is None else nn.Parameter(full["bias"].float(), requires_grad=False)
    if storage is PLAIN:
        linear = nn.Linear(in_f, out_f, bias=False, device="meta")
        linear.weight = nn.Parameter(full["weight"].float(), requires_grad=False)
        linear.bias = bias
        return linear
    fmt = get_format(storage.reader_format)
    codes, scale, w8a16_group = w8a16 or (None, None, None)
    act_scale = pqs = scale_2 = None
    for spec in storage.tensors:
        t = full.get(spec.suffix)
        if t is None or spec.role in ("one", "load_source"):
            continue
        if spec.role == "weight_scale_2":
            scale_2 = t.float().reshape(())
        elif spec.role == "codes":
            codes = t
        elif spec.role == "weight_scale":
            t = t.to(dtype) if storage.scale_in_model_dtype else t
            scale = {"tensor": lambda: t.float().reshape(()), "channel": lambda: t.float().reshape(-1, 1),
                     "group": lambda: t.float().reshape(out_f, -1),
                     "block": lambda: t.reshape(out_f, -1)}[fmt.weight.granularity]()  # E4M3 block scales stay E4M3
        elif spec.role == "act_scale":
            act_scale = t.float().reshape(())
        elif spec.role == "pqs":
            pqs = t.float().reshape(-1)
        elif spec.role == "smoother":
            pqs = 1.0 / t.float().reshape(-1)
    group = group if fmt.weight.granularity in ("group", "block") else w8a16_group
    requant = fmt.weight.requant if scale_2 is not None else None
    return QuantLinear(QuantizedWeight(codes, scale, group, requant, scale_2), fmt, bias, act_scale, pqs)


def _install_kv(model: nn.Module, kv_algo: str | None, scales: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    if not kv_algo:
        return
    fmt = next(f for f in KV_CACHE_FORMATS.values() if f.trtllm_kv_cache_quant_algo == kv_algo)
    quantizers = install_kv_quantizers(model, [layer.self_attn for layer in model.model.layers], fmt)
    for quantizer, (k, v) in zip(quantizers, scales):
        quantizer.k_scale, quantizer.v_scale = k.float().reshape(()), v.float().reshape(())
        quantizer.calibrating = False


# ---------------------------------------------------------------- TensorRT-LLM checkpoint


class _Ranks:
    """The rank files of a TensorRT-LLM checkpoint, reassembled tensor by tensor."""

    def __init__(self, path: Path, tp: int):
        missing = [r for r in range(tp) if not (path / f"rank{r}.safetensors").is_file()]
        if missing:
            raise UserError(f"{path}: config.json says tp_size {tp} but rank{missing[0]}.safetensors is missing")
        self.tp = tp
        self.files = [load_file(path / f"rank{r}.safetensors") for r in range(tp)]

    def get(self, name: str) -> list[torch.Tensor] | None:
        if name not in self.files[0]:
            return None
        return [f[name] for f in self.files]


class _Expert:
    """One expert's tensors of a stacked experts slot (one rank): the stacked ones sliced, the others whole."""

    def __init__(self, ranks: _Ranks, stacked: set[str], index: int):
        self.ranks, self.stacked, self.index = ranks, stacked, index

    def get(self, name: str) -> list[torch.Tensor] | None:
        per_rank = self.ranks.get(name)
        return [t[self.index] for t in per_rank] if per_rank is not None and name in self.stacked else per_rank


def _unshard_slot(per_rank: list[torch.Tensor], axis: int | None, part_sizes: list[int]) -> torch.Tensor:
    """Ranks' tensors of a fused linear back to the whole: each rank holds its share of every part."""
    if axis is None or len(per_rank) == 1 or len(part_sizes) == 1:
        return unshard(per_rank, axis)
    tp = len(per_rank)
    pieces = [torch.split(t, [s // tp for s in part_sizes], dim=axis) for t in per_rank]
    return torch.cat([torch.cat([p[i] for p in pieces], dim=axis) for i in range(len(part_sizes))], dim=axis)


def _w8a16(per_rank: list[torch.Tensor], parallel: str, dtype: torch.dtype, part_sizes: list[int]):
    """TensorRT-LLM's load-time quantization of each rank's shard, reassembled (row-parallel shards
    have their own per-channel scales: a per-group scale with one group per rank)."""
    quantized = [trtllm_weight_only_quantize(t) for t in per_rank]
    codes = [c for c, _ in quantized]
    scales = [s.to(dtype).float() for _, s in quantized]  # the kernel's scale is in the checkpoint dtype
    if parallel == "column":
        return _unshard_slot(codes, 0, part_sizes), _unshard_slot(scales, 0, part_sizes), None
    in_f = sum(c.shape[1] for c in codes)
    group = in_f // len(codes) if len(codes) > 1 else None
    return torch.cat(codes, dim=1), torch.cat(scales, dim=1), group


def _read_slot(ranks: _Ranks | _Expert, name: str, slot: TrtllmSlot, specs: tuple[TensorSpec, ...], part_sizes: list[int],
               dtype: torch.dtype) -> list[dict]:
    """Each part's rows of the slot's tensors, keyed by suffix (INT4/FP4 codes unpacked; ``w8a16``: the codes,
    scales and group TensorRT-LLM's load-time quantization gives those rows)."""
    full: dict[str, torch.Tensor] = {}
    out_axes: dict[str, int | None] = {}
    w8a16 = None
    for spec in specs:
        per_rank = ranks.get(f"{name}.{spec.suffix}")
        if per_rank is None:
            if spec.row_only and slot.parallel != "row":
                continue
            raise UserError(f"checkpoint lacks {name}.{spec.suffix}, which {name} needs")
        if spec.role == "load_source":
            w8a16 = _w8a16(per_rank, slot.parallel, dtype, part_sizes)
            continue
        if spec.packed:
            per_rank = [PACKINGS[spec.pack_axis][1](t) for t in per_rank]
        axis = split_axis(spec.shape, slot.parallel)
        full[spec.suffix] = _unshard_slot(per_rank, axis, part_sizes if slot.parallel == "column" else [1])
        out_axes[spec.suffix] = next((i for i, d in enumerate(spec.shape) if d.startswith("out")), None)
    pieces, offset = [], 0
    for size in part_sizes:
        own = {k: t if out_axes[k] is None else t.narrow(out_axes[k], offset, size) for k, t in full.items()}
        if w8a16 is not None:
            codes, scale, group = w8a16
            own["w8a16"] = (codes[offset: offset + size], scale[offset: offset + size], group)
        pieces.append((own, out_axes))
        offset += size
    return pieces


def _joined(pieces: list[tuple[dict, dict]]) -> dict:
    """Row blocks of one fused HF linear (in its row order) as the linear's tensors."""
    if len(pieces) == 1:
        return pieces[0][0]
    first, out_axes = pieces[0]
    out = {k: first[k] if out_axes.get(k) is None else torch.cat([p[k] for p, _ in pieces], dim=out_axes[k])
           for k in first if k != "w8a16"}
    if "w8a16" in first:
        out["w8a16"] = (torch.cat([p["w8a16"][0] for p, _ in pieces]), torch.cat([p["w8a16"][1] for p, _ in pieces]),
                        first["w8a16"][2])
    return out


class _StoredNorm(nn.Module):
    """TensorRT-LLM's RmsNorm of a ``(1 + w)·x̂`` family, whose checkpoint holds ``1 + w``: the HF norm's own
    float32 normalisation times the stored weight, cast back - what Gemma's RMSNorm computes, ``1.0 + w`` being
    the stored value (a ``w`` read back as ``stored - 1`` would not always round to it again)."""

    def __init__(self, norm: nn.Module, weight: torch.Tensor):
        super().__init__()
        self.eps = norm.eps
        self.normalize = type(norm)._norm
        self.weight = nn.Parameter(weight, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.normalize(self, x.float()) * self.weight.float()).type_as(x)


def _hf_config(cfg: dict, decoder: TrtllmDecoder) -> dict:
    """The HF config of what TensorRT-LLM's ``decoder`` computes from ``cfg``: global attention (its engine
    attends to every token it holds), the activation under its HF name, the family's own keys."""
    act = {trt: hf for hf, trt in decoder.hidden_act}[cfg["hidden_act"]]
    # absent keys take TensorRT-LLM's PretrainedConfig defaults (rotary_base 10000, rotary_pct 1): ModelOpt under
    # transformers 5 omits rotary_base (test_export_modelopt.py)
    rope = {"rope_type": "default", "rope_theta": cfg.get("rotary_base", 10000.0)}
    if cfg.get("rotary_pct", 1.0) != 1.0:
        rope["partial_rotary_factor"] = cfg["rotary_pct"]
    kw = dict(vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"], intermediate_size=cfg["intermediate_size"],
              num_hidden_layers=cfg["num_hidden_layers"], num_attention_heads=cfg["num_attention_heads"],
              num_key_value_heads=cfg["num_key_value_heads"], head_dim=cfg["head_size"], rms_norm_eps=cfg["norm_epsilon"],
              max_position_embeddings=cfg["max_position_embeddings"], hidden_act=act, hidden_activation=act,
              rope_parameters=rope, sliding_window=cfg["max_position_embeddings"],
              pad_token_id=None,  # not in the checkpoint; an embedding's padding index changes no forward
              **{k: cfg[k] for k in decoder.copied})
    if decoder.moe:
        if cfg["moe"]["normalization_mode"] != decoder.moe.normalization_mode:
            raise UserError(f"moe normalization_mode {cfg['moe']['normalization_mode']}: the reader computes "
                            f"{decoder.moe.normalization_mode} (renormalised top-k) only")
        kw.update({hf_key: cfg["moe"][key] for key, hf_key in decoder.moe.hf_keys})
    if decoder.local_rope:  # models/gemma/model.py: layer i is local iff (i + 1) % _sliding_window_pattern
        pattern = cfg["_sliding_window_pattern"]
        kw["layer_types"] = [SLIDING_ATTENTION if (i + 1) % pattern else FULL_ATTENTION
                             for i in range(cfg["num_hidden_layers"])]
        kw["rope_parameters"] = {FULL_ATTENTION: rope,
                                 SLIDING_ATTENTION: {"rope_type": "default", "rope_theta": cfg["rope_local_base_freq"]}}
    return kw


def _load_slot(model: nn.Module, source: _Ranks | _Expert, name: str, slot: TrtllmSlot, paths: list[str],
               storage: Storage, specs: tuple[TensorSpec, ...], group: int | None, dtype: torch.dtype, cfg: dict) -> set[str]:
    """Put the HF linears ``paths`` (full names, ``path:block`` for a row block) that TensorRT-LLM linear ``name``
    holds into ``model``; returns the parameter names set."""
    parts = [(hf, block or None) for hf, _, block in (p.partition(":") for p in paths)]
    rows = [block_rows(block, model.get_submodule(hf).out_features, cfg["num_attention_heads"],
                       cfg["num_key_value_heads"], cfg["head_size"]) for hf, block in parts]
    pieces = _read_slot(source, name, slot, specs, [r.stop - r.start for r in rows], dtype)
    loaded = set()
    for hf_name in dict.fromkeys(hf for hf, _ in parts):  # each HF linear once, its row blocks in row order
        mine = sorted((r.start, piece) for (hf, _), r, piece in zip(parts, rows, pieces) if hf == hf_name)
        own = _joined([piece for _, piece in mine])
        linear = model.get_submodule(hf_name)
        module = _decode(storage, own, (linear.out_features, linear.in_features), group, dtype, own.pop("w8a16", None))
        model.set_submodule(hf_name, module)
        loaded |= {f"{hf_name}.{n}" for n, _ in module.named_parameters()}
    return loaded


def load_trtllm_checkpoint(path: str | Path) -> nn.Module:
    """The HF causal LM of the checkpoint's family computing what the TensorRT-LLM checkpoint at ``path`` defines."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise UserError(f"{path} has no config.json: not a TensorRT-LLM checkpoint")
    cfg = json.loads((path / "config.json").read_text())
    arch = next((a for a in ARCHITECTURES if a.trtllm and a.trtllm.architecture == cfg.get("architecture")), None)
    if arch is None:
        known = ", ".join(a.trtllm.architecture for a in ARCHITECTURES if a.trtllm)
        raise UserError(f"{path}: architecture {cfg.get('architecture')!r}; the reader handles {known}")
    decoder = arch.trtllm
    quant = cfg.get("quantization") or {}
    layer_cfgs = None
    if quant.get("quant_algo") == "MIXED_PRECISION":
        layer_cfgs = json.loads((path / "quant_cfg.json").read_text())["quantized_layers"]
    dtype = DTYPES[cfg["dtype"]]
    tp = cfg["mapping"]["tp_size"]
    if decoder.moe and tp > 1:
        raise UserError(f"{path}: the reader takes {arch.family} checkpoints of one rank (what quantaudit writes)")
    ranks = _Ranks(path, tp)

    def storage_of(name: str, table: dict[str, Storage]) -> tuple[Storage, int | None]:
        if layer_cfgs is not None:
            entry = layer_cfgs.get(name)
            return (_storage_for_algo(table, entry), entry.get("group_size")) if entry else (PLAIN, None)
        if any(fnmatch.fnmatchcase(name, p) for p in quant.get("exclude_modules") or []):
            return PLAIN, None
        return _storage_for_algo(table, quant), quant.get("group_size")

    model = _causal_lm(_hf_config(cfg, decoder), arch.model_types[0])
    if decoder.moe:  # per-expert linears, as the audited model has them
        model = linearize_experts(model)
    embedding, hf_embedding, axis = EMBEDDING
    state = {hf_embedding: unshard(ranks.get(embedding), axis).float()}
    norms = [(FINAL_NORM[0], FINAL_NORM[1])] + [
        (f"transformer.layers.{i}.{trt}.weight", f"model.layers.{i}.{hf}.weight")
        for i in range(cfg["num_hidden_layers"]) for trt, hf in decoder.norms]
    for trt_name, hf_name in norms:
        weight = ranks.get(trt_name)[0].float()
        if arch.norm_offset:
            model.set_submodule(hf_name[: -len(".weight")], _StoredNorm(model.get_submodule(hf_name[: -len(".weight")]), weight))
        else:
            state[hf_name] = weight
    if decoder.moe:  # the float32 routers
        state.update((f"model.layers.{i}.{arch.moe.router}.weight",
                      ranks.get(f"transformer.layers.{i}.{decoder.moe.router}.weight")[0].float())
                     for i in range(cfg["num_hidden_layers"]))
    model.load_state_dict(state, strict=False)
    loaded = set(state) | {hf for _, hf in norms}
    kv = [ranks.get(f"transformer.layers.{i}.{KV_CACHE_SCALE}") for i in range(cfg["num_hidden_layers"])]
    _install_kv(model, quant.get("kv_cache_quant_algo"), [(s[0], s[0]) for s in kv if s is not None])
    slots = [(f"transformer.layers.{i}.{s.name}", f"model.layers.{i}.", s)
             for i in range(cfg["num_hidden_layers"]) for s in decoder.slots]
    if ranks.get("lm_head.weight") is None and cfg.get("share_embedding_table"):
        model.lm_head.weight = model.model.embed_tokens.weight  # the embedding table is the lm_head
        loaded.add("lm_head.weight")
    else:
        slots.append(("lm_head", "", LM_HEAD_SLOT))
    for name, hf_prefix, slot in slots:
        storage, group = storage_of(name, TRTLLM_EXPERTS if slot.experts else TRTLLM)
        specs = storage.tensors + ((BIAS,) if slot.name in decoder.biased else ())
        if not slot.experts:
            loaded |= _load_slot(model, ranks, name, slot, [hf_prefix + p for p in slot.parts], storage, specs, group,
                                 dtype, cfg)
            continue
        stacked = {f"{name}.{s.suffix}" for s in specs if s.shape[:1] == (EXPERTS,)}
        own_specs = tuple(replace(s, shape=s.shape[1:]) if f"{name}.{s.suffix}" in stacked else s for s in specs)
        for e in range(cfg["moe"]["num_experts"]):
            paths = [f"{hf_prefix}{arch.moe.experts}.{e}.{p}" for p in slot.parts]
            loaded |= _load_slot(model, _Expert(ranks, stacked, e), name, slot, paths, storage, own_specs, group, dtype,
                                 cfg)
    _check_loaded(model, loaded)
    return model.eval()


# ---------------------------------------------------------------- unified HF checkpoint


def load_hf_checkpoint(path: str | Path) -> nn.Module:
    """The causal LM (its config's ``model_type``) computing what the ModelOpt-style HF checkpoint at ``path`` defines."""
    path = Path(path)
    if not (path / "hf_quant_config.json").is_file():
        raise UserError(f"{path} has no hf_quant_config.json: not a quantized unified HF checkpoint")
    cfg = json.loads((path / "config.json").read_text())
    quant = json.loads((path / "hf_quant_config.json").read_text())["quantization"]
    tensors = {}
    for f in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(f))
    dtype = DTYPES[cfg.get("dtype") or cfg.get("torch_dtype")]
    keep = {k: v for k, v in cfg.items() if k not in ("quantization_config", "architectures", "dtype", "torch_dtype",
                                                          "transformers_version", "model_type")}
    model = linearize_experts(_causal_lm(keep, cfg.get("model_type", "llama")))  # MoE: per-expert linears
    arch = architecture(model)
    scales = [(tensors[f"model.layers.{i}.{HF_KV_SCALES[0]}"], tensors[f"model.layers.{i}.{HF_KV_SCALES[1]}"])
              for i in range(cfg["num_hidden_layers"]) if f"model.layers.{i}.{HF_KV_SCALES[0]}" in tensors]
    _install_kv(model, quant.get("kv_cache_quant_algo"), scales)
    storage = _storage_for_algo(HF, quant)
    excluded = quant.get("exclude_modules") or []
    loaded: set[str] = set()
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear):
            continue
        if name == "lm_head" and "lm_head.weight" not in tensors:
            continue  # tied to the embedding
        key = arch.checkpoint_name(name)  # MoE experts: the family's checkpoint names (Mixtral's w1/w3/w2)
        quantized = f"{key}.weight_scale" in tensors and not any(fnmatch.fnmatchcase(key, p) for p in excluded)
        use = storage if quantized else PLAIN
        own = {s.suffix: PACKINGS[s.pack_axis][1](tensors[f"{key}.{s.suffix}"]) if s.packed else tensors[f"{key}.{s.suffix}"]
               for s in use.tensors if f"{key}.{s.suffix}" in tensors}
        own["bias"] = tensors.get(f"{key}.bias")
        new = _decode(use, own, (module.out_features, module.in_features), quant.get("group_size"), dtype)
        model.set_submodule(name, new)
        loaded |= {f"{name}.{n}" for n, _ in new.named_parameters()}
    state = {k: v.float() for k, v in tensors.items()
             if k.endswith("norm.weight") or k == "model.embed_tokens.weight"}
    for router in arch.router_names(model.model.layers):  # MoE routers, kept in 16 bit
        state.update((f"{router}.{n}", tensors[arch.checkpoint_name(f"{router}.{n}")].float())
                     for n, _ in model.get_submodule(router).named_parameters())
    model.load_state_dict(state, strict=False)
    if "lm_head.weight" not in tensors:
        model.lm_head.weight = model.model.embed_tokens.weight
    _check_loaded(model, loaded | set(state))
    return model.eval()
