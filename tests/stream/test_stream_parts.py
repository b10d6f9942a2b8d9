"""The layer source (safetensors read part by part) and the spill store, on their own."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal

import pytest
import torch
from safetensors.torch import load_file, save_file

from quantaudit.stream.source import CheckpointParts, checkpoint_fp32_bytes
from quantaudit.stream.spill import PREFIX, SpillStore


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def sharded(stories_dir, tmp_path):
    """stories260K re-saved as two shards with an index, the way large checkpoints come."""
    folder = tmp_path / "sharded"
    folder.mkdir()
    tensors = load_file(stories_dir / "model.safetensors")
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for file, part in halves.items():
        save_file({n: tensors[n] for n in part}, folder / file)
        weight_map.update(dict.fromkeys(part, file))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    for f in stories_dir.iterdir():
        if not f.name.endswith(".safetensors"):
            shutil.copy(f, folder / f.name)
    return folder


def test_parts_hold_exactly_the_loaded_models_tensors(stories, stories_dir, sharded):
    for folder in (stories_dir, sharded):
        parts = CheckpointParts(folder)
        assert parts.n_layers == 5
        assert parts.fp32_bytes() == checkpoint_fp32_bytes(folder) == 4 * sum(p.numel() for p in stories.model.parameters())
        layer, reference = parts.layer(3), stories.model.model.layers[3]
        assert layer.state_dict().keys() == reference.state_dict().keys()
        assert all(torch.equal(t, reference.state_dict()[n]) for n, t in layer.state_dict().items())
        assert torch.equal(parts.lm_head_weight(), stories.model.lm_head.weight)  # tied: the embedding
        assert torch.equal(parts.final_norm().weight, stories.model.model.norm.weight)
        with parts.with_embedding() as front:
            assert torch.equal(front.model.embed_tokens.weight, stories.model.model.embed_tokens.weight)
        assert parts.skeleton.model.embed_tokens.weight.is_meta  # freed again
        assert [i for i, _ in parts.layers()] == [0, 1, 2, 3, 4]


def test_in_place_edits_never_reach_the_file(stories_dir, tmp_path):
    """The tensors are views of a copy-on-write mapping: SmoothQuant divides norms in place."""
    folder = tmp_path / "copy"
    shutil.copytree(stories_dir, folder)
    before = _sha(folder / "model.safetensors")
    layer = CheckpointParts(folder).layer(0)
    with torch.no_grad():
        layer.input_layernorm.weight.mul_(3.0)
        layer.mlp.down_proj.weight.zero_()
    assert _sha(folder / "model.safetensors") == before
    assert torch.equal(CheckpointParts(folder).layer(0).input_layernorm.weight * 3.0, layer.input_layernorm.weight)


def test_sharded_checkpoint_streams_to_the_same_numbers(stories_dir, sharded, calib, eval_windows):
    from quantaudit.audit.streamed import stream_audit
    from quantaudit.quant import QuantSpec

    results = []
    for folder in (stories_dir, sharded):
        with SpillStore(2**30) as store:
            results.append(stream_audit(CheckpointParts(folder), {"int8_sq": QuantSpec(format="int8_sq")}, calib,
                                        eval_windows, store, progress=False))
    assert results[0].formats["int8_sq"].stats["kld"] == results[1].formats["int8_sq"].stats["kld"]


def test_spill_store_keeps_within_budget_and_round_trips(tmp_path):
    small = torch.arange(6, dtype=torch.float32).reshape(2, 3)  # 24 bytes
    with SpillStore(budget=30, directory=tmp_path) as store:
        store.put("a", small)
        store.put("b", torch.randn(4, 5, dtype=torch.bfloat16))  # over budget: to disk
        store.put("c", torch.tensor([1, 2, 3], dtype=torch.int64))
        assert store.ram_bytes == 24 and store.folder is not None and store.folder.parent == tmp_path
        assert len(list(store.folder.iterdir())) == 2
        assert store.get("a") is small
        b = store.get("b")
        assert b.dtype == torch.bfloat16 and b.shape == (4, 5)
        store.put("b", b * 2)  # replaced in place of the old file
        assert torch.equal(store.get("b"), b * 2) and torch.equal(store.get("c"), torch.tensor([1, 2, 3]))
        assert len(list(store.folder.iterdir())) == 2 and store.spilled_bytes == 4 * 5 * 2 + 3 * 8
        store.pop("a")  # room in memory again
        store.put("d", small)
        assert store.ram_bytes == 24
        folder = store.folder
    assert not folder.exists()


def test_spill_folder_is_removed_on_errors_and_sigterm(tmp_path):
    handler = signal.getsignal(signal.SIGTERM)
    with pytest.raises(RuntimeError):
        with SpillStore(0, tmp_path) as store:
            store.put("x", torch.ones(3))
            folder = store.folder
            raise RuntimeError("boom")
    assert folder is not None and not folder.exists()
    with pytest.raises(SystemExit) as exited:
        with SpillStore(0, tmp_path) as store:
            store.put("x", torch.ones(3))
            folder = store.folder
            os.kill(os.getpid(), signal.SIGTERM)
    assert exited.value.code == 128 + signal.SIGTERM and not folder.exists()
    assert signal.getsignal(signal.SIGTERM) is handler  # restored


def test_a_sigkilled_runs_folder_is_removed_by_the_next_store(tmp_path):
    orphan = tmp_path / f"{PREFIX}999999999-abc"  # no such process
    orphan.mkdir()
    (orphan / "0.bin").write_bytes(b"x")
    mine = tmp_path / f"{PREFIX}{os.getpid()}-keep"  # a live process's folder stays
    mine.mkdir()
    with SpillStore(0, tmp_path) as store:
        store.put("x", torch.ones(2))
    assert not orphan.exists() and mine.exists()
