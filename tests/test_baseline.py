"""The baseline cache: reuse, atomicity, storage kinds; and its accuracy on SmolLM2 (slow)."""

from __future__ import annotations

import copy
import gc
import json

import pytest
import torch

from quantaudit.baseline import baseline_key, baselines_root, open_baseline
from quantaudit.data import load_windows
from quantaudit.evaluate import build_baseline, compare_to_baseline
from quantaudit.metrics import PairedAccumulator, summarize_logits
from quantaudit.models import load_model


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTAUDIT_CACHE", str(tmp_path))
    return tmp_path


@pytest.fixture(scope="module")
def windows(stories, shared_dir):
    """Three short windows: cache mechanics do not need long ones."""
    return load_windows(shared_dir / "data" / "tinystories_sample.txt", stories.tokenizer, seq_len=64, n_windows=3)


class ForwardCounter:
    """Counts forward passes of a module (a model's decoder stack, which every loop runs); ``fail_at`` makes
    the n-th one raise (a killed run)."""

    def __init__(self, model, fail_at: int | None = None):
        self.model, self.calls, self.fail_at = model, 0, fail_at

    def __enter__(self):
        self.handle = self.model.register_forward_pre_hook(self._count)
        return self

    def _count(self, module, args):
        self.calls += 1
        if self.calls == self.fail_at:
            raise KeyboardInterrupt("killed")

    def __exit__(self, *exc):
        self.handle.remove()


def window_logits(model, windows, i: int) -> torch.Tensor:
    """Window ``i``'s scored logits [n, V] from the model's own forward (no chunks)."""
    n = int(windows.lengths[i]) - 1
    with torch.no_grad():
        return model(windows.ids[i : i + 1, : n + 1]).logits[0, :n]


def whole_windows(baseline):
    """Each window's chunk over all its scored tokens."""
    return [w.chunk(slice(None)) for w in baseline.windows()]


def test_second_build_reads_the_cache_and_gives_identical_chunks(stories, windows, cache):
    with ForwardCounter(stories.model.model) as first:
        built = build_baseline(stories, windows, batch_size=1)
    with ForwardCounter(stories.model.model) as second:
        again = build_baseline(stories, windows, batch_size=1)
    assert first.calls == 3 and second.calls == 0
    assert again.path == built.path == baselines_root() / built.meta["key"]
    assert again.meta == built.meta and again.n_windows == 3
    for a, b in zip(whole_windows(built), whole_windows(again), strict=True):
        assert torch.equal(a.topk_logprobs, b.topk_logprobs) and a.topk_ids is b.topk_ids is None
        assert torch.equal(a.target_logprob, b.target_logprob)
    # the exact chunks are the full log-probs of the forward's logits
    want = torch.log_softmax(window_logits(stories.model, windows, 0), -1)
    torch.testing.assert_close(whole_windows(built)[0].topk_logprobs, want, rtol=1e-6, atol=1e-6)


def test_windows_are_read_one_at_a_time_and_recomputed_in_any_chunks(stories, windows, cache, monkeypatch):
    """Nothing of the vocabulary's size is kept: each pass reads the window files again (the head once) and
    recomputes the log-probs of the rows asked for, the same whichever rows a chunk holds."""
    import quantaudit.baseline as module

    loads, load_file = [], module.load_file
    monkeypatch.setattr(module, "load_file", lambda path, **kw: loads.append(path.name) or load_file(path, **kw))
    built = build_baseline(stories, windows, batch_size=1)
    files = ["window_00000.safetensors", "head.safetensors", "window_00001.safetensors", "window_00002.safetensors"]
    for _ in range(2):
        loads.clear()
        for window in built.windows():
            whole = window.chunk(slice(None))
            n = whole.tokens
            assert whole.topk_ids is None and whole.topk_logprobs.shape == (n, 512)
            parts = [window.chunk(slice(start, min(start + 7, n))) for start in range(0, n, 7)]
            for name in ("topk_logprobs", "target_logprob", "argmax"):
                # float rounding only: a product over 7 rows may round apart from one over the window's
                torch.testing.assert_close(torch.cat([getattr(p, name) for p in parts]), getattr(whole, name),
                                           rtol=1e-5, atol=1e-5)
            assert torch.equal(whole.argmax, whole.topk_logprobs.argmax(-1))
        assert loads == files


@pytest.mark.parametrize("damage", ["no meta.json", "missing window", "missing head", "bad json"])
def test_incomplete_cache_folders_are_never_used(stories, windows, cache, damage):
    built = build_baseline(stories, windows)
    path = built.path
    if damage == "no meta.json":
        (path / "meta.json").unlink()
    elif damage == "missing window":
        (path / "window_00001.safetensors").unlink()
    elif damage == "missing head":
        (path / "head.safetensors").unlink()
    else:
        (path / "meta.json").write_text('{"version": 1, "files": [')
    assert open_baseline(path) is None
    with ForwardCounter(stories.model.model) as rebuild:
        fresh = build_baseline(stories, windows)
    assert rebuild.calls > 0 and fresh.path == path and open_baseline(path) is not None
    assert json.loads((path / "meta.json").read_text())["files"] == built.meta["files"]


