"""What each CPU fast path is worth end to end: a training epoch and an evaluation with every
fast path on, and with each one replaced by its reference, one at a time.

What is measured (one torch thread, in-process training and evaluation, ``num_workers=0``):

- ``ml-1m train`` / ``gowalla train``: seconds of a training epoch's steps (collation,
  forward, backward, optimizer), the ML-20M script's settings as in ``train_speed.py``:
  DynamicAutoencoder([200], tanh, noise 0.5, sparse embeddings), batch 500, negative sampling,
  Adam (SparseAdam for the embeddings), loss 'logloss'. A round is one training run with an
  epoch per variant (``--repeats`` of each), after an untimed first epoch.
- ``ml-1m train, all items``: the same with ``negative_sampling=False``: the case where a batch
  touches every row of the tables (what ``_EveryRow`` and SparseAdam's every-row update are
  for).
- ``ml-1m eval`` / ``gowalla eval``: seconds of a whole ``Recoder.evaluate`` call (top 100 over
  all items, Recall@20, Recall@50, NDCG@100, batches of 500 users; the splits of
  ``eval_speed.py``), on a model trained for one epoch.

Each fast path is switched off by replacing it with its reference; the replacements are
listed in ``SWITCHES``, and a workload only runs the switches whose code it reaches. Variants
interleave (A B C A B C; the order rotates each round); the table gives the median and the
range over every timed epoch or evaluation, and "off/on": the median with the path off over
the median with every path on, in CPU seconds of this process (which a loaded machine moves
far less than the wall clock) and in wall-clock seconds.

    python benchmarks/fast_paths.py                  # ~15 min on an idle 2-core machine
    python benchmarks/fast_paths.py --quick          # ml-1m only, 1 round
    python benchmarks/fast_paths.py --workloads "gowalla eval" --rounds 2
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from _common import load_average, load_matrix, markdown_table, median
from eval_speed import eval_matrices, metrics

MODEL = dict(hidden_layers=[200], activation_type="tanh", noise_prob=0.5, sparse=True)
TRAIN = dict(batch_size=500, lr=1e-3, weight_decay=2e-5)


# ------------------------------------------------------------------ the references


def _unique_items(indices, size):
    """The collator's item marking by ``np.unique`` (its reference)."""
    items, positions = np.unique(indices, return_inverse=True)
    return items.astype(np.int64), positions.reshape(-1).astype(np.int64, copy=False)


def _repeated_rows(indptr):
    """The collator's row numbers by ``np.repeat`` (its reference)."""
    return np.repeat(np.arange(len(indptr) - 1, dtype=np.int64), np.diff(indptr))


def _searched_hits(items, targets, num_items, device):
    from recoder_dist.training import evaluation

    return evaluation._searched_hits(items, targets, num_items, device)


def _gathered_every_row(param, values, exp_avg, exp_avg_sq, beta1, beta2, eps, step_size):
    """SparseAdam's update of a gradient with every row, through the gather/scatter path."""
    rows = torch.arange(len(param))
    old_avg, old_avg_sq = exp_avg.index_select(0, rows), exp_avg_sq.index_select(0, rows)
    avg = values.sub(old_avg).mul_(1 - beta1).add_(old_avg)
    avg_sq = values.pow(2).sub_(old_avg_sq).mul_(1 - beta2).add_(old_avg_sq)
    exp_avg.index_copy_(0, rows, avg)
    exp_avg_sq.index_copy_(0, rows, avg_sq)
    param.index_add_(0, rows, avg.div_(avg_sq.sqrt_().add_(eps)).mul_(-step_size))


class _AutogradEmbeddingBag:
    """``_SparseRowsTimes`` replaced by ``embedding_bag`` with autograd's own backward."""

    @staticmethod
    def apply(weight, rows, cols, values, num_rows):
        from recoder_dist.nn.autoencoder import _bag_offsets

        offsets = _bag_offsets(rows, num_rows)
        return F.embedding_bag(cols, weight, offsets, mode="sum", per_sample_weights=values)


def _looked_up_rows(embedding, items):
    """``embedding_rows`` without ``_EveryRow`` and the every-row check: a lookup of
    ``0..n-1`` where every row is read with gradients."""
    if items is None:
        if embedding.sparse and torch.is_grad_enabled():
            return embedding(torch.arange(embedding.num_embeddings))
        return embedding.weight
    return embedding(items)


def _dense_codes(self, input, input_items):
    """``DynamicAutoencoder._codes`` through the dense product only (the encoding's
    reference): the input densified, normalized, dropped out and multiplied."""
    from recoder_dist.nn.base import embedding_rows

    encoder = embedding_rows(self.encoder_embedding, input_items)
    if input.is_sparse:
        input = input.to_dense()
    z = self.noise(F.normalize(input, p=2, dim=1)) @ encoder
    z = self.act(z + self.encoder_bias)
    for layer in self.encoder_layers:
        z = self.act(layer(z))
    z = self.dropout(z)
    if self.is_constrained:
        for layer, bias in zip(reversed(self.encoder_layers), self.decoder_biases):
            z = self.act(F.linear(z, layer.weight.t(), bias))
    else:
        for layer in self.decoder_layers:
            z = self.act(layer(z))
    return z


