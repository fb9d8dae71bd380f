"""What the data path costs as the data grow: prepare time, driver and worker peak RSS, epoch.

Synthetic event tables of a given number of interactions, in three shapes:

- ``ml20m``: shaped like MovieLens 20M (about 144 items a user, 27,000 items, popularity
  following a Zipf law of exponent 1);
- ``longtail``: a catalog of 1,000,000 items, 50 items a user, Zipf exponent 0.8;
- ``users``: the users grow with the events, the catalog stays: 50 events a user, items
  drawn by a Zipf law of exponent 1 over 20,000 (repeats within a user are events that
  ``prepare`` drops). Its training is what a user runs: ``recoder-dist train --epochs 1
  --workers 2`` under ``/usr/bin/time -v``, on the cluster at ``RAY_ADDRESS`` when set (start
  one with ``ray start --head``: the driver then holds only what is its own), with the CLI's
  evaluation of the test users at the end; its driver's peak is time's "Maximum resident set
  size", and the peaks of its private (``RssAnon``) and shared (``RssShmem``: the object
  store's pages that the driver touched) memory are sampled from ``/proc`` every 0.1 s.

Each table is written as Parquet files of 1M events, then ``recoder-dist prepare --dataset
events`` (on the cluster: Ray Data reads, groups and splits) and training (2 workers, 2
epochs, a small autoencoder with negative sampling) run as separate processes (the model is
kept small, [64], so that a 1M-item catalog's tables and their Adam states fit two workers on
one machine). A driver's peak RSS is its process's own (``VmHWM``), for prepare and for
train; a worker's is what the workers report: its peak (``VmHWM``, which counts the object
store's shared pages it has read rows from) and its private memory (``RssAnon``) at the end of
an epoch, the larger of the two epochs'. The epoch time is the second epoch's.

    python benchmarks/data_scale.py --interactions 1e6 1e7 --shapes ml20m longtail
    RAY_ADDRESS=... python benchmarks/data_scale.py --interactions 4e6 8e6 16e6 32e6 --shapes users
"""

from __future__ import annotations

import argparse
import contextlib
import json
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
    "users": dict(items_per_user=50, num_items=20_000, zipf=1.0),
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


