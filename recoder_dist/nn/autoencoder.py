"""DynamicAutoencoder: an autoencoder whose first and last layers are item embeddings.

Using embeddings as the input and output layers lets a batch read and reconstruct only the items
it samples: ``F(X[:, I], I) == F(X)[:, I]`` whenever the rows of ``X`` are zero outside ``I``,
which is what mini-batch negative sampling relies on.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from recoder_dist.nn.base import (
    FactorizationModel,
    activation,
    embedding_rows,
    hidden_sizes,
    probability,
    seeded_dense_,
    seeded_xavier_,
)
from recoder_dist.nn.registry import register

# recsys-recoder 0.4.0's names -> ours.
_ALIASES = {
    "en_embedding_layer": "encoder_embedding",
    "de_embedding_layer": "decoder_embedding",
    "encoding_layers": "encoder_layers",
    "decoding_layers": "decoder_layers (decoder_biases when is_constrained)",
}


@register("autoencoder")
class DynamicAutoencoder(FactorizationModel):
    """An item-based autoencoder over users' interaction rows.

    Args:
        hidden_layers: sizes of the hidden layers, e.g. ``[200]`` or ``[600, 200]``; the
            decoder mirrors the encoder.
        activation_type: activation of every hidden layer (the output is linear: logits).
        is_constrained: tie the decoder weights to the transposed encoder weights.
        dropout_prob: dropout on the code (the innermost layer).
        noise_prob: dropout on the (L2-normalized) input rows, i.e. denoising.
        sparse: give the item embeddings sparse gradients (updated with SparseAdam).
    """

    accepts_sparse_input = True  # on CPU, encoded from its entries; elsewhere densified

    tune_space = {
        "hidden_layers": [[200], [600], [600, 200]],
        "is_constrained": [False, True],
        "noise_prob": [0.2, 0.5],
        "dropout_prob": [0.0, 0.5],
    }

    @classmethod
    def sharded_form(cls):
        from recoder_dist.sharded.autoencoder import ShardedAutoencoder

        return ShardedAutoencoder

    def __init__(
        self,
        hidden_layers: list[int] | None = None,
        activation_type: str = "tanh",
        is_constrained: bool = False,
        dropout_prob: float = 0.0,
        noise_prob: float = 0.0,
        sparse: bool = False,
    ):
        super().__init__()
        self.load_model_params(
            dict(
                hidden_layers=hidden_layers,
                activation_type=activation_type,
                is_constrained=is_constrained,
                dropout_prob=dropout_prob,
                noise_prob=noise_prob,
                sparse=sparse,
            )
        )
        self.num_items = None

    def model_params(self) -> dict:
        return dict(
            hidden_layers=None if self.hidden_layers is None else list(self.hidden_layers),
            activation_type=self.activation_type,
            is_constrained=self.is_constrained,
            dropout_prob=self.dropout_prob,
            noise_prob=self.noise_prob,
            sparse=self.sparse,
        )

    def load_model_params(self, model_params: dict) -> None:
        hidden = hidden_sizes(model_params["hidden_layers"])
        dropout_prob = probability(model_params["dropout_prob"], "dropout_prob")
        noise_prob = probability(model_params["noise_prob"], "noise_prob")
        activation(model_params["activation_type"])  # validates the name
        self.hidden_layers = hidden
        self.activation_type = model_params["activation_type"]
        self.is_constrained = bool(model_params["is_constrained"])
        self.dropout_prob = dropout_prob
        self.noise_prob = noise_prob
        self.sparse = bool(model_params["sparse"])

    def init_model(self, num_items: int | None = None, num_users: int | None = None) -> None:
        if self.hidden_layers is None:
            raise ValueError("DynamicAutoencoder needs hidden_layers (e.g. [200])")
        if not num_items or num_items < 1:
            raise ValueError(f"DynamicAutoencoder needs num_items >= 1, got {num_items}")
        self.num_items = int(num_items)
        # Drawn first, from torch's global generator: torch.manual_seed(s) then init_model
        # gives the same weights every time, and a ShardedAutoencoder made with this seed
        # holds their rows (see reset_parameters).
        self.init_seed = int(torch.randint(0, 2**31 - 1, (), device="cpu"))
        sizes = self.hidden_layers
        self.act = activation(self.activation_type)
        self.noise = nn.Dropout(self.noise_prob)
        self.dropout = nn.Dropout(self.dropout_prob)

        self.encoder_embedding = _table(num_items, sizes[0], self.sparse)
        self.encoder_bias = nn.Parameter(torch.zeros(sizes[0]))
        self.encoder_layers = nn.ModuleList(
            nn.Linear(n_in, n_out) for n_in, n_out in zip(sizes[:-1], sizes[1:])
        )
        if self.is_constrained:
            # Decoder layers own only their biases; weights are the encoder's, transposed.
            self.decoder_biases = nn.ParameterList(
                nn.Parameter(torch.zeros(n)) for n in reversed(sizes[:-1])
            )
            self.decoder_embedding = self.encoder_embedding
        else:
            self.decoder_layers = nn.ModuleList(
                nn.Linear(n_in, n_out)
                for n_in, n_out in zip(reversed(sizes[1:]), reversed(sizes[:-1]))
            )
            self.decoder_embedding = _table(num_items, sizes[0], self.sparse)
        self.decoder_bias = _table(num_items, 1, self.sparse)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Xavier-uniform weights and zero biases, each drawn from its own seeded CPU
        generator: the encoder's item table from ``init_seed``, the decoder's from
        ``init_seed + 1``, the dense layers (in order) from ``init_seed + 2``. Any row of a
        table is thereby drawable without the rest: ``ShardedAutoencoder(seed=init_seed)``
        makes each rank's rows of these tables, shard by shard, and nothing else holds them."""
        if self.encoder_embedding.weight.is_meta:
            return  # a model without weights (see Recoder): they are made where they are used
        tables = [self.encoder_embedding]
        if not self.is_constrained:
            tables.append(self.decoder_embedding)
        seeded_xavier_(tables, self.init_seed)
        seeded_dense_(self, self.init_seed + 2)
        nn.init.zeros_(self.decoder_bias.weight)

    # recsys-recoder 0.4.0's attribute names, read-only. Properties register nothing: the
    # state_dict and named_parameters keep our names only.
    recoder040_aliases = _ALIASES

    @property
    def en_embedding_layer(self) -> nn.Embedding:
        """0.4.0's name of :attr:`encoder_embedding` (the input items' embedding)."""
        return self.encoder_embedding

    @property
    def de_embedding_layer(self) -> nn.Embedding:
        """0.4.0's name of :attr:`decoder_embedding` (the output items' embedding; the
        encoder's own when ``is_constrained``)."""
        return self.decoder_embedding

    @property
    def encoding_layers(self) -> nn.ModuleList:
        """0.4.0's name of :attr:`encoder_layers` (the hidden ``nn.Linear`` layers after the
        embedding; empty with one hidden layer). A ModuleList where 0.4.0 had nn.Sequential:
        indexing and iteration are the same (neither model calls it as one function)."""
        return self.encoder_layers

    @property
    def decoding_layers(self) -> nn.ModuleList:
        """0.4.0's ``decoding_layers``: the hidden layers of the decoder, in order.

        Unconstrained, this is :attr:`decoder_layers`. With ``is_constrained`` the decoder
        owns only biases (:attr:`decoder_biases`), so this builds, at each access, read-only
        views shaped as 0.4.0's tied layers: layer ``i`` has ``weight`` the transposed weight
        of encoder layer ``-1 - i`` (a view, no parameter of its own) and ``bias`` the
        parameter ``decoder_biases[i]``, and computes ``F.linear(x, weight, bias)`` (the
        activation is applied by the model, as in 0.4.0). The views are not registered on the
        model: its state_dict and parameters are unchanged.
        """
        if not self.is_constrained:
            return self.decoder_layers
        return nn.ModuleList(
            _TiedDecoderLayer(layer, bias)
            for layer, bias in zip(reversed(self.encoder_layers), self.decoder_biases)
        )

    def forward(
        self,
        input: torch.Tensor,
        input_users: torch.Tensor | None = None,
        input_items: torch.Tensor | None = None,
        target_users: torch.Tensor | None = None,
        target_items: torch.Tensor | None = None,
    ) -> torch.Tensor:
        codes = self._codes(input, input_items)
        weight = embedding_rows(self.decoder_embedding, target_items)
        bias = embedding_rows(self.decoder_bias, target_items).squeeze(1)
        return torch.addmm(bias, codes, weight.t())

    def _codes(self, input: torch.Tensor, input_items: torch.Tensor | None) -> torch.Tensor:
        """The decoder's last hidden layer for the rows of ``input``."""
        encoder = embedding_rows(self.encoder_embedding, input_items)
        return dense_codes(self, pooled_input(self.noise, input, encoder))