def _switches():
    """Fast path -> the (object, attribute, reference) replacements that switch it off."""
    from recoder_dist.data import collator
    from recoder_dist.nn import autoencoder, base, factorization
    from recoder_dist.training import evaluation, sparse_adam, top_k_kernel

    no = lambda *args: False  # noqa: E731
    return {
        "collator item marking (numba)": [(collator, "_marked_items", _unique_items)],
        "collator row numbers (numba)": [(collator, "_filled_row_numbers", _repeated_rows)],
        "top-k kernel (numba)": [(top_k_kernel, "applies", no)],
        "hit test (numba)": [(evaluation, "_is_target", _searched_hits)],
        "SparseAdam compiled update (numba)": [(sparse_adam, "_compiled_update_applies", no)],
        "SparseAdam every-row update": [(sparse_adam, "_update_every_row", _gathered_every_row)],
        "encoding from entries (sparse input)": [
            (autoencoder.DynamicAutoencoder, "accepts_sparse_input", False),
            (autoencoder.DynamicAutoencoder, "_codes", _dense_codes),
        ],
        "_SparseRowsTimes backward": [(autoencoder, "_SparseRowsTimes", _AutogradEmbeddingBag)],
        "_EveryRow": [
            (autoencoder, "embedding_rows", _looked_up_rows),
            (factorization, "embedding_rows", _looked_up_rows),
            (base, "embedding_rows", _looked_up_rows),
        ],
        "top-k product slicing (score_factors)": [
            (evaluation, "_score_factors", lambda *args: None)
        ],
    }


MEANS = {}  # (workload, variant) -> the evaluation's metric means
SWITCHES = None  # filled in main(): importing the package here would slow --help

TRAIN_PATHS = [
    "collator item marking (numba)",
    "collator row numbers (numba)",
    "SparseAdam compiled update (numba)",
    "SparseAdam every-row update",
    "encoding from entries (sparse input)",
    "_SparseRowsTimes backward",
    "_EveryRow",
]
# With negative sampling, a group of 500 users rarely touches every item (never on Gowalla):
# the every-row paths are measured where they are reached, training on all items.
NS_TRAIN_PATHS = [p for p in TRAIN_PATHS if "every-row" not in p and p != "_EveryRow"]
ALL_ITEMS_PATHS = [
    "SparseAdam compiled update (numba)",
    "SparseAdam every-row update",
    "_EveryRow",
]
EVAL_PATHS = [
    "collator row numbers (numba)",
    "top-k kernel (numba)",
    "hit test (numba)",
    "encoding from entries (sparse input)",
    "top-k product slicing (score_factors)",
]
# Variants beyond "each path off alone": the every-row update is only reached where the
# compiled update does not apply, and every path off at once.
ADAM_BOTH = ("SparseAdam compiled update (numba)", "SparseAdam every-row update")


@contextlib.contextmanager
def switched_off(paths):
    saved = []
    try:
        for path in paths:
            for owner, name, reference in SWITCHES[path]:
                saved.append((owner, name, owner.__dict__[name]))
                setattr(owner, name, reference)
        yield
    finally:
        for owner, name, original in reversed(saved):
            setattr(owner, name, original)


def variants(paths: list[str]) -> dict[str, tuple[str, ...]]:
    found = {"every fast path on": ()}
    for path in paths:
        if path == ADAM_BOTH[1]:  # reached only where the compiled update does not apply
            found["off: both SparseAdam fast updates"] = ADAM_BOTH
        else:
            found[f"off: {path}"] = (path,)
    found["off: all of the above"] = tuple(paths)
    return found


# ------------------------------------------------------------------ the workloads


def _recoder():
    from recoder_dist import nn
    from recoder_dist.model import Recoder

    model = nn.DynamicAutoencoder(**MODEL)
    return Recoder(
        model, optimizer_type="adam", loss="logloss", num_workers=0, cpus_per_worker=1, seed=0
    )


