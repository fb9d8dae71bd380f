"""The CPUs a worker reserves by default, and the torch threads it runs."""

from __future__ import annotations

import json
import os
import time

import pytest
import ray
import torch

from recoder_dist.losses import MultinomialNLLLoss
from recoder_dist.model import Recoder
from recoder_dist.nn import DynamicAutoencoder
from recoder_dist.training.resources import split_cpus, worker_threads
from tests.ml100k import ml100k_split


def first_fit_places(nodes, num_workers: int, cpus: int, use_gpu: bool) -> bool:
    """Naive reference: place the workers one by one on the first node with room."""
    free = [[c, g] for c, g in nodes if g >= 1 or not use_gpu]
    for _ in range(num_workers):
        node = next((n for n in free if n[0] >= cpus and (n[1] >= 1 or not use_gpu)), None)
        if node is None:
            return False
        node[0] -= cpus
        node[1] -= 1 if use_gpu else 0
    return True


@pytest.mark.parametrize(
    "nodes, workers, use_gpu, expected",
    [
        ([(64, 0)], 1, False, 64),  # one worker takes the node
        ([(64, 0)], 2, False, 32),
        ([(64, 0)], 3, False, 21),  # whole CPUs: 3 x 21 of 64
        ([(8, 0), (64, 0)], 2, False, 32),  # both on the large node, not 36 each
        ([(8, 0), (64, 0)], 9, False, 8),  # 8 on the large node, 1 on the small
        ([(4, 0), (4, 0)], 2, False, 4),  # one a node
        ([(0, 0), (48, 4), (48, 4)], 8, True, 12),  # a GPU each: 4 a node
        ([(0, 0), (48, 4), (16, 2)], 4, True, 16),  # 3 + 1
        ([(0, 0), (96, 0), (48, 1)], 1, True, 48),  # only GPU nodes count
        ([(0, 0)], 2, False, 1),  # no CPU yet (an autoscaler's head): 1, as before
        ([(0, 0), (64, 0)], 2, True, 1),  # no GPU node yet
        ([(4.0, 0.0)], 4, False, 1),
        ([(2.0, 0.0)], 3, False, 1),  # does not fit: Ray Train waits for nodes
    ],
)
def test_split_cpus_by_hand(nodes, workers, use_gpu, expected):
    assert split_cpus(nodes, workers, use_gpu) == expected


@pytest.mark.parametrize("seed", range(20))
def test_split_cpus_is_the_largest_share_that_places_every_worker(seed):
    rng = torch.Generator().manual_seed(seed)
    sizes = torch.randint(0, 65, (int(torch.randint(1, 5, (1,), generator=rng)),), generator=rng)
    gpus = torch.randint(0, 5, (len(sizes),), generator=rng)
    nodes = [(float(c), float(g)) for c, g in zip(sizes, gpus)]
    for use_gpu in (False, True):
        for workers in (1, 2, 3, 5, 8):
            cpus = split_cpus(nodes, workers, use_gpu)
            if first_fit_places(nodes, workers, 1, use_gpu):
                assert first_fit_places(nodes, workers, cpus, use_gpu), (nodes, workers, cpus)
                assert not first_fit_places(nodes, workers, cpus + 1, use_gpu)
            else:
                assert cpus == 1


def test_worker_threads_are_whole_cpus_within_the_cores():
    cores = len(os.sched_getaffinity(0))
    assert worker_threads(1, 1) == 1
    assert worker_threads(0.5, 1) == 1
    assert worker_threads(cores + 10, 1) == cores
    assert worker_threads(cores + 10, cores) == 1
    assert worker_threads(cores + 10, cores * 2) == 1
    if cores >= 2:
        assert worker_threads(1.9, 1) == 1
        assert worker_threads(2, 1) == 2


class RecordsWorker(MultinomialNLLLoss):
    """logloss that writes, once per worker, the CPUs Ray gave it and torch's thread count."""

    def __init__(self, folder: str):
        super().__init__()
        self.folder, self.seen = folder, False

    def forward(self, input, target):
        if not self.seen:
            self.seen = True
            rank = ray.train.get_context().get_world_rank()
            record = {
                "cpus": ray.get_runtime_context().get_assigned_resources().get("CPU"),
                "threads": torch.get_num_threads(),
            }
            with open(os.path.join(self.folder, f"rank{rank}.json"), "w") as f:
                json.dump(record, f)
        return super().forward(input, target)


