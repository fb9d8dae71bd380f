"""MatrixFactorization: user and item embeddings with an item bias."""

from __future__ import annotations

import torch
from torch import nn

from recoder_dist.nn.base import (
    FactorizationModel,
    activation,
    embedding_rows,
    probability,
    seeded_xavier_,
    whole_number,
)
from recoder_dist.nn.registry import register

# recsys-recoder 0.4.0's names -> ours.
_ALIASES = {"user_embedding_layer": "user_embedding", "item_embedding_layer": "item_embedding"}


@register("mf")
class MatrixFactorization(FactorizationModel):
    """Scores ``act(user) . item + bias(item)`` for the users of the batch, as recsys-recoder
    0.4.0 does (the activation applies to user embeddings only; both tables start from
    ``xavier_uniform_``, the item bias from zero).

    Args:
        embedding_size: dimension of user and item embeddings.
        activation_type: activation applied to the user embeddings ('none' for plain dot
            products).
        dropout_prob: dropout on the user embeddings.
        sparse: give the embeddings sparse gradients (updated with SparseAdam).
    """

    accepts_sparse_input = True  # the input rows are not read: users have their own embedding

    tune_space = {"embedding_size": [64, 128, 200], "dropout_prob": [0.0, 0.2, 0.5]}

    @classmethod
    def sharded_form(cls):
        from recoder_dist.sharded.factorization import ShardedFactorization

        return ShardedFactorization

    def __init__(
        self,
        embedding_size: int = 200,
        activation_type: str = "none",
        dropout_prob: float = 0.0,
        sparse: bool = False,
    ):
        super().__init__()
        self.load_model_params(
            dict(
                embedding_size=embedding_size,
                activation_type=activation_type,
                dropout_prob=dropout_prob,
                sparse=sparse,
            )
        )
        self.num_items = self.num_users = None

    def model_params(self) -> dict:
        return dict(
            embedding_size=self.embedding_size,
            activation_type=self.activation_type,
            dropout_prob=self.dropout_prob,
            sparse=self.sparse,
        )

    def load_model_params(self, model_params: dict) -> None:
        embedding_size = whole_number(model_params["embedding_size"], "embedding_size", 1)
        dropout_prob = probability(model_params["dropout_prob"], "dropout_prob")
        activation(model_params["activation_type"])
        self.embedding_size = embedding_size
        self.activation_type = model_params["activation_type"]
        self.dropout_prob = dropout_prob
        self.sparse = bool(model_params["sparse"])

    def init_model(self, num_items: int | None = None, num_users: int | None = None) -> None:
        if not num_items or not num_users:
            raise ValueError(
                f"MatrixFactorization needs num_items and num_users, got {num_items}, {num_users}"
            )
        self.num_items, self.num_users = int(num_items), int(num_users)
        # Drawn first, from torch's global generator: torch.manual_seed(s) then init_model
        # gives the same weights every time, and a ShardedFactorization made with this seed
        # holds their rows (see reset_parameters).
        self.init_seed = int(torch.randint(0, 2**31 - 1, (), device="cpu"))
        self.act = activation(self.activation_type)
        self.dropout = nn.Dropout(self.dropout_prob)
        self.user_embedding = nn.Embedding(num_users, self.embedding_size, sparse=self.sparse)
        self.item_embedding = nn.Embedding(num_items, self.embedding_size, sparse=self.sparse)
        self.item_bias = nn.Embedding(num_items, 1, sparse=self.sparse)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """0.4.0's initialisation: xavier-uniform user and item tables and a zero item bias.
        Its scale, sqrt(6 / (rows + size)), shrinks with the table: a user row gets one update
        an epoch, and a larger random start than that drowns it. Each table draws from its own
        seeded CPU generator (the users' from ``init_seed``, the items' from ``init_seed +
        1``), so that any row is drawable without the rest: ``ShardedFactorization`` makes
        each rank's rows, shard by shard."""
        if self.user_embedding.weight.is_meta:
            return  # a model without weights (see Recoder): they are made where they are used
        seeded_xavier_([self.user_embedding, self.item_embedding], self.init_seed)
        nn.init.zeros_(self.item_bias.weight)

    # recsys-recoder 0.4.0's attribute names, read-only. Properties register nothing: the
    # state_dict and named_parameters keep our names only.
    recoder040_aliases = _ALIASES

    @property
    def known_users(self) -> int | None:
        return self.num_users

    @property
    def user_embedding_layer(self) -> nn.Embedding:
        """0.4.0's name of :attr:`user_embedding`."""
        return self.user_embedding

    @property
    def item_embedding_layer(self) -> nn.Embedding:
        """0.4.0's name of :attr:`item_embedding`. (0.4.0's item bias, ``bias``, a vector of
        ``num_items``, is ``item_bias.weight[:, 0]`` here; it has no alias.)"""
        return self.item_embedding

    def forward(
        self,
        input: torch.Tensor,
        input_users: torch.Tensor | None = None,
        input_items: torch.Tensor | None = None,
        target_users: torch.Tensor | None = None,
        target_items: torch.Tensor | None = None,
    ) -> torch.Tensor:
        items = embedding_rows(self.item_embedding, target_items)
        bias = embedding_rows(self.item_bias, target_items).squeeze(1)
        return torch.addmm(bias, self._user_codes(input_users), items.t())

    def _user_codes(self, input_users: torch.Tensor | None) -> torch.Tensor:
        if input_users is None:
            raise ValueError("MatrixFactorization scores known users: pass input_users")
        return self.dropout(self.act(self.user_embedding(input_users)))
