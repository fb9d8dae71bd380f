"""The 2D layout: tables sharded within a group of ranks (a node, over NVLink) and replicated
across groups, so that the code exchange (``world x batch x hidden``) grows with the group, not
with the whole world.

Rank ``r`` of every group holds the same rows. A step: each group runs the sharded step on its
own batch (its own sampled items, as one process would on that batch); then each shard's
replicas average their gradients, and the dense layers average over every rank. The replicas'
exchange here is the simplest correct one, dense and of known size: an all-reduce of the whole
shard's gradient with one "touched" column (so that a sparse optimizer updates the rows that any
replica touched, as today's sync does over the whole table). On a large catalog that is the
shard's size a step; the row all-gather of ``SparseGradSync`` (touched rows only) is what a
production 2D layout would use across groups. Not counted in benchmarks/sync_bytes.py yet.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from recoder_dist.sharded import comm


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
    for table in model.tables():
        param = table.weight
        if param.grad is None:
            continue
        if param.grad.is_sparse:
            param.grad = _averaged_sparse(param.grad, replicas, replica_group)
        else:
            dist.all_reduce(param.grad, group=replica_group)
            param.grad.div_(replicas)
    for param in model.dense_parameters():
        dist.all_reduce(param.grad, group=replica_group)
        param.grad.div_(replicas)


def _averaged_sparse(grad: torch.Tensor, replicas: int, group) -> torch.Tensor:
    """The replicas' mean of a row-sparse gradient, sparse on the rows any replica touched."""
    grad = grad.coalesce()
    rows, values = grad.indices()[0], grad.values()
    buffer = values.new_zeros((grad.shape[0], grad.shape[1] + 1))
    buffer[rows, :-1] = values
    buffer[rows, -1] = 1
    dist.all_reduce(buffer, group=group)
    touched = torch.nonzero(buffer[:, -1]).squeeze(1)
    return torch.sparse_coo_tensor(
        touched.unsqueeze(0),
        buffer.index_select(0, touched)[:, :-1] / replicas,
        grad.shape,
        is_coalesced=True,
    )
