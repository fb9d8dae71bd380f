"""MatrixFactorization over sharded tables: the user table and both item tables hold only this
rank's rows (user ``u`` on rank ``u % world``, item ``i`` on ``i % world``).

A step, as one process's MatrixFactorization on the global batch:

1. The users' rows: each rank sends its users' ids to their rows' owners, which send the rows
   back (the encoder's pooling with one entry a user, ``sharded_pooling``); their gradients go
   back the same way, so a user row is updated only by its owner. Why not keep each user on the
   rank that owns its row for the whole run: Ray Data hands a worker whatever blocks its split
   gives it, not fixed users, and the rows' trip costs ``batch x size`` floats each way, no
   more than the codes' exchange that the decoder makes anyway.
2. The codes, ``dropout(act(user row))``, on the user's rank.
3. The decoder of every sharded model (``sharded.decoder``): each item owner scores its items
   ``bias + codes @ item_vectors.T`` for every rank's users.
"""

from __future__ import annotations

import torch
from torch import nn

from recoder_dist.nn.base import activation
from recoder_dist.sharded.encoder import sharded_pooling
from recoder_dist.sharded.model import ShardedModel
from recoder_dist.sharded.ownership import Ownership
from recoder_dist.sharded.routes import EntryRoutes, route_entries
from recoder_dist.sharded.tables import ShardedTable


class ShardedFactorization(ShardedModel):
    """A MatrixFactorization whose three tables hold only this rank's rows.

    Its parameters have MatrixFactorization's names, in its order: the state of a whole model
    (its ``state_dict``, and its optimizers' states) is this model's with each table's rows
    ``rank::world`` (see ``recoder_dist.sharded.state``).

    Args:
        num_items: catalog size.
        num_users: users of the user table.
        embedding_size: as MatrixFactorization's.
        activation_type: as MatrixFactorization's (on the user rows).
        dropout_prob: dropout on the user rows (drawn on the user's rank).
        sparse: sparse gradients for the tables.
        seed: the initialization seed: the user table draws from ``seed``, the item table from
            ``seed + 1`` (xavier, as MatrixFactorization's; the item bias starts at zero).
            None: the tables are left uninitialized (their rows are to be loaded).
        group: the process group of the shards (None: the default group).
        replica_group: the 2D layout's group of replicas (see ``ShardedModel``).
        device: where the model lives.
    """

    def __init__(
        self,
        num_items: int,
        num_users: int,
        embedding_size: int,
        *,
        activation_type: str = "none",
        dropout_prob: float = 0.0,
        sparse: bool = False,
        seed: int | None = 0,
        group=None,
        replica_group=None,
        device: torch.device | str | None = None,
    ):
        super().__init__(group, replica_group)
        self.ownership = Ownership(num_items, self.world)
        self.user_ownership = Ownership(num_users, self.world)
        self.act = activation(activation_type)
        self.dropout = nn.Dropout(dropout_prob)
        table = dict(rank=self.rank, world=self.world, sparse=sparse, device=device)
        xavier = None if seed is None else "xavier"
        # Registered in MatrixFactorization's order, under its names.
        self.user_embedding = ShardedTable(
            num_users, embedding_size, init=xavier, seed=seed or 0, **table
        )
        self.item_embedding = ShardedTable(
            num_items, embedding_size, init=xavier, seed=(seed or 0) + 1, **table
        )
        self.item_bias = ShardedTable(num_items, 1, init="zeros", **table)

    @classmethod
    def of(cls, model, **placement) -> ShardedFactorization:
        """See ``ShardedModel.of``: ``model`` is a MatrixFactorization."""
        params = model.model_params()
        return cls(
            model.num_items,
            model.num_users,
            params["embedding_size"],
            activation_type=params["activation_type"],
            dropout_prob=params["dropout_prob"],
            sparse=params["sparse"],
            **placement,
        )

    @property
    def decoder_embedding(self) -> ShardedTable:
        """The item vectors that score (``ShardedModel``'s name)."""
        return self.item_embedding

    @property
    def decoder_bias(self) -> ShardedTable:
        """The item biases (``ShardedModel``'s name)."""
        return self.item_bias

    def encode(
        self,
        rows: torch.Tensor,
        items: torch.Tensor,
        values: torch.Tensor,
        num_users: int,
        negative_sampling: bool = True,
        *,
        users: torch.Tensor | None = None,
        keep: torch.Tensor | None = None,
        sampled: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, EntryRoutes]:
        """The codes of this rank's ``num_users`` users (``users``: their global ids), read
        from their owners' rows, and the routes of their entries to the items' owners (the
        decoder's). MatrixFactorization has no input noise: ``keep`` must be None. A
        collective.

        Raises:
            ValueError: no ``users``, or not one a row.
        """
        if users is None or users.shape != (num_users,):
            raise ValueError(
                f"ShardedFactorization reads its users' rows: pass users, one id for each of "
                f"the {num_users} rows (got {None if users is None else tuple(users.shape)})"
            )
        if keep is not None:
            raise ValueError("MatrixFactorization has no input noise: keep must be None")
        routes = route_entries(rows, items, num_users, self.ownership, self.group, sampled)
        one_each = torch.arange(num_users, device=users.device)
        user_routes = route_entries(one_each, users, num_users, self.user_ownership, self.group)
        user_rows = sharded_pooling(
            self.user_embedding, user_routes, torch.ones(num_users, device=users.device)
        )
        return self.dropout(self.act(user_rows)), routes
