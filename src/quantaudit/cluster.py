"""Independent jobs on Ray (``--ray auto|HOST:PORT``): the flags, the connection, and one loop that runs jobs.

``audit`` (one job per format), ``calib-check`` (one per calibration set x format, and per point of a
sample-count curve) and ``autotune`` (one per ladder format) share this. A job is a plain function run as a
Ray task with one CPU (or one GPU where the cluster has them and ``--device cuda``); it records each attempt
(process, node) in a folder, so a report can say how many attempts each job took. A task whose worker dies is
run again by Ray (``max_retries``, :data:`MAX_RETRIES`); one that fails with a user error is not retried, and
the error is raised once in the driver, as a sequential run would raise it.

Progress: each worker sends its bars' progress to a small actor (:class:`Board`); the driver draws one bar
per job from it (:class:`~quantaudit.progress.JobBars`).

Ray is an extra (``pip install 'quantaudit[ray]'``), imported only when ``--ray`` is given.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError
from .progress import JobBars, console, reported_to
from .session import Settings, flag

DISTRIBUTED = "distributed (Ray)"
CONNECT_SECONDS = 3.0  # an unreachable --ray address is refused after this long
MAX_RETRIES = 2  # a job whose worker dies is run at most this many more times
REPORT_SECONDS = 0.2  # a worker sends its progress at most this often (and at each step's start and end)
POLL_SECONDS = 0.2  # how often the driver redraws the jobs' bars


def ray_module():
    """``ray``, or one line naming the extra to install."""
    try:
        import ray
    except ImportError:
        raise UserError("--ray needs Ray: pip install 'quantaudit[ray]'") from None
    return ray


def check_address(address: str) -> None:
    """``--ray``: ``auto`` (a local Ray instance) or the ``HOST:PORT`` of a cluster's head, reachable now."""
    if address == "auto":
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"--ray {address!r}: give auto or the head node's HOST:PORT (e.g. 10.0.0.1:6379)")
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_SECONDS).close()
    except OSError as exc:
        raise UserError(f"--ray {address}: cannot reach the Ray head ({exc.strerror or exc}); start it with "
                        "`ray start --head` or give --ray auto") from None


@dataclass
class ClusterSettings(Settings):
    """``--ray`` and ``--shared-dir``: how a command's independent jobs run, never what they measure."""

    ray: str | None = flag("--ray", None, "run each job as a Ray task: auto starts Ray on this machine, HOST:PORT "
                           "joins a cluster (pip install 'quantaudit[ray]'); the results are the same", DISTRIBUTED,
                           metavar="ADDRESS")
    shared_dir: str | None = flag("--shared-dir", None, "with --ray on a cluster: a folder every node reads and "
                                  "writes, for the baseline cache and the model cache", DISTRIBUTED, metavar="DIR")

    def check(self) -> None:
        super().check()
        if self.ray:
            ray_module()
            if self.shared_dir is not None and not os.access(self.shared_dir, os.W_OK | os.X_OK):
                raise UserError(f"--shared-dir {self.shared_dir}: not a folder this process can write; give one "
                                "every node reads and writes")
            check_address(self.ray)
        elif self.shared_dir is not None:
            raise UserError("--shared-dir is where Ray workers read the baseline: give --ray too")

    def use_shared_dir(self) -> None:
        """Point this process's cache (where the baseline is published) at ``--shared-dir``, if given."""
        if self.shared_dir:
            os.environ["QUANTAUDIT_CACHE"] = str(Path(self.shared_dir).resolve())


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


def _records(jobs: Path, name: str) -> list[Path]:
    """The attempt records ``NAME.K.json`` of job ``name`` (not those of a job whose name extends it)."""
    return [p for p in jobs.glob(f"{name}.*.json") if p.name[len(name) + 1 : -len(".json")].isdigit()]


