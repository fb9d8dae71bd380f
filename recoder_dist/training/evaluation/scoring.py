"""Top-k recommendation and metric sums for batches of evaluation users (no Ray here).

``compiled`` (True by default) chooses the CPU fast paths: the model's sparse input and the
top-k kernel; False, their references (a dense input, ``torch.topk``).
"""

from __future__ import annotations

import numbers

import numpy as np
import torch

from recoder_dist.data.collator import SparseBatch, UserRows, row_numbers
from recoder_dist.metrics import Metric
from recoder_dist.training.batch import checked_output, model_input, to_device
from recoder_dist.training.evaluation.top_k import top_k


def _as_batch(rows: UserRows, num_items: int) -> SparseBatch:
    return SparseBatch(
        users=rows.users,
        items=None,
        rows=row_numbers(rows.indptr),
        cols=rows.indices.astype(np.int64, copy=False),
        values=rows.values,
        shape=(len(rows), num_items),
    )


@torch.no_grad()
def predict_scores(
    model, rows: UserRows, num_items: int, device, *, compiled: bool = True
) -> torch.Tensor:
    """Scores of all items for the users of ``rows``, from their interactions."""
    return _scores(model, _as_batch(rows, num_items), device, compiled)


def _scores(model, batch: SparseBatch, device, compiled: bool) -> torch.Tensor:
    users = to_device(batch.users, device)
    input = model_input(model, batch, device, compiled=compiled)
    return checked_output(model, model(input, input_users=users, target_users=users), batch.shape)


@torch.no_grad()
def recommend_top_k(
    model, rows: UserRows, num_items: int, k: int, device, *, compiled: bool = True
):
    """Top ``k`` items per user, never an item of the user's input.

    Returns:
        ``(items, valid)``: ``users x k`` item ids and a mask that is False where a user has
        fewer than ``k`` items left to recommend.
    """
    batch = _as_batch(rows, num_items)
    k = min(k, num_items)
    excluded_rows, excluded_cols = to_device(batch.rows, device), to_device(batch.cols, device)
    scores = _scores(model, batch, device, compiled)
    scores[excluded_rows, excluded_cols] = -torch.inf
    top_scores, top_items = top_k(scores, k, compiled=compiled)
    return top_items, top_scores > -torch.inf


def metric_sums(
    model,
    inputs: UserRows,
    targets: UserRows,
    metrics: list[Metric],
    k: int,
    num_items: int,
    device,
    *,
    compiled: bool = True,
    top_k_of=None,
) -> tuple[np.ndarray, int]:
    """Sum over the users of the batch of each metric, and the number of users counted.

    Users with no target item cannot be scored and are not counted. ``top_k_of(inputs)``
    gives the lists ``(items, valid)`` when they do not come from ``model``'s
    ``recommend_top_k``: a collective that every rank calls, with users or none (a sharded
    model's, ``training.evaluation.sharded``).
    """
    inputs, targets = _scored_users(inputs, targets)
    if top_k_of is not None:
        top_items, valid = top_k_of(inputs)
    elif len(targets):
        top_items, valid = recommend_top_k(model, inputs, num_items, k, device, compiled=compiled)
    if len(targets) == 0:
        return np.zeros(len(metrics)), 0
    return _top_k_metric_sums(top_items, valid, targets, metrics, num_items, device), len(targets)


def batches_metric_sums(
    model,
    batches,
    metrics: list[Metric],
    k: int,
    num_items: int,
    device,
    *,
    compiled: bool = True,
    top_k_of=None,
) -> tuple[np.ndarray, int]:
    """:func:`metric_sums` over ``batches`` (pairs of input and target ``UserRows``), added up."""
    sums, count = np.zeros(len(metrics)), 0
    for inputs, targets in batches:
        batch_sums, batch_count = metric_sums(
            model,
            inputs,
            targets,
            metrics,
            k,
            num_items,
            device,
            compiled=compiled,
            top_k_of=top_k_of,
        )
        sums += batch_sums
        count += batch_count
    return sums, count


