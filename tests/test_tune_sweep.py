"""Real Ray Tune sweeps: each trial a distributed training run (or one in the trial's own
process), the best exported."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback

from recoder_dist.datasets import load_prepared, open_prepared
from recoder_dist.losses import MultinomialNLLLoss
from recoder_dist.metrics import NDCG
from recoder_dist.model import Recoder, read_training_rows
from recoder_dist.nn import DynamicAutoencoder, MultVAE
from tests.second_ray import stop_session
from tune.sweep import main as sweep


@pytest.mark.slow
def test_two_trial_sweep_exports_a_snapshot_that_evaluates_to_its_score(
    ray_session, prepared_ml100k, tmp_path
):
    """Trials that train in their own process (``--workers 0``): each reports what the same
    training reaches outside Tune, and the best one's snapshot is exported. (Trials on Ray
    Train workers: the next test, and test_multinode's sweep through the bucket.)"""
    data = prepared_ml100k
    summary = sweep(
        [
            "--workers",
            "0",
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
            "--model",
            "vae",
            "--hidden",
            "64",
            "16",
            "--model-param",
            "anneal_steps=20",
            "--cpus-per-worker",
            "0.5",
            "--gpus",  # where there are some: none here, so the trials train on CPU
        ]
    )
    table = pd.read_csv(tmp_path / "sweep" / "results.csv")
    assert len(table) == 2 and table["NDCG@100"].notna().all()
    assert sorted(table["config/batch_size"]) == [50, 100]
    # the model's own settings, as the trials had them
    assert (table["config/anneal_steps"] == 20).all()
    assert summary["model"] == "vae" and summary["best"]["hidden_layers"] == [64, 16]
    assert table["config/use_cuda"].all()
    assert summary["NDCG@100"] == table["NDCG@100"].max()
    assert_no_reservation_left(ray_session)

    # The trial of batch size 50, trained again here without Tune.
    split = open_prepared(data)
    model = MultVAE(hidden_layers=[64, 16], anneal_steps=20, sparse=True)  # --sparse's default
    recoder = Recoder(model, num_workers=0, seed=0)
    history = recoder.train(
        read_training_rows(split.train),
        val_dataset=split.validation,
        lr=1e-3,
        batch_size=50,
        num_epochs=4,
        negative_sampling=True,
        eval_freq=2,
        metrics=[NDCG(k=100)],
        eval_num_recommendations=100,
    )
    trial = table[table["config/batch_size"] == 50].iloc[0]
    assert trial["epoch"] == 4  # not stopped by ASHA at epoch 2
    assert trial["NDCG@100"] == pytest.approx(history[-1]["NDCG@100"], abs=1e-9)

    # Resuming a finished sweep restores its results instead of running the trials again.
    resumed = sweep(["--data", str(data), "--output", str(tmp_path / "sweep"), "--resume"])
    assert resumed == summary

    recoder = Recoder(MultVAE(), num_workers=0)
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


REPO = Path(__file__).resolve().parents[1]
TRIAL_TIMEOUT_S = 420  # a trial took up to 175 s on this 2-core machine under a load of 50


