"""The interface that Recoder trains: a model that reconstructs rows of the interaction matrix."""

from __future__ import annotations

import numbers
from collections.abc import Iterable

import torch
from torch import nn

ACTIVATIONS = {
    "none": nn.Identity,
    "identity": nn.Identity,
    "tanh": nn.Tanh,
    "relu": nn.ReLU,
    "sigmoid": nn.Sigmoid,
    "selu": nn.SELU,
    "elu": nn.ELU,
    "leaky_relu": nn.LeakyReLU,
}


def hidden_sizes(hidden) -> list[int] | None:
    """``hidden_layers`` as a list of ints (None stays None: given later, by a snapshot).

    Raises:
        ValueError: not a list (a number, a string), an empty list, or a size that is not a
            whole number >= 1.
    """
    if hidden is None:
        return None
    if isinstance(hidden, (str, bytes)) or not isinstance(hidden, Iterable):
        raise ValueError(f"hidden_layers must be a list of sizes such as [200], got {hidden!r}")
    hidden = list(hidden)
    if not all(_whole(size) for size in hidden):
        raise ValueError(f"hidden_layers must hold whole sizes, got {hidden!r}")
    sizes = [int(h) for h in hidden]
    if not sizes or min(sizes) < 1:
        raise ValueError(f"hidden_layers must be positive sizes, got {sizes}")
    return sizes


def probability(value, name: str) -> float:
    """A dropout or noise probability: a number in [0, 1)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value < 1:
        raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")
    return float(value)


def whole_number(value, name: str, minimum: int) -> int:
    """A size or a count: an int (or a float with no fraction) >= ``minimum``."""
    if not _whole(value) or value < minimum:
        raise ValueError(f"{name} must be a whole number >= {minimum}, got {value!r}")
    return int(value)


def _whole(value) -> bool:
    """An int, or a finite float with no fraction (a size read from JSON may be 8.0)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return False
    return isinstance(value, numbers.Integral) or float(value).is_integer()


def activation(name: str) -> nn.Module:
    try:
        return ACTIVATIONS[name]()
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown activation_type {name!r}; choose one of {sorted(ACTIVATIONS)}"
        ) from None


