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

Ray is an extra (``pip install 'quantaudit[ray]'``), imported only when ``--ray`` is given. Not yet distributed:
layer-streamed audits (refused with ``--ray``), autotune and calib-check.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import UserError
from ..progress import console, track
from .in_memory import InMemoryExecutor, Shared
from .inputs import check_inputs
from .measurement import BaselineMeasured, Candidate, Measured
from .settings import ray_module

MAX_RETRIES = 2  # a job whose worker dies is run at most this many more times
JOBS = ".jobs"  # inside DIR/formats: one record per attempt of each job


@contextmanager
def connected(address: str, cache: Path):
    """Ray, joined at ``address`` or started locally (``auto``: this machine's CPUs and GPUs), with the workers'
    cache folder set to ``cache``; a local instance is shut down afterwards."""
    ray = ray_module()
    runtime_env = {"env_vars": {"QUANTAUDIT_CACHE": str(cache), "QUANTAUDIT_QUIET": "1"}}
    started_here = not ray.is_initialized()
    if started_here:
        if address == "auto":
            ray.init(include_dashboard=False, log_to_driver=False, runtime_env=runtime_env)
        else:
            ray.init(address=address, log_to_driver=False, runtime_env=runtime_env)
    try:
        yield ray
    finally:
        if started_here:
            ray.shutdown()


def _record_attempt(jobs: Path, name: str) -> int:
    """Note this attempt of job ``name`` (its number, process and node) and return its number."""
    jobs.mkdir(parents=True, exist_ok=True)
    attempt = len(list(jobs.glob(f"{name}.*.json"))) + 1
    record = {"attempt": attempt, "pid": os.getpid(), "node": socket.gethostname(), "started": time.time()}
    (jobs / f"{name}.{attempt}.json").write_text(json.dumps(record))
    return attempt


def run_job(settings, name: str, shared: Shared, jobs: Path, lm_eval_dir: Path) -> Measured:
    """One candidate measured in a worker: its inputs read again from ``settings``, the shared baseline opened."""
    _record_attempt(jobs, name)
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
        if s.shared_dir:
            os.environ["QUANTAUDIT_CACHE"] = str(Path(s.shared_dir).resolve())  # the baseline goes where all read
        self._baseline = self.local.prepare()
        jobs = self.work / "formats" / JOBS
        with connected(s.ray, cache_dir()) as ray:
            resources = ray.cluster_resources()
            gpus = 1 if resources.get("GPU", 0) >= 1 and s.device.startswith("cuda") else 0
            job = ray.remote(num_cpus=1, num_gpus=gpus, max_retries=MAX_RETRIES, retry_exceptions=False)(run_job)
            shared = ray.put(self.local.shared)
            settings = ray.put(s)
            pending = {job.remote(settings, c.name, shared, jobs, self.lm_eval_dir): c for c in todo}
            console.print(f"[bold]ray[/bold]: {len(todo)} jobs on {int(resources.get('CPU', 0))} CPUs and "
                          f"{int(resources.get('GPU', 0))} GPUs ({s.ray})")
            for _ in track(range(len(todo)), "formats on ray", total=len(todo)):
                done, _waiting = ray.wait(list(pending), num_returns=1)
                candidate = pending.pop(done[0])
                try:
                    measured = ray.get(done[0])
                except ray.exceptions.RayTaskError as exc:
                    cause = exc.cause if isinstance(exc.cause, Exception) else None
                    if isinstance(cause, UserError):
                        raise cause from None
                    raise RuntimeError(f"{candidate.name}: {cause or exc}") from None
                except ray.exceptions.WorkerCrashedError:
                    raise RuntimeError(f"{candidate.name}: its worker died {MAX_RETRIES + 1} times") from None
                console.print(f"[bold]{candidate.name}[/bold]: measured")
                yield measured
            self._baseline.distributed = {
                "address": s.ray, "cpus": resources.get("CPU", 0), "gpus": resources.get("GPU", 0),
                "max_retries": MAX_RETRIES, "jobs": _attempts(jobs, [c.name for c in todo]),
            }

    def baseline(self) -> BaselineMeasured:
        """After :meth:`measure`: the baseline's measurements, with how the jobs ran."""
        return self._baseline


def _attempts(jobs: Path, names: list[str]) -> dict[str, dict]:
    """Per job, its attempts (a retried job has more than one) and where the last one ran."""
    out = {}
    for name in names:
        records = sorted((json.loads(p.read_text()) for p in jobs.glob(f"{name}.*.json")), key=lambda r: r["attempt"])
        out[name] = {"attempts": len(records), "node": records[-1]["node"] if records else None}
    return out