def sweep_process(arguments: list[str]) -> subprocess.Popen:
    """`tune/sweep.py arguments` in a process of its own, on a local Ray of its own (this
    machine's CPUs), its output read through a pipe."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return subprocess.Popen(
        [sys.executable, str(REPO / "tune" / "sweep.py"), *arguments],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=True,  # its Ray's processes too: stopped by their group on failure
    )


def _terminated(line: str) -> int:
    """The number of ended trials in a Tune status line ("Trial status: 2 TERMINATED | ...")."""
    if not line.startswith("Trial status:"):
        return 0
    words = line.split()
    return sum(int(words[i - 1]) for i, w in enumerate(words) if w in ("TERMINATED", "ERROR"))


@pytest.mark.slow
def test_four_trials_in_turn_finish_on_the_real_cpus_beside_another_ray_instance(
    ray_session, prepared_ml100k, tmp_path
):
    """The sweep in a process of its own, on a local Ray of this machine's CPUs, while this
    test session's Ray runs too: Ray Train's cleaner cannot free a stopped trial's CPUs then,
    and before `ReleaseStoppedRuns` the second trial waited for them forever."""
    cpus = len(os.sched_getaffinity(0))
    command = [
        "--data",
        str(prepared_ml100k),
        "--storage",
        str(tmp_path / "sweep"),
        "--lrs",
        "1e-3",
        "3e-3",
        "--batch-sizes",
        "100",
        "200",
        "--epochs",
        "4",
        "--eval-freq",
        "2",
        "--hidden",
        "64",
        "--concurrent",
        "1",
        "--workers",  # each trial a Ray Train run (this machine alone would train in process)
        "1",
    ]
    process = sweep_process(command)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(process.stdout), daemon=True)
    reader.start()
    try:
        # A hang is a trial that never gets its CPUs: no trial ends any more. A busy machine
        # only makes every trial slow, so the bound is on the time between two trials' ends.
        ended, last_end = 0, time.monotonic()
        while process.poll() is None:
            now_ended = max([_terminated(line) for line in lines[-200:]] + [ended])
            if now_ended > ended:
                ended, last_end = now_ended, time.monotonic()
            if time.monotonic() - last_end > TRIAL_TIMEOUT_S:
                status = [line for line in lines if line.startswith("Trial status")]
                pytest.fail(
                    f"no trial ended in {TRIAL_TIMEOUT_S} s (last status: "
                    f"{status[-1].strip() if status else 'none'}): a trial waiting for CPUs "
                    "that a stopped trial's Ray Train run still holds? The sweep's output "
                    f"ends:\n{''.join(lines)[-3000:]}"
                )
            time.sleep(1)
    finally:
        stop_session(process)
        reader.join(timeout=30)
    output = "".join(lines)
    assert process.returncode == 0, output[-3000:]
    assert f"/{cpus} CPUs" in output, "the sweep's Ray did not advertise the machine's CPUs"
    table = pd.read_csv(tmp_path / "sweep" / "results.csv")
    assert len(table) == 4 and table["NDCG@100"].notna().all()
    assert sorted(zip(table["config/lr"], table["config/batch_size"])) == [
        (1e-3, 100),
        (1e-3, 200),
        (3e-3, 100),
        (3e-3, 200),
    ]


@pytest.mark.slow
def test_trials_that_train_in_their_process_may_hold_every_cpu(prepared_ml100k, tmp_path):
    """As many trials at once as the machine has CPUs, each training in its process on one
    (`--workers 0`), on a local Ray of the real CPU count: their evaluation rows are read in
    the trials' processes, with no Ray task. Before, Ray Data's tasks (a CPU each) waited for
    the CPUs that the trials held, and the sweep never ended."""
    cpus = len(os.sched_getaffinity(0))
    batch_sizes = [str(50 * (i + 1)) for i in range(cpus)]
    process = sweep_process(
        [
            *("--data", str(prepared_ml100k), "--storage", str(tmp_path / "sweep")),
            *("--workers", "0", "--cpus-per-worker", "1", "--concurrent", str(cpus)),
            *("--lrs", "1e-3", "--batch-sizes", *batch_sizes, "--hidden", "32"),
            *("--epochs", "2", "--eval-freq", "1", "--grace-period", "2"),
        ]
    )
    try:
        output, _ = process.communicate(timeout=TRIAL_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        stop_session(process)
        pytest.fail(f"the sweep did not end in {TRIAL_TIMEOUT_S} s: trials waiting for CPUs?")
    assert process.returncode == 0, output[-3000:]
    assert f"{cpus}.0/{cpus} CPUs" in output, "the trials did not run at once on every CPU"
    table = pd.read_csv(tmp_path / "sweep" / "results.csv")
    assert len(table) == cpus and (table["epoch"] == 2).all() and table["NDCG@100"].notna().all()


def test_the_search_space_is_the_models_own():
    """--model picks the registered model; --model-param fixes a setting, --grid makes one a
    grid axis, --tune-model draws from the model's tune_space, --optimizer names the trials'
    optimizer; results.csv's columns are the training settings and the model's constructor
    arguments."""
    from tune.sweep import chosen, parse_args, search_space

    args = parse_args(
        [
            *("--data", "d", "--storage", "s", "--model", "vae"),
            *("--model-param", "anneal_steps=300", "--grid", "anneal_cap=[0.1, 0.3]"),
            *("--tune-model", "--optimizer", "adamw"),
        ]
    )
    space = search_space(args)
    assert space["model"] == "vae" and space["anneal_steps"] == 300
    assert space["optimizer"] == "adamw" and "optimizer" in chosen("vae")
    assert space["anneal_cap"] == {"grid_search": [0.1, 0.3]}
    assert space["noise_prob"].categories == [0.2, 0.5]  # MultVAE.tune_space
    assert "anneal_cap" in chosen("vae") and "is_constrained" not in chosen("vae")
    assert "is_constrained" in chosen("autoencoder")
    with pytest.raises(SystemExit):
        parse_args(["--data", "d", "--storage", "s", "--grid", "anneal_cap=0.1"])
    with pytest.raises(SystemExit):
        parse_args(["--data", "d", "--storage", "s", "--optimizer", "lbfgs"])


class FailOnce(MultinomialNLLLoss):
    """logloss that raises at its ``at_call``-th batch, the first time only (a marker file
    remembers it across the trial's restart)."""

    def __init__(self, marker: str, at_call: int):
        super().__init__()
        self.marker, self.at_call, self.calls = marker, at_call, 0

    def forward(self, input, target):
        self.calls += 1
        if self.calls == self.at_call and not os.path.exists(self.marker):
            open(self.marker, "w").close()
            raise RuntimeError("the trial fails once")
        return super().forward(input, target)


def _trial_run(loss, data: Path, in_trial: bool) -> list[dict]:
    """6 epochs of ml-100k in this process, a checkpoint every 2 (as a sweep's trial with
    ``--workers 0`` trains), reporting to Tune ``in_trial``."""
    split = open_prepared(data)
    callbacks = [TuneReportCallback()] if in_trial else []
    model = DynamicAutoencoder(hidden_layers=[32], sparse=True)
    recoder = Recoder(model, loss=loss, num_workers=0, seed=3, callbacks=callbacks)
    return recoder.train(
        read_training_rows(split.train),
        val_dataset=split.validation,
        batch_size=100,
        num_epochs=6,
        negative_sampling=True,
        eval_freq=2,
        checkpoint_freq=2,
        metrics=[NDCG(k=100)],
        eval_num_recommendations=100,
    )


@pytest.mark.slow
def test_a_failed_in_process_trial_resumes_from_its_checkpoint_to_a_straight_runs_score(
    ray_session, prepared_ml100k, tmp_path
):
    """A trial that trains in its own process and fails in epoch 4 is restarted by Tune
    (``max_failures``) from the checkpoint it reported at epoch 2, and ends where the same
    training outside Tune, never interrupted, ends."""
    marker, calls = str(tmp_path / "failed"), tmp_path / "batches-after-the-restart"
    batches_per_epoch = -(-len(load_prepared(prepared_ml100k).split.train) // 100)

    def trial(config):
        loss = FailOnce(marker, 3 * batches_per_epoch + 2)
        _trial_run(loss, prepared_ml100k, in_trial=True)
        calls.write_text(str(loss.calls))  # the attempt that ended: the restarted one

    tuner = tune.Tuner(
        tune.with_resources(trial, {"CPU": 1}),
        run_config=tune.RunConfig(
            storage_path=str(tmp_path / "tune"),
            failure_config=tune.FailureConfig(max_failures=1),
            verbose=0,
        ),
    )
    [result] = tuner.fit()
    assert os.path.exists(marker), "the trial never failed"
    assert result.error is None
    straight_loss = FailOnce(marker, 1)  # the marker is there: it never fails
    straight = _trial_run(straight_loss, prepared_ml100k, in_trial=False)
    # The restarted attempt trained epochs 3 to 6 of the straight run's 6, not all 6.
    assert int(calls.read_text()) * 6 == straight_loss.calls * 4
    assert result.metrics["epoch"] == 6
    assert result.metrics["NDCG@100"] == pytest.approx(straight[-1]["NDCG@100"], abs=1e-9)
    assert result.metrics["loss"] == pytest.approx(straight[-1]["loss"], rel=1e-9)
