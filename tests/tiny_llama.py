"""A random-weight Llama small enough for unit tests, for what stories260K cannot show (its head_dim of 8
holds no NVFP4 KV block of 16). Imported by name: tests/ is on sys.path through tests/conftest.py."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from quantaudit.data import Windows


def tiny_llama(head_dim: int = 16) -> LlamaForCausalLM:
    """2 layers, 4 heads / 2 KV heads of ``head_dim``, vocab 64, fixed seed."""
    torch.manual_seed(7)
    cfg = LlamaConfig(vocab_size=64, hidden_size=4 * head_dim, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    cfg.architectures = ["LlamaForCausalLM"]
    return LlamaForCausalLM(cfg).eval()


def random_windows() -> Windows:
    """Two windows of random token ids (24 and 20 real tokens)."""
    torch.manual_seed(8)
    return Windows(torch.randint(0, 64, (2, 24)), torch.tensor([24, 20]), "random", "none", 44)
