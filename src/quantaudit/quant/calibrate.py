"""The statistics calibration collects on a model's linears (where they sit: :mod:`quantaudit.arch`).

Calibration runs layer by layer: the calibration windows are run up to the first decoder layer once
(recording every layer's own call arguments: masks and rotary embeddings differ between layers);
then, per layer, the layer is run on the current hidden states with hooks recording the inputs of its
linears, and the layer is quantized. What the next layer sees depends on the algorithm
(``quant.algorithms``): static scales, SmoothQuant and AWQ are calibrated on the full-precision
model's activations (ModelOpt's ``max`` calibration, llm-awq), so the float layer produces the next
hidden states; GPTQ is sequential, as the GPTQ reference and llm-compressor's sequential pipeline run
it, and the quantized layer produces them, so each layer is calibrated on the outputs of the
already-quantized layers before it. Within a layer all linears are calibrated on the same pass
(llm-compressor's per-subgraph scheme), so o_proj/down_proj see the inputs of the layer's float
q/k/v and gate/up.

Mixture-of-Experts layers are calibrated as ModelOpt's ``_QuantSparseMoe`` and llm-compressor's
``calibrate_all_experts`` do: during the statistics pass every expert runs on every token
(:func:`quantaudit.moe.set_all_tokens`), so rarely routed experts are calibrated on the whole set, while the
layer's output stays the routed one.

Padded positions of the calibration windows are excluded from every statistic. Memory holds the
hidden states of all calibration tokens at one depth (SmolLM2, 64 x 512 tokens: 75 MB) plus one
layer's statistics.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..arch import LinearGroup
from ..moe import set_all_tokens
from .gptq import HessianAccumulator

# Relative to the causal-LM module: lm_head reads the final norm (its fold rule is the family's, ``arch``).
LM_HEAD_GROUP = LinearGroup(("lm_head",), "model.norm")


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
    """The calibration hidden states at one depth, batch by batch, with every decoder layer's call kwargs."""

    hidden: list[torch.Tensor]  # [batch, seq, hidden]
    layer_kwargs: list[list[dict]]  # [layer][batch]: position embeddings, mask, ... as the model passes them
    masks: list[torch.Tensor]  # [batch, seq] True at real (unpadded) tokens


class _Captured(Exception):
    pass


class _Recorder(nn.Module):
    """Stands in for decoder layer ``index`` while the model runs: records what the model passes to it (the
    layer's own mask and rotary embedding: Gemma 2/3 and GPT-OSS alternate sliding and global layers) and
    hands the hidden states on unchanged, so nothing is computed past the embedding."""

    def __init__(self, index: int, last: bool, sink: LayerInputs):
        super().__init__()
        self.index, self.last, self.sink = index, last, sink

    def forward(self, hidden_states, *args, **kwargs):
        if args:
            raise TypeError("decoder layer called with positional arguments besides the hidden states")
        if self.index == 0:
            self.sink.hidden.append(hidden_states.detach())
        self.sink.layer_kwargs[self.index].append(kwargs)
        if self.last:
            raise _Captured
        return hidden_states


@torch.no_grad()
def first_layer_inputs(model: nn.Module, layers: nn.ModuleList, ids: torch.Tensor, lengths: torch.Tensor, batch: int) -> LayerInputs:
    """Run the windows through the embeddings and capture layer 0's input and every layer's call kwargs.

    The layers are replaced by recorders for the duration (the kwargs depend on positions and masks only, not
    on the hidden states, so each layer's are captured without running any layer); kwargs the layers share
    are the same tensor objects, held once."""
    device = next(model.parameters()).device
    captured = LayerInputs([], [[] for _ in layers], [])
    originals = list(layers)
    for i in range(len(layers)):
        layers[i] = _Recorder(i, i == len(layers) - 1, captured)
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
        for i, layer in enumerate(originals):
            layers[i] = layer
    return captured


def layer_output(out) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def collect(layer: nn.Module, index: int, targets: dict[nn.Module, InputStats], inputs: LayerInputs,
            kv_quantizer=None, advance: bool = False) -> None:
    """Run decoder layer ``index`` on every batch, adding each target linear's real-token inputs to its stats;
    with ``advance``, the outputs of this same pass replace ``inputs`` (one pass instead of two)."""
    current_mask: list[torch.Tensor] = []

    def record(stats):  # [batch, seq, in], or an expert's [batch · seq, in] (every token: moe.set_all_tokens)
        return lambda module, args: stats.add(args[0].reshape(-1, args[0].shape[-1])[current_mask[0].reshape(-1)])

    handles = [module.register_forward_pre_hook(record(stats)) for module, stats in targets.items()]
    outputs = []
    set_all_tokens(layer, True)
    try:
        for hidden, kwargs, mask in zip(inputs.hidden, inputs.layer_kwargs[index], inputs.masks, strict=True):
            current_mask[:] = [mask]
            if kv_quantizer is not None:
                kv_quantizer.token_mask = mask
            out = layer(hidden, **kwargs)
            if advance:
                outputs.append(layer_output(out))
    finally:
        set_all_tokens(layer, False)
        for handle in handles:
            handle.remove()
    if advance:
        inputs.hidden = outputs


@torch.no_grad()
def propagate(layer: nn.Module, index: int, inputs: LayerInputs) -> None:
    """Replace the hidden states by decoder layer ``index``'s outputs (the inputs of the next layer)."""
    inputs.hidden = [layer_output(layer(h, **kw)) for h, kw in zip(inputs.hidden, inputs.layer_kwargs[index], strict=True)]
