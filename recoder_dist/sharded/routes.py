"""Where a step's entries go: each ``(user row, item, value)`` of a rank's batch to the item's
owner, and the sizes of every exchange that the encoder and the decoder make with them.

Computed once a step (one exchange of counts, one of indices); the encoder's input values and
the decoder's targets then travel the same route (``EntryRoutes.to_owners``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from recoder_dist.sharded import comm
from recoder_dist.sharded.ownership import Ownership


@dataclass(frozen=True)
class EntryRoutes:
    """A step's routing, on one rank.

    Attributes:
        ownership: the rule that places item rows.
        rank: this rank.
        batch_sizes: every rank's users this step, in rank order.
        order: this rank's entries sorted by owner (stable: row-major within an owner).
        send_counts: entries this rank sends to each owner.
        recv_counts: entries each rank sends to this one.
        users: the received entries' users, numbered in the step's global batch (rank 0's
            users, then rank 1's, ...), nondecreasing.
        local_rows: the received entries' rows in this rank's shard.
        bag_of_entry: the received entries' pooling bag (a distinct user, numbered in order).
        bag_users: each bag's user in the global batch.
        bag_counts: bags of each source rank (what the owner sends back to each).
        home_rows: this rank's rows that have entries at each owner, owner by owner (the
            order in which the owners' partial codes arrive).
        home_counts: rows of ``home_rows`` per owner.
        sampled_rows: local rows of the items that some rank's sampling group scores beyond
            its entries' (None when no rank gave ``sampled``).
    """

    ownership: Ownership
    rank: int
    batch_sizes: list[int]
    order: torch.Tensor
    send_counts: list[int]
    recv_counts: list[int]
    users: torch.Tensor
    local_rows: torch.Tensor
    bag_of_entry: torch.Tensor
    bag_users: torch.Tensor
    bag_counts: list[int]
    home_rows: torch.Tensor
    home_counts: list[int]
    group: object = None
    sampled_rows: torch.Tensor | None = None
    # scored_items's answers (the encoder and the decoder ask the same question each step).
    _scored: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def num_users(self) -> int:
        """Users of the step's global batch (every rank's)."""
        return sum(self.batch_sizes)

    @property
    def offset(self) -> int:
        """This rank's first user in the global batch."""
        return sum(self.batch_sizes[: self.rank])

    def scored_items(self, shard_rows: int, negative_sampling: bool):
        """The step's items on this owner (local rows, sorted) and each received entry's
        column among them: with negative sampling, the union of every rank's batch items
        (here, the rows that received entries or were sampled); without, every row of the
        shard."""
        key = (shard_rows, negative_sampling)
        if key not in self._scored:
            self._scored[key] = self._scored_items(shard_rows, negative_sampling)
        return self._scored[key]

    def _scored_items(self, shard_rows: int, negative_sampling: bool):
        if negative_sampling and self.sampled_rows is not None:
            rows = torch.cat([self.local_rows, self.sampled_rows])
            items, columns = torch.unique(rows, return_inverse=True)
            return items, columns[: len(self.local_rows)]
        if negative_sampling:
            return torch.unique(self.local_rows, return_inverse=True)
        return torch.arange(shard_rows, device=self.local_rows.device), self.local_rows

    def to_owners(self, values: torch.Tensor) -> torch.Tensor:
        """Entry-aligned ``values`` (``entries`` or ``entries x k``) moved to the entries'
        owners; returns the received values, aligned with ``users`` and ``local_rows``."""
        return comm.all_to_all(
            values.index_select(0, self.order), self.send_counts, self.recv_counts, self.group
        )