def record_attempt(jobs: Path, name: str) -> int:
    """Note this attempt of job ``name`` (its number, process and node) in the folder ``jobs``; its number."""
    jobs.mkdir(parents=True, exist_ok=True)
    attempt = len(_records(jobs, name)) + 1
    record = {"attempt": attempt, "pid": os.getpid(), "node": socket.gethostname(), "started": time.time()}
    (jobs / f"{name}.{attempt}.json").write_text(json.dumps(record))
    return attempt


def _attempts(jobs: Path, names: list[str]) -> dict[str, dict]:
    """Per job, its attempts (a retried job has more than one) and where the last one ran."""
    out = {}
    for name in names:
        records = sorted((json.loads(p.read_text()) for p in _records(jobs, name)), key=lambda r: r["attempt"])
        out[name] = {"attempts": len(records), "node": records[-1]["node"] if records else None}
    return out


class Board:
    """A Ray actor holding each job's latest progress, ``{job: (description, done, total)}``: written by the
    workers, read by the driver."""

    def __init__(self):
        self.state: dict[str, tuple[str, int, int | None]] = {}

    def update(self, job: str, description: str, done: int, total: int | None) -> None:
        self.state[job] = (description, done, total)

    def read(self) -> dict[str, tuple[str, int, int | None]]:
        return self.state


def _reporting_job(job: Callable, board, name: str, *args):
    """``job(*args)`` in a worker, its progress bars sent to ``board`` (at most every REPORT_SECONDS)."""
    last = 0.0

    def report(description: str, done: int, total: int | None) -> None:
        nonlocal last
        now = time.monotonic()
        if done == 0 or done == total or now - last >= REPORT_SECONDS:
            last = now
            board.update.remote(name, description, done, total)

    with reported_to(report):
        return job(*args)


def run_jobs(ray, job: Callable, arguments: dict[str, tuple], *, device: str, what: str) -> Iterator[tuple[str, object]]:
    """Run ``job(*arguments[name])`` for every name as Ray tasks; yield ``(name, result)`` as each finishes, with
    a bar per job meanwhile. Shared arguments should be ``ray.put`` references (sent to each node once)."""
    resources = ray.cluster_resources()
    gpus = 1 if resources.get("GPU", 0) >= 1 and device.startswith("cuda") else 0
    remote = ray.remote(num_cpus=1, num_gpus=gpus, max_retries=MAX_RETRIES, retry_exceptions=False)(_reporting_job)
    board = ray.remote(num_cpus=0)(Board).remote()
    pending = {remote.remote(job, board, name, *args): name for name, args in arguments.items()}
    console.print(f"[bold]ray[/bold]: {len(pending)} {what} jobs on {int(resources.get('CPU', 0))} CPUs and "
                  f"{int(resources.get('GPU', 0))} GPUs")
    with JobBars(list(arguments)) as bars:
        while pending:
            done, _waiting = ray.wait(list(pending), num_returns=1, timeout=POLL_SECONDS)
            bars.show(ray.get(board.read.remote()))
            for ref in done:
                name = pending.pop(ref)
                result = _result(ray, ref, name)
                bars.finish(name)
                console.print(f"[bold]{name}[/bold]: measured")
                yield name, result


def _result(ray, ref, name: str):
    """A finished task's result; its user error raised as it is, any other failure in one line naming the job."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        cause = exc.cause if isinstance(exc.cause, Exception) else None
        if isinstance(cause, UserError):
            raise cause from None
        raise RuntimeError(f"{name}: {cause or exc}") from None
    except ray.exceptions.WorkerCrashedError:
        raise RuntimeError(f"{name}: its worker died {MAX_RETRIES + 1} times") from None


def run_description(address: str, ray, jobs: Path, names: list[str]) -> dict:
    """What a report records of a Ray run: where, on what, and each job's attempts."""
    resources = ray.cluster_resources()
    return {"address": address, "cpus": resources.get("CPU", 0), "gpus": resources.get("GPU", 0),
            "max_retries": MAX_RETRIES, "jobs": _attempts(jobs, names)}
