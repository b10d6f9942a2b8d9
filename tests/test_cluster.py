"""quantaudit.cluster: each job's progress, reported by its worker, drawn by the driver as one bar per job; a
user error raised in a job reaches the driver once, as itself. On a local Ray instance (skips without the ray
extra, fails in CI: conftest's ``ray_installed``)."""

from __future__ import annotations

import sys
import time

import pytest

from quantaudit import cluster
from quantaudit.errors import UserError
from quantaudit.progress import JobBars, track


def counting(steps: int) -> int:
    """A job with one bar of ``steps`` items, slow enough for the driver to see it part done."""
    for _ in track(range(steps), "counting"):
        time.sleep(0.5)
    return steps


def refusing(path: str) -> None:
    raise UserError(f"--calib {path}: not a text file")


@pytest.fixture(scope="module")
def ray(ray_installed, tmp_path_factory):
    import ray

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import tests/
    with cluster.connected("auto", tmp_path_factory.mktemp("cache")) as connected:
        yield connected


def test_each_job_has_a_bar_fed_by_its_worker(ray, monkeypatch):
    shown: list[dict] = []
    finished: list[str] = []

    class Recorded(JobBars):
        def show(self, state):
            shown.append(dict(state))
            super().show(state)

        def finish(self, name):
            finished.append(name)
            super().finish(name)

    monkeypatch.setattr(cluster, "JobBars", Recorded)
    results = dict(cluster.run_jobs(ray, counting, {"short": (4,), "long": (8,)}, device="cpu", what="test"))
    assert results == {"short": 4, "long": 8}
    assert sorted(finished) == ["long", "short"]
    for name, steps in (("short", 4), ("long", 8)):
        seen = [state[name] for state in shown if name in state]
        assert {description for description, _, _ in seen} == {"counting"}
        assert {total for _, _, total in seen} == {steps}
        done = [d for _, d, _ in seen]
        assert done == sorted(done) and any(0 < d < steps for d in done)  # drawn part done, never going back


def test_a_user_error_in_a_job_is_raised_once_as_itself(ray):
    with pytest.raises(UserError, match="--calib /nowhere.txt: not a text file"):
        dict(cluster.run_jobs(ray, refusing, {"bad": ("/nowhere.txt",)}, device="cpu", what="test"))