def route_entries(
    rows: torch.Tensor,
    items: torch.Tensor,
    num_users: int,
    ownership: Ownership,
    group=None,
    sampled: torch.Tensor | None = None,
) -> EntryRoutes:
    """The routes of this rank's batch entries (a collective: every rank calls it).

    Args:
        rows: each entry's user row in this rank's batch, nondecreasing (row-major entries,
            as the collator builds them).
        items: each entry's global item id.
        num_users: users in this rank's batch (0 is allowed: the rank still takes part).
        ownership: where the rows of the item tables live; its world is the group's size.
        group: the process group of the shards (None: the default group).
        sampled: the global ids that this rank's sampling group scores, when a step scores
            more items than its entries' (a sampling group larger than the batch: every
            batch of the group scores the group's items). Every rank gives it, or none.

    Raises:
        ValueError: rows out of order or out of range, ids outside the catalog, or a world
            that is not the group's.
    """
    rank, world = comm.rank_and_world(group)
    if ownership.world != world:
        raise ValueError(f"ownership is for {ownership.world} ranks, the group has {world}")
    if rows.shape != items.shape or rows.dim() != 1:
        raise ValueError(
            f"rows and items must be 1-D of one length, got {rows.shape}/{items.shape}"
        )
    if rows.numel():
        if int(rows.min()) < 0 or int(rows.max()) >= num_users:
            raise ValueError(f"entry rows must be in [0, num_users={num_users})")
        if bool((rows[1:] < rows[:-1]).any()):
            raise ValueError("entry rows must be nondecreasing (row-major entries)")
    ownership.check_ids(items)
    if sampled is not None:
        ownership.check_ids(sampled)
    device = rows.device
    batch_sizes = comm.all_sizes(num_users, device, group)

    owners = ownership.owner(items)
    sent = torch.stack([rows, ownership.local_index(items)], 1)
    received, order, send_counts, recv_counts = _to_owners(sent, owners, world, group)
    offsets = torch.tensor([0, *batch_sizes[:-1]], device=device).cumsum(0)
    sources = torch.repeat_interleave(
        torch.arange(world, device=device), torch.tensor(recv_counts, device=device)
    )
    users = received[:, 0] + offsets.index_select(0, sources)

    # One pooling bag per (source, user): the users arrive sorted, so the bags are runs.
    bag_users, bag_of_entry = torch.unique_consecutive(users, return_inverse=True)
    bag_sources = torch.bucketize(bag_users, offsets, right=True) - 1
    bag_counts = torch.bincount(bag_sources, minlength=world).tolist()

    # The same runs seen from home: this rank's distinct rows per owner, in the owners' order.
    sorted_rows, sorted_owners = rows.index_select(0, order), owners.index_select(0, order)
    key = sorted_owners * max(num_users, 1) + sorted_rows
    home_keys = torch.unique_consecutive(key)
    home_rows = home_keys % max(num_users, 1)
    home_counts = torch.bincount(
        torch.div(home_keys, max(num_users, 1), rounding_mode="floor"), minlength=world
    ).tolist()
    sampled_rows = None
    if sampled is not None:
        sampled_rows = _to_owners(
            ownership.local_index(sampled), ownership.owner(sampled), world, group
        )[0]
    return EntryRoutes(
        ownership=ownership,
        rank=rank,
        batch_sizes=batch_sizes,
        order=order,
        send_counts=send_counts,
        recv_counts=recv_counts,
        users=users,
        local_rows=received[:, 1],
        bag_of_entry=bag_of_entry,
        bag_users=bag_users,
        bag_counts=bag_counts,
        home_rows=home_rows,
        home_counts=home_counts,
        group=group,
        sampled_rows=sampled_rows,
    )


def _to_owners(values: torch.Tensor, owners: torch.Tensor, world: int, group):
    """``values`` (a row per item) sent to their items' ``owners``, stably sorted by owner
    (the counts travel first); returns the rows received by source rank, the sending order,
    and the counts sent to and received from each rank."""
    order = torch.argsort(owners, stable=True)
    send = torch.bincount(owners, minlength=world)
    send_counts = send.tolist()
    recv_counts = comm.exchange_counts(send, group).tolist()
    received = comm.all_to_all(values.index_select(0, order), send_counts, recv_counts, group)
    return received, order, send_counts, recv_counts
