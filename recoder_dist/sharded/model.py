"""What every model with sharded tables shares: its tables hold this rank's rows, the rest of
its parameters (the dense layers) is a copy on every rank, and a step's loss is scored where the
item rows are (``sharded.decoder``).

A subclass (``ShardedAutoencoder``, ``ShardedFactorization``) registers its parameters under
the whole model's names, in its order, so that states map between the two
(``sharded.state``), and says how it computes its users' codes (``encode``); the decoder is
the same for all: ``bias + codes @ item_vectors.T`` over the step's items.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from recoder_dist.sharded import comm
from recoder_dist.sharded.decoder import sharded_loss
from recoder_dist.sharded.ownership import Ownership
from recoder_dist.sharded.replicas import average_replicas
from recoder_dist.sharded.routes import EntryRoutes
from recoder_dist.sharded.state import sharded_state
from recoder_dist.sharded.tables import ShardedTable


class ShardedModel(nn.Module):
    """A model whose tables are sharded by row over the ranks of ``group``.

    Subclasses set ``ownership`` (the item tables' layout), ``decoder_embedding`` and
    ``decoder_bias`` (the item vectors and biases that score), and implement ``encode`` and
    ``of`` (the sharded form of a whole model's class and hyper-parameters).

    Args:
        group: the process group of the shards (None: the default group).
        replica_group: in the 2D layout (``sharded.replicas``), the group of this rank's
            replicas, the ranks of the other groups that hold the same rows; None: no replicas.
    """

    ownership: Ownership
    decoder_embedding: ShardedTable
    decoder_bias: ShardedTable

    def __init__(self, group=None, replica_group=None):
        super().__init__()
        self.group, self.replica_group = group, replica_group
        self.rank, self.world = comm.rank_and_world(group)

    @classmethod
    def like(
        cls, model, group=None, device=None, replica_group=None, draw: bool = True
    ) -> ShardedModel:
        """This rank's shard of ``model`` (an initialized whole model): its hyper-parameters,
        its dense layers and its tables' rows ``rank::world``. A model initialized on the meta
        device (no weights, as the driver of a sharded run makes it) gives the rows its
        ``init_seed`` draws, shard by shard: the whole tables never exist. ``draw=False``
        leaves them uninitialized: rows that are to be loaded."""
        weightless = any(p.is_meta for p in model.parameters())
        seed = model.init_seed if weightless and draw else None
        sharded = cls.of(model, seed=seed, group=group, replica_group=replica_group, device=device)
        if not weightless:
            sharded.load_from(model)
        return sharded

    @classmethod
    def of(cls, model, *, seed, group, replica_group, device) -> ShardedModel:
        """A sharded model of ``model``'s class and hyper-parameters, its tables drawn from
        ``seed`` (None: left uninitialized), placed as the constructor's arguments say."""
        raise NotImplementedError

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
        """The codes of this rank's ``num_users`` users (what the decoder scores) and the
        routes of their entries (``rows``, global ``items``, ``values``) to the items' owners.
        ``users``: their global ids (the models with a user table read them); ``keep``: input
        noise's mask; ``sampled``: items scored beyond the entries' (see ``loss``). A
        collective."""
        raise NotImplementedError

    def loss(
        self,
        rows: torch.Tensor,
        items: torch.Tensor,
        values: torch.Tensor,
        num_users: int,
        *,
        users: torch.Tensor | None = None,
        loss: str | nn.Module = "mse",
        loss_params: dict | None = None,
        negative_sampling: bool = True,
        keep: torch.Tensor | None = None,
        sampled: torch.Tensor | None = None,
        epoch: int = 1,
        step: int = 0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One step's loss on this rank's batch (entries ``rows``, global ``items``,
        ``values``; ``users`` the rows' global user ids), as the whole model's ``batch_loss``
        on the global batch.

        ``keep`` is the input noise's mask per entry (drawn when None, for the models with
        input noise). ``sampled``: the items that this rank's sampling group scores (global
        ids), when more than its entries' (a sampling group larger than the batch). ``epoch``
        and ``step``: for the model's own terms (``loss_terms``), as the whole model's. Returns
        ``(share, total)`` as ``sharded_loss``; a collective.
        """
        codes, routes = self.encode(
            rows,
            items,
            values,
            num_users,
            negative_sampling,
            users=users,
            keep=keep,
            sampled=sampled,
        )
        share, total = sharded_loss(
            codes,
            routes,
            values,
            self.decoder_embedding,
            self.decoder_bias,
            loss,
            loss_params,
            negative_sampling,
        )
        terms = self.loss_terms(epoch, step)
        if terms is None:
            return share, total
        # This rank's users' terms, over the global batch's users as the reconstruction's.
        terms = terms / max(routes.num_users, 1)
        return share + terms, total + comm.all_reduce(terms.detach(), group=self.group)

    def loss_terms(self, epoch: int, step: int) -> torch.Tensor | None:
        """The whole model's ``loss_terms`` for this rank's users of the last ``encode`` in
        training mode (summed over them), or None."""
        return None

    def tables(self) -> list[ShardedTable]:
        """The distinct sharded tables, in registration order (a tied table once)."""
        return [module for module in self.modules() if isinstance(module, ShardedTable)]

    def dense_parameters(self) -> list[nn.Parameter]:
        """The data-parallel parameters (everything but the sharded tables)."""
        tables = {id(t.weight) for t in self.tables()}
        return [p for p in self.parameters() if id(p) not in tables]

    @torch.no_grad()
    def load_from(self, model) -> None:
        """This rank's rows and the dense layers of the whole model (one that fits in one
        process: tests, and today's snapshots)."""
        self.load_state_dict(sharded_state(model.state_dict(), self))

    def synchronize_grads(self) -> None:
        """After ``backward``: the dense layers' gradients summed over the group, then, in the
        2D layout, every gradient averaged over the replicas (``sharded.replicas``)."""
        self.all_reduce_dense_grads()
        if self.replica_group is not None:
            average_replicas(self, self.replica_group)

    def first_replica(self) -> bool:
        """Whether this rank's shard is the first group's (the one a checkpoint keeps)."""
        return self.replica_group is None or dist.get_rank(self.replica_group) == 0

    def all_reduce_dense_grads(self) -> None:
        """Sums the dense layers' gradients over the ranks (what DDP does; the loss is already
        averaged over the global batch, so a sum, not a mean), in one flat all-reduce."""
        params = self.dense_parameters()
        if not params:
            return
        for param in params:
            if param.grad is None:
                param.grad = torch.zeros_like(param)
        flat = torch.cat([param.grad.reshape(-1) for param in params])
        dist.all_reduce(flat, group=self.group)
        for param, part in zip(params, flat.split([p.numel() for p in params])):
            param.grad.copy_(part.view_as(param))
