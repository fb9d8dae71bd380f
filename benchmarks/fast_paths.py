"""What each CPU fast path is worth end to end: a training epoch and an evaluation with every
fast path on, and with each one replaced by its reference, one at a time.

What is measured (one torch thread, in-process training and evaluation, ``num_workers=0``):

- ``ml-1m train`` / ``gowalla train``: seconds of a training epoch's steps (collation,
  forward, backward, optimizer), the ML-20M script's settings as in ``train_speed.py``:
  DynamicAutoencoder([200], tanh, noise 0.5, sparse embeddings), batch 500, negative sampling,
  Adam (SparseAdam for the embeddings), loss 'logloss'. A round is one training run with an
  epoch per variant (``--repeats`` of each), after an untimed first epoch.
- ``ml-1m eval`` / ``gowalla eval``: seconds of a whole ``Recoder.evaluate`` call (top 100 over
  all items, Recall@20, Recall@50, NDCG@100, batches of 500 users; the splits of
  ``eval_speed.py``), on a model trained for one epoch.

Each fast path is switched off by replacing it with its reference (``SWITCHES``); with all of
them off, a run is what ``Recoder(..., kernels="reference")`` runs. Variants interleave
(A B C A B C; the order rotates each round); the table gives the median and the range over
every timed epoch or evaluation, and "off/on": the median with the path off over the median
with every path on, in CPU seconds of this process (which a loaded machine moves far less
than the wall clock) and in wall-clock seconds.

The paths measured on 2026-12-06 that gained less than 10% were deleted (benchmarks/
RESULTS.md); the script that measured them is this file at commit 9ec6217.

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

import torch
from _common import load_average, load_matrix, markdown_table, median
from eval_speed import eval_matrices, metrics

MODEL = dict(hidden_layers=[200], activation_type="tanh", noise_prob=0.5, sparse=True)
TRAIN = dict(batch_size=500, lr=1e-3, weight_decay=2e-5)


# ------------------------------------------------------------------ the references


def _switches():
    """Fast path -> the (object, attribute, reference) replacements that switch it off."""
    from recoder_dist.nn import autoencoder
    from recoder_dist.training.evaluation import top_k_kernel

    return {
        # A dense input: the step densifies the batch, the model multiplies it whole.
        "encoding from entries (sparse input)": [
            (autoencoder.DynamicAutoencoder, "accepts_sparse_input", False)
        ],
        "top-k kernel (numba)": [(top_k_kernel, "applies", lambda *args: False)],
    }


TRAIN_PATHS = ["encoding from entries (sparse input)"]
EVAL_PATHS = ["encoding from entries (sparse input)", "top-k kernel (numba)"]


MEANS = {}  # (workload, variant) -> the evaluation's metric means
SWITCHES = None  # filled in main(): importing the package here would slow --help


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
    found.update({f"off: {path}": (path,) for path in paths})
    if len(paths) > 1:
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
    from recoder_dist.training.worker import worker_loop

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
    "ml-1m train": (lambda args: training("ml-1m", True, args), TRAIN_PATHS),
    "gowalla train": (lambda args: training("gowalla", True, args), TRAIN_PATHS),
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