class FactorizationModel(nn.Module):
    """Base class of the models that Recoder trains.

    A model is built in two steps: the constructor takes its hyper-parameters, then
    ``init_model`` creates the parameters once the numbers of items and users are known (from the
    training data, or from a snapshot). Subclasses implement the four methods below.
    """

    #: True when ``forward`` also takes ``input`` as a sparse COO tensor: the trainer then hands
    #: CPU batches to the model without densifying them (a dense batch is mostly zeros).
    accepts_sparse_input = False

    #: recsys-recoder 0.4.0's names of this model's modules (read-only properties) -> ours.
    recoder040_aliases: dict[str, str] = {}

    def __setattr__(self, name, value):
        # nn.Module.__setattr__ registers a Module value without consulting the class's
        # properties: assigning to an alias would silently add a second, unused submodule.
        if name in self.recoder040_aliases:
            raise AttributeError(
                f"{name} is recsys-recoder 0.4.0's read-only name of "
                f"{self.recoder040_aliases[name]}"
            )
        super().__setattr__(name, value)

    #: What a sweep (``tune/sweep.py --tune-model``) searches for this model: constructor
    #: argument -> the values to choose from.
    tune_space: dict[str, list] = {}

    @classmethod
    def sharded_form(cls) -> type | None:
        """The class of this model's form whose tables are sharded over the ranks (a
        ``recoder_dist.sharded.ShardedModel`` computing the same loss), or None: the tables are
        replicated on every rank. It holds for the class that defines it only (see
        ``sharded_class``): a subclass's forward may differ from what it computes."""
        return None

    @property
    def known_users(self) -> int | None:
        """The users that a model of user rows scores (its user table's rows, ids 0..n-1), or
        None for a model that reads only the interactions (any user). ``Recoder`` refuses data
        with users beyond them, which the table would otherwise meet as an index error."""
        return None

    def loss_terms(self, epoch: int, step: int) -> torch.Tensor | None:
        """What this model adds to the loss of its last forward in training mode, summed over
        that batch's users (the trainer divides the sum of this and the reconstruction loss by
        them), or None. ``epoch`` (from 1) and ``step`` (the optimizer updates before this one,
        counted over the run) let a term follow a schedule, such as a VAE's KL annealing."""
        return None

    def init_model(self, num_items: int | None = None, num_users: int | None = None) -> None:
        """Creates the model's parameters for ``num_items`` items and ``num_users`` users."""
        raise NotImplementedError

    def model_params(self) -> dict:
        """The hyper-parameters, as a dict of plain Python values (saved in snapshots)."""
        raise NotImplementedError

    def load_model_params(self, model_params: dict) -> None:
        """Sets the hyper-parameters from a dict returned by ``model_params``."""
        raise NotImplementedError

    def forward(
        self,
        input: torch.Tensor,
        input_users: torch.Tensor | None = None,
        input_items: torch.Tensor | None = None,
        target_users: torch.Tensor | None = None,
        target_items: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Scores ``target_items`` (all items when None) for the users of the batch.

        Args:
            input: dense ``batch x len(input_items)`` matrix (``batch x num_items`` when
                ``input_items`` is None) of the users' interactions; a sparse COO tensor of
                that shape for a model that sets ``accepts_sparse_input``.
            input_users: the users of the batch (row ``r`` is user ``input_users[r]``).
            input_items: the items that the columns of ``input`` stand for.
            target_users: the users to score (the same as ``input_users`` in Recoder).
            target_items: the items to score; None means every item.

        Returns:
            ``batch x len(target_items)`` scores (logits for the logistic and logloss losses).
        """
        raise NotImplementedError


@torch.no_grad()
def seeded_xavier_(tables: list[nn.Embedding], seed: int) -> None:
    """Xavier-uniform weights for ``tables``, table ``i`` drawn on the CPU from a generator of
    its own seeded ``seed + i``: any row of a table can then be drawn without the rest (the
    sharded tables draw their rows so, ``recoder_dist.sharded.tables``)."""
    for offset, table in enumerate(tables):
        generator = torch.Generator().manual_seed(seed + offset)
        weight = nn.init.xavier_uniform_(torch.empty(table.weight.shape), generator=generator)
        table.weight.copy_(weight)


@torch.no_grad()
def seeded_dense_(model: nn.Module, seed: int) -> None:
    """Xavier-uniform weights for ``model``'s ``nn.Linear`` layers, in module order, drawn on
    the CPU from one generator seeded ``seed``, and zero biases: a whole model and each rank of
    its sharded form draw the same dense layers, with no broadcast."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.Linear):
            weight = nn.init.xavier_uniform_(torch.empty(module.weight.shape), generator=generator)
            module.weight.copy_(weight)
            nn.init.zeros_(module.bias)


def embedding_rows(embedding: nn.Embedding, items: torch.Tensor | None) -> torch.Tensor:
    """Rows ``items`` of an embedding table (all rows when None).

    A sparse embedding is always looked up where a gradient is recorded, never read through
    ``.weight``: reading the weight directly would give it a dense gradient, which SparseAdam
    and the sparse sync refuse. Where no gradient is recorded (evaluation), all rows are the
    weight itself, not a copy.
    """
    if items is not None:
        return embedding(items)
    if embedding.sparse and torch.is_grad_enabled():
        return embedding(torch.arange(embedding.num_embeddings, device=embedding.weight.device))
    return embedding.weight


def sharded_class(model: nn.Module) -> type | None:
    """The sharded form of ``model``'s class (``FactorizationModel.sharded_form``), when that
    class defines one itself; None otherwise (an inherited one may not compute its forward)."""
    cls = type(model)
    if "sharded_form" not in vars(cls):
        return None
    return cls.sharded_form()
