"""How many CPUs a training worker reserves, and how many torch threads it runs.

By default (``Recoder(cpus_per_worker=None)``) the workers split the nodes' CPUs: each takes
the largest whole number of CPUs that still lets every worker fit on the alive nodes (on nodes
with GPUs, one a worker, when the workers hold GPUs), less what the calling process holds (a
Tune trial's driver, a Ray task that trains), which would otherwise never be free for them.

The nodes' totals, not what happens to be free when the run starts: the CPUs set the torch
threads, and the threads the order of some float sums, so a run must get the same CPUs however
busy the cluster was at its start. A stopped run submitted again at once, while the old one
still holds its CPUs, then resumes to the weights of a run that never stopped. Work that holds
CPUs when the run starts makes it wait, as any Ray request would. Every Ray Data task of a run
(reading and shuffling the rows, reading the evaluation users) has ended before its workers
start.

A worker runs as many torch threads as the whole CPUs it holds, but no more than its share of
the cores that its process may run on: Ray's logical CPUs may outnumber the cores (as in
``ray.init(num_cpus=4)`` on 2 cores), and more threads than cores make every step slower.
"""

from __future__ import annotations

import math
import os


def default_workers(max_failures: int = 0) -> int:
    """What ``num_workers=None`` stands for: 0 (train in this process) where Ray runs on this
    machine alone, which saves starting a worker group where there is nothing to spread over;
    1 worker on a cluster (``RAY_ADDRESS``, or more than one node), or when ``max_failures``
    asks Ray Train for restarts."""
    import ray

    nodes = sum(node["Alive"] for node in ray.nodes())
    alone = not os.environ.get("RAY_ADDRESS") and nodes == 1
    return 0 if alone and max_failures == 0 else 1


def split_cpus(nodes: list[tuple[float, float]], num_workers: int, use_gpu: bool) -> int:
    """The most whole CPUs each of ``num_workers`` workers can hold with all of them placed.

    Args:
        nodes: (CPUs, GPUs) that each alive node can give the workers.
        num_workers: the workers to place (>= 1).
        use_gpu: each worker also holds one GPU; only nodes with GPUs count.

    Returns:
        The largest ``c`` such that the nodes hold ``num_workers`` workers of ``c`` CPUs, at
        least 1 (where not even 1 CPU each fits, the run waits for nodes, as Ray Train does).
    """

    def fits(cpus: int) -> int:  # workers of ``cpus`` CPUs that the nodes hold
        if use_gpu:
            return sum(min(int(c // cpus), int(g)) for c, g in nodes)
        return sum(int(c // cpus) for c, _ in nodes)

    largest = int(max((cpus for cpus, _ in nodes), default=0))
    return next((c for c in range(largest, 0, -1) if fits(c) >= num_workers), 1)


def nodes_for_workers() -> list[tuple[float, float]]:
    """(CPUs, GPUs) of each alive node of the Ray cluster this process is connected to, less
    what this process holds on its node when it is itself a Ray task or actor."""
    import ray

    context = ray.get_runtime_context()
    held = held_by_caller(context)
    here = context.get_node_id()
    nodes = []
    for node in ray.nodes():
        if not node["Alive"]:
            continue
        cpus, gpus = (node["Resources"].get(name, 0.0) for name in ("CPU", "GPU"))
        if node["NodeID"] == here:
            cpus, gpus = cpus - held.get("CPU", 0.0), gpus - held.get("GPU", 0.0)
        nodes.append((cpus, gpus))
    return nodes


def held_by_caller(context) -> dict[str, float]:
    """The resources that this process holds: a Ray task's or actor's assignment (e.g.
    ``{"CPU": 1.0}``), nothing for a driver.

    Ray's public ``RuntimeContext.get_assigned_resources`` refuses a driver with an
    ``AssertionError`` (its documented "only available when the process is a worker"), and
    under ``python -O``, which strips that assertion, returns ``{}`` there. The public ways to
    ask whether the caller is a task instead (``get_task_id``, ``get_task_name``) log a
    warning in a driver, and ``get_actor_id`` tells actors only. Should a Ray upgrade refuse
    a driver in another way, ``tests/test_resources.py`` fails, naming this function.
    """
    try:
        return dict(context.get_assigned_resources())
    except AssertionError:  # a driver: it holds nothing
        return {}


def worker_threads(cpus_held: float, workers_on_node: int) -> int:
    """Torch threads for a worker holding ``cpus_held`` CPUs beside ``workers_on_node - 1``
    others on its node: its whole CPUs, capped by its share of the usable cores, at least 1."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        cores = os.cpu_count() or 1
    return max(1, min(math.floor(cpus_held), cores // workers_on_node))
