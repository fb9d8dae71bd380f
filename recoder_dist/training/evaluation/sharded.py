"""Evaluation of a model whose item tables are sharded over the ranks: each user's top k merged
from every owner's top k, with no whole model anywhere (no Ray here).

A batch's path (a collective: every rank takes part with its own users, maybe none):

1. Each rank encodes its users as a training step does (``ShardedModel.encode``: for the
   autoencoder, the entries go to their items' owners, are pooled there, and the partial
   codes come back; for matrix factorization, the users' rows come from their owners).
2. Every rank's codes reach every owner (an all-gather of ``world x batch x hidden`` floats).
3. Each owner scores its rows for all those users (``bias + codes @ rows.T``, one source
   rank's users at a time), sets ``-inf`` on the input items it owns, and keeps its top
   ``min(k, its rows)`` a user.
4. The candidates (scores and global ids) go back to each user's rank (an all-to-all of
   ``batch x k`` a pair of ranks), which merges them into the top k over the catalog.

The scores never travel (``users x items``); a rank receives at most ``world x k`` candidates a
user. The whole model's ``recommend_top_k`` is the reference: the same lists up to rounding
(the codes are summed in another order), with ties ordered by the lowest id first wherever
``top_k`` defines their order (see ``merge_top_k``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.distributed as dist

from recoder_dist.data.collator import UserRows, row_numbers
from recoder_dist.metrics import Metric
from recoder_dist.sharded import comm
from recoder_dist.sharded.model import ShardedModel
from recoder_dist.training.evaluation.scoring import batches_metric_sums
from recoder_dist.training.evaluation.top_k import top_k


def no_users() -> UserRows:
    """A batch of no users: what a rank with no batch left gives to a collective step."""
    empty = np.empty(0, dtype=np.int64)
    return UserRows(
        users=empty,
        indptr=np.zeros(1, dtype=np.int64),
        indices=empty,
        values=np.empty(0, dtype=np.float32),
    )


def merge_top_k(
    scores: torch.Tensor, items: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` best of each row's candidates (``scores``, and ``items``: their global ids),
    best first; among equal scores the lowest id first (the order of the compiled top-k
    kernel; ``torch.topk`` leaves it open).

    Returns:
        ``(scores, items)``, ``rows x k``.
    """
    by_id = torch.argsort(items, dim=1, stable=True)
    scores, items = scores.gather(1, by_id), items.gather(1, by_id)
    best = torch.argsort(scores, dim=1, descending=True, stable=True)[:, :k]
    return scores.gather(1, best), items.gather(1, best)


@torch.no_grad()
def sharded_top_k(
    model: ShardedModel, rows: UserRows, k: int, device, *, compiled: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top ``k`` items per user of ``rows`` (this rank's users), never an item of the user's
    input: the whole model's ``recommend_top_k``, from the shards. A collective: every rank
    of the model's group calls it, each with its own users (maybe none). ``model`` must be in
    eval mode (no noise or dropout), as for ``recommend_top_k``.

    Returns:
        ``(items, valid)``: ``users x min(k, num_items)`` global item ids and a mask that is
        False where a user has fewer items left to recommend.
    """
    ownership = model.ownership
    world, k = ownership.world, min(k, ownership.num_items)
    codes, routes = model.encode(
        torch.from_numpy(row_numbers(rows.indptr)).to(device),
        torch.from_numpy(np.array(rows.indices, dtype=np.int64)).to(device),
        torch.from_numpy(np.array(rows.values, dtype=np.float32)).to(device),
        len(rows),
        users=torch.from_numpy(np.array(rows.users, dtype=np.int64)).to(device),
    )
    all_codes = comm.gather_rows(codes, routes.batch_sizes, routes.group)
    widths = [min(k, ownership.rows_of(owner)) for owner in range(world)]
    mine = widths[routes.rank]
    top_scores, top_rows = _owned_top_k(model, all_codes, routes, mine, compiled)
    top_ids = ownership.global_ids(routes.rank, top_rows)

    # Each user's candidates to its rank: from each owner, widths[owner] a user.
    users = routes.batch_sizes[routes.rank]
    send = [n * mine for n in routes.batch_sizes]
    recv = [users * width for width in widths]
    got_scores = comm.all_to_all(top_scores.reshape(-1), send, recv, routes.group)
    got_ids = comm.all_to_all(top_ids.reshape(-1), send, recv, routes.group)
    merged_scores, merged_items = merge_top_k(
        torch.cat([b.view(users, w) for b, w in zip(got_scores.split(recv), widths)], 1),
        torch.cat([b.view(users, w) for b, w in zip(got_ids.split(recv), widths)], 1),
        k,
    )
    return merged_items, merged_scores > -torch.inf


def _owned_top_k(model, all_codes, routes, width: int, compiled: bool):
    """This owner's ``width`` best rows for every user of the step (their scores, and their
    rows in the shard), the inputs' items that it owns excluded. Scored one source rank's
    users at a time: ``batch x rows owned`` floats at once, which shrink with the world, not
    ``global batch x rows owned`` (the memory of one process scoring the whole catalog)."""
    decoder, bias = model.decoder_embedding.weight, model.decoder_bias.weight
    sizes = torch.tensor(routes.batch_sizes, device=all_codes.device)
    starts = sizes.cumsum(0) - sizes
    # The received entries come by user (nondecreasing): each source's are one run of them.
    bounds = torch.searchsorted(routes.users, torch.cat([starts, starts[-1:] + sizes[-1:]]))
    bounds, starts = bounds.tolist(), starts.tolist()
    scores_out, rows_out = [], []
    for source, size in enumerate(routes.batch_sizes):
        scores = torch.addmm(
            bias.squeeze(1), all_codes[starts[source] : starts[source] + size], decoder.t()
        )
        entries = slice(bounds[source], bounds[source + 1])
        scores[routes.users[entries] - starts[source], routes.local_rows[entries]] = -torch.inf
        if width:
            values, rows = top_k(scores, width, compiled=compiled)
        else:  # a rank of no rows (fewer items than ranks)
            values = scores.new_empty((size, 0))
            rows = torch.empty((size, 0), dtype=torch.int64, device=scores.device)
        scores_out.append(values)
        rows_out.append(rows)
    return torch.cat(scores_out), torch.cat(rows_out)


def sharded_eval_sums(
    model: ShardedModel,
    batches: Sequence[tuple[UserRows, UserRows]],
    metrics: list[Metric],
    k: int,
    device,
    *,
    compiled: bool = True,
) -> tuple[np.ndarray, int]:
    """This rank's metric sums and users over its ``batches`` of ``(inputs, targets)``
    (``batches_metric_sums`` with the lists of ``sharded_top_k``).

    Ranks hold different numbers of batches: they agree on the most (one all-reduce), and a
    rank past its last batch takes part with no users, so that every rank joins every
    collective. A collective.
    """
    count = torch.tensor([len(batches)], dtype=torch.int64, device=device)
    dist.all_reduce(count, op=dist.ReduceOp.MAX, group=model.group)
    padded = [*batches, *[(no_users(), no_users())] * (int(count.item()) - len(batches))]
    return batches_metric_sums(
        model,
        padded,
        metrics,
        k,
        model.ownership.num_items,
        device,
        top_k_of=lambda rows: sharded_top_k(model, rows, k, device, compiled=compiled),
    )