def pooled_input(noise: nn.Dropout, input: torch.Tensor, encoder: torch.Tensor) -> torch.Tensor:
    """``noise(normalize(input, dim=1)) @ encoder``: the input rows L2-normalized, dropped out
    by ``noise`` (input noise; a no-op outside training mode) and pooled over ``encoder``'s rows
    (``input``'s columns' item vectors).

    A sparse CPU ``input`` (the trainer's, ``training.batch.model_input``) is read from its
    stored entries alone (``_pooled_entries``); a dense one takes the dense path, the reference.
    """
    if input.is_sparse and input.device.type == "cpu" and not input.requires_grad:
        input = input.coalesce()  # a no-op for the trainer's batches, built coalesced
        rows, cols = input.indices()
        return _pooled_entries(noise, rows, cols, input.values(), input.shape[0], encoder)
    if input.is_sparse:
        input = input.to_dense()
    return noise(F.normalize(input, p=2, dim=1)) @ encoder


def _pooled_entries(noise: nn.Dropout, rows, cols, values, num_rows: int, encoder):
    """``noise(normalize(input)) @ encoder`` from the stored entries ``(rows, cols, values)``
    of ``input`` (row-major order); the zeros of ``input`` are never read.

    Interaction rows are a few percent dense: on CPU, the dense product and a dropout mask
    drawn for every zero cost much of a training step (benchmarks/RESULTS.md). Zeros
    contribute nothing to either, so this normalizes, drops out and sums the non-zeros alone
    (``embedding_bag`` with per-entry weights): the same result up to rounding, each non-zero
    dropped with the same probability (the random draws differ from the dense path's).
    """
    # F.normalize: each row divided by max(its L2 norm, 1e-12).
    norms = torch.zeros(num_rows, dtype=values.dtype).index_add_(0, rows, values * values)
    values = values / norms.sqrt_().clamp_min_(1e-12).index_select(0, rows)
    if noise.training and noise.p > 0:
        # nn.Dropout's bernoulli_ costs several times a uniform draw and a compare; the kept
        # entries and their scale are the same.
        keep = torch.rand_like(values) >= noise.p
        values = values.mul_(keep).div_(1 - noise.p)
    offsets = bag_offsets(rows, num_rows)
    return F.embedding_bag(cols, encoder, offsets, mode="sum", per_sample_weights=values)


