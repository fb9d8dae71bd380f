"""recsys-recoder 0.4.0's in-process data path: ``UsersInteractions``, ``Batch``,
``BatchCollator`` and ``RecommendationDataLoader``.

Training on Ray does not use them (the workers collate Arrow rows with
:class:`~recoder_dist.data.collator.Collator` directly); they are here so that code written
against 0.4.0 runs unchanged. The batches come from the same vectorized collator that training
uses, converted to 0.4.0's torch form at the end, so there is one negative-sampling rule.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch
from torch.utils.data import BatchSampler, DataLoader, RandomSampler

from recoder_dist.data.collator import Collator, SparseBatch, UserRows, resolve_sampling_users
from recoder_dist.data.dataset import RecommendationDataset


class UsersInteractions:
    """The interactions of some users: row ``i`` of ``interactions_matrix`` is user
    ``users[i]``'s.

    Args:
        users: the users' ids (rows of the model's user table), one per row.
        interactions_matrix: ``len(users) x num_items`` scipy sparse matrix (kept as CSR).

    Raises:
        TypeError: the matrix is not a scipy sparse matrix.
        ValueError: the matrix is not 2-D, or its rows are not one per user.
    """

    def __init__(self, users, interactions_matrix):
        if not sp.issparse(interactions_matrix):
            raise TypeError(
                "interactions_matrix must be a scipy sparse matrix, got "
                f"{type(interactions_matrix).__name__}"
            )
        users = np.asarray(users, dtype=np.int64).reshape(-1)
        if interactions_matrix.ndim != 2 or interactions_matrix.shape[0] != len(users):
            raise ValueError(
                f"interactions_matrix has shape {interactions_matrix.shape}; it needs one row "
                f"per user ({len(users)} users)"
            )
        self.users = users
        self.interactions_matrix = sp.csr_matrix(interactions_matrix)

    def __len__(self) -> int:
        return len(self.users)

    def __repr__(self) -> str:
        return (
            f"UsersInteractions({len(self.users)} users x {self.interactions_matrix.shape[1]} "
            f"items, nnz={self.interactions_matrix.nnz})"
        )

    def user_rows(self) -> UserRows:
        """The rows as our collator's :class:`UserRows` (canonical: each row's items sorted and
        distinct, duplicates summed, explicit zeros dropped, as ``RecommendationDataset``
        keeps its matrices), with ``users`` as the rows' users."""
        matrix = RecommendationDataset(self.interactions_matrix).interactions
        return UserRows(
            users=self.users,
            indptr=matrix.indptr.astype(np.int64),
            indices=matrix.indices.astype(np.int64),
            values=matrix.data.astype(np.float32, copy=False),
        )


@dataclass
class Batch:
    """A sparse batch of user x item interactions, as 0.4.0's.

    Attributes:
        users: the batch's users (LongTensor), one per row.
        items: the items that the columns stand for (LongTensor, sorted), or None when the
            columns are all the catalog's items in order (no negative sampling).
        indices: ``2 x nnz`` LongTensor of (row, column) per interaction, row-major.
        values: the interactions' values (FloatTensor).
        size: ``(rows, columns)`` of the sparse matrix.
    """

    users: torch.Tensor
    items: torch.Tensor | None
    indices: torch.Tensor
    values: torch.Tensor
    size: torch.Size

    @classmethod
    def from_sparse_batch(cls, batch: SparseBatch) -> Batch:
        """The torch form of a collator's :class:`SparseBatch` (shares its arrays' memory)."""
        return cls(
            users=torch.from_numpy(np.ascontiguousarray(batch.users, dtype=np.int64)),
            items=None if batch.items is None else torch.from_numpy(batch.items),
            indices=torch.from_numpy(np.stack([batch.rows, batch.cols])),
            values=torch.from_numpy(np.ascontiguousarray(batch.values, dtype=np.float32)),
            size=torch.Size(batch.shape),
        )

    def to_dense(self) -> torch.Tensor:
        """The batch as a dense ``size`` FloatTensor."""
        dense = torch.zeros(self.size, dtype=self.values.dtype)
        dense[self.indices[0], self.indices[1]] = self.values
        return dense


class BatchCollator:
    """Collates a :class:`UsersInteractions` into :class:`Batch`es of ``batch_size`` users.

    With ``negative_sampling``, the items of every batch are the sorted union of the items of
    all the users given to one ``collate`` call (0.4.0's mini-batch negative sampling), so a
    batch is scored on its users' items and the other users' items as negatives.

    Args:
        batch_size: users per batch (the last batch may have fewer).
        negative_sampling: sample the items as above; when False the columns are all items.
    """

    def __init__(self, batch_size: int, negative_sampling: bool = False):
        resolve_sampling_users(batch_size, 0)  # validates batch_size
        self.batch_size = batch_size
        self.negative_sampling = negative_sampling

    def collate(self, users_interactions: UsersInteractions) -> list[Batch]:
        """The batches of ``users_interactions``, in its row order.

        Args:
            users_interactions: the users to collate.

        Returns:
            ``ceil(len(users) / batch_size)`` batches.
        """
        if not isinstance(users_interactions, UsersInteractions):
            raise TypeError(
                f"collate takes a UsersInteractions, got {type(users_interactions).__name__}"
            )
        collator = Collator(
            num_items=users_interactions.interactions_matrix.shape[1],
            batch_size=self.batch_size,
            negative_sampling=self.negative_sampling,
        )
        return [Batch.from_sparse_batch(b) for b in collator(users_interactions.user_rows())]


