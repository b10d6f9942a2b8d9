"""The distributed executor: each candidate format one Ray task (``audit --ray auto|ADDRESS``).

An audit is a set of independent jobs sharing one baseline. The driver does the shared work once, as the
in-memory executor does (:meth:`.in_memory.InMemoryExecutor.prepare`: the baseline cache on disk, outliers, the
baseline's tasks and generations), then submits one Ray task per candidate. Each task reads the model and texts
itself from the same settings, opens the baseline cache by path (a folder every worker reads: the local cache,
or ``--shared-dir`` on a cluster; a worker that cannot read it refuses in one line), measures its candidate with
the in-memory executor's own :meth:`~.in_memory.InMemoryExecutor.measure_one`, and returns the typed
:class:`~.measurement.Measured`. The orchestrator renders and saves each result as it arrives, by the same code
as a sequential run, so ``report.json`` is the same (tests/audit/test_distributed.py).

Faults: a task whose worker dies is run again by Ray (``max_retries``, :data:`MAX_RETRIES`); a task that fails
with a user error is not retried, and the error is reported once. Every attempt leaves a record in
``DIR/formats/.jobs`` (process, node), so the report's ``ray.jobs`` says how many attempts each format took;
finished formats are in ``DIR/formats`` as always, so ``--resume`` works across cluster runs.

The Ray plumbing (flags, connection, the job loop, attempt records) is :mod:`quantaudit.cluster`, shared
with calib-check and autotune. Not distributed: layer-streamed audits (refused with ``--ray``).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from ..cluster import connected, record_attempt, run_description, run_jobs
from .in_memory import InMemoryExecutor, Shared
from .inputs import check_inputs
from .measurement import BaselineMeasured, Candidate, Measured

JOBS = ".jobs"  # inside DIR/formats: one record per attempt of each job


def run_job(settings, name: str, shared: Shared, jobs: Path, lm_eval_dir: Path) -> Measured:
    """One candidate measured in a worker: its inputs read again from ``settings``, the shared baseline opened."""
    record_attempt(jobs, name)
    inputs = check_inputs(settings, streamed=False)
    candidate = next(c for c in inputs.candidates if c.name == name)
    return InMemoryExecutor(settings, inputs, lm_eval_dir, shared).measure_one(candidate)


class RayExecutor:
    """Measures the candidates as Ray tasks (module docstring); ``work`` is the run's folder."""

    def __init__(self, settings, inputs, work: Path, lm_eval_dir: Path):
        self.settings, self.work, self.lm_eval_dir = settings, work, lm_eval_dir
        self.local = InMemoryExecutor(settings, inputs, lm_eval_dir)
        self._baseline: BaselineMeasured | None = None

    def measure(self, todo: list[Candidate]) -> Iterator[Measured]:
        from ..models import cache_dir

        s = self.settings
        s.use_shared_dir()  # the baseline goes where every worker reads it
        self._baseline = self.local.prepare()
        jobs = self.work / "formats" / JOBS
        with connected(s.ray, cache_dir()) as ray:
            shared, settings = ray.put(self.local.shared), ray.put(s)
            arguments = {c.name: (settings, c.name, shared, jobs, self.lm_eval_dir) for c in todo}
            for _name, measured in run_jobs(ray, run_job, arguments, device=s.device, what="format"):
                yield measured
            self._baseline.distributed = run_description(s.ray, ray, jobs, [c.name for c in todo])

    def baseline(self) -> BaselineMeasured:
        """After :meth:`measure`: the baseline's measurements, with how the jobs ran."""
        return self._baseline
