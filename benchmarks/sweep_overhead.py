"""A sweep's overhead (issue 36, item 3): a 6-trial ml-100k sweep's wall time against the time
its trials spend in their epochs, for trials on one Ray Train worker (``--workers 1``) and
trials that train in their own process (``--workers 0``).

Each side runs ``tune/sweep.py`` in a fresh process on its own local Ray (the machine's CPUs),
one trial at a time, from a tree of the repository (``--side LABEL TREE WORKERS``; the tree's
``tune/sweep.py`` and package: a copy of an earlier commit gives "before"). The trials' epochs
are the ``seconds`` of every epoch record in each trial's last checkpoint (its
``history.json``: training and the evaluations in it).

    recoder-dist prepare --dataset ml-100k --data-dir ../shared/data/ml-100k --output /tmp/ml100k-p
    python benchmarks/sweep_overhead.py --data /tmp/ml100k-p --side after-0 . 0 --side after-1 . 1
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import load_average, markdown_table

SWEEP = [
    *("--lrs", "1e-3", "3e-3", "--batch-sizes", "50", "100", "200"),
    *("--epochs", "10", "--eval-freq", "5", "--grace-period", "10"),
    *("--concurrent", "1", "--hidden", "64"),
]
TRIAL = re.compile(r"(?:trial-|run_trial_)([0-9a-f]{5}_\d{5})")  # a Train run's, a Tune trial's


def epochs_seconds(storage: str) -> tuple[float, int]:
    """The seconds of the trials' epochs (each trial's longest record of them) and the
    number of trials found."""
    longest: dict[str, list[dict]] = {}
    for path in glob.glob(os.path.join(storage, "**", "history.json"), recursive=True):
        match = TRIAL.search(path)
        if match is None:
            continue
        with open(path) as f:
            records = json.load(f)
        if len(records) > len(longest.get(match[1], [])):
            longest[match[1]] = records
    total = sum(r["seconds"] for records in longest.values() for r in records)
    return total, len(longest)


def one_side(label: str, tree: str, workers: str, data: str) -> list:
    tree = str(Path(tree).resolve())
    storage = tempfile.mkdtemp(prefix=f"sweep-overhead-{label}-")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = tree
    command = [sys.executable, os.path.join(tree, "tune", "sweep.py"), "--data", data]
    command += ["--storage", storage, "--workers", workers, *SWEEP]
    load = load_average()
    started = time.perf_counter()
    done = subprocess.run(command, cwd=tree, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        output = done.stdout[-3000:] + done.stderr[-3000:]
        raise RuntimeError(f"{label}: the sweep failed:\n{output}")
    epochs, trials = epochs_seconds(storage)
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    return [
        label,
        workers,
        trials,
        f"{wall:.2f}",
        f"{epochs:.2f}",
        f"{wall - epochs:.2f}",
        f"{summary['NDCG@100']:.4f}",
        load,
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="a prepared ml-100k (recoder-dist prepare)")
    parser.add_argument(
        "--side",
        nargs=3,
        action="append",
        required=True,
        metavar=("LABEL", "TREE", "WORKERS"),
        help="a side: its label, the repository tree it runs, --workers of its trials",
    )
    parser.add_argument("--rounds", type=int, default=1, help="the sides in turn, this often")
    args = parser.parse_args()
    rows = []
    for _ in range(args.rounds):
        for label, tree, workers in args.side:
            rows.append(one_side(label, tree, workers, os.path.abspath(args.data)))
            print(rows[-1], flush=True)
    header = ["side", "workers", "trials", "wall (s)", "epochs (s)", "overhead (s)"]
    print(markdown_table([*header, "best NDCG@100", "load at start"], rows))


if __name__ == "__main__":
    main()
