"""DynamicAutoencoder's step over sharded item tables: the tables sharded, the dense layers
data-parallel (each rank a copy; their gradients all-reduced as DDP does).

The same computation as ``recoder_dist.nn.autoencoder.DynamicAutoencoder`` on the global batch
(every rank's users), composed from this package's blocks: entries routed to owners, pooled
there, the dense layers on each user's rank, the loss scored at the owners.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from recoder_dist.nn.autoencoder import dense_codes
from recoder_dist.nn.base import activation
from recoder_dist.sharded import comm
from recoder_dist.sharded.decoder import sharded_loss
from recoder_dist.sharded.encoder import input_noise, normalized_values, sharded_pooling
from recoder_dist.sharded.ownership import Ownership
from recoder_dist.sharded.routes import route_entries
from recoder_dist.sharded.tables import ShardedTable


class ShardedAutoencoder(nn.Module):
    """A DynamicAutoencoder whose three item tables hold only this rank's rows.

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
        group: the process group of the shards (None: the default group).
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
        seed: int = 0,
        group=None,
    ):
        super().__init__()
        rank, world = comm.rank_and_world(group)
        self.group, self.noise_prob = group, noise_prob
        self.ownership = Ownership(num_items, world)
        sizes = [int(h) for h in hidden_layers]
        self.act = activation(activation_type)
        self.dropout = nn.Dropout(dropout_prob)
        self.is_constrained = is_constrained
        table = dict(rank=rank, world=world, sparse=sparse)
        self.encoder_table = ShardedTable(num_items, sizes[0], seed=seed, **table)
        self.decoder_table = (
            self.encoder_table
            if is_constrained
            else ShardedTable(num_items, sizes[0], seed=seed + 1, **table)
        )
        self.bias_table = ShardedTable(num_items, 1, init="zeros", **table)
        self.encoder_bias = nn.Parameter(torch.zeros(sizes[0]))
        self.encoder_layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))
        if is_constrained:
            self.decoder_biases = nn.ParameterList(
                nn.Parameter(torch.zeros(n)) for n in reversed(sizes[:-1])
            )
        else:
            self.decoder_layers = nn.ModuleList(
                nn.Linear(a, b) for a, b in zip(reversed(sizes[1:]), reversed(sizes[:-1]))
            )
        generator = torch.Generator().manual_seed(seed + 2)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight, generator=generator)
                nn.init.zeros_(module.bias)

    def dense_parameters(self) -> list[nn.Parameter]:
        """The data-parallel parameters (everything but the item tables)."""
        tables = {id(p) for t in self.tables() for p in t.parameters()}
        return [p for p in self.parameters() if id(p) not in tables]

    def tables(self) -> list[ShardedTable]:
        """The distinct sharded tables (two when the decoder is tied to the encoder)."""
        return list(
            {id(t): t for t in (self.encoder_table, self.decoder_table, self.bias_table)}.values()
        )

    @torch.no_grad()
    def load_from(self, model) -> None:
        """This rank's rows and the dense layers of a whole DynamicAutoencoder (a model that
        fits in one process: tests, and today's snapshots)."""
        self.encoder_table.load_full(model.encoder_embedding.weight)
        self.decoder_table.load_full(model.decoder_embedding.weight)
        self.bias_table.load_full(model.decoder_bias.weight)
        self.encoder_bias.copy_(model.encoder_bias)
        for mine, theirs in zip(self.encoder_layers, model.encoder_layers):
            mine.load_state_dict(theirs.state_dict())
        if self.is_constrained:
            for mine, theirs in zip(self.decoder_biases, model.decoder_biases):
                mine.copy_(theirs)
        else:
            for mine, theirs in zip(self.decoder_layers, model.decoder_layers):
                mine.load_state_dict(theirs.state_dict())

    def codes(self, pooled: torch.Tensor) -> torch.Tensor:
        """The dense layers on this rank's users: DynamicAutoencoder's path after the pooling."""
        return dense_codes(self, pooled)

    def loss(
        self,
        rows: torch.Tensor,
        items: torch.Tensor,
        values: torch.Tensor,
        num_users: int,
        *,
        loss: str | nn.Module = "mse",
        loss_params: dict | None = None,
        negative_sampling: bool = True,
        keep: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One step's loss on this rank's batch (entries ``rows``, global ``items``,
        ``values``), as DynamicAutoencoder's ``batch_loss`` on the global batch.

        ``keep`` is the input noise's mask per entry (drawn here when None). Returns
        ``(share, total)`` as ``sharded_loss``; a collective.
        """
        routes = route_entries(rows, items, num_users, self.ownership, self.group)
        inputs = normalized_values(rows, values, num_users)
        if self.training:
            inputs = input_noise(inputs, self.noise_prob, keep)
        pooled = sharded_pooling(self.encoder_table, routes, inputs, negative_sampling)
        return sharded_loss(
            self.codes(pooled),
            routes,
            values,
            self.decoder_table,
            self.bias_table,
            loss,
            loss_params,
            negative_sampling,
        )

    def all_reduce_dense_grads(self) -> None:
        """Sums the dense layers' gradients over the ranks (what DDP does; the loss is already
        averaged over the global batch, so a sum, not a mean)."""
        for param in self.dense_parameters():
            if param.grad is None:
                param.grad = torch.zeros_like(param)
            dist.all_reduce(param.grad, group=self.group)
