"""Tasks that read or write this node's own files.

A local path names a file on the node that holds it; other nodes of a cluster may not see it.
Work on such a file is pinned to this node, and asks for no CPU: this node may be a cluster's
head, which advertises none (``cluster.yaml``). Ray Data's own way, a ``local://`` path, is
deprecated in Ray 2.60.
"""

from __future__ import annotations


def on_this_node() -> dict:
    """Ray remote arguments (for ``ray.remote(...).options``, or Ray Data's ``ray_remote_args``
    and read arguments) of a task that must run on this node and asks for no CPU."""
    import ray

    node = ray.get_runtime_context().get_node_id()
    return {"num_cpus": 0, "label_selector": {"ray.io/node-id": node}}
