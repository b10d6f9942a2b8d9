"""Read an exported checkpoint back into a PyTorch model: the round-trip proof.

:func:`load_trtllm_checkpoint` and :func:`load_hf_checkpoint` rebuild a Hugging Face
``LlamaForCausalLM`` from the checkpoint files alone (config + safetensors; nothing from the
quantized model): ranks are reassembled, the qkv rows are split back into Q, K and V (per rank, by
heads), INT4 and FP4 bytes unpacked, and every quantized linear becomes a
:class:`~quantaudit.quant.qlinear.QuantLinear` computing ``quant_act(x * pre_quant_scale) @
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
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from ..errors import UserError
from ..quant.formats import KV_CACHE_FORMATS, get_format
from ..quant.kvcache import install_kv_quantizers
from ..quant.qlinear import QuantizedWeight, QuantLinear
from ..quant.weightonly import trtllm_weight_only_quantize
from .layout import (
    DECODER_NORMS,
    DECODER_SLOTS,
    DTYPES,
    HF,
    HF_KV_SCALES,
    KV_CACHE_SCALE,
    LM_HEAD_SLOT,
    TOP_TENSORS,
    TRTLLM,
    Slot,
    Storage,
    split_axis,
)
from .linears import PLAIN
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


def _read_slot(ranks: _Ranks, name: str, slot: Slot, storage: Storage, modules: list[nn.Linear], group: int | None,
               dtype: torch.dtype) -> list[nn.Module]:
    part_sizes = [m.out_features for m in modules]
    full: dict[str, torch.Tensor] = {}
    w8a16 = None
    for spec in storage.tensors:
        per_rank = ranks.get(f"{name}.{spec.suffix}")
        if per_rank is None:
            if spec.row_only and slot.parallel != "row":
                continue
            raise UserError(f"checkpoint lacks {name}.{spec.suffix}, which {storage.quant_algo or 'an unquantized linear'} needs")
        if spec.role == "load_source":
            w8a16 = _w8a16(per_rank, slot.parallel, dtype, part_sizes)
            continue
        if spec.packed:
            per_rank = [PACKINGS[spec.pack_axis][1](t) for t in per_rank]
        axis = split_axis(spec.shape, slot.parallel)
        full[spec.suffix] = _unshard_slot(per_rank, axis, part_sizes if slot.parallel == "column" else [1])
    modules_out = []
    offset = 0
    for m in modules:
        own = {}
        for spec in storage.tensors:
            if spec.suffix not in full:
                continue
            t = full[spec.suffix]
            per_out = any(d.startswith("out") for d in spec.shape)
            axis = next((i for i, d in enumerate(spec.shape) if d.startswith("out")), None)
            own[spec.suffix] = t.narrow(axis, offset, m.out_features) if per_out else t
        part_w8a16 = None
        if w8a16 is not None:
            codes, scale, g = w8a16
            part_w8a16 = (codes[offset: offset + m.out_features], scale[offset: offset + m.out_features], g)
        modules_out.append(_decode(storage, own, (m.out_features, m.in_features), group, dtype, part_w8a16))
        offset += m.out_features
    return modules_out


def load_trtllm_checkpoint(path: str | Path) -> nn.Module:
    """A ``LlamaForCausalLM`` computing what the TensorRT-LLM checkpoint at ``path`` defines."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise UserError(f"{path} has no config.json: not a TensorRT-LLM checkpoint")
    cfg = json.loads((path / "config.json").read_text())
    if cfg.get("architecture") != "LlamaForCausalLM":
        raise UserError(f"{path}: architecture {cfg.get('architecture')!r}; the reader handles LlamaForCausalLM")
    quant = cfg.get("quantization") or {}
    layer_cfgs = None
    if quant.get("quant_algo") == "MIXED_PRECISION":
        layer_cfgs = json.loads((path / "quant_cfg.json").read_text())["quantized_layers"]
    dtype = DTYPES[cfg["dtype"]]
    tp = cfg["mapping"]["tp_size"]
    ranks = _Ranks(path, tp)

    def storage_of(name: str) -> tuple[Storage, int | None]:
        if layer_cfgs is not None:
            entry = layer_cfgs.get(name)
            return (_storage_for_algo(TRTLLM, entry), entry.get("group_size")) if entry else (PLAIN, None)
        if any(fnmatch.fnmatchcase(name, p) for p in quant.get("exclude_modules") or []):
            return PLAIN, None
        return _storage_for_algo(TRTLLM, quant), quant.get("group_size")

    model = _causal_lm(dict(
        vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"], intermediate_size=cfg["intermediate_size"],
        num_hidden_layers=cfg["num_hidden_layers"], num_attention_heads=cfg["num_attention_heads"],
        num_key_value_heads=cfg["num_key_value_heads"], head_dim=cfg["head_size"], rms_norm_eps=cfg["norm_epsilon"],
        max_position_embeddings=cfg["max_position_embeddings"], hidden_act=cfg["hidden_act"],
        rope_parameters={"rope_theta": cfg.get("rotary_base", 10000.0), "rope_type": "default"},
    ))
    state = {}
    for trt_name, (hf_name, axis) in TOP_TENSORS.items():
        state[hf_name] = unshard(ranks.get(trt_name), axis).float()
    for i in range(cfg["num_hidden_layers"]):
        for trt_norm, hf_norm in DECODER_NORMS.items():
            state[f"model.layers.{i}.{hf_norm}.weight"] = ranks.get(f"transformer.layers.{i}.{trt_norm}.weight")[0].float()
    model.load_state_dict(state, strict=False)
    loaded = set(state)
    kv = [ranks.get(f"transformer.layers.{i}.{KV_CACHE_SCALE}") for i in range(cfg["num_hidden_layers"])]
    _install_kv(model, quant.get("kv_cache_quant_algo"), [(s[0], s[0]) for s in kv if s is not None])
    slots = [(f"transformer.layers.{i}.{s.name}", f"model.layers.{i}.", s)
             for i in range(cfg["num_hidden_layers"]) for s in DECODER_SLOTS] + [("lm_head", "", LM_HEAD_SLOT)]
    for name, hf_prefix, slot in slots:
        storage, group = storage_of(name)
        hf_names = [hf_prefix + p for p in slot.hf]
        modules = _read_slot(ranks, name, slot, storage, [model.get_submodule(n) for n in hf_names], group, dtype)
        for hf_name, module in zip(hf_names, modules):
            model.set_submodule(hf_name, module)
            loaded |= {f"{hf_name}.{n}" for n, _ in module.named_parameters()}
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
    model = _causal_lm(keep, cfg.get("model_type", "llama"))
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
        quantized = f"{name}.weight_scale" in tensors and not any(fnmatch.fnmatchcase(name, p) for p in excluded)
        use = storage if quantized else PLAIN
        own = {s.suffix: PACKINGS[s.pack_axis][1](tensors[f"{name}.{s.suffix}"]) if s.packed else tensors[f"{name}.{s.suffix}"]
               for s in use.tensors if f"{name}.{s.suffix}" in tensors}
        own["bias"] = tensors.get(f"{name}.bias")
        new = _decode(use, own, (module.out_features, module.in_features), quant.get("group_size"), dtype)
        model.set_submodule(name, new)
        loaded |= {f"{name}.{n}" for n, _ in new.named_parameters()}
    state = {k: v.float() for k, v in tensors.items()
             if k.endswith("norm.weight") or k == "model.embed_tokens.weight"}
    model.load_state_dict(state, strict=False)
    if "lm_head.weight" not in tensors:
        model.lm_head.weight = model.model.embed_tokens.weight
    _check_loaded(model, loaded | set(state))
    return model.eval()