def dense_codes(model, pooled: torch.Tensor) -> torch.Tensor:
    """The dense layers after the input embedding's pooling: encoder bias and layers, dropout
    on the code, decoder layers (tied or not), up to the decoder's last hidden layer. ``model``
    is a DynamicAutoencoder, or a module holding the same dense layers (the sharded one)."""
    z = model.act(pooled + model.encoder_bias)
    for layer in model.encoder_layers:
        z = model.act(layer(z))
    z = model.dropout(z)
    if model.is_constrained:
        for layer, bias in zip(reversed(model.encoder_layers), model.decoder_biases):
            z = model.act(F.linear(z, layer.weight.t(), bias))
    else:
        for layer in model.decoder_layers:
            z = model.act(layer(z))
    return z


class _TiedDecoderLayer(nn.Module):
    """A constrained decoder layer as 0.4.0 exposed it: ``weight`` is the encoder layer's
    weight transposed, ``bias`` the decoder's bias parameter (shared, not copied)."""

    def __init__(self, encoder_layer: nn.Linear, bias: nn.Parameter):
        super().__init__()
        self.bias = bias
        # In a tuple so that the encoder layer is not registered as a submodule of the view.
        self._encoder_layer = (encoder_layer,)
        self.in_features = encoder_layer.out_features
        self.out_features = encoder_layer.in_features

    @property
    def weight(self) -> torch.Tensor:
        return self._encoder_layer[0].weight.t()

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.linear(input, self.weight, self.bias)


def bag_offsets(bags: torch.Tensor, num_bags: int) -> torch.Tensor:
    """Start of each bag in the list of ``bags``'s entries sorted by bag (empty bags included)."""
    counts = torch.bincount(bags, minlength=num_bags)
    return counts.cumsum(0) - counts


def _table(num_items: int, dim: int, sparse: bool) -> nn.Embedding:
    """An item table whose weights ``reset_parameters`` draws (nn.Embedding's own normal draw
    of a whole table would be thrown away)."""
    return nn.Embedding(num_items, dim, sparse=sparse, _weight=torch.empty(num_items, dim))
