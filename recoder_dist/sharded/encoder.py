"""The encoder's input layer over a sharded table: ``normalize(x) @ E`` pooled where E's rows are.

Each owner pools its own rows for every (source rank, user) that has entries on it, and sends
the partial sums home, where they are added: no table row crosses the wire, only entries and
one ``hidden``-float partial per (user, owner) pair with entries (at most ``world`` a user, and
at most one per entry). The backward runs the same way in reverse (``comm.all_to_all_rows``):
each partial's gradient goes to its owner, and the rows' gradients stay there.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from recoder_dist.nn.autoencoder import bag_offsets
from recoder_dist.sharded import comm
from recoder_dist.sharded.routes import EntryRoutes
from recoder_dist.sharded.tables import ShardedTable


def normalized_values(rows: torch.Tensor, values: torch.Tensor, num_users: int) -> torch.Tensor:
    """Each entry's value divided by its row's L2 norm (``F.normalize(x, dim=1)``: clamped at
    1e-12), computed on the user's rank, where the whole row is."""
    norms = values.new_zeros(num_users).index_add_(0, rows, values * values)
    return values / norms.sqrt().clamp_min(1e-12).index_select(0, rows)


def input_noise(values: torch.Tensor, noise_prob: float, keep: torch.Tensor | None = None):
    """Dropout of the input entries (``nn.Dropout(noise_prob)`` on the non-zeros), drawn on the
    user's rank. ``keep`` (a boolean mask per entry) replaces the draw: N ranks draw from other
    streams than one process, so equality with a single process is tested with the mask given.
    """
    if noise_prob == 0:
        return values
    if keep is None:
        keep = torch.rand_like(values) >= noise_prob
    return values * keep / (1 - noise_prob)


def sharded_pooling(
    table: ShardedTable, routes: EntryRoutes, values: torch.Tensor, negative_sampling: bool = True
):
    """``S @ E`` for this rank's users, where ``S`` holds the batch's entries with ``values``
    (already normalized and noised) and ``E`` is the table sharded over the ranks.

    A collective: every rank calls it, with its own batch.

    Args:
        table: this rank's shard of the encoder's item table.
        routes: the step's routes (``route_entries``).
        values: this rank's entry values, aligned with the ``rows``/``items`` given to
            ``route_entries`` (no gradient flows to them).
        negative_sampling: as the decoder's: which rows the lookup reads (and a sparse
            gradient lists), the step's items or all; one process's DynamicAutoencoder reads
            the same, and SparseAdam moves every listed row, zero gradient or not.

    Returns:
        ``num_users x dim``: the pooled rows of this rank's users (zeros for a user without
        entries); differentiable in every shard's rows.
    """
    received = routes.to_owners(values.detach())
    # A lookup of the scored rows, then a bag sum over them: the shard gets a gradient on the
    # rows that one process's table gets one on (zero rows included), and no entry's row is
    # ever materialized (entries x dim: most of a step's time when it was).
    items, columns = routes.scored_items(len(table.weight), negative_sampling)
    offsets = bag_offsets(routes.bag_of_entry, len(routes.bag_users))  # entries come by bag
    partials = F.embedding_bag(
        columns, table(items), offsets, mode="sum", per_sample_weights=received
    )
    returned = comm.all_to_all_rows(partials, routes.bag_counts, routes.home_counts, routes.group)
    num_users = routes.batch_sizes[routes.rank]
    return returned.new_zeros((num_users, table.dim)).index_add(0, routes.home_rows, returned)
