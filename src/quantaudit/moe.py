"""Mixture-of-Experts experts as one ``nn.Linear`` per expert projection, so every quantizer sees plain linears.

transformers 5 keeps a sparse block's experts as 3-D parameters (Mixtral / Qwen3-MoE ``gate_up_proj``
[experts, 2·inter, hidden] with gate and up concatenated; GPT-OSS ``gate_up_proj`` [experts, hidden, 2·inter],
transposed, gate and up interleaved, with biases). :func:`linearize_experts` replaces each such module by a
:class:`LinearExperts`: per expert a ``gate_proj``, ``up_proj`` and ``down_proj`` ``nn.Linear`` holding the same
numbers, with the same forward (the family's own ``_apply_gate``: SiLU·up, or GPT-OSS's clamped GLU). This is
llm-compressor's ``modeling/moe/linear_experts.py`` (``LinearExperts2D``) and the per-expert layout ModelOpt and
TensorRT-LLM quantize and the checkpoints store (``experts.{e}.w1/w3/w2``, ``experts.{e}.gate_proj/...``).

Calibration (ModelOpt's ``_QuantSparseMoe``, llm-compressor's ``calibrate_all_experts``): while
:attr:`LinearExperts.all_tokens` is set, every expert runs on every token, so that an expert the router rarely
picks still gets statistics from the whole calibration set; the block's output is still the routed one (the
expert outputs of the tokens routed to it, weighted by the router). The router itself stays in 16 bit, as
ModelOpt's default configs disable ``*router*`` / ``*mlp.gate.*``.
"""

from __future__ import annotations

import torch
from torch import nn

from .errors import UserError

# What a family's gate function reads from its experts module (SiLU; GPT-OSS's swiglu alpha and clamp limit).
_GATE_ATTRIBUTES = ("act_fn", "alpha", "limit")


class ExpertMLP(nn.Module):
    """One expert: down(gate_fn(gate(x), up(x)))."""

    def __init__(self, gate_proj: nn.Linear, up_proj: nn.Linear, down_proj: nn.Linear):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = gate_proj, up_proj, down_proj


class LinearExperts(nn.ModuleList):
    """The experts of one sparse block as :class:`ExpertMLP` modules; called as the 3-D module was,
    ``(hidden [tokens, hidden], top_k_index [tokens, k], top_k_weights [tokens, k])``."""

    def __init__(self, experts: list[ExpertMLP], source: nn.Module):
        super().__init__(experts)
        self.num_experts = len(experts)
        self.is_concatenated = getattr(source, "is_concatenated", True)
        self._apply_gate_fn = type(source)._apply_gate  # the family's own gating, called on this module
        for name in _GATE_ATTRIBUTES:  # plain attributes: an activation module must not become a list entry
            if hasattr(source, name):
                object.__setattr__(self, name, getattr(source, name))
        self.all_tokens = False  # calibration: every expert sees every token (module docstring)

    def expert_output(self, index: int, x: torch.Tensor) -> torch.Tensor:
        expert = self[index]
        gate, up = expert.gate_proj(x), expert.up_proj(x)
        if self.is_concatenated:
            gate_up = torch.cat([gate, up], dim=-1)
        else:  # GPT-OSS: gate and up interleaved column by column
            gate_up = torch.stack([gate, up], dim=-1).flatten(-2)
        return expert.down_proj(self._apply_gate_fn(self, gate_up))

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        out = torch.zeros_like(hidden_states)
        with torch.no_grad():
            expert_mask = nn.functional.one_hot(top_k_index, num_classes=self.num_experts + 1).permute(2, 1, 0)
            hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()
        if self.all_tokens:
            hit = torch.arange(self.num_experts)[:, None]
        for index in hit:
            index = int(index[0])
            if index == self.num_experts:  # the "no expert" slot of expert-parallel routing
                continue
            position, token = torch.where(expert_mask[index])
            if self.all_tokens:
                y = self.expert_output(index, hidden_states)[token]
            else:
                y = self.expert_output(index, hidden_states[token])
            y = y * top_k_weights[token, position, None]
            out.index_add_(0, token, y.to(out.dtype))
        return out


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device,
                       dtype=weight.dtype)
    linear.weight = nn.Parameter(weight.detach().clone().contiguous(), requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(bias.detach().clone().contiguous(), requires_grad=False)
    return linear


@torch.no_grad()
def linear_experts(source: nn.Module) -> LinearExperts:
    """``source`` (a transformers ``@use_experts_implementation`` module with 3-D parameters) as
    :class:`LinearExperts` holding the same numbers."""
    if not getattr(source, "has_gate", True):
        raise UserError(f"{type(source).__name__}: experts without a gate projection are not supported")
    transposed = getattr(source, "is_transposed", False)
    concatenated = getattr(source, "is_concatenated", True)
    has_bias = getattr(source, "has_bias", False)
    experts = []
    for e in range(source.gate_up_proj.shape[0]):
        gate_up = source.gate_up_proj[e].T if transposed else source.gate_up_proj[e]  # [2·inter, hidden]
        down = source.down_proj[e].T if transposed else source.down_proj[e]  # [hidden, inter]
        gate_up_bias = source.gate_up_proj_bias[e] if has_bias else None
        if concatenated:
            gate, up = gate_up.chunk(2, dim=0)
            gate_bias, up_bias = gate_up_bias.chunk(2) if has_bias else (None, None)
        else:
            gate, up = gate_up[0::2], gate_up[1::2]
            gate_bias, up_bias = (gate_up_bias[0::2], gate_up_bias[1::2]) if has_bias else (None, None)
        down_bias = source.down_proj_bias[e] if has_bias else None
        experts.append(ExpertMLP(_linear(gate, gate_bias), _linear(up, up_bias), _linear(down, down_bias)))
    return LinearExperts(experts, source)


def is_fused_experts(module: nn.Module) -> bool:
    """A transformers 5 experts module with 3-D parameters (what :func:`linearize_experts` replaces)."""
    return isinstance(getattr(module, "gate_up_proj", None), nn.Parameter) and getattr(module, "gate_up_proj").dim() == 3


def linearize_experts(model: nn.Module) -> nn.Module:
    """Replace every 3-D experts module of ``model`` in place by :class:`LinearExperts`; returns ``model``."""
    for name, module in list(model.named_modules()):
        if is_fused_experts(module):
            model.set_submodule(name, linear_experts(module))
    return model


def set_all_tokens(module: nn.Module, on: bool) -> None:
    """Switch calibration routing (every expert on every token) on or off in every sparse block of ``module``."""
    for sub in module.modules():
        if isinstance(sub, LinearExperts):
            sub.all_tokens = on
