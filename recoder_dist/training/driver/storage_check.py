"""Refusing, before any worker starts, run storage that the workers' nodes cannot reach.

Ray Train finds out itself only once the worker group has started ("A local path on the head
node is not accessible by worker nodes"), or at the first checkpoint. A local folder is checked
here from every other live node of the cluster, with a marker file that a zero-CPU task looks
for; URIs (``s3://``, ``gs://``) are taken as reachable, since each node brings its own
credentials.
"""

from __future__ import annotations

import os
import uuid

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from recoder_dist import storage

_USE_INSTEAD = (
    "use storage that every node reaches: s3://bucket/prefix, gs://bucket/prefix, or a "
    "shared filesystem mounted at the same path on every node"
)


def check_storage_reaches_workers(storage_path: str, *, default: bool = False) -> None:
    """Raises a ValueError naming ``storage_path`` (the default temporary folder when
    ``default``) if a node that may run the workers cannot see it.

    A local folder must be visible from every other live node. The default folder is also
    refused when this node has no CPU (as a cluster head that runs no training): the workers
    then run on nodes that may not exist yet, which could not share this machine's temporary
    folder.
    """
    if storage.is_uri(storage_path):
        return
    what = "the default run storage, a temporary folder on this machine," if default else ""
    here = ray.get_runtime_context().get_node_id()
    nodes = [node for node in ray.nodes() if node["Alive"]]
    others = [node for node in nodes if node["NodeID"] != here]
    blind = _nodes_that_cannot_see(storage_path, others)
    if blind:
        raise ValueError(
            f"storage_path {what} {storage_path} is not visible from node(s) "
            f"{', '.join(sorted(blind))}, which may run the workers; {_USE_INSTEAD}"
        )
    this_node = next((node for node in nodes if node["NodeID"] == here), {})
    if default and this_node.get("Resources", {}).get("CPU", 0) == 0:
        raise ValueError(
            f"{what} {storage_path}, cannot serve workers that run on other nodes (this node "
            f"has no CPU for them): pass storage_path (--storage); {_USE_INSTEAD}"
        )


def _nodes_that_cannot_see(folder: str, nodes: list[dict]) -> list[str]:
    if not nodes:
        return []
    os.makedirs(folder, exist_ok=True)
    marker = os.path.join(folder, f".recoder-dist-reach-{uuid.uuid4().hex}")
    open(marker, "w").close()
    try:
        looks = [
            _sees.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)
            ).remote(marker)
            for node in nodes
        ]
        blind = []
        for node, look in zip(nodes, looks):
            try:
                if not ray.get(look, timeout=120):
                    blind.append(node["NodeManagerAddress"])
            except ray.exceptions.TaskUnschedulableError:
                pass  # the node left the cluster since it was listed (an autoscaler removed it)
    finally:
        os.unlink(marker)
    return blind


@ray.remote(num_cpus=0)
def _sees(path: str) -> bool:
    return os.path.exists(path)
