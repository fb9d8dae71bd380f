"""An item table of which this rank holds only its own rows, made and saved shard by shard.

Initialization: ``xavier_uniform`` over the full table's shape, drawn from a seeded CPU
generator chunk by chunk in row order, each rank keeping its rows of each chunk. The union of
the shards is then exactly ``nn.init.xavier_uniform_(torch.empty(num_items, dim),
generator=torch.Generator().manual_seed(seed))`` (a CPU uniform draw of a chunk continues the
stream of the previous one), and no rank ever holds more than one chunk beyond its shard. Every
rank draws the whole stream (the draws are cheap next to the memory they would take), so each
shard is the same whatever the world size.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from recoder_dist.sharded.ownership import Ownership

CHUNK_ROWS = 1 << 16


class ShardedTable(nn.Embedding):
    """Rows ``rank, rank + world, ...`` of a ``num_items x dim`` table: an ``nn.Embedding`` of
    the shard's rows, so that the project's optimizers (SparseAdam for ``sparse``) and a model's
    ``state_dict`` see it as they see a whole table, under the same name.

    Args:
        num_items: rows of the full table.
        dim: columns.
        rank: this rank's place in the group of shards.
        world: ranks in the group.
        sparse: give the rows sparse gradients (``nn.Embedding(sparse=True)``: the project's
            optimizers route it to SparseAdam).
        init: ``"xavier"`` (seeded, as the module docstring says), ``"zeros"``, or None (left
            uninitialized: rows to be loaded, e.g. ``load_full``).
        seed: the generator's seed for ``"xavier"``.
        device: where the shard lives.
    """

    def __init__(
        self,
        num_items: int,
        dim: int,
        *,
        rank: int,
        world: int,
        sparse: bool = False,
        init: str | None = "xavier",
        seed: int = 0,
        device: torch.device | str | None = None,
    ):
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        if init not in ("xavier", "zeros", None):
            raise ValueError(f"init must be 'xavier', 'zeros' or None, got {init!r}")
        ownership = Ownership(num_items, world)
        rows = ownership.rows_of(rank)
        # An explicit weight: nn.Embedding's own (normal) initialization would be thrown away.
        super().__init__(rows, dim, sparse=sparse, _weight=torch.empty(rows, dim, device=device))
        self.ownership = ownership
        self.rank = rank
        self.num_items, self.dim = int(num_items), int(dim)
        self.init, self.seed = init, seed
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Draws the shard (see the module docstring); a no-op for ``init=None``."""
        weight = self.weight
        if self.init is None:
            return
        if self.init == "zeros":
            weight.zero_()
            return
        # torch's xavier bound for a 2-D (num_items x dim) weight: fan_in dim, fan_out rows.
        bound = math.sqrt(6.0 / (self.dim + self.num_items))
        generator = torch.Generator().manual_seed(self.seed)
        world = self.ownership.world
        for start in range(0, self.num_items, CHUNK_ROWS):
            stop = min(start + CHUNK_ROWS, self.num_items)
            chunk = torch.empty(stop - start, self.dim).uniform_(-bound, bound, generator=generator)
            first = start + (self.rank - start) % world  # this rank's first id in the chunk
            mine = chunk[first - start :: world]
            weight[first // world : first // world + len(mine)] = mine.to(weight)

    def shard_state(self) -> dict:
        """This shard alone, with what is needed to place its rows in any other layout."""
        return dict(
            num_items=self.num_items,
            world=self.ownership.world,
            rank=self.rank,
            weight=self.weight.detach().cpu().clone(),
        )

    @torch.no_grad()
    def load_shard_states(self, states) -> None:
        """Takes this rank's rows from shards saved by any world size (resharding). ``states``
        (``shard_state`` dicts) may be an iterable that loads one saved shard at a time.

        Raises:
            ValueError: a shard of another table, or rows of this shard that no state had.
        """

        def pieces():  # checked one at a time, as they are read
            for state in states:
                if state["num_items"] != self.num_items or state["weight"].shape[1:] != (self.dim,):
                    raise ValueError(
                        f"a shard of a {state['num_items']} x {state['weight'].shape[1]} table "
                        f"for a {self.num_items} x {self.dim} one"
                    )
                yield state["rank"], state["world"], state["weight"]

        self.weight.copy_(reshard_rows(pieces(), self.ownership, self.rank))

    @torch.no_grad()
    def load_full(self, full: torch.Tensor) -> None:
        """Takes this rank's rows of a full ``num_items x dim`` table."""
        if tuple(full.shape) != (self.num_items, self.dim):
            raise ValueError(f"a {tuple(full.shape)} table for {self.num_items} x {self.dim}")
        self.weight.copy_(full[self.rank :: self.ownership.world])


def reshard_rows(pieces, ownership: Ownership, rank: int) -> torch.Tensor:
    """Rank ``rank``'s rows under ``ownership``, from rows saved under other layouts: any
    per-item tensor (a table, or its optimizer's moments) saved shard by shard.

    Args:
        pieces: ``(saved_rank, saved_world, rows)`` for every saved shard (an iterable: one
            shard in memory at a time), ``rows[j]`` being item ``saved_rank + j * saved_world``.
        ownership: the new layout.
        rank: the rank whose rows to build.

    Raises:
        ValueError: when the pieces leave some of the rank's rows unfilled.
    """
    out, filled = None, 0
    for saved_rank, saved_world, rows in pieces:
        if out is None:
            out = rows.new_empty((ownership.rows_of(rank), *rows.shape[1:]))
        ids = Ownership(ownership.num_items, saved_world).global_ids(saved_rank)
        if len(ids) != len(rows):
            raise ValueError(f"a saved shard of {len(rows)} rows where its layout has {len(ids)}")
        mine = ownership.owner(ids) == rank
        out[ownership.local_index(ids[mine])] = rows[mine]
        filled += int(mine.sum())
    if out is None or filled != len(out):
        raise ValueError(
            f"the shards gave {filled} of rank {rank}'s {ownership.rows_of(rank)} rows"
        )
    return out
