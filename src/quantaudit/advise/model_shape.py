"""A decoder's shape — all the advisor needs to size weights, KV cache and FLOPs — read cheaply.

Sources, none of which loads weights:

* a Hugging Face folder: ``transformers.AutoConfig`` on its config.json (the text config of a
  multimodal one);
* a GGUF file (or a packaged short name such as ``smollm2-135m``): the GGUF header's llama.cpp
  metadata keys and tensor names, read by :func:`_gguf_header`;
* ``--params N``: a Llama-like shape (see :data:`REFERENCE_LLAMA_SHAPES`).

The advisor models Llama-like dense decoders: attention with grouped KV heads, a gated MLP (gate,
up, down), RMSNorm, untied or tied embeddings. Mixture-of-experts configs are refused.
"""

from __future__ import annotations

import math
import mmap
import struct
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from ..arch import ModelDims
from ..errors import UserError


@dataclass(frozen=True)
class ModelShape(ModelDims):
    name: str
    tied_embeddings: bool
    source: str  # where the shape came from, for the report

    def layer_linears(self) -> tuple[tuple[str, int, int], ...]:
        """(module suffix as in Hugging Face Llama, out_features, in_features) of one decoder layer."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return (
            ("self_attn.q_proj", q, self.hidden),
            ("self_attn.k_proj", kv, self.hidden),
            ("self_attn.v_proj", kv, self.hidden),
            ("self_attn.o_proj", self.hidden, q),
            ("mlp.gate_proj", self.intermediate, self.hidden),
            ("mlp.up_proj", self.intermediate, self.hidden),
            ("mlp.down_proj", self.hidden, self.intermediate),
        )

    @property
    def linear_params_per_layer(self) -> int:
        return sum(o * i for _, o, i in self.layer_linears())

    @property
    def linear_params(self) -> int:
        """Parameters of all decoder-layer linears (the quantized ones)."""
        return self.layers * self.linear_params_per_layer

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def norm_params(self) -> int:
        return (2 * self.layers + 1) * self.hidden

    @property
    def total_params(self) -> int:
        """Parameter count as Hugging Face reports it (a tied lm_head counted once)."""
        heads = 1 if self.tied_embeddings else 2
        return self.linear_params + heads * self.embedding_params + self.norm_params

    def linears_under(self, module: str) -> list[tuple[int, int]]:
        """(out, in) of every decoder linear named ``module`` or inside it (``model.layers.3``)."""
        found = []
        for i in range(self.layers):
            for suffix, out_f, in_f in self.layer_linears():
                name = f"model.layers.{i}.{suffix}"
                if name == module or name.startswith(module + "."):
                    found.append((out_f, in_f))
        return found

    def describe(self) -> dict:
        return {
            "name": self.name, "source": self.source, "layers": self.layers, "hidden": self.hidden,
            "heads": self.heads, "kv_heads": self.kv_heads, "head_dim": self.head_dim,
            "intermediate": self.intermediate, "vocab": self.vocab, "tied_embeddings": self.tied_embeddings,
            "params": self.total_params,
        }


# Llama-family shapes from each model's config.json (meta-llama on the Hugging Face Hub):
# (name, layers, hidden, heads, kv_heads, head_dim, intermediate, vocab, tied embeddings).
REFERENCE_LLAMA_SHAPES = (
    ("Llama-3.2-1B", 16, 2048, 32, 8, 64, 8192, 128256, True),
    ("Llama-3.2-3B", 28, 3072, 24, 8, 128, 8192, 128256, True),
    ("Llama-2-7B", 32, 4096, 32, 32, 128, 11008, 32000, False),
    ("Llama-2-13B", 40, 5120, 40, 40, 128, 13824, 32000, False),
    ("Llama-2-70B", 80, 8192, 64, 8, 128, 28672, 32000, False),
    ("Llama-3.1-405B", 126, 16384, 128, 8, 128, 53248, 128256, False),
)


def reference_shape(name: str) -> ModelShape:
    row = next(r for r in REFERENCE_LLAMA_SHAPES if r[0] == name)
    keys = ("name", "layers", "hidden", "heads", "kv_heads", "head_dim", "intermediate", "vocab", "tied_embeddings")
    return ModelShape(**dict(zip(keys, row)), source=f"{name} config.json")


def shape_from_params(params: float) -> ModelShape:
    """A Llama-like shape with about ``params`` parameters.

    Assumption (stated in the report): the published Llama shape nearest in log-parameter count
    (:data:`REFERENCE_LLAMA_SHAPES`) — its width, heads, KV heads, MLP ratio and vocabulary — with the
    number of layers rescaled so the total matches ``params`` to within one layer.
    """
    if not math.isfinite(params) or params <= 0:
        raise UserError(f"--params must be a positive number of parameters (got {params})")
    nearest = min((reference_shape(r[0]) for r in REFERENCE_LLAMA_SHAPES),
                  key=lambda s: abs(math.log(s.total_params / params)))
    fixed = nearest.total_params - nearest.layers * (nearest.linear_params_per_layer + 2 * nearest.hidden)
    per_layer = nearest.linear_params_per_layer + 2 * nearest.hidden
    layers = round((params - fixed) / per_layer)
    if layers < 1:
        raise UserError(
            f"--params {params:.3g} is too small for a Llama-like shape (the nearest, {nearest.name}, needs at "
            f"least {(fixed + per_layer) / 1e9:.2f}B for one layer); give --model with a config instead"
        )
    return replace(nearest, name=f"{params / 1e9:g}B-params", layers=layers,
                   source=f"--params {params:.4g}: {nearest.name}-like shape, layers rescaled to {layers}")


def _require(value, what: str, where: str):
    if value is None:
        raise UserError(f"{where} has no {what}: the advisor models Llama-like decoders; use --params instead")
    return value


def shape_from_hf_config(config, name: str, source: str) -> ModelShape:
    """From a transformers ``PretrainedConfig`` (Llama-like attribute names via its attribute_map)."""
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    for moe_key in ("num_local_experts", "num_experts", "n_routed_experts"):
        if getattr(cfg, moe_key, None):
            raise UserError(f"{source} describes a mixture-of-experts model ({moe_key}); the advisor models dense "
                            "decoders only: use --params for a dense estimate")
    dims = ModelDims.of(cfg, source, "the advisor models Llama-like decoders; use --params instead")
    return ModelShape(**asdict(dims), name=name, tied_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
                      source=source)


def shape_from_gguf(path: Path, name: str) -> ModelShape:
    """From a GGUF header: ``{arch}.block_count`` etc. (llama.cpp's keys, gguf.Keys) and tensor names."""
    import gguf

    meta, array_lengths, tensor_names = _gguf_header(path)
    arch = meta.get(gguf.Keys.General.ARCHITECTURE)
    where = f"GGUF {path.name}"
    if arch is None:
        raise UserError(f"{where} has no general.architecture key: is it a GGUF model file?")
    if meta.get(gguf.Keys.LLM.EXPERT_COUNT.format(arch=arch)):
        raise UserError(f"{where} is a mixture-of-experts model; the advisor models dense decoders only: use --params")

    def key(template: str, required: bool = True):
        value = meta.get(template.format(arch=arch))
        return _require(value, template.format(arch=arch), where) if required else value

    hidden = key(gguf.Keys.LLM.EMBEDDING_LENGTH)
    heads = key(gguf.Keys.Attention.HEAD_COUNT)
    intermediate = key(gguf.Keys.LLM.FEED_FORWARD_LENGTH)
    if not isinstance(intermediate, int):
        raise UserError(f"{where}: per-layer feed-forward sizes are not modelled; use --params")
    vocab = key(gguf.Keys.LLM.VOCAB_SIZE, required=False) or array_lengths.get(gguf.Keys.Tokenizer.LIST)
    return ModelShape(
        name=name,
        layers=key(gguf.Keys.LLM.BLOCK_COUNT),
        hidden=hidden,
        heads=heads,
        kv_heads=key(gguf.Keys.Attention.HEAD_COUNT_KV, required=False) or heads,
        head_dim=key(gguf.Keys.Attention.KEY_LENGTH, required=False) or hidden // heads,
        intermediate=intermediate,
        vocab=_require(vocab, "vocabulary size", where),
        tied_embeddings="output.weight" not in tensor_names,  # llama.cpp reuses token_embd without it
        source=f"GGUF metadata of {path}",
    )


def load_model_shape(spec: str) -> ModelShape:
    """The shape of ``--model`` (HF folder, .gguf file or packaged short name), without weights."""
    from ..models import resolve_model_path

    path = resolve_model_path(spec)
    if path.is_file():
        return shape_from_gguf(path, spec)
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(f"cannot read {path / 'config.json'}: {str(exc).strip().splitlines()[0]}") from exc
    return shape_from_hf_config(config, spec, f"config.json of {path}")


def _gguf_header(path: Path) -> tuple[dict, dict, set[str]]:
    """Scalar metadata, array lengths and tensor names of a GGUF file, skipping array contents.

    gguf.GGUFReader builds a numpy view per array element (about 10 s for SmolLM2's 49k-token
    vocabulary on this machine); the header walk here reads the same layout (GGUF v2/v3,
    little-endian: magic, version, tensor count, KV count, KV pairs, tensor infos) and only decodes
    what the advisor uses, in well under a second.
    """
    import gguf

    scalar_formats = {t: struct.Struct("<" + gguf.GGUFReader.gguf_scalar_to_np[t]().dtype.char)
                      for t in gguf.GGUFReader.gguf_scalar_to_np}
    u32, u64 = struct.Struct("<I"), struct.Struct("<Q")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        if buf[:4] != b"GGUF" or u32.unpack_from(buf, 4)[0] not in (2, 3):
            raise UserError(f"{path} is not a little-endian GGUF v2/v3 file")
        n_tensors, n_kv = u64.unpack_from(buf, 8)[0], u64.unpack_from(buf, 16)[0]
        offset = 24

        def read_str(at: int) -> tuple[str, int]:
            n = u64.unpack_from(buf, at)[0]
            return bytes(buf[at + 8 : at + 8 + n]).decode("utf-8", errors="replace"), at + 8 + n

        def skip(vtype: int, at: int) -> int:
            if vtype == gguf.GGUFValueType.STRING:
                return at + 8 + u64.unpack_from(buf, at)[0]
            if vtype == gguf.GGUFValueType.ARRAY:
                itype, count = u32.unpack_from(buf, at)[0], u64.unpack_from(buf, at + 4)[0]
                at += 12
                if itype in scalar_formats:
                    return at + count * scalar_formats[itype].size
                for _ in range(count):
                    at = skip(itype, at)
                return at
            return at + scalar_formats[gguf.GGUFValueType(vtype)].size

        meta, lengths = {}, {}
        for _ in range(n_kv):
            key, offset = read_str(offset)
            vtype = u32.unpack_from(buf, offset)[0]
            offset += 4
            if vtype == gguf.GGUFValueType.STRING:
                meta[key], offset = read_str(offset)
            elif vtype == gguf.GGUFValueType.ARRAY:
                lengths[key] = u64.unpack_from(buf, offset + 4)[0]
                offset = skip(vtype, offset)
            else:
                fmt = scalar_formats[gguf.GGUFValueType(vtype)]
                meta[key] = fmt.unpack_from(buf, offset)[0]
                offset += fmt.size
        names = set()
        for _ in range(n_tensors):
            name, offset = read_str(offset)
            n_dims = u32.unpack_from(buf, offset)[0]
            offset += 4 + 8 * n_dims + 4 + 8  # dims, ggml type, data offset
            names.add(name)
    return meta, lengths, names