def test_a_killed_build_leaves_nothing_that_is_read(stories, windows, cache):
    key_dir = baselines_root() / baseline_key(stories.fingerprint, windows, None)
    with ForwardCounter(stories.model.model, fail_at=2), pytest.raises(KeyboardInterrupt):
        build_baseline(stories, windows, batch_size=1)
    assert not key_dir.exists()
    assert list(baselines_root().iterdir()) == []  # the temporary folder was removed too


def test_private_baseline_is_not_published_and_removed_when_dropped(stories, windows, cache):
    private = build_baseline(stories, windows, use_cache=False)
    path = private.path
    assert path.name.startswith(".tmp-") and open_baseline(path) is not None
    assert not (baselines_root() / private.meta["key"]).exists()
    del private
    gc.collect()
    assert not path.exists()


def test_topk_baseline_stores_the_top_k_log_probs(stories, windows, cache):
    baseline = build_baseline(stories, windows, k=16)
    assert baseline.meta["storage"] == ["topk"] and baseline.top_k == 16
    assert baseline.path != build_baseline(stories, windows).path  # K is part of the key
    for i, chunk in enumerate(whole_windows(baseline)):
        n = int(windows.lengths[i]) - 1
        want = torch.log_softmax(window_logits(stories.model, windows, i), -1)
        assert chunk.topk_ids.dtype == torch.int64 and chunk.topk_logprobs.shape == (n, 16)
        torch.testing.assert_close(chunk.topk_logprobs, want.topk(16, -1).values, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(want.gather(-1, chunk.topk_ids), chunk.topk_logprobs, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(chunk.target_logprob, want.gather(-1, windows.ids[i, 1 : n + 1, None]).squeeze(-1),
                                   rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["gemma2", "granite"])
def test_soft_capped_or_scaled_logits_are_recomputed_from_hidden_states(name, tiny_model_dir, shared_dir, cache):
    """Gemma 2's soft-capping and Granite's logits_scaling follow the output layer: the baseline stores hidden
    states all the same, with the config that says how, and reproduces the model's own log-probs."""
    lm = load_model(str(tiny_model_dir(name)))
    windows = load_windows(shared_dir / "data" / "tinystories_sample.txt", lm.tokenizer, seq_len=48, n_windows=2)
    baseline = build_baseline(lm, windows)
    assert baseline.meta["storage"] == ["hidden"] and baseline.meta["config"]["model_type"] == name
    reopened = open_baseline(baseline.path)
    for i, chunk in enumerate(whole_windows(reopened)):
        want = torch.log_softmax(window_logits(lm.model, windows, i), -1)
        torch.testing.assert_close(chunk.topk_logprobs, want, rtol=1e-6, atol=1e-6)


def test_key_changes_with_model_windows_and_k(stories, windows):
    keys = {
        baseline_key(stories.fingerprint, windows, None),
        baseline_key(stories.fingerprint, windows, 64),
        baseline_key(stories.fingerprint, windows.subset(2), None),
        baseline_key("another-model", windows, None),
    }
    assert len(keys) == 4


def rtn_int8(model: torch.nn.Module) -> torch.nn.Module:
    """Per-output-channel symmetric int8 round-to-nearest of every decoder linear weight."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and name.startswith("model.layers."):
                scale = module.weight.abs().amax(1, keepdim=True) / 127
                module.weight.copy_(torch.round(module.weight / scale).clamp(-128, 127) * scale)
    return model


@pytest.mark.slow
def test_smollm2_exact_baseline_matches_full_vocabulary_kl(smollm2, shared_dir, cache):
    windows = load_windows(shared_dir / "data" / "wikitext2_raw_test.txt", smollm2.tokenizer, n_windows=4)
    candidate = rtn_int8(smollm2.model)
    topks = (64, 1024)
    accumulators = {k: PairedAccumulator() for k in (None, *topks)}  # None: full vocabulary
    for i in range(windows.n):  # the models' own whole-window logits
        base_logits, cand_logits = (window_logits(model, windows, i) for model in (smollm2.model, candidate))
        targets = windows.ids[i, 1 : base_logits.shape[0] + 1]
        for k, acc in accumulators.items():
            acc.update(summarize_logits(base_logits, targets, k), cand_logits, targets)
    full = accumulators[None].summary()["kld"]["mean"]
    assert 0.001 < full < 0.02  # int8 RTN: a small but real divergence
    cached = compare_to_baseline(build_baseline(smollm2, windows), candidate, windows)
    assert cached["kld"]["mean"] == pytest.approx(full, rel=1e-6)  # exact: far inside 1%
    # Why exact is the default: most of this KL lives in the tail, so a top-K + tail-bin baseline
    # is a lower bound that is badly low on a 49k vocabulary even at K = 1024.
    tail_binned = [accumulators[k].summary()["kld"]["mean"] for k in topks]
    assert tail_binned == sorted(tail_binned) and tail_binned[-1] <= full
    assert tail_binned[0] < 0.9 * full