class RecommendationDataLoader:
    """Iterates a :class:`RecommendationDataset` in shuffled groups of users, as 0.4.0's
    loader.

    Every iteration draws a new random order of all the dataset's rows (torch's
    ``RandomSampler``, so ``torch.manual_seed`` fixes it, and the same seed gives 0.4.0's
    order), cuts it into groups of ``num_sampling_users`` (the last may be shorter), and:

    - without ``collate_fn``, collates each group with :class:`BatchCollator` and yields
      ``(input, target)`` per batch: two :class:`Batch`es, or ``(input, None)`` when the
      dataset has no target. Input and target of a group share their sampled items' rule but
      each samples from its own matrix, as in 0.4.0.
    - with ``collate_fn``, yields ``(collate_fn(input), collate_fn(target) or None)`` per
      group, where input and target are the group's :class:`UsersInteractions`.

    Args:
        dataset: the rows to iterate (all rows of its matrix, empty ones included).
        batch_size: users per batch.
        negative_sampling: mini-batch negative sampling over each group's items.
        num_sampling_users: users per sampling group, at least ``batch_size``; 0 means
            ``batch_size``.
        num_workers: torch DataLoader worker processes that extract and collate the groups
            (0: in this process).
        collate_fn: a function of a :class:`UsersInteractions`, replacing the default
            collation.
    """

    def __init__(
        self,
        dataset: RecommendationDataset,
        batch_size: int,
        negative_sampling: bool = False,
        num_sampling_users: int = 0,
        num_workers: int = 0,
        collate_fn: Callable | None = None,
    ):
        if not isinstance(dataset, RecommendationDataset):
            raise TypeError(
                f"dataset must be a RecommendationDataset, got {type(dataset).__name__}"
            )
        self.batch_collator = BatchCollator(batch_size, negative_sampling=negative_sampling)
        if num_sampling_users is None or num_sampling_users == 0:
            num_sampling_users = batch_size
        if num_sampling_users < batch_size:
            raise ValueError(
                f"num_sampling_users={num_sampling_users} must be at least "
                f"batch_size={batch_size} (or 0 to mean batch_size)"
            )
        self.dataset = dataset
        self.batch_size = batch_size
        self.negative_sampling = negative_sampling
        self.num_sampling_users = int(num_sampling_users)
        self.num_workers = num_workers
        self._collate_fn = collate_fn
        groups = BatchSampler(
            RandomSampler(range(dataset.num_users)), self.num_sampling_users, drop_last=False
        )
        # batch_size=None hands each group of row numbers to _Groups.__getitem__ at once, so a
        # group is one CSR slice, not one lookup per user.
        self._loader = DataLoader(
            _Groups(dataset),
            sampler=groups,
            batch_size=None,
            num_workers=num_workers,
            collate_fn=_CollateGroup(collate_fn or self.batch_collator.collate),
        )

    def __iter__(self) -> Iterator[tuple]:
        if self._collate_fn is not None:
            yield from self._loader
            return
        for inputs, targets in self._loader:
            for i, input in enumerate(inputs):
                yield input, None if targets is None else targets[i]

    def __len__(self) -> int:
        """The number of items that an iteration yields: batches, or groups with a
        ``collate_fn``. (0.4.0 returned ``ceil(rows / batch_size)`` either way, the same
        number when ``num_sampling_users`` is a multiple of ``batch_size``.)"""
        rows, group = self.dataset.num_users, self.num_sampling_users
        if self._collate_fn is not None:
            return -(-rows // group)
        full, rest = divmod(rows, group)
        return full * -(-group // self.batch_size) + -(-rest // self.batch_size)


class _Groups:
    """The dataset's rows as a map-style torch dataset indexed by lists of row numbers."""

    def __init__(self, dataset: RecommendationDataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return self.dataset.num_users

    def __getitem__(self, rows) -> tuple[UsersInteractions, UsersInteractions | None]:
        rows = np.asarray(rows, dtype=np.int64)
        input = UsersInteractions(rows, self.dataset.interactions[rows])
        if self.dataset.target is None:
            return input, None
        return input, UsersInteractions(rows, self.dataset.target[rows])


class _CollateGroup:
    """Applies a collate function to a group's input and target (a class, not a closure, so
    that DataLoader workers can receive it)."""

    def __init__(self, collate_fn: Callable):
        self.collate_fn = collate_fn

    def __call__(self, group):
        input, target = group
        return self.collate_fn(input), None if target is None else self.collate_fn(target)
