"""Which rank owns which item row: item ``i`` lives on rank ``i % world`` at row ``i // world``.

Why modulo and not contiguous ranges: item ids are usually numbered in order of first
appearance or of popularity, so a range split would put the popular head on one rank. Modulo
deals the ids round-robin, so every rank gets every ``world``-th id of the head and of the tail
(the rows a step touches per rank, on Gowalla and a Zipf catalog: benchmarks/RESULTS.md, "the
sharded path"). Structure in the ids shows up directly (as in the synthetic 1M catalog's
generator, whose rounded draws crowd one rank); a hash would hide it but would need a lookup
table to map back to a local row, where modulo maps both ways in arithmetic: renumber the
items at random once, where ids may carry structure.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Ownership:
    """The modulo rule for a catalog of ``num_items`` over ``world`` ranks.

    Args:
        num_items: rows of every item table.
        world: number of ranks that share the rows.
    """

    num_items: int
    world: int

    def __post_init__(self):
        if isinstance(self.num_items, bool) or int(self.num_items) < 1:
            raise ValueError(f"num_items must be >= 1, got {self.num_items}")
        if isinstance(self.world, bool) or int(self.world) < 1:
            raise ValueError(f"world must be >= 1, got {self.world}")

    def rows_of(self, rank: int) -> int:
        """How many rows rank ``rank`` holds: ``ceil((num_items - rank) / world)``."""
        self._check_rank(rank)
        return max(0, -(-(self.num_items - rank) // self.world))

    def owner(self, items: torch.Tensor) -> torch.Tensor:
        """The owning rank of each global id."""
        return torch.remainder(items, self.world)

    def local_index(self, items: torch.Tensor) -> torch.Tensor:
        """Each global id's row in its owner's shard."""
        return torch.div(items, self.world, rounding_mode="floor")

    def global_ids(self, rank: int, local: torch.Tensor | None = None) -> torch.Tensor:
        """The global ids of rank ``rank``'s rows ``local`` (all its rows when None)."""
        self._check_rank(rank)
        if local is None:
            local = torch.arange(self.rows_of(rank))
        return local * self.world + rank

    def check_ids(self, items: torch.Tensor) -> None:
        """Raises ValueError if an id is outside ``[0, num_items)``."""
        if items.numel() and not (int(items.min()) >= 0 and int(items.max()) < self.num_items):
            raise ValueError(f"item ids must be in [0, num_items={self.num_items})")

    def _check_rank(self, rank: int) -> None:
        if not 0 <= rank < self.world:
            raise ValueError(f"rank must be in [0, world={self.world}), got {rank}")


def balance(items_per_step: list[np.ndarray], num_items: int, world: int) -> dict:
    """How evenly the modulo rule spreads a catalog and the rows that steps touch.

    Args:
        items_per_step: for each step, the distinct global ids that the step touches.
        num_items: catalog size.
        world: number of ranks.

    Returns:
        ``rows``: rows held per rank; ``touched``: mean rows touched per rank a step;
        ``max_over_mean``: the most loaded rank's touched rows over the mean, averaged over steps
        (1.0 is perfect balance; the step waits for the most loaded rank).
    """
    rule = Ownership(num_items, world)
    rows = np.array([rule.rows_of(r) for r in range(world)])
    touched = np.zeros(world)
    ratios = []
    for items in items_per_step:
        counts = np.bincount(np.asarray(items) % world, minlength=world)
        touched += counts
        ratios.append(counts.max() / max(counts.mean(), 1e-12))
    return dict(
        rows=rows,
        touched=touched / max(len(items_per_step), 1),
        max_over_mean=float(np.mean(ratios)) if ratios else 1.0,
    )
