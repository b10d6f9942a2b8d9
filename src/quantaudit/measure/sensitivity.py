"""Per-layer sensitivity: the KL divergence when only one layer is quantized and the rest stays baseline.

This is the ranking ModelOpt's ``auto_quantize`` and Intel Neural Compressor's op-wise fallback
are built on: it names the layers worth keeping in higher precision. The quantized layer is the
very module the full quantized model uses (same codes and scales), swapped into the baseline.

Cost: a naive sweep runs the whole model once per layer. Here the baseline runs once per window
with pre-hooks recording each decoder layer's inputs (hidden states and the keyword arguments the
model passes: rotary embeddings, masks); a swap then replays only the decoder layers from the
swapped one onward, then the final norm. On average that halves the cost.
KL(base||swapped) is full-vocabulary, with the metric definition of :mod:`quantaudit.metrics`.

Logits in chunks (:mod:`quantaudit.logits`): per window, each swap's final hidden states are kept (d floats
a token, as many as the decoder-layer inputs recorded anyway when sweeping decoder layers, one per swap
when sweeping linears), then the logits are made a chunk of tokens at a time: the baseline's once, each
swap's against them. Memory does not grow with the vocabulary, and the baseline's logits are made once
per window, not once per swap.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from ..arch import decoder_layers
from ..data import Windows
from ..logits import OutputHead, final_hidden
from ..metrics import summarize_logits, token_statistics
from ..progress import track


def decoder_stack(model: torch.nn.Module):
    """(decoder layers ModuleList, final norm, lm_head) of a causal LM of a family in :mod:`quantaudit.arch`."""
    return decoder_layers(model), model.model.norm, model.lm_head


class InputScaled(torch.nn.Module):
    """``inner(x * scale)``: a smoothed linear taken out from behind the norm its scale was folded into."""

    def __init__(self, inner: torch.nn.Module, scale: torch.Tensor):
        super().__init__()
        self.inner = inner
        self.register_buffer("scale", scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x * self.scale.to(x.dtype))


def _set_module(root: torch.nn.Module, path: str, module: torch.nn.Module) -> torch.nn.Module:
    parent_path, _, attr = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    old = getattr(parent, attr)
    setattr(parent, attr, module)
    return old


@contextmanager
def swapped(root: torch.nn.Module, replacements: dict[str, torch.nn.Module]):
    """Temporarily put ``replacements`` (module path -> module) into ``root``."""
    originals = {path: _set_module(root, path, m) for path, m in replacements.items()}
    try:
        yield
    finally:
        for path, m in originals.items():
            _set_module(root, path, m)


def decoder_index(path: str) -> int | None:
    """The decoder layer a module path belongs to (``model.layers.3.mlp.up_proj`` -> 3), else None."""
    parts = path.split(".")
    for a, b in zip(parts, parts[1:]):
        if a == "layers" and b.isdigit():
            return int(b)
    return None


def _hidden_states(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


@torch.inference_mode()
def sensitivity_kld(base: torch.nn.Module, swaps: dict[str, dict[str, torch.nn.Module]],
                    windows: Windows, description: str = "sensitivity") -> dict[str, float]:
    """Mean per-token KL(base||base with one swap) for each entry of ``swaps``.

    ``swaps`` maps a report name (a linear or decoder layer) to the module replacements that
    quantize just that part.
    """
    layers, norm, _ = decoder_stack(base)
    reference_head = OutputHead.of(base)
    device = next(base.parameters()).device
    totals = {name: 0.0 for name in swaps}
    tokens = 0
    # replay from the first swapped decoder layer; a swapped lm_head replays only norm + head
    starts = {name: min(len(layers) if decoder_index(p) is None else decoder_index(p) for p in repl)
              for name, repl in swaps.items()}
    steps = [(i, name) for i in range(windows.n) for name in swaps]
    progress = iter(track(steps, description, total=len(steps)))
    for i in range(windows.n):
        length = int(windows.lengths[i])
        ids = windows.ids[i : i + 1, :length].to(device)
        targets = ids[0, 1:]
        inputs: list[tuple[tuple, dict]] = []
        hooks = [
            layer.register_forward_pre_hook(lambda _m, a, kw: inputs.append((a, kw)), with_kwargs=True)
            for layer in layers
        ]
        hooks.append(norm.register_forward_pre_hook(lambda _m, a: captured_final.append(a[0])))
        captured_final: list[torch.Tensor] = []
        try:
            base_hidden = final_hidden(base, ids)[0, :-1]
        finally:
            for h in hooks:
                h.remove()
        tokens += targets.numel()
        swapped_hidden = {}  # name -> (its head, its final hidden states [T, d])
        for name, replacements in swaps.items():
            next(progress)
            hidden = _hidden_states(*inputs[starts[name]]) if starts[name] < len(layers) else captured_final[0]
            with swapped(base, replacements):
                for j in range(starts[name], len(layers)):
                    args, kwargs = inputs[j]
                    out = layers[j](hidden, *args[1:], **{k: v for k, v in kwargs.items() if k != "hidden_states"})
                    hidden = out[0] if isinstance(out, tuple) else out
                swapped_hidden[name] = (OutputHead.of(base), norm(hidden)[0, :-1])
        for rows in reference_head.slices(targets.numel()):
            reference = summarize_logits(reference_head(base_hidden[rows]), targets[rows])
            for name, (head, hidden) in swapped_hidden.items():
                totals[name] += float(token_statistics(reference, head(hidden[rows]), targets[rows])["kld"].double().sum())
    return {name: total / tokens for name, total in totals.items()}
