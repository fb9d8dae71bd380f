"""Batch inference: the top-K items of every user of a dataset, to Parquet, with Ray Data.

The model goes to the object store once; a pool of actors each takes a copy (on a GPU each
when asked), and ``map_batches`` streams user rows through them, so scoring is spread over the
cluster and the Parquet files are written by the nodes in parallel, to a folder or a URI.
"""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import ray
from ray.data import ActorPoolStrategy

from recoder_dist import storage
from recoder_dist.data.ray_dataset import rows_from_arrow, to_ray_dataset, user_rows_table
from recoder_dist.training.evaluation import recommend_top_k


class _TopK:
    """A Ray Data actor: restores the model once, then scores batches of user rows."""

    def __init__(self, model, k: int, num_items: int, user_ids, item_ids, use_gpu: bool):
        import torch

        if isinstance(model, ray.ObjectRef):
            model = ray.get(model)
        gpu = use_gpu and torch.cuda.is_available()  # Ray gave this actor a GPU: it is cuda:0
        self.device = torch.device("cuda" if gpu else "cpu")
        self.model = model.to(self.device).eval()
        self.k, self.num_items = k, num_items
        self.user_ids, self.item_ids = np.asarray(user_ids), np.asarray(item_ids)

    def __call__(self, table: pa.Table) -> pa.Table:
        rows = rows_from_arrow(table)
        items, valid = recommend_top_k(self.model, rows, self.num_items, self.k, self.device)
        items, valid = items.cpu().numpy(), valid.cpu().numpy()
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
    recoder,
    prepared,
    output: str | os.PathLike,
    *,
    k: int,
    part: str,
    workers: int = 1,
    use_gpu: bool = False,
) -> int:
    """Writes ``user, rank_items`` (original ids, best first; the user's own items excluded)
    for every user of ``prepared.split.<part>`` with interactions as Parquet files in
    ``output`` (a folder or a URI); returns how many users. ``workers`` actors score them, with
    a GPU each when ``use_gpu``."""
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
    model = ray.put(recoder.model)
    scored = rows.map_batches(
        _TopK,
        fn_constructor_args=(model, k, recoder.num_items, user_ids, item_ids, use_gpu),
        batch_size=256,
        batch_format="pyarrow",
        compute=ActorPoolStrategy(size=workers),
        num_gpus=1 if use_gpu else 0,
    )
    filesystem, path = storage.filesystem(output)
    scored.write_parquet(path, filesystem=filesystem)
    return table.num_rows


def _inverse(id_map: dict) -> list:
    ids = [None] * len(id_map)
    for raw, index in id_map.items():
        ids[index] = raw
    return ids
