"""What the data path costs as the data grow: prepare time, driver and worker peak RSS, epoch.

Synthetic event tables of a given number of interactions, in two shapes:

- ``ml20m``: shaped like MovieLens 20M (about 144 items a user, 27,000 items, popularity
  following a Zipf law of exponent 1);
- ``longtail``: a catalog of 1,000,000 items, 50 items a user, Zipf exponent 0.8.

Each table is written as Parquet files of 1M events, then ``recoder-dist prepare --dataset
events`` (on the cluster: Ray Data reads, groups and splits) and training (2 workers, 2
epochs, a small autoencoder with negative sampling) run as separate processes (the model is
kept small, [64], so that a 1M-item catalog's tables and their Adam states fit two workers on
one machine). A driver's peak RSS is its process's own (``VmHWM``), for prepare and for
train; a worker's is what the workers report: its peak (``VmHWM``, which counts the object
store's shared pages it has read rows from) and its private memory (``RssAnon``) at the end of
an epoch, the larger of the two epochs'. The epoch time is the second epoch's.

    python benchmarks/data_scale.py --interactions 1e6 1e7 --shapes ml20m longtail
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import load_average, markdown_table  # noqa: E402

SHAPES = {
    "ml20m": dict(items_per_user=144, num_items=27_000, zipf=1.0),
    "longtail": dict(items_per_user=50, num_items=1_000_000, zipf=0.8),
}


def synthetic_events(interactions: int, shape: dict, seed: int = 0) -> pd.DataFrame:
    """Distinct (user, item) pairs: user sizes geometric around the mean, items drawn by a
    Zipf law over the catalog."""
    rng = np.random.default_rng(seed)
    # More users than needed: popular items repeat within a user and are dropped as duplicates.
    users = max(int(1.6 * interactions) // shape["items_per_user"], 1)
    sizes = rng.geometric(1 / shape["items_per_user"], size=users) + 4  # at least 5
    sizes = np.minimum(sizes, shape["num_items"] // 2)
    ranks = np.arange(1, shape["num_items"] + 1)
    popularity = ranks ** -shape["zipf"]
    popularity /= popularity.sum()
    user = np.repeat(np.arange(users, dtype=np.int64), sizes)
    item = rng.choice(shape["num_items"], size=len(user), p=popularity)
    frame = pd.DataFrame({"user": user, "item": item}).drop_duplicates()
    return frame.iloc[: int(interactions)]


def run(cmd: list[str]) -> tuple[float, str]:
    started = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stdout[-2000:]}{done.stderr[-3000:]}")
    return time.perf_counter() - started, done.stdout


PREPARE_SCRIPT = """
import json, sys
from recoder_dist.cli import main
if main(sys.argv[1:]) != 0:
    raise SystemExit("prepare failed")
print(json.dumps({"prepare_peak_mb": next(int(line.split()[1]) for line in open("/proc/self/status")
                                          if line.startswith("VmHWM")) / 1024}))
"""

EVENTS_PER_FILE = 1_000_000

TRAIN_SCRIPT = """
import json, sys
from recoder_dist.datasets import open_prepared
from recoder_dist.model import Recoder
from recoder_dist.nn import DynamicAutoencoder
split = open_prepared(sys.argv[1])
recoder = Recoder(DynamicAutoencoder([64], sparse=True), num_workers=2, seed=0)
history = recoder.train(split.train, batch_size=500, num_epochs=2, negative_sampling=True)
print(json.dumps({
    # VmHWM, this process's own high-water mark: ru_maxrss would carry the parent's across exec.
    "driver_peak_mb": next(int(line.split()[1]) for line in open("/proc/self/status")
                           if line.startswith("VmHWM")) / 1024,
    "worker_peak_mb": max(h["peak_rss_mb"] for h in history),
    "worker_private_mb": max(h["private_rss_mb"] for h in history),
    "epoch_s": history[-1]["seconds"],
}))
"""


def measure(interactions: int, shape_name: str, folder: Path) -> dict:
    events = synthetic_events(interactions, SHAPES[shape_name])
    table = folder / f"{shape_name}-{interactions}"
    table.mkdir()
    for number, start in enumerate(range(0, len(events), EVENTS_PER_FILE)):
        events.iloc[start : start + EVENTS_PER_FILE].to_parquet(
            table / f"part-{number:04d}.parquet"
        )
    prepared = folder / f"{shape_name}-{interactions}-prepared"
    held_out = max(len(events.user.unique()) // 20, 1)
    prepare_s, out = run(
        [
            sys.executable, "-c", PREPARE_SCRIPT, "prepare", "--dataset", "events",
            "--input", str(table), "--output", str(prepared),
            "--val-users", str(held_out), "--test-users", str(held_out),
        ]
    )  # fmt: skip
    prepared_result = last_json(out)
    _, out = run([sys.executable, "-c", TRAIN_SCRIPT, str(prepared)])
    return dict(
        shape=shape_name,
        interactions=len(events),
        users=int(events.user.nunique()),
        prepare_s=prepare_s,
        **prepared_result,
        **last_json(out),
    )


def last_json(out: str) -> dict:
    """The last JSON line of a process's output (Ray may print its own lines after it)."""
    return json.loads([line for line in out.splitlines() if line.startswith("{")][-1])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--interactions", type=float, nargs="+", default=[1e6, 1e7])
    parser.add_argument("--shapes", nargs="+", default=["ml20m", "longtail"], choices=SHAPES)
    parser.add_argument("--plot", type=Path, help="write a plot (PNG) of the table here")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="recoder-dist-data-scale-") as scratch:
        for shape in args.shapes:
            for interactions in args.interactions:
                rows.append(measure(int(interactions), shape, Path(scratch)))
                print(json.dumps(rows[-1]), flush=True)
    header = ["shape", "interactions", "users", "prepare s", "prepare driver peak MB",
              "train driver peak MB", "worker peak MB",
              "worker private MB", "epoch s (2 workers)"]  # fmt: skip
    table = [
        [r["shape"], f"{r['interactions']:,}", f"{r['users']:,}", f"{r['prepare_s']:.1f}",
         f"{r['prepare_peak_mb']:.0f}", f"{r['driver_peak_mb']:.0f}",
         f"{r['worker_peak_mb']:.0f}", f"{r['worker_private_mb']:.0f}", f"{r['epoch_s']:.2f}"]
        for r in rows
    ]  # fmt: skip
    print(f"\nload: {load_average()}; peak RSS of this process {peak_mb():.0f} MB\n")
    print(markdown_table(header, table))
    for shape in args.shapes:
        mine = [r for r in rows if r["shape"] == shape]
        if len(mine) > 1:
            growth = mine[-1]["driver_peak_mb"] / mine[0]["driver_peak_mb"]
            print(
                f"{shape}: driver peak x{growth:.2f} from {mine[0]['interactions']:,} to "
                f"{mine[-1]['interactions']:,} interactions"
            )
    if args.plot:
        plot(rows, args.plot)


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for shape in sorted({r["shape"] for r in rows}):
        mine = [r for r in rows if r["shape"] == shape]
        x = [r["interactions"] for r in mine]
        for ax, key in zip(axes, ("prepare_s", "driver_peak_mb", "epoch_s")):
            ax.plot(x, [r[key] for r in mine], marker="o", label=shape)
            ax.set_xscale("log")
            ax.set_xlabel("interactions")
            ax.set_title(key)
    axes[0].legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    os.environ.setdefault("RECODER_DIST_VERBOSE", "0")
    main()
