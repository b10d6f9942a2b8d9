"""Logits in token chunks: the one place where hidden states become full-vocabulary logits.

A model's float32 logits take 4·V bytes a token: at Gemma's 262,144-token vocabulary one 512-token window
is 512 MiB, and each log-softmax, exp or difference a statistic takes of it is as large again. Every
statistic quantaudit reports reduces a token's logits to a few numbers (its target's log-prob, the KL
against the baseline, top-1, ...), so none needs more than a few tokens' logits at a time. Everything that
needs logits gets them here, never from the model's ``forward(...).logits``:

* :func:`final_hidden` runs the model's decoder stack (``model.model``: embeddings, decoder layers, final
  norm) up to the output layer's input: d floats a token;
* :class:`OutputHead` is what the causal LM does next: its output layer (``lm_head``, quantized or not, as
  the model runs it), then its family's transform (:meth:`quantaudit.arch.Architecture.final_logits`:
  Gemma 2/3's soft-capping, Granite's ``logits_scaling``), in float32. :meth:`OutputHead.chunks` applies
  it to at most :func:`chunk_rows` tokens at a time: ``LOGIT_CHUNK_BYTES`` (16 MiB) of float32 logits, 16
  tokens at a 262,144-token vocabulary, 85 at SmolLM2's 49,152, 8,192 (whole windows) at stories260K's 512.
  Much smaller chunks cost speed: every chunk reads the whole output layer (a tiny model's 262,144 × 128
  head took twice as long in chunks of 8 tokens as in chunks of 16 or more).

Same numbers: a token's logits depend on its own final hidden state only (the output layer is a linear map
per token; a quantized one has static, per-token or per-block activation scales, never a dynamic scale
over all tokens), so chunking changes which tokens share a matrix multiply, not what any token gets. What
can change is float rounding: a CPU BLAS picks its kernel by the number of rows, and a few row counts round
a product's last bit apart from the whole window's (a one-row product, a matrix-vector kernel, further
apart: :meth:`OutputHead.slices` never makes one). The statistics equal those of whole-window logits to
1e-6 relative, differences of the two models' values (ln PPL(q) − ln PPL(b), mean Δp) to 1e-6 of what
they are differences of (tests/test_logits.py: every family of :mod:`quantaudit.arch`; the paired
statistics, perplexity, sensitivity, drift and task scores with chunks smaller than a window).

Memory: a consumer holds a handful of chunk-sized tensors at once (the paired statistics: base and
candidate logits, both log-softmaxes, their exps and difference, a soft-cap's temporaries; layer drift: both
models' lm_head outputs and their float64 copies): at most ``WORKING_BYTES`` = 16 × ``LOGIT_CHUNK_BYTES`` =
256 MiB at any vocabulary, instead of batch × sequence × vocabulary floats several times over
(tests/test_vocab_memory.py: a whole audit at vocabulary 262,144 against the same at 512).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from .arch import Architecture, architecture, architecture_for_config
from .memory import return_large_frees

LOGIT_CHUNK_BYTES = 16 * 2**20  # float32 logits of one chunk of tokens (module docstring)
WORKING_BYTES = 16 * LOGIT_CHUNK_BYTES  # what a consumer of chunks holds at once (module docstring)


def chunk_rows(vocab: int, chunk_bytes: int | None = None) -> int:
    """Tokens per chunk at vocabulary ``vocab``: as many as keep their float32 logits within ``chunk_bytes``
    (default ``LOGIT_CHUNK_BYTES``)."""
    return max(1, (chunk_bytes or LOGIT_CHUNK_BYTES) // (4 * vocab))


def final_hidden(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """The output layer's input [b, L, d] for ``input_ids`` [b, L]: the causal LM's forward without its head."""
    return model.model(input_ids=input_ids, use_cache=False).last_hidden_state


@dataclass(frozen=True)
class OutputHead:
    """Final hidden states [T, d] -> the model's float32 logits [T, V] (module docstring)."""

    layer: Callable[[torch.Tensor], torch.Tensor]  # the output layer: lm_head, or its stored weight
    arch: Architecture
    config: object  # what ``arch.final_logits`` reads (a transformers config, or its stored values)
    vocab: int

    @classmethod
    def of(cls, model: torch.nn.Module) -> OutputHead:
        """The head ``model`` runs now (a swapped-in ``lm_head`` included)."""
        layer = model.get_output_embeddings()
        return cls(layer, architecture(model), model.config, layer.weight.shape[0])

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None, config: dict | object) -> OutputHead:
        """The head of an output layer kept as tensors (a baseline's, a streamed checkpoint's); ``config`` is the
        model's config or the dict :meth:`config_dict` made of it."""
        if isinstance(config, dict):
            config = SimpleNamespace(**config)
        return cls(partial(F.linear, weight=weight, bias=bias), architecture_for_config(config), config, weight.shape[0])

    def config_dict(self) -> dict:
        """The model's config as JSON values, for :meth:`from_weight` (a baseline stores it)."""
        return json.loads(self.config.to_json_string(use_diff=False))

    def transform(self, raw: torch.Tensor) -> torch.Tensor:
        """The output layer's output -> the logits (the family's soft-capping or scaling), float32."""
        return self.arch.final_logits(self.config, raw).float()

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.transform(self.layer(hidden))

    def slices(self, tokens: int, chunk_bytes: int | None = None) -> Iterator[slice]:
        """``tokens`` rows cut into chunks of :func:`chunk_rows`; a last chunk of one row joins the one before (a
        one-row product runs a matrix-vector kernel, which rounds further from the whole-window product)."""
        return_large_frees()  # chunk-sized temporaries go back to the system when freed (quantaudit.memory)
        step = chunk_rows(self.vocab, chunk_bytes)
        starts = list(range(0, tokens, step))
        if len(starts) > 1 and step > 1 and tokens - starts[-1] == 1:
            starts.pop()
        return (slice(start, stop) for start, stop in zip(starts, [*starts[1:], tokens]))

    def chunks(self, hidden: torch.Tensor) -> Iterator[tuple[slice, torch.Tensor]]:
        """``(rows, logits [len(rows), V])`` over the rows of ``hidden`` [T, d], one chunk at a time."""
        for rows in self.slices(hidden.shape[0]):
            yield rows, self(hidden[rows])
