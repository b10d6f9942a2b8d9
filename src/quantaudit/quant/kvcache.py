"""KV-cache quantization: cached keys (after RoPE) and values rounded with per-layer static scales.

TensorRT-LLM stores the KV cache in FP8 or INT8 with scales calibrated offline; the key is cached
after the rotary embedding, so that is where it is rounded. We simulate it through transformers'
``AttentionInterface``: a registered attention function (:data:`ATTN_IMPL`) receives the query,
key and value states exactly as the model's attention computes them (key after RoPE, after the
cache update) and fake-quantizes key and value with the :class:`KVQuantizer` attached to the
attention module, then runs PyTorch SDPA like transformers' ``sdpa`` implementation. Rounding the
whole cache at every step equals rounding each entry once when stored: with a fixed scale,
re-quantizing a value on the grid returns it unchanged.

Scales: separate K and V per-tensor scales per layer, ``amax / 448`` (FP8) or ``amax / 127``
(INT8), from the calibration tokens (padding excluded) — ModelOpt's ``k_bmm_quantizer`` /
``v_bmm_quantizer`` after RoPE. Differences from the references, deliberately: ModelOpt floors an
FP8 KV scale at 1.0 ("recommended default"), which pushes small keys into FP8 subnormals; we use
the calibrated ``amax / 448``. The legacy TensorRT-LLM checkpoint holds one
``kv_cache_scaling_factor`` per layer for K and V together; an exporter writing that format
must use ``max(k_scale, v_scale)``.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

from .formats import KVCacheFormat
from .numerics import fake_quant, quant_scale

ATTN_IMPL = "quantaudit_kv_sdpa"


class KVQuantizer(nn.Module):
    """Per-layer K and V rounding; in calibration mode it records max |K| and |V| instead."""

    def __init__(self, fmt: KVCacheFormat):
        super().__init__()
        self.fmt = fmt
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
        bits = self.fmt.bits
        return fake_quant(self.fmt.kind, key, self.k_scale, bits), fake_quant(self.fmt.kind, value, self.v_scale, bits)

    def finish_calibration(self) -> None:
        """Turn the recorded amax into scales and switch to quantizing."""
        self.k_scale = quant_scale(self.fmt.kind, self.k_amax, self.fmt.bits)
        self.v_scale = quant_scale(self.fmt.kind, self.v_amax, self.fmt.bits)
        self.calibrating = False
        self.token_mask = None


def _masked_amax(states: torch.Tensor, token_mask: torch.Tensor | None) -> torch.Tensor:
    per_token = states.detach().abs().amax(dim=(1, 3)).float()  # [batch, seq]
    if token_mask is not None:
        per_token = per_token[token_mask.to(per_token.device)]
    return per_token.amax() if per_token.numel() else torch.zeros((), device=states.device)


def kv_quant_sdpa_forward(module, query, key, value, attention_mask, **kwargs):
    """transformers' SDPA attention with the module's K/V rounding applied first."""
    quantizer = getattr(module, "kv_quantizer", None)
    if quantizer is not None:
        key, value = quantizer(key, value)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(ATTN_IMPL, kv_quant_sdpa_forward)
AttentionMaskInterface.register(ATTN_IMPL, sdpa_mask)


def install_kv_quantizers(model: nn.Module, attentions: list[nn.Module], fmt: KVCacheFormat) -> list[KVQuantizer]:
    """Attach a calibrating :class:`KVQuantizer` to each attention module and switch ``model`` to
    :data:`ATTN_IMPL` (whatever attention it used before: the wrapper runs SDPA)."""
    quantizers = []
    for attention in attentions:
        attention.kv_quantizer = KVQuantizer(fmt).to(next(attention.parameters()).device)
        attention.kv_quantizer.calibrating = True
        quantizers.append(attention.kv_quantizer)
    model.set_attn_implementation(ATTN_IMPL)
    return quantizers
