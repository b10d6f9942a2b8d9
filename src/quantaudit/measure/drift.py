"""Layer-by-layer drift: where the quantization error enters and how it compounds with depth.

Base and quantized model run on the same windows; forward hooks capture the output of every
decoder layer (the residual stream) and of every linear layer. Per capture point:

* ``drift_rel`` = ||h_q - h_b||_F / ||h_b||_F over all real (unpadded) positions;
* ``cosine``    = mean over positions of cos(h_q[t], h_b[t]).

Both models see the quantized model's own upstream errors (this is the end-to-end drift a user
ships), unlike per-layer sensitivity, which isolates one layer. One window at a time: memory is
one window's activations of the base model, independent of the number of windows. The output layer's
outputs (a point whose module is the model's output layer, ``lm_head``: vocabulary-sized) are compared
in token chunks (:mod:`quantaudit.logits`) after both forward passes, never held for a whole window.
"""

from __future__ import annotations

import torch

from ..data import Windows
from ..logits import OutputHead, final_hidden
from ..progress import track


def _output_tensor(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


class DriftAccumulator:
    def __init__(self) -> None:
        self.err_sq = 0.0
        self.ref_sq = 0.0
        self.cos_sum = 0.0
        self.tokens = 0

    def add(self, quant: torch.Tensor, base: torch.Tensor) -> None:
        q, b = quant.double(), base.double()
        self.err_sq += float(((q - b) ** 2).sum())
        self.ref_sq += float((b**2).sum())
        self.cos_sum += float(torch.nn.functional.cosine_similarity(q, b, dim=-1, eps=1e-12).sum())
        self.tokens += b.shape[0]

    def result(self) -> dict:
        return {
            "drift_rel": (self.err_sq / self.ref_sq) ** 0.5 if self.ref_sq else 0.0,
            "cosine": self.cos_sum / self.tokens if self.tokens else 1.0,
        }


@torch.inference_mode()
def layer_drift(base: torch.nn.Module, quant: torch.nn.Module, windows: Windows,
                points: dict[str, str]) -> dict[str, dict]:
    """Drift at each capture point. ``points`` maps a report name to a module path present in both models.

    Returns ``{report_name: {"drift_rel": ..., "cosine": ...}}``.
    """
    device = next(base.parameters()).device
    acc = {name: DriftAccumulator() for name in points}
    heads = [OutputHead.of(model) for model in (base, quant)]
    at_head = [name for name, path in points.items() if base.get_submodule(path) is base.get_output_embeddings()]
    for i in track(range(windows.n), "layer drift", total=windows.n):
        length = int(windows.lengths[i])
        ids = windows.ids[i : i + 1, :length].to(device)
        captured: dict[str, torch.Tensor] = {}

        def keep(name):
            return lambda _m, _a, out: captured.__setitem__(name, _output_tensor(out)[0].detach().clone())

        def compare(name):
            return lambda _m, _a, out: acc[name].add(_output_tensor(out)[0], captured.pop(name))

        final = []
        for model, make_hook in ((base, keep), (quant, compare)):
            modules = dict(model.named_modules())
            hooks = [modules[path].register_forward_hook(make_hook(name)) for name, path in points.items()
                     if name not in at_head]
            try:
                final.append(final_hidden(model, ids)[0])
            finally:
                for h in hooks:
                    h.remove()
        if at_head:
            for rows in heads[0].slices(length):
                base_out, quant_out = (head.layer(hidden[rows]) for head, hidden in zip(heads, final))
                for name in at_head:
                    acc[name].add(quant_out, base_out)
    return {name: a.result() for name, a in acc.items()}
