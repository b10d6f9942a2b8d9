"""Where the linears of a Llama-family model sit, and the statistics calibration collects on them.

Calibration runs layer by layer: the calibration windows are run up to the first decoder layer once;
then, per layer, the layer is run on the current hidden states with hooks recording the inputs of its
linears, and the layer is quantized. What the next layer sees depends on the algorithm
(``quant.algorithms``): static scales, SmoothQuant and AWQ are calibrated on the full-precision
model's activations (ModelOpt's ``max`` calibration, llm-awq), so the float layer produces the next
hidden states; GPTQ is sequential, as the GPTQ reference and llm-compressor's sequential pipeline run
it, and the quantized layer produces them, so each layer is calibrated on the outputs of the
already-quantized layers before it. Within a layer all linears are calibrated on the same pass
(llm-compressor's per-subgraph scheme), so o_proj/down_proj see the inputs of the layer's float
q/k/v and gate/up.

Padded positions of the calibration windows are excluded from every statistic. Memory holds the
hidden states of all calibration tokens at one depth (SmolLM2, 64 x 512 tokens: 75 MB) plus one
layer's statistics.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import UserError
from .gptq import HessianAccumulator


@dataclass(frozen=True)
class LinearGroup:
    """Linears that read the same input, and the RMSNorm producing it (None: no exact fold)."""

    linears: tuple[str, ...]
    norm: str | None
    # TensorRT-LLM runs them as one GEMM (qkv; gate/up in its fused gated MLP and PyTorch backend): one
    # activation scale and one per-tensor weight scale for all of them (quant.algorithms)
    fused: bool = False


# Paths relative to a decoder layer (HF llama family: Llama, Mistral, Qwen2, SmolLM2, ...).
DECODER_GROUPS = (
    LinearGroup(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "input_layernorm", fused=True),
    LinearGroup(("self_attn.o_proj",), None),
    LinearGroup(("mlp.gate_proj", "mlp.up_proj"), "post_attention_layernorm", fused=True),
    LinearGroup(("mlp.down_proj",), None),
)
# Relative to the causal-LM module.
LM_HEAD_GROUP = LinearGroup(("lm_head",), "model.norm")


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """``model.model.layers``, checked to hold every Llama-family linear and norm by name.

    Anything else is refused with a UserError naming the linear layers that were found.
    """
    layers = getattr(getattr(model, "model", None), "layers", None)
    problems = []
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        problems.append("no decoder layers at model.model.layers")
    else:
        for group in DECODER_GROUPS:
            for path in group.linears:
                if not isinstance(_get(layers[0], path), nn.Linear):
                    problems.append(f"no nn.Linear at model.model.layers.N.{path}")
            if group.norm and getattr(_get(layers[0], group.norm), "weight", None) is None:
                problems.append(f"no norm with a weight at model.model.layers.N.{group.norm}")
    if not isinstance(_get(model, "lm_head"), nn.Linear) or getattr(_get(model, "model.norm"), "weight", None) is None:
        problems.append("no lm_head linear or final norm at model.model.norm")
    if problems:
        found = sorted({re.sub(r"\.\d+\.", ".N.", n) for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        shown = ", ".join(found[:12]) + (", ..." if len(found) > 12 else "") if found else "none"
        raise UserError(
            f"cannot quantize {type(model).__name__}: expected a Llama-family layout "
            f"({problems[0]}); linear layers found: {shown}"
        )
    return layers


def _get(module: nn.Module, path: str) -> nn.Module | None:
    try:
        return module.get_submodule(path)
    except AttributeError:
        return None


class InputStats:
    """What calibration records about one group's input, over real (unpadded) tokens.

    ``needs`` picks the statistics: ``"amax"`` (per-channel max |x|, for SmoothQuant and static
    activation scales), ``"hessian"`` (GPTQ), ``"inputs"`` (the token vectors themselves for the
    AWQ and SmoothQuant-alpha searches; at most ``max_inputs`` of them, taken at a regular stride).
    """

    def __init__(self, in_features: int, needs: set[str], total_tokens: int, max_inputs: int | None = None):
        self.needs = needs
        self.tokens = 0
        self.amax: torch.Tensor | None = None
        self.hessian = HessianAccumulator(in_features) if "hessian" in needs else None
        self._inputs: list[torch.Tensor] = []
        self._stride = max(1, math.ceil(total_tokens / max_inputs)) if max_inputs else 1

    def add(self, x: torch.Tensor) -> None:
        """``x``: [tokens, in] real tokens."""
        x = x.detach().float()
        self.tokens += x.shape[0]
        if "amax" in self.needs:
            amax = x.abs().amax(dim=0)
            self.amax = amax if self.amax is None else torch.maximum(self.amax, amax)
        if self.hessian is not None:
            self.hessian.add(x)
        if "inputs" in self.needs:
            self._inputs.append(x[:: self._stride].clone())

    def inputs(self) -> torch.Tensor:
        return torch.cat(self._inputs)


@dataclass
class LayerInputs:
    """The calibration hidden states at one depth, batch by batch, with the layer call's kwargs."""

    hidden: list[torch.Tensor]  # [batch, seq, hidden]
    kwargs: list[dict]  # position embeddings, mask, ... as the model passes them to its layers
    masks: list[torch.Tensor]  # [batch, seq] True at real (unpadded) tokens


class _Captured(Exception):
    pass


@torch.no_grad()
def first_layer_inputs(model: nn.Module, layers: nn.ModuleList, ids: torch.Tensor, lengths: torch.Tensor, batch: int) -> LayerInputs:
    """Run the windows through the embeddings and capture what layer 0 receives (then stop)."""
    device = next(model.parameters()).device
    captured = LayerInputs([], [], [])

    def grab(module, args, kwargs):
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.hidden.append(hidden.detach())
        captured.kwargs.append(kwargs)
        raise _Captured

    handle = layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for start in range(0, ids.shape[0], batch):
            chunk = ids[start : start + batch].to(device)
            try:
                model(input_ids=chunk, use_cache=False)
            except _Captured:
                pass
            positions = torch.arange(ids.shape[1], device=device)
            captured.masks.append(positions[None, :] < lengths[start : start + batch, None].to(device))
    finally:
        handle.remove()
    return captured


def _layer_output(out) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def collect(layer: nn.Module, targets: dict[nn.Module, InputStats], inputs: LayerInputs, kv_quantizer=None,
            advance: bool = False) -> None:
    """Run ``layer`` on every batch, adding each target linear's real-token inputs to its stats;
    with ``advance``, the outputs of this same pass replace ``inputs`` (one pass instead of two)."""
    current_mask: list[torch.Tensor] = []

    def record(stats):
        return lambda module, args: stats.add(args[0][current_mask[0]])

    handles = [module.register_forward_pre_hook(record(stats)) for module, stats in targets.items()]
    outputs = []
    try:
        for hidden, kwargs, mask in zip(inputs.hidden, inputs.kwargs, inputs.masks):
            current_mask[:] = [mask]
            if kv_quantizer is not None:
                kv_quantizer.token_mask = mask
            out = layer(hidden, **kwargs)
            if advance:
                outputs.append(_layer_output(out))
    finally:
        for handle in handles:
            handle.remove()
    if advance:
        inputs.hidden = outputs


@torch.no_grad()
def propagate(layer: nn.Module, inputs: LayerInputs) -> None:
    """Replace the hidden states by ``layer``'s outputs (the inputs of the next layer)."""
    inputs.hidden = [_layer_output(layer(h, **kw)) for h, kw in zip(inputs.hidden, inputs.kwargs)]
