"""KV-cache quantization: cached keys (after RoPE) and values rounded with per-layer static scales.

TensorRT-LLM stores the KV cache in FP8 or INT8 with scales calibrated offline; the key is cached
after the rotary embedding, so that is where it is rounded. We simulate it through transformers'
``AttentionInterface``: a registered attention function (``quantaudit_kv_<impl>``) receives the query,
key and value states exactly as the model's attention computes them (key after RoPE and after any
k_norm, after the cache update), fake-quantizes key and value with the :class:`KVQuantizer` attached
to the attention module, then calls the attention function the model ran before (``<impl>``: SDPA, or
the family's own eager function with Gemma 2's soft-capping or GPT-OSS's sinks), under that
implementation's own mask function. The wrapper changes nothing else, so an identity quantizer leaves
the logits bit for bit as they were (tests/test_arch.py). Rounding the
whole cache at every step equals rounding each entry once when stored: with a fixed scale,
re-quantizing a value on the grid returns it unchanged.

Scales: per-tensor, per layer, ``amax / 448`` (FP8) or ``amax / 127`` (INT8), from the calibration
tokens (padding excluded): ModelOpt's ``k_bmm_quantizer`` / ``v_bmm_quantizer`` after RoPE record max |K|
and max |V| separately, and both are always kept. What the cache is rounded with (``formats.KV_SCALES``):

* ``"shared"`` (default): one scale for K and V from max(K amax, V amax). That is what TensorRT-LLM's
  engines run: a TensorRT-LLM checkpoint holds one ``kv_cache_scaling_factor`` per attention layer, and
  ``models/modeling_utils.preprocess_weights`` (``process_kv_scaling_factor``) replaces separate
  ``k_cache_scaling_factor`` / ``v_cache_scaling_factor`` by their max; ModelOpt's legacy export
  (``get_kv_cache_scaling_factor``) takes the same max.
* ``"separate"``: K and V each with their own scale, as Hugging Face / vLLM checkpoints carry them
  (``k_proj.k_scale``, ``v_proj.v_scale``; vLLM's ``BaseKVCacheMethod`` uses them separately).

NVFP4 (ModelOpt ``NVFP4_KV_CFG``): E2M1 in blocks of 16 along head_dim with dynamic E4M3 block scales
under a per-layer global scale ``amax / (6 * 448)`` (the same amax calibration, shared or separate).
Difference from the references, deliberately: ModelOpt floors an FP8 KV scale at 1.0 ("recommended
default"), which pushes small keys into FP8 subnormals; we use the calibrated ``amax / 448``.
"""

from __future__ import annotations

import itertools
import sys

import torch
from torch import nn
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .formats import KV_SCALES, KVCacheFormat
from .numerics import calibrated_scale, fake_quant_static

WRAPPER_PREFIX = "quantaudit_kv_"


