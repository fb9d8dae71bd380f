"""How many CPUs a training worker reserves, and how many torch threads it runs.

By default (``Recoder(cpus_per_worker=None)``) the workers split the nodes' free CPUs: each
takes the largest whole number of CPUs that still lets every worker fit in what the alive nodes
have free when the run starts (free GPUs too, one a worker, when the workers hold GPUs). Free,
not total: a caller that is itself a Ray task or actor (a Tune trial's driver) holds some, and
a request for more than is free would wait forever. Every Ray Data task of a run (reading and
shuffling the rows, reading the evaluation users) has ended before its workers start, so the
workers may hold every free CPU.

A worker runs as many torch threads as the whole CPUs it holds, but no more than its share of
the cores that its process may run on: Ray's logical CPUs may outnumber the cores (as in
``ray.init(num_cpus=4)`` on 2 cores), and more threads than cores make every step slower.
"""

from __future__ import annotations

import math
import os


def split_cpus(nodes: list[tuple[float, float]], num_workers: int, use_gpu: bool) -> int:
    """The most whole CPUs each of ``num_workers`` workers can hold with all of them placed.

    Args:
        nodes: (CPUs, GPUs) that each alive node can give.
        num_workers: the workers to place (>= 1).
        use_gpu: each worker also holds one GPU; only free GPUs count.

    Returns:
        The largest ``c`` such that the nodes hold ``num_workers`` workers of ``c`` CPUs, at
        least 1 (where not even 1 CPU each fits, the run waits for nodes, as Ray Train does).
    """

    def fits(cpus: int) -> int:
        per_node = (
            min(int(node_cpus // cpus), int(node_gpus)) if use_gpu else int(node_cpus // cpus)
            for node_cpus, node_gpus in nodes
        )
        return sum(per_node)

    largest = int(max((cpus for cpus, _ in nodes), default=0))
    return next((c for c in range(largest, 0, -1) if fits(c) >= num_workers), 1)


def free_on_nodes() -> list[tuple[float, float]]:
    """(CPUs, GPUs) free now on each alive node of the Ray cluster this process is connected
    to (Ray's DeveloperAPI: the public ``ray.available_resources`` sums over the nodes)."""
    from ray._private.state import available_resources_per_node

    return [
        (free.get("CPU", 0.0), free.get("GPU", 0.0))
        for free in available_resources_per_node().values()
    ]


def worker_threads(cpus_held: float, workers_on_node: int) -> int:
    """Torch threads for a worker holding ``cpus_held`` CPUs beside ``workers_on_node - 1``
    others on its node: its whole CPUs, capped by its share of the usable cores, at least 1."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        cores = os.cpu_count() or 1
    return max(1, min(math.floor(cpus_held), cores // max(workers_on_node, 1)))
