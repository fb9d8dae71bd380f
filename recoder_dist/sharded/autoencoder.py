"""DynamicAutoencoder's step over sharded item tables: the tables sharded, the dense layers
data-parallel (each rank a copy; their gradients all-reduced as DDP does).

The same computation as ``recoder_dist.nn.autoencoder.DynamicAutoencoder`` on the global batch
(every rank's users), composed from this package's blocks: entries routed to owners, pooled
there, the dense layers on each user's rank, the loss scored at the owners.
"""

from __future__ import annotations

import torch
from torch import nn

from recoder_dist.nn.autoencoder import dense_codes
from recoder_dist.nn.base import activation, seeded_dense_
from recoder_dist.sharded.encoder import input_noise, normalized_values, sharded_pooling
from recoder_dist.sharded.model import ShardedModel
from recoder_dist.sharded.ownership import Ownership
from recoder_dist.sharded.routes import EntryRoutes, route_entries
from recoder_dist.sharded.tables import ShardedTable


class ShardedAutoencoder(ShardedModel):
    """A DynamicAutoencoder whose three item tables hold only this rank's rows.

    Its parameters have DynamicAutoencoder's names, in its order: the state of a whole model
    (its ``state_dict``, and its optimizers' states) is this model's with each table's rows
    ``rank::world`` (see ``recoder_dist.sharded.state``).

    Args:
        num_items: catalog size.
        hidden_layers: as DynamicAutoencoder's.
        activation_type: as DynamicAutoencoder's.
        is_constrained: tie the decoder's item vectors to the encoder's (one sharded table).
        dropout_prob: dropout on the code (drawn on the user's rank).
        noise_prob: dropout on the normalized input entries (drawn on the user's rank).
        sparse: sparse gradients for the item tables.
        seed: the initialization seed: the encoder's table draws from ``seed``, the
            decoder's from ``seed + 1``, the dense layers from ``seed + 2`` (the same on every
            rank, with no broadcast; xavier weights and zero biases, as DynamicAutoencoder's).
            None: the tables are left uninitialized (their rows are to be loaded).
        group: the process group of the shards (None: the default group).
        replica_group: in the 2D layout (``sharded.replicas``), the group of this rank's
            replicas, the ranks of the other groups that hold the same rows; None: no replicas.
        device: where the model lives.
    """

    def __init__(
        self,
        num_items: int,
        hidden_layers: list[int],
        *,
        activation_type: str = "tanh",
        is_constrained: bool = False,
        dropout_prob: float = 0.0,
        noise_prob: float = 0.0,
        sparse: bool = False,
        seed: int | None = 0,
        group=None,
        replica_group=None,
        device: torch.device | str | None = None,
    ):
        super().__init__(group, replica_group)
        rank, world = self.rank, self.world
        self.noise_prob = noise_prob
        self.ownership = Ownership(num_items, world)
        sizes = [int(h) for h in hidden_layers]
        self.act = activation(activation_type)
        self.dropout = nn.Dropout(dropout_prob)
        self.is_constrained = is_constrained
        table = dict(rank=rank, world=world, sparse=sparse, device=device)
        xavier = None if seed is None else "xavier"
        # Registered in DynamicAutoencoder's order, under its names (see the class docstring).
        self.encoder_embedding = ShardedTable(
            num_items, sizes[0], init=xavier, seed=seed or 0, **table
        )
        self.encoder_bias = nn.Parameter(torch.zeros(sizes[0], device=device))
        self.encoder_layers = nn.ModuleList(
            nn.Linear(a, b, device=device) for a, b in zip(sizes[:-1], sizes[1:])
        )
        if is_constrained:
            self.decoder_biases = nn.ParameterList(
                nn.Parameter(torch.zeros(n, device=device)) for n in reversed(sizes[:-1])
            )
            self.decoder_embedding = self.encoder_embedding
        else:
            self.decoder_layers = nn.ModuleList(
                nn.Linear(a, b, device=device)
                for a, b in zip(reversed(sizes[1:]), reversed(sizes[:-1]))
            )
            self.decoder_embedding = ShardedTable(
                num_items, sizes[0], init=xavier, seed=(seed or 0) + 1, **table
            )
        self.decoder_bias = ShardedTable(num_items, 1, init="zeros", **table)
        seeded_dense_(self, (seed or 0) + 2)

    @classmethod
    def of(cls, model, **placement) -> ShardedAutoencoder:
        """See ``ShardedModel.of``: ``model`` is a DynamicAutoencoder."""
        params = model.model_params()
        return cls(
            model.num_items,
            params["hidden_layers"],
            activation_type=params["activation_type"],
            is_constrained=params["is_constrained"],
            dropout_prob=params["dropout_prob"],
            noise_prob=params["noise_prob"],
            sparse=params["sparse"],
            **placement,
        )

    def codes(self, pooled: torch.Tensor) -> torch.Tensor:
        """The dense layers on this rank's users: DynamicAutoencoder's path after the pooling."""
        return dense_codes(self, pooled)

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
        """The codes (the decoder's last hidden layer) of this rank's users, from their
        entries (``rows``, global ``items``, ``values``, as ``loss`` takes them), and the
        step's routes. Input noise (``keep``, drawn when None) only in training mode; the
        users' ids are not read (an autoencoder encodes any user from its row). A
        collective."""
        routes = route_entries(rows, items, num_users, self.ownership, self.group, sampled)
        inputs = normalized_values(rows, values, num_users)
        if self.training:
            inputs = input_noise(inputs, self.noise_prob, keep)
        pooled = sharded_pooling(self.encoder_embedding, routes, inputs, negative_sampling)
        return self.codes(pooled), routes
