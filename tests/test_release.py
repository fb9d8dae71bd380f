"""A Ray Train run whose controller is killed leaves its placement group held; `release` frees
it, and leaves a running run's group alone. With a second Ray instance up, Ray Train's own
cleaner cannot, so the CPUs come back only through `release`."""

from __future__ import annotations

import time

import pytest
import ray
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from recoder_dist.training.driver import release
from tests.second_ray import second_ray  # noqa: F401


def _sleep_loop(config):
    time.sleep(config["seconds"])


@ray.remote(num_cpus=0.1)
class _RunDriver:
    """Owns a Ray Train controller, as a Tune trial's actor does."""

    def fit(self, storage: str) -> None:
        TorchTrainer(
            _sleep_loop,
            train_loop_config={"seconds": 600},
            scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
            run_config=RunConfig(name="killed", storage_path=storage),
        ).fit()


def _wait(condition, timeout_s: float, failure: str):
    deadline = time.monotonic() + timeout_s
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(failure)
        time.sleep(0.5)
    return value


@pytest.mark.slow
@pytest.mark.usefixtures("second_ray")
def test_a_killed_runs_group_is_released_and_a_running_ones_is_not(ray_session, tmp_path):
    before = release.train_groups()  # other tests' runs, if any, are not this test's
    free = ray.available_resources().get("CPU", 0)
    driver = _RunDriver.remote()
    driver.fit.remote(str(tmp_path))
    running = _wait(
        lambda: [g for g, alive in release.train_groups().items() if alive and g not in before],
        180,
        f"no placement group holding a live {release.TRAIN_WORKER_CLASS!r} actor: has a Ray "
        "upgrade renamed Ray Train's worker class? (release.TRAIN_WORKER_CLASS)",
    )
    assert len(running) == 1
    group = running[0]

    assert release.release_abandoned_train_groups() == []  # a running run keeps its group
    assert ray.util.placement_group_table()[group]["state"] == "CREATED"

    ray.kill(driver)  # the controller dies with its owner, before it can remove the group
    _wait(
        lambda: release.train_groups().get(group) is False,
        60,
        f"the killed run's workers are not dead, or its group vanished: {release.train_groups()}",
    )
    assert release.release_abandoned_train_groups() == [group]
    assert ray.util.placement_group_table()[group]["state"] == "REMOVED"
    assert group not in release.train_groups()
    _wait(
        lambda: ray.available_resources().get("CPU", 0) >= free,
        30,
        f"CPUs still reserved: {ray.available_resources()} of {ray.cluster_resources()}",
    )
