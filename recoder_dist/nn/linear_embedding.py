"""recsys-recoder 0.4.0's ``LinearEmbedding``: an embedding table used as a linear map over a
subset of its rows.

Our models score item subsets through :func:`recoder_dist.nn.base.embedding_rows` instead; this
module keeps 0.4.0's public layer for code that builds its own models from it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LinearEmbedding(nn.Module):
    """A linear layer whose weight is an ``nn.Embedding``'s table, restricted to some rows.

    With ``input_based=True`` it is an input layer: ``forward(items, y)`` maps ``y`` (``batch x
    len(items)``, the values of those items) to ``batch x embedding_dim`` as
    ``y @ table[items] + bias``. With ``input_based=False`` it is an output layer: ``y`` (``batch
    x embedding_dim``) maps to the scores of ``items``, ``y @ table[items].T + bias[items]``.
    ``items=None`` means every row of the table, in order.

    Args:
        embedding_layer: the table (shared, not copied: a tied encoder and decoder can pass the
            same one).
        input_based: an input layer (True) or an output layer (False).
        bias: add a learned bias (``embedding_dim`` of them for an input layer, one per row for
            an output layer), initialized to zero (0.4.0 left it uninitialized and its models
            zeroed it).
    """

    def __init__(self, embedding_layer: nn.Embedding, input_based: bool = True, bias: bool = True):
        super().__init__()
        if not isinstance(embedding_layer, nn.Embedding):
            raise TypeError(
                f"embedding_layer must be an nn.Embedding, got {type(embedding_layer).__name__}"
            )
        self.embedding_layer = embedding_layer
        self.input_based = input_based
        rows, dim = embedding_layer.num_embeddings, embedding_layer.embedding_dim
        self.in_features, self.out_features = (rows, dim) if input_based else (dim, rows)
        self.bias = nn.Parameter(torch.zeros(self.out_features)) if bias else None

    def forward(self, x: torch.Tensor | None, y: torch.Tensor) -> torch.Tensor:
        """Applies the layer.

        Args:
            x: the rows (item ids) that ``y``'s columns (input layer) or the output's columns
                (output layer) stand for; None for all rows.
            y: the input, ``batch x len(x)`` (input layer) or ``batch x embedding_dim``.
        """
        if x is None:
            rows, bias = self.embedding_layer.weight, self.bias
        else:
            rows = self.embedding_layer(x)
            # An input layer's bias belongs to its outputs (the embedding dimensions), so no
            # row subset applies to it.
            bias = self.bias if self.input_based or self.bias is None else self.bias[x]
        weight = rows.t() if self.input_based else rows
        return F.linear(y, weight, bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"input_based={self.input_based}, bias={self.bias is not None}"
        )