def write_users_shape(interactions: int, folder: Path, seed: int = 0) -> tuple[int, int]:
    """The ``users`` shape as Parquet files of ``EVENTS_PER_FILE`` events, written a file at
    a time (32M events take seconds): user ``e // 50`` for event ``e``, items by inverting the
    Zipf law's cumulative distribution. Returns (events, users)."""
    shape = SHAPES["users"]
    rng = np.random.default_rng(seed)
    cdf = np.cumsum(np.arange(1, shape["num_items"] + 1) ** -shape["zipf"])
    cdf /= cdf[-1]
    for number, start in enumerate(range(0, interactions, EVENTS_PER_FILE)):
        events = np.arange(start, min(start + EVENTS_PER_FILE, interactions), dtype=np.int64)
        item = np.searchsorted(cdf, rng.random(len(events)))
        frame = pd.DataFrame({"user": events // shape["items_per_user"], "item": item})
        frame.to_parquet(folder / f"part-{number:04d}.parquet")
    return interactions, -(-interactions // shape["items_per_user"])


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
    table = folder / f"{shape_name}-{interactions}"
    table.mkdir()
    if shape_name == "users":
        num_events, num_users = write_users_shape(interactions, table)
        held_out = 100  # prepare's default: the CLI's evaluation at the end stays small
    else:
        events = synthetic_events(interactions, SHAPES[shape_name])
        for number, start in enumerate(range(0, len(events), EVENTS_PER_FILE)):
            events.iloc[start : start + EVENTS_PER_FILE].to_parquet(
                table / f"part-{number:04d}.parquet"
            )
        num_events, num_users = len(events), int(events.user.nunique())
        held_out = max(num_users // 20, 1)
    prepared = folder / f"{shape_name}-{interactions}-prepared"
    prepare_s, out = run(
        [
            sys.executable, "-c", PREPARE_SCRIPT, "prepare", "--dataset", "events",
            "--input", str(table), "--output", str(prepared),
            "--val-users", str(held_out), "--test-users", str(held_out),
        ]
    )  # fmt: skip
    prepared_result = last_json(out)
    if shape_name == "users":
        trained = cli_train_driver(prepared, folder / f"{shape_name}-{interactions}-checkpoints")
    else:
        trained = last_json(run([sys.executable, "-c", TRAIN_SCRIPT, str(prepared)])[1])
    return dict(
        shape=shape_name,
        interactions=num_events,
        users=num_users,
        prepare_s=prepare_s,
        **prepared_result,
        **trained,
    )


def cli_train_driver(prepared: Path, checkpoints: Path) -> dict:
    """``recoder-dist train --epochs 1 --workers 2`` under ``/usr/bin/time -v``: the driver's
    peak RSS (time's), and the peaks of its ``RssAnon`` and ``RssShmem`` sampled from
    ``/proc`` (the process that time starts)."""
    cli = str(Path(sys.executable).parent / "recoder-dist")
    command = ["/usr/bin/time", "-v", cli, "train", "--epochs", "1", "--workers", "2",
               "--data", str(prepared), "--checkpoint-dir", str(checkpoints)]  # fmt: skip
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peaks = {"RssAnon": 0, "RssShmem": 0}
    children = Path(f"/proc/{process.pid}/task/{process.pid}/children")
    while process.poll() is None:
        with contextlib.suppress(OSError, ValueError):
            for pid in children.read_text().split():
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    key, _, value = line.partition(":")
                    if key in peaks:
                        peaks[key] = max(peaks[key], int(value.split()[0]))
        time.sleep(0.1)
    out, err = process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{out[-2000:]}{err[-3000:]}")
    peak_kb = next(
        int(line.rsplit(":", 1)[1]) for line in err.splitlines() if "Maximum resident" in line
    )
    return {
        "driver_peak_mb": peak_kb / 1024,
        "driver_anon_mb": peaks["RssAnon"] / 1024,
        "driver_shmem_mb": peaks["RssShmem"] / 1024,
        "train_s": time.perf_counter() - started,
    }


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
    print(f"\nload: {load_average()}; peak RSS of this process {peak_mb():.0f} MB\n")
    library = [r for r in rows if r["shape"] != "users"]
    if library:
        header = ["shape", "interactions", "users", "prepare s", "prepare driver peak MB",
                  "train driver peak MB", "worker peak MB",
                  "worker private MB", "epoch s (2 workers)"]  # fmt: skip
        table = [
            [r["shape"], f"{r['interactions']:,}", f"{r['users']:,}", f"{r['prepare_s']:.1f}",
             f"{r['prepare_peak_mb']:.0f}", f"{r['driver_peak_mb']:.0f}",
             f"{r['worker_peak_mb']:.0f}", f"{r['worker_private_mb']:.0f}",
             f"{r['epoch_s']:.2f}"]
            for r in library
        ]  # fmt: skip
        print(markdown_table(header, table))
    cli = [r for r in rows if r["shape"] == "users"]
    if cli:
        header = ["shape", "interactions", "users", "prepare s", "train driver peak MB",
                  "peak RssAnon MB", "peak RssShmem MB", "train s (CLI)"]  # fmt: skip
        table = [
            [r["shape"], f"{r['interactions']:,}", f"{r['users']:,}", f"{r['prepare_s']:.1f}",
             f"{r['driver_peak_mb']:.0f}", f"{r['driver_anon_mb']:.0f}",
             f"{r['driver_shmem_mb']:.0f}", f"{r['train_s']:.1f}"]
            for r in cli
        ]  # fmt: skip
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
            ax.plot(x, [r.get(key, np.nan) for r in mine], marker="o", label=shape)
            ax.set_xscale("log")
            ax.set_xlabel("interactions")
            ax.set_title(key)
    axes[0].legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