def metric_means(sums, count: int, metrics: list[Metric]) -> dict[str, float]:
    """``{metric name: sum / count}`` (NaN without users) and ``eval_users``: ``count``."""
    results = {
        m.name: float(sums[i] / count) if count else float("nan") for i, m in enumerate(metrics)
    }
    results["eval_users"] = int(count)
    return results


def _scored_users(inputs: UserRows, targets: UserRows) -> tuple[UserRows, UserRows]:
    """The users of a batch that have a target item (the others cannot be scored)."""
    keep = np.diff(targets.indptr) > 0
    if keep.all():
        return inputs, targets
    return _select(inputs, keep), _select(targets, keep)


def _top_k_metric_sums(
    top_items: torch.Tensor,
    valid: torch.Tensor,
    targets: UserRows,
    metrics: list[Metric],
    num_items: int,
    device,
) -> np.ndarray:
    """Sum over the users of each metric, given their recommended lists: ``top_items``
    (``users x k`` item ids, best first) where ``valid`` (False past a user's last item that
    may be recommended), and ``targets`` with at least one item a user (``_scored_users``)."""
    num_relevant = np.diff(targets.indptr)
    hits = (_is_target(top_items, targets, num_items, device) & valid).cpu().numpy()
    lists = relevant_lists = None  # only metrics without evaluate_hits read these

    sums = np.empty(len(metrics))
    for i, metric in enumerate(metrics):
        if metric.vectorized:
            values = metric.evaluate_hits(hits, num_relevant)
        else:
            if lists is None:
                lists = [row[ok] for row, ok in zip(top_items.cpu().numpy(), valid.cpu().numpy())]
                relevant_lists = np.split(targets.indices, targets.indptr[1:-1])
            values = metric.evaluate_lists(lists, relevant_lists)
        sums[i] = float(np.sum(values, dtype=np.float64))
    return sums


def _is_target(items: torch.Tensor, targets: UserRows, num_items: int, device) -> torch.Tensor:
    """Whether ``items[r, j]`` is a target of row ``r``: a binary search of the keys
    ``row * num_items + item`` among the targets', not a users x items table to clear and
    fill. ``metric_sums`` only asks with some targets."""
    target_keys = row_numbers(targets.indptr) * num_items + targets.indices
    target_keys = to_device(np.sort(target_keys), device)
    keys = torch.arange(len(items), device=device)[:, None] * num_items + items
    found = torch.searchsorted(target_keys, keys).clamp_max_(len(target_keys) - 1)
    return target_keys[found] == keys


def _select(rows: UserRows, mask: np.ndarray) -> UserRows:
    lengths = np.diff(rows.indptr)[mask]
    entry_mask = np.repeat(mask, np.diff(rows.indptr))
    return UserRows(
        users=rows.users[mask],
        indptr=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        indices=rows.indices[entry_mask],
        values=rows.values[entry_mask],
    )


def check_metrics(metrics, num_recommendations: int | None) -> int:
    """Validates the metrics and returns the list length to compute."""
    if isinstance(metrics, Metric):
        raise TypeError(f"metrics must be a list of metrics, e.g. [{type(metrics).__name__}(...)]")
    if not metrics:
        raise ValueError("evaluation needs at least one metric, e.g. [Recall(20), NDCG(100)]")
    for metric in metrics:
        if not isinstance(metric, Metric):
            raise TypeError(f"metrics must be recoder_dist.metrics.Metric, got {metric!r}")
    longest = max((m.k or 0) for m in metrics)
    if num_recommendations is None:
        if longest == 0:
            raise ValueError("set num_recommendations: no metric has a k")
        return longest
    if (
        isinstance(num_recommendations, bool)
        or not isinstance(num_recommendations, numbers.Integral)
        or num_recommendations < 1
    ):
        raise ValueError(f"num_recommendations must be an int >= 1, got {num_recommendations!r}")
    if longest > num_recommendations:
        raise ValueError(
            f"a metric reads the top {longest} but num_recommendations={num_recommendations}"
        )
    return int(num_recommendations)