@pytest.mark.slow
def test_a_worker_takes_the_nodes_cpus_by_default(ray_session, tmp_path):
    """The session's Ray has 4 logical CPUs on this machine's cores: the worker reserves them
    all, and runs no more threads than there are cores."""
    total = ray.cluster_resources()["CPU"]  # one node
    cores = len(os.sched_getaffinity(0))
    recoder = Recoder(
        DynamicAutoencoder(hidden_layers=[16]), loss=RecordsWorker(str(tmp_path)), num_workers=1
    )
    recoder.train(ml100k_split().train, batch_size=200, num_epochs=1)
    seen = json.loads((tmp_path / "rank0.json").read_text())
    assert seen == {"cpus": float(int(total)), "threads": max(1, min(int(total), cores))}


@ray.remote(num_cpus=1)
def nodes_seen_from_a_task(release: str):
    """What a task holding 1 CPU sees; it keeps its CPU until ``release`` exists."""
    from recoder_dist.training.resources import nodes_for_workers

    seen = nodes_for_workers()
    deadline = time.monotonic() + 60
    while not os.path.exists(release) and time.monotonic() < deadline:
        time.sleep(0.05)
    return seen


def test_the_nodes_for_workers_are_totals_less_what_the_caller_holds(ray_session, tmp_path):
    """From the driver, while a task holds a CPU: the node's total, not what is free. From the
    task: one less, so that a run started there can be placed."""
    from recoder_dist.training.resources import nodes_for_workers

    total = ray.cluster_resources()["CPU"]
    gpus = ray.cluster_resources().get("GPU", 0.0)
    release = tmp_path / "release"
    busy = nodes_seen_from_a_task.remote(str(release))
    deadline = time.monotonic() + 60
    while ray.available_resources().get("CPU", 0.0) > total - 1:  # until the task holds its CPU
        assert time.monotonic() < deadline, "the task never started"
        time.sleep(0.05)
    assert nodes_for_workers() == [(total, gpus)]
    release.touch()
    assert ray.get(busy) == [(total - 1, gpus)]


@ray.remote(num_cpus=0.5)
class HoldsHalfACpu:
    def held(self):
        from recoder_dist.training.resources import held_by_caller

        return held_by_caller(ray.get_runtime_context())


def test_what_the_caller_holds_through_rays_public_api(ray_session):
    """The upgrade test of ``held_by_caller``: a driver holds nothing, and asking says so
    without the warning that Ray's other public ways log in a driver ("This method is only
    available when the process is a worker"); an actor holds what it asked for. A Ray that
    refuses a driver otherwise than with its AssertionError fails here."""
    import logging

    from recoder_dist.training.resources import held_by_caller

    records = []
    handler = logging.Handler(level=logging.DEBUG)
    handler.emit = records.append
    ray_logger = logging.getLogger("ray")
    ray_logger.addHandler(handler)
    try:
        assert held_by_caller(ray.get_runtime_context()) == {}
    finally:
        ray_logger.removeHandler(handler)
    assert [r.getMessage() for r in records if r.levelno >= logging.WARNING] == []
    actor = HoldsHalfACpu.remote()
    try:
        assert ray.get(actor.held.remote()) == {"CPU": 0.5}
    finally:
        ray.kill(actor)


@pytest.mark.slow
def test_cpus_per_worker_given_is_what_each_worker_holds(ray_session, tmp_path):
    """1.5 CPUs each: Ray reserves 1.5, torch runs 1 thread (whole CPUs only)."""
    recoder = Recoder(
        DynamicAutoencoder(hidden_layers=[16]),
        loss=RecordsWorker(str(tmp_path)),
        num_workers=2,
        cpus_per_worker=1.5,
    )
    recoder.train(ml100k_split().train, batch_size=200, num_epochs=1)
    seen = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert seen == [{"cpus": 1.5, "threads": 1}] * 2


@pytest.mark.parametrize("bad", [0, -1, float("nan"), float("inf"), "2", True])
def test_bad_cpus_per_worker_is_refused(bad):
    with pytest.raises(ValueError, match="cpus_per_worker"):
        Recoder(DynamicAutoencoder(), cpus_per_worker=bad)