class KVQuantizer(nn.Module):
    """Per-layer K and V rounding; in calibration mode it records max |K| and |V| instead."""

    def __init__(self, fmt: KVCacheFormat, scales: str = "shared"):
        super().__init__()
        if scales not in KV_SCALES:
            raise ValueError(f"KV scales must be one of {KV_SCALES} (got {scales!r})")
        self.fmt = fmt
        self.scales = scales
        self.calibrating = False
        self.token_mask: torch.Tensor | None = None  # [batch, seq] real tokens, set by the calibration loop
        self.register_buffer("k_amax", torch.zeros(()))
        self.register_buffer("v_amax", torch.zeros(()))
        self.register_buffer("k_scale", None)
        self.register_buffer("v_scale", None)

    def forward(self, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``key``/``value``: [batch, kv_heads, seq, head_dim]."""
        if self.calibrating:
            self.k_amax = torch.maximum(self.k_amax, _masked_amax(key, self.token_mask))
            self.v_amax = torch.maximum(self.v_amax, _masked_amax(value, self.token_mask))
            return key, value
        if self.k_scale is None:
            raise RuntimeError("KV quantizer used before calibration set its scales")
        f = self.fmt
        return (fake_quant_static(f.kind, f.bits, key, self.k_scale, f.block),
                fake_quant_static(f.kind, f.bits, value, self.v_scale, f.block))

    def finish_calibration(self) -> None:
        """Turn the recorded amax into scales (one from the larger of the two when shared) and switch to quantizing."""
        both = torch.maximum(self.k_amax, self.v_amax)
        k_amax, v_amax = (both, both) if self.scales == "shared" else (self.k_amax, self.v_amax)
        self.k_scale = calibrated_scale(self.fmt.kind, self.fmt.bits, k_amax, self.fmt.block)
        self.v_scale = calibrated_scale(self.fmt.kind, self.fmt.bits, v_amax, self.fmt.block)
        self.calibrating = False
        self.token_mask = None


def _device(*modules: nn.Module) -> torch.device:
    """Where the first of ``modules`` holding a tensor keeps it: parameters or buffers (a QuantLinear
    holds only buffers, so an attention whose linears are all quantized has no parameter)."""
    tensors = (t for m in modules for t in itertools.chain(m.parameters(), m.buffers()))
    return next((t.device for t in tensors), torch.device("cpu"))


def _masked_amax(states: torch.Tensor, token_mask: torch.Tensor | None) -> torch.Tensor:
    per_token = states.detach().abs().amax(dim=(1, 3)).float()  # [batch, seq]
    if token_mask is not None:
        per_token = per_token[token_mask.to(per_token.device)]
    return per_token.amax() if per_token.numel() else torch.zeros((), device=states.device)


def kv_quant_attention_forward(module, query, key, value, attention_mask, **kwargs):
    """The module's K/V rounding, then the attention function the model used before the wrapper."""
    quantizer = getattr(module, "kv_quantizer", None)
    if quantizer is not None:
        key, value = quantizer(key, value)
    return module.kv_inner_attention(module, query, key, value, attention_mask, **kwargs)


def _wrapper_for(impl: str) -> str:
    """The registered name wrapping attention implementation ``impl`` (registered on first use)."""
    if impl.startswith(WRAPPER_PREFIX):
        return impl
    name = WRAPPER_PREFIX + impl
    if name not in ALL_MASK_ATTENTION_FUNCTIONS:
        AttentionInterface.register(name, kv_quant_attention_forward)
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[impl])
    return name


def _inner_attention(attention: nn.Module, impl: str):
    """The function ``attention`` calls under ``impl``: the registered one, or its modeling file's eager one."""
    if impl == "eager":
        return sys.modules[type(attention).__module__].eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[impl]


def attach_kv_quantizer(attention: nn.Module, fmt: KVCacheFormat, scales: str, device, impl: str) -> KVQuantizer:
    """Give one attention module a calibrating :class:`KVQuantizer` and route its attention, which ran
    implementation ``impl``, through the wrapper (its config is switched to the wrapper's name)."""
    if impl.startswith(WRAPPER_PREFIX):
        raise ValueError("attention already runs quantaudit's KV wrapper")
    attention.kv_inner_attention = _inner_attention(attention, impl)
    attention.kv_quantizer = KVQuantizer(fmt, scales).to(device)
    attention.kv_quantizer.calibrating = True
    attention.config._attn_implementation = _wrapper_for(impl)
    return attention.kv_quantizer


def install_kv_quantizers(model: nn.Module, attentions: list[nn.Module], fmt: KVCacheFormat,
                          scales: str = "shared") -> list[KVQuantizer]:
    """Attach a calibrating :class:`KVQuantizer` to each attention module and switch ``model`` to the
    wrapper of the attention implementation it runs."""
    impl = model.config._attn_implementation or "eager"
    quantizers = [attach_kv_quantizer(attention, fmt, scales, _device(attention, model), impl) for attention in attentions]
    model.set_attn_implementation(_wrapper_for(impl))
    return quantizers
