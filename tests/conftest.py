"""Shared fixtures: the real models and data in ../shared (skipped with a message when absent)."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

os.environ.setdefault("QUANTAUDIT_QUIET", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED = (REPO / ".." / "shared").resolve()
STORIES_HF = SHARED / "models" / "stories260K" / "hf"
# stories260K's tensors are tiny: intra-op threads only add synchronisation (on a busy 2-core machine a
# stories260K forward took 1.3 s with 2 threads and 17 ms with 1). SmolLM2 tests elsewhere keep both cores.
ONE_THREAD_DIRS = ("quant", "export", "stream")
ONE_THREAD_MODULES = ("test_arch.py", "test_logits.py", "test_calibcheck.py")  # tiny models, stories260K


@contextmanager
def _single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module", autouse=True)
def _one_thread_for_tiny_models(request):
    """One torch thread for the modules under ONE_THREAD_DIRS and the ONE_THREAD_MODULES, restored afterwards."""
    path = Path(request.path)
    if path.parent.name not in ONE_THREAD_DIRS and path.name not in ONE_THREAD_MODULES:
        yield
        return
    with _single_thread():
        yield


@pytest.fixture
def one_thread():
    """One torch thread for a test on stories260K in a module whose other tests keep both cores for SmolLM2."""
    with _single_thread():
        yield


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"../shared not found at {SHARED}: the real models and data live there")
    return SHARED


@pytest.fixture(scope="session")
def stories(shared_dir):
    """stories260K (llama2.c, Llama architecture, vocab 512) as a LoadedModel."""
    from quantaudit.models import load_model

    return load_model(str(STORIES_HF))


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M-Instruct, the embedded default (dequantized GGUF, cached)."""
    from quantaudit.models import load_model

    return load_model("smollm2-135m")


@pytest.fixture(scope="session")
def smollm2_piqa200(smollm2, shared_dir):
    """PIQA's first 200 items and SmolLM2's result on them by quantaudit's own scorer (tests/test_tasks.py,
    tests/test_lm_eval.py)."""
    from quantaudit.tasks import evaluate_task, load_task

    task = load_task("piqa", shared_dir / "data", limit=200)
    return task, evaluate_task(smollm2.model, smollm2.tokenizer, task)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, shared_dir):
    """``tiny_model_dir(name)``: the folder of the tiny model ``name`` of ``tiny_models.TINY_FAMILIES``, built once."""
    from tiny_models import build_tiny_model

    built: dict[str, Path] = {}

    def build(name: str) -> Path:
        if name not in built:
            built[name] = build_tiny_model(name, tmp_path_factory.mktemp(name), STORIES_HF)
        return built[name]

    return build


@pytest.fixture(scope="session")
def ray_installed():
    """Ray tests skip without the ray extra, except in CI (CI set), where make install puts it and they must run."""
    try:
        import ray  # noqa: F401
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail("the ray extra is not installed: CI must run these tests")
        pytest.skip("the ray extra is not installed (pip install 'quantaudit[ray]')")
