"""Mult-VAE (Liang et al., "Variational Autoencoders for Collaborative Filtering", WWW 2018),
with item tables as its first and last layers, and its form with sharded tables.

The encoder maps a user's L2-normalized, dropped-out row to a Gaussian code (mean and log
variance); in training the decoder reads a draw of it (the reparameterization), in evaluation
its mean. The loss is the multinomial likelihood of the row (``loss="logloss"``, over the
sampling group's items with negative sampling, as Recoder's ``MultinomialNLLLoss``; over every
item without) plus ``beta`` times the code's KL divergence from N(0, I), ``beta`` annealed
linearly from 0 to ``anneal_cap`` over ``anneal_steps`` updates (the paper's schedule).

As ``DynamicAutoencoder``, the item tables let a batch read and score only the items it
samples; the sharded form (``ShardedMultVAE``) pools and scores where the rows are
(``recoder_dist.sharded``) and runs the dense layers, the draw and the KL term on the user's
rank.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import nn

from recoder_dist.nn.autoencoder import pooled_input
from recoder_dist.nn.base import (
    FactorizationModel,
    activation,
    embedding_rows,
    hidden_sizes,
    probability,
    seeded_dense_,
    seeded_xavier_,
    whole_number,
)
from recoder_dist.nn.registry import register
from recoder_dist.sharded.encoder import input_noise, normalized_values, sharded_pooling
from recoder_dist.sharded.model import ShardedModel
from recoder_dist.sharded.ownership import Ownership
from recoder_dist.sharded.routes import EntryRoutes, route_entries
from recoder_dist.sharded.tables import ShardedTable


@register("vae")
class MultVAE(FactorizationModel):
    """Mult-VAE over users' interaction rows.

    Args:
        hidden_layers: the encoder's sizes, the last one the code's: ``[600, 200]`` (the
            paper's) reads items into 600 units and draws a code of 200; ``[200]`` maps the
            items straight to the code. The decoder mirrors the encoder.
        activation_type: the hidden layers' activation (the code's mean and log variance and
            the output are linear).
        noise_prob: dropout on the L2-normalized input rows (the paper's 0.5).
        anneal_cap: the largest weight of the KL term (the paper's 0.2).
        anneal_steps: updates over which the KL weight grows linearly from 0 to ``anneal_cap``
            (0: ``anneal_cap`` from the first update).
        sparse: give the item tables sparse gradients (updated with SparseAdam).
    """

    accepts_sparse_input = True  # on CPU, pooled from its entries; elsewhere densified

    tune_space = {
        "hidden_layers": [[600, 200], [600, 100], [200]],
        "noise_prob": [0.2, 0.5],
        "anneal_cap": [0.1, 0.2, 0.4],
    }

    @classmethod
    def sharded_form(cls):
        return ShardedMultVAE

    def __init__(
        self,
        hidden_layers: list[int] | None = None,
        activation_type: str = "tanh",
        noise_prob: float = 0.5,
        anneal_cap: float = 0.2,
        anneal_steps: int = 200_000,
        sparse: bool = False,
    ):
        super().__init__()
        self.load_model_params(
            dict(
                hidden_layers=hidden_layers,
                activation_type=activation_type,
                noise_prob=noise_prob,
                anneal_cap=anneal_cap,
                anneal_steps=anneal_steps,
                sparse=sparse,
            )
        )
        self.num_items = None
        self._kl = None

    def model_params(self) -> dict:
        return dict(
            hidden_layers=None if self.hidden_layers is None else list(self.hidden_layers),
            activation_type=self.activation_type,
            noise_prob=self.noise_prob,
            anneal_cap=self.anneal_cap,
            anneal_steps=self.anneal_steps,
            sparse=self.sparse,
        )

    def load_model_params(self, model_params: dict) -> None:
        hidden = hidden_sizes(model_params["hidden_layers"])
        noise_prob = probability(model_params["noise_prob"], "noise_prob")
        cap = model_params["anneal_cap"]
        if isinstance(cap, bool) or not isinstance(cap, numbers.Real) or not 0 <= cap < math.inf:
            raise ValueError(f"anneal_cap must be a finite number >= 0, got {cap!r}")
        anneal_steps = whole_number(model_params["anneal_steps"], "anneal_steps", 0)
        activation(model_params["activation_type"])  # validates the name
        self.hidden_layers = hidden
        self.activation_type = model_params["activation_type"]
        self.noise_prob = noise_prob
        self.anneal_cap = float(cap)
        self.anneal_steps = anneal_steps
        self.sparse = bool(model_params["sparse"])

    def init_model(self, num_items: int | None = None, num_users: int | None = None) -> None:
        if self.hidden_layers is None:
            raise ValueError("MultVAE needs hidden_layers (e.g. [600, 200])")
        if not num_items or num_items < 1:
            raise ValueError(f"MultVAE needs num_items >= 1, got {num_items}")
        self.num_items = int(num_items)
        # Drawn first, from torch's global generator, as DynamicAutoencoder's: the same weights
        # for the same torch seed, and a ShardedMultVAE of this seed holds their rows.
        self.init_seed = int(torch.randint(0, 2**31 - 1, (), device="cpu"))
        self.noise = nn.Dropout(self.noise_prob)
        _build_layers(self, self.num_items, self.hidden_layers, dict(sparse=self.sparse))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Xavier-uniform weights and zero biases: the encoder's item table from ``init_seed``,
        the decoder's from ``init_seed + 1``, the dense layers in order from ``init_seed + 2``
        (each row of a table drawable without the rest: see ``DynamicAutoencoder``)."""
        if self.encoder_embedding.weight.is_meta:
            return  # a model without weights (see Recoder): they are made where they are used
        seeded_xavier_([self.encoder_embedding, self.decoder_embedding], self.init_seed)
        seeded_dense_(self, self.init_seed + 2)
        nn.init.zeros_(self.decoder_bias.weight)

    def forward(
        self,
        input: torch.Tensor,
        input_users: torch.Tensor | None = None,
        input_items: torch.Tensor | None = None,
        target_users: torch.Tensor | None = None,
        target_items: torch.Tensor | None = None,
    ) -> torch.Tensor:
        encoder = embedding_rows(self.encoder_embedding, input_items)
        codes, self._kl = latent_codes(self, pooled_input(self.noise, input, encoder))
        weight = embedding_rows(self.decoder_embedding, target_items)
        bias = embedding_rows(self.decoder_bias, target_items).squeeze(1)
        return torch.addmm(bias, codes, weight.t())

    def epsilon(self, std: torch.Tensor) -> torch.Tensor:
        """The reparameterization's standard normal draw, one per code entry (a method so that
        a test can fix it)."""
        return torch.randn_like(std)

    def loss_terms(self, epoch: int, step: int) -> torch.Tensor | None:
        """``beta(step)`` times the last training forward's KL terms, summed over its users."""
        kl, self._kl = self._kl, None
        return None if kl is None else kl_weight(step, self.anneal_cap, self.anneal_steps) * kl


def kl_weight(step: int, anneal_cap: float, anneal_steps: int) -> float:
    """The KL term's weight ``beta`` at ``step`` (the updates before this one): linear from 0
    to ``anneal_cap`` over ``anneal_steps``."""
    if anneal_steps == 0:
        return anneal_cap
    return min(anneal_cap, step / anneal_steps)


def latent_codes(model, pooled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """From the pooled input rows: the decoder's last hidden layer, and, in training mode, the
    KL divergences of the users' codes from N(0, I), summed (None in evaluation, where the
    code is its mean). ``model`` is a MultVAE or a ShardedMultVAE (the same dense layers)."""
    z = pooled + model.encoder_bias
    for layer in model.encoder_layers:  # an activation between layers, none after the last
        z = layer(model.act(z))
    mean, log_var = z.chunk(2, dim=1)
    kl = None
    if model.training:
        std = torch.exp(0.5 * log_var)
        z = mean + model.epsilon(std) * std
        kl = 0.5 * (torch.exp(log_var) + mean * mean - 1.0 - log_var).sum()
    else:
        z = mean
    for layer in model.decoder_layers:
        z = model.act(layer(z))
    return z, kl


def _build_layers(model: nn.Module, num_items: int, sizes: list[int], table: dict) -> None:
    """MultVAE's layers on ``model``, in the order both forms register them (their states map
    by name and order): the encoder's item table (``sizes[0]`` wide; twice the code with one
    size, the code's mean and log variance), its bias, the dense encoder layers down to the
    mean and log variance, the dense decoder layers, the decoder's item table and item bias.
    ``table``: how the item tables are made (``nn.Embedding``'s or ``ShardedTable``'s
    arguments)."""
    encoder = [*sizes[:-1], 2 * sizes[-1]]
    decoder = list(reversed(sizes))
    device = table.get("device")
    model.act = activation(model.activation_type)
    model.encoder_embedding = _table(num_items, encoder[0], table, seed_offset=0)
    model.encoder_bias = nn.Parameter(torch.zeros(encoder[0], device=device))
    model.encoder_layers = nn.ModuleList(
        nn.Linear(a, b, device=device) for a, b in zip(encoder[:-1], encoder[1:])
    )
    model.decoder_layers = nn.ModuleList(
        nn.Linear(a, b, device=device) for a, b in zip(decoder[:-1], decoder[1:])
    )
    model.decoder_embedding = _table(num_items, sizes[0], table, seed_offset=1)
    model.decoder_bias = _table(num_items, 1, table, zeros=True)


def _table(num_items: int, dim: int, table: dict, seed_offset: int = 0, zeros: bool = False):
    """An item table: a whole one (weights drawn by ``reset_parameters``), or, when ``table``
    has a ``rank``, this rank's shard, drawn from ``table["seed"] + seed_offset``."""
    if "rank" not in table:
        return nn.Embedding(
            num_items, dim, sparse=table["sparse"], _weight=torch.empty(num_items, dim)
        )
    placement = {key: table[key] for key in ("rank", "world", "sparse", "device")}
    seed = table["seed"]
    if zeros:
        return ShardedTable(num_items, dim, init="zeros", **placement)
    init = None if seed is None else "xavier"
    return ShardedTable(num_items, dim, init=init, seed=(seed or 0) + seed_offset, **placement)


class ShardedMultVAE(ShardedModel):
    """A MultVAE whose item tables hold only this rank's rows (``recoder_dist.sharded``).

    Its parameters have MultVAE's names, in its order, so that states map between the two.
    Arguments as MultVAE's, and: ``num_items``, the catalog's size; ``seed``, the
    initialization seed (MultVAE's ``init_seed``; None: the tables are left to be loaded);
    ``group``, ``replica_group``, ``device``: as ``ShardedModel``'s.
    """

    def __init__(
        self,
        num_items: int,
        hidden_layers: list[int],
        *,
        activation_type: str = "tanh",
        noise_prob: float = 0.5,
        anneal_cap: float = 0.2,
        anneal_steps: int = 200_000,
        sparse: bool = False,
        seed: int | None = 0,
        group=None,
        replica_group=None,
        device: torch.device | str | None = None,
    ):
        super().__init__(group, replica_group)
        self.ownership = Ownership(num_items, self.world)
        self.activation_type = activation_type
        self.noise_prob = noise_prob
        self.anneal_cap, self.anneal_steps = anneal_cap, anneal_steps
        table = dict(rank=self.rank, world=self.world, sparse=sparse, device=device, seed=seed)
        _build_layers(self, num_items, [int(h) for h in hidden_layers], table)
        seeded_dense_(self, (seed or 0) + 2)
        self._kl = None

    @classmethod
    def of(cls, model: MultVAE, **placement) -> ShardedMultVAE:
        """See ``ShardedModel.of``: ``model`` is a MultVAE."""
        params = model.model_params()
        hidden = params.pop("hidden_layers")
        return cls(model.num_items, hidden, **params, **placement)

    def epsilon(self, std: torch.Tensor) -> torch.Tensor:
        """As MultVAE's: the reparameterization's draw for this rank's users."""
        return torch.randn_like(std)

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
        """See ``ShardedModel.encode``: the entries pooled where their rows are, then the
        code's draw (in training mode; its KL terms kept for ``loss_terms``) and the decoder's
        dense layers on this rank. A collective."""
        routes = route_entries(rows, items, num_users, self.ownership, self.group, sampled)
        inputs = normalized_values(rows, values, num_users)
        if self.training:
            inputs = input_noise(inputs, self.noise_prob, keep)
        pooled = sharded_pooling(self.encoder_embedding, routes, inputs, negative_sampling)
        codes, self._kl = latent_codes(self, pooled)
        return codes, routes

    def loss_terms(self, epoch: int, step: int) -> torch.Tensor | None:
        """MultVAE's, for this rank's users."""
        kl, self._kl = self._kl, None
        return None if kl is None else kl_weight(step, self.anneal_cap, self.anneal_steps) * kl
