"""A training set's user rows, read once into Ray's object store, for several training runs."""

from __future__ import annotations

from dataclasses import dataclass

from recoder_dist.data.epoch_order import RowBlocks


@dataclass(frozen=True)
class TrainingRows:
    """User rows already in the object store, in blocks, with what ``Recoder.train`` needs to
    know of the set they came from. Made by ``recoder_dist.model.read_training_rows``; pass it
    to ``Recoder.train`` as ``train_dataset`` in place of the files or matrix, so that several
    runs (the trials of a sweep) train from one read. It holds object references only: the rows
    live as long as it does, in the process that read them (their owner).
    """

    blocks: RowBlocks
    num_users: int  # the catalog's: user ids are below it
    num_items: int  # item ids are below it
    num_interactions: int

    def __len__(self) -> int:
        return self.blocks.num_rows
