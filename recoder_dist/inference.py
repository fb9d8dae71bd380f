"""Batch inference: the top-K items of every user of a dataset, to Parquet, with Ray Data.

The model goes to the object store once; a pool of actors each takes a copy, and
``map_batches`` streams user rows through them, so scoring is spread over the cluster and the
Parquet files are written by the actors' nodes in parallel.
"""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import ray

from recoder_dist.data.ray_dataset import rows_from_arrow, to_ray_dataset, user_rows_table
from recoder_dist.training.evaluation import recommend_top_k


class _TopK:
    """A Ray Data actor: restores the model once, then scores batches of user rows."""

    def __init__(self, model, k: int, num_items: int, user_ids, item_ids):
        import torch

        if isinstance(model, ray.ObjectRef):
            model = ray.get(model)
        self.model = model.eval()
        self.k, self.num_items = k, num_items
        self.user_ids, self.item_ids = np.asarray(user_ids), np.asarray(item_ids)
        self.device = torch.device("cpu")

    def __call__(self, table: pa.Table) -> pa.Table:
        rows = rows_from_arrow(table)
        items, valid = recommend_top_k(self.model, rows, self.num_items, self.k, self.device)
        items, valid = items.numpy(), valid.numpy()
        lengths = valid.sum(1)
        offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
        flat = self.item_ids[items[valid]]
        return pa.table(
            {
                "user": pa.array(self.user_ids[rows.users]),
                "rank_items": pa.ListArray.from_arrays(offsets, pa.array(flat)),
            }
        )


def write_recommendations(
    recoder, prepared, output: str | os.PathLike, *, k: int, part: str, workers: int = 1
) -> int:
    """Writes ``user, rank_items`` (original ids, best first; the user's own items excluded)
    for every user of ``prepared.split.<part>`` with interactions; returns how many."""
    dataset = {
        "train": prepared.split.train,
        "test": prepared.split.test,
        "validation": prepared.split.validation,
    }[part]
    if dataset is None:
        raise ValueError(f"the prepared split has no {part} part")
    if k < 1:
        raise ValueError(f"--top-k must be >= 1, got {k}")
    user_ids, item_ids = _inverse(prepared.user_id_map), _inverse(prepared.item_id_map)
    table = user_rows_table(dataset)
    table = table.drop_columns([c for c in table.column_names if c.startswith("target_")])
    rows = to_ray_dataset(table, rows_per_block=1024)
    scored = rows.map_batches(
        _TopK,
        fn_constructor_args=(ray.put(recoder.model), k, recoder.num_items, user_ids, item_ids),
        batch_size=256,
        batch_format="pyarrow",
        concurrency=workers,
    )
    scored.write_parquet(os.fspath(output))
    return table.num_rows


def _inverse(id_map: dict) -> list:
    ids = [None] * len(id_map)
    for raw, index in id_map.items():
        ids[index] = raw
    return ids