def training(name: str, negative_sampling: bool, args):
    """A function of a list of variants that trains one run with an epoch per variant (and
    a first, untimed epoch) and returns each epoch's (wall, CPU) seconds. The worker loop runs
    in this process (``num_workers=0``): each epoch's ``_run_steps`` is wrapped so that its
    variant's paths are off while it runs. The batches of an epoch are made a few ahead in a
    thread (``EpochPrefetcher``): a few at the edge of an epoch are made under its
    neighbour's variant. CPU seconds are this process's, all threads: on a loaded machine they
    move far less than the wall clock."""
    from recoder_dist.data.dataset import RecommendationDataset
    from recoder_dist.training import worker_loop

    dataset = RecommendationDataset(load_matrix(name))
    original = worker_loop._run_steps

    def run(schedule: list[tuple[str, ...]]) -> list[tuple[float, float]]:
        pending, windows = [(), *schedule], []

        def timed(*args, **kwargs):
            with switched_off(pending.pop(0)):
                wall, cpu = time.perf_counter(), time.process_time()
                result = original(*args, **kwargs)
                windows.append((time.perf_counter() - wall, time.process_time() - cpu))
            return result

        worker_loop._run_steps = timed
        try:
            _recoder().train(
                dataset,
                num_epochs=len(schedule) + 1,
                negative_sampling=negative_sampling,
                **TRAIN,
            )
        finally:
            worker_loop._run_steps = original
        return windows[1:]

    return run


def evaluation(name: str):
    from recoder_dist.data.dataset import RecommendationDataset

    train, inputs, targets = eval_matrices(name)
    recoder = _recoder()
    recoder.train(RecommendationDataset(train), num_epochs=1, negative_sampling=True, **TRAIN)
    dataset = RecommendationDataset(inputs, targets)

    def run(schedule: list[tuple[str, ...]]) -> list[tuple[float, float]]:
        windows = []
        for paths in schedule:
            with switched_off(paths):
                wall, cpu = time.perf_counter(), time.process_time()
                found = recoder.evaluate(dataset, num_recommendations=100, metrics=metrics())
                windows.append((time.perf_counter() - wall, time.process_time() - cpu))
            MEANS[(f"{name} eval", paths)] = found  # every variant should rank the same
        return windows

    return run


WORKLOADS = {
    "ml-1m train": (lambda args: training("ml-1m", True, args), NS_TRAIN_PATHS),
    "gowalla train": (lambda args: training("gowalla", True, args), NS_TRAIN_PATHS),
    "ml-1m train, all items": (lambda args: training("ml-1m", False, args), ALL_ITEMS_PATHS),
    "ml-1m eval": (lambda args: evaluation("ml-1m"), EVAL_PATHS),
    "gowalla eval": (lambda args: evaluation("gowalla"), EVAL_PATHS),
}


def main():
    global SWITCHES
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=WORKLOADS)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--repeats", type=int, default=2, help="epochs or evaluations of each variant a round"
    )
    parser.add_argument("--quick", action="store_true", help="ml-1m only, 1 round")
    args = parser.parse_args()
    if args.quick:
        args.workloads, args.rounds = [w for w in args.workloads if w.startswith("ml-1m")], 1
    logging.getLogger("ray").setLevel(logging.WARNING)
    torch.set_num_threads(1)
    SWITCHES = _switches()
    started = time.perf_counter()
    loads = [os.getloadavg()[0]]
    times = {}  # (workload, variant) -> [(wall, cpu) seconds]
    runs = {name: WORKLOADS[name][0](args) for name in args.workloads}
    for round_ in range(args.rounds):
        for name in args.workloads:
            found = variants(WORKLOADS[name][1])
            order = list(found)
            shift = round_ % len(order)
            order = (order[shift:] + order[:shift]) * args.repeats
            print(f"round {round_ + 1}/{args.rounds}: {name}: {order}", flush=True)
            for variant, seconds in zip(order, runs[name]([found[v] for v in order])):
                times.setdefault((name, variant), []).append(seconds)
            loads.append(os.getloadavg()[0])

    print(f"\nmachine load (1-minute average) before and after each round: {loads}")
    print(f"now: {load_average()}; torch threads: 1; {args.rounds} round(s)")
    for name in args.workloads:
        base = [median(t[i] for t in times[(name, "every fast path on")]) for i in (0, 1)]
        rows = []
        for variant in variants(WORKLOADS[name][1]):
            row = [variant]
            for i in (1, 0):  # CPU, then wall
                values = [t[i] for t in times[(name, variant)]]
                seconds = median(values)
                row += [
                    f"{seconds:.3f}",
                    f"{min(values):.3f}-{max(values):.3f}",
                    f"{seconds / base[i]:.2f}",
                ]
            rows.append(row + [len(times[(name, variant)])])
        print(f"\n### {name}: seconds (CPU of this process, and wall clock)\n")
        header = ["variant", "CPU s", "range", "off/on", "wall s", "range", "off/on", "n"]
        print(markdown_table(header, rows))
        means = {paths: m for (w, paths), m in MEANS.items() if w == name}
        if means:
            keys = list(next(iter(means.values())))
            spread = {
                k: max(m[k] for m in means.values()) - min(m[k] for m in means.values())
                for k in keys
            }
            print(f"\n(metric means over the variants: largest minus smallest {spread})")
    print(f"\nwall time of the benchmark: {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
