"""The collectives of the sharded path: dense tensors of sizes that both sides know.

Every exchange is an ``all_to_all_single`` with split sizes, an ``all_gather`` of equal-sized
(padded) tensors or an ``all_reduce``: what NCCL and gloo both do natively. Sizes that the
receiver cannot compute itself travel first, as a small tensor of counts. The two
differentiable ones (``all_to_all_rows``, ``gather_rows``) carry their gradient back the way
they came.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def rank_and_world(group=None) -> tuple[int, int]:
    """This process's rank in ``group`` and the group's size."""
    if not dist.is_initialized():
        raise RuntimeError("the sharded tables need torch.distributed initialized (any world)")
    return dist.get_rank(group), dist.get_world_size(group)


def all_sizes(size: int, device: torch.device, group=None) -> list[int]:
    """Every rank's ``size`` (e.g. its batch's users), in rank order."""
    _, world = rank_and_world(group)
    mine = torch.tensor([size], dtype=torch.int64, device=device)
    sizes = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(sizes, mine, group=group)
    return [int(s) for s in torch.cat(sizes).tolist()]  # one host copy for all


def exchange_counts(send_counts: torch.Tensor, group=None) -> torch.Tensor:
    """What each rank will send to this one, given what this one sends to each (``world``
    int64 counts): the first half of every variable-size all-to-all."""
    recv_counts = torch.empty_like(send_counts)
    dist.all_to_all_single(recv_counts, send_counts, group=group)
    return recv_counts


def all_to_all(x: torch.Tensor, send_counts: list[int], recv_counts: list[int], group=None):
    """Rows ``x`` split by ``send_counts`` go to ranks 0, 1, ...; returns the rows received,
    by source rank (not differentiable: for indices and values)."""
    out = x.new_empty((sum(recv_counts), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), recv_counts, send_counts, group=group)
    return out


class _AllToAllRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, send_counts, recv_counts, group):
        ctx.counts = (send_counts, recv_counts)
        ctx.group = group
        return all_to_all(x, send_counts, recv_counts, group)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        send_counts, recv_counts = ctx.counts
        return all_to_all(grad, recv_counts, send_counts, ctx.group), None, None, None


def all_to_all_rows(x, send_counts: list[int], recv_counts: list[int], group=None):
    """``all_to_all`` with a gradient: the backward sends each row's gradient back to it."""
    return _AllToAllRows.apply(x, list(send_counts), list(recv_counts), group)


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, sizes, group):
        rank, world = rank_and_world(group)
        ctx.sizes, ctx.group, ctx.rank = sizes, group, rank
        # all_gather needs equal sizes: pad to the longest rank's rows.
        longest = max(sizes)
        padded = x.new_zeros((longest, *x.shape[1:]))
        padded[: len(x)] = x
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded, group=group)
        return torch.cat([part[:size] for part, size in zip(parts, sizes)])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        # Every rank holds a gradient for every rank's rows (its share of the loss): send each
        # block to its rows' rank and sum what arrives (a reduce-scatter; gloo has none).
        sizes, world = ctx.sizes, len(ctx.sizes)
        mine = sizes[ctx.rank]
        received = all_to_all(grad, sizes, [mine] * world, ctx.group)
        return received.view(world, mine, *grad.shape[1:]).sum(0), None, None


def gather_rows(x: torch.Tensor, sizes: list[int], group=None) -> torch.Tensor:
    """Every rank's rows ``x`` (``sizes[r]`` rows on rank ``r``) concatenated in rank order,
    on every rank; differentiable (each rank's rows get the sum of all ranks' gradients)."""
    return _GatherRows.apply(x, list(sizes), group)


def all_reduce(x: torch.Tensor, op=dist.ReduceOp.SUM, group=None) -> torch.Tensor:
    """``x`` reduced over the ranks (a new tensor; ``x`` is left as it was)."""
    out = x.clone()
    dist.all_reduce(out, op=op, group=group)
    return out
