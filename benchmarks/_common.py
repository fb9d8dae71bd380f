"""Shared helpers of the benchmarks: the real datasets as CSR, timing, tables and plots.

The data are read from ``../shared/data`` (never copied into the repository); each matrix is
also written once as ``.npz`` into the benchmark cache, so that the recsys-recoder side reads
exactly the same matrix without pandas.
"""

from __future__ import annotations

import os
import statistics
from pathlib import Path

import numpy as np
import scipy.sparse as sp

REPO = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("RECODER_DIST_DATA", REPO.parent / "shared" / "data"))
CACHE = Path(os.environ.get("RECODER_DIST_BENCH_CACHE", Path.home() / ".cache/recoder_dist/bench"))


def load_matrix(name: str) -> sp.csr_matrix:
    """``ml-1m`` (interactions.csv, 5,949 x 2,810) or ``gowalla`` (train.txt, 29,858 x 40,981),
    as a binary float32 users x items CSR matrix."""
    from recoder_dist.data.dataset import RecommendationDataset
    from recoder_dist.datasets.events import load_events
    from recoder_dist.datasets.line_format import read_user_items

    if name == "ml-1m":
        frame = load_events(DATA / "ml-1m-implicit" / "interactions.csv")
    elif name == "gowalla":
        frame = read_user_items(DATA / "gowalla" / "train.txt")
    else:
        raise ValueError(f"unknown dataset {name!r}: ml-1m or gowalla")
    shape = (int(frame.user.max()) + 1, int(frame.item.max()) + 1)
    coo = sp.coo_matrix((np.ones(len(frame), np.float32), (frame.user, frame.item)), shape=shape)
    return RecommendationDataset(coo).interactions  # sorted, duplicates summed, float32


def npz_path(name: str, matrix: sp.csr_matrix) -> str:
    """``matrix`` written once into the cache as ``{name}.npz``; returns the path."""
    path = CACHE / "data" / f"{name}.npz"
    path.parent.mkdir(parents=True, exist_ok=True)
    sp.save_npz(path, matrix)
    return str(path)


def median(values) -> float:
    values = list(values)
    return statistics.median(values) if values else float("nan")


def load_average() -> str:
    """The 1-minute load average, for the record of how busy the machine was."""
    return f"{os.getloadavg()[0]:.2f} (1 min load, {os.cpu_count()} CPUs)"


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b > 0 else "n/a"


def save_bar_plot(path: Path, title: str, labels: list[str], series: dict[str, list[float]], unit):
    """A grouped bar chart of ``series`` (name -> one value per label), if matplotlib is
    installed (``pip install -e .[bench]``); returns the path or None."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("\n(matplotlib is not installed: no plot; pip install -e .[bench])")
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(max(5, 1.4 * len(labels) + 2), 3.2), dpi=100)
    width = 0.8 / max(len(series), 1)
    for i, (name, values) in enumerate(series.items()):
        xs = [x + (i - (len(series) - 1) / 2) * width for x in range(len(labels))]
        ax.bar(xs, values, width, label=name)
    ax.set_xticks(range(len(labels)), labels, fontsize=8)
    ax.set_ylabel(unit)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    print(f"\nplot: {path}")
    return path
