"""A real 2-trial Ray Tune sweep: each trial a distributed training run, the best exported."""

from __future__ import annotations

import time

import pandas as pd
import pytest

from recoder_dist.datasets import load_prepared
from recoder_dist.metrics import NDCG
from recoder_dist.model import Recoder
from recoder_dist.nn import DynamicAutoencoder
from tune.sweep import main as sweep


@pytest.mark.slow
def test_two_trial_sweep_exports_a_snapshot_that_evaluates_to_its_score(
    ray_session, prepared_ml100k, tmp_path
):
    data = prepared_ml100k
    summary = sweep(
        [
            "--data",
            str(data),
            "--output",
            str(tmp_path / "sweep"),
            "--lrs",
            "1e-3",
            "--batch-sizes",
            "50",
            "100",
            "--epochs",
            "4",
            "--eval-freq",
            "2",
            "--hidden",
            "64",
            "--cpus-per-worker",
            "0.5",
        ]
    )
    table = pd.read_csv(tmp_path / "sweep" / "results.csv")
    assert len(table) == 2 and table["NDCG@100"].notna().all()
    assert sorted(table["config/batch_size"]) == [50, 100]
    assert summary["NDCG@100"] == table["NDCG@100"].max()
    assert_no_reservation_left(ray_session)

    # Resuming a finished sweep restores its results instead of running the trials again.
    resumed = sweep(["--data", str(data), "--output", str(tmp_path / "sweep"), "--resume"])
    assert resumed == summary

    recoder = Recoder(DynamicAutoencoder(), num_workers=0)
    recoder.init_from_model_file(summary["snapshot"])
    validation = load_prepared(data).split.validation
    score = recoder.evaluate(validation, 100, [NDCG(k=100)])["NDCG@100"]
    assert score == pytest.approx(summary["NDCG@100"], abs=1e-9)


def assert_no_reservation_left(ray, within_s: float = 90.0) -> None:
    """Every CPU is free again once the sweep is over. A trial that Tune stops kills its Ray
    Train controller, whose placement group only Ray Train's cleaner can then free (through the
    state API): when it could not, the next trial on a small machine waited forever."""
    deadline = time.monotonic() + within_s
    while ray.available_resources().get("CPU", 0) < ray.cluster_resources()["CPU"]:
        if time.monotonic() > deadline:
            raise AssertionError(
                f"CPUs still reserved after the sweep: {ray.available_resources()} "
                f"of {ray.cluster_resources()}"
            )
        time.sleep(0.5)
