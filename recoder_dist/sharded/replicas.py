"""The 2D layout: tables sharded within a group of ranks (a node, over NVLink) and replicated
across groups, so that the code exchange (``world x batch x hidden``) grows with the group, not
with the whole world.

Rank ``r`` of every group holds the same rows. A step: each group runs the sharded step on its
own batch (its own sampled items, as one process would on that batch); then each shard's
replicas average their gradients, and the dense layers average over every rank. The replicas
exchange only the rows that some replica touched, as the replicated layout's sync does over
whole tables (``SparseGradSync``, over the group of replicas); a table with dense gradients,
its whole shard.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from recoder_dist.sharded import comm
from recoder_dist.training.sparse_sync import SparseGradSync


def layout_groups(group_size: int):
    """``(shard_group, replica_group)`` of this rank for groups of ``group_size`` consecutive
    ranks. A collective: every rank calls it (each creates every group, in one order).

    Raises:
        ValueError: a world that is not a multiple of ``group_size``.
    """
    rank, world = comm.rank_and_world()
    if group_size < 1 or world % group_size:
        raise ValueError(f"world {world} is not a multiple of group_size {group_size}")
    shard_group = replica_group = None
    for start in range(0, world, group_size):
        group = dist.new_group(list(range(start, start + group_size)))
        if start <= rank < start + group_size:
            shard_group = group
    for offset in range(group_size):
        group = dist.new_group(list(range(offset, world, group_size)))
        if rank % group_size == offset:
            replica_group = group
    return shard_group, replica_group


@torch.no_grad()
def average_replicas(model, replica_group) -> None:
    """After ``backward`` and ``model.all_reduce_dense_grads()`` (within the shard group):
    averages every gradient of ``model`` (a ``ShardedAutoencoder``) over the replicas."""
    _, replicas = comm.rank_and_world(replica_group)
    sparse = [t.weight for t in model.tables() if t.sparse]
    if sparse:  # the rows that some replica touched (SparseGradSync's average)
        SparseGradSync(sparse, group=replica_group).synchronize()
    dense = [t.weight for t in model.tables() if not t.sparse] + model.dense_parameters()
    for param in dense:
        if param.grad is None:
            param.grad = torch.zeros_like(param)
        dist.all_reduce(param.grad, group=replica_group)
        param.grad.div_(replicas)
