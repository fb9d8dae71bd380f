"""What a 1-worker training run of ours costs above a bare Ray Train run (issue 36, issue 31's
suite time): on one local Ray, interleaved, ``--rounds`` times,

- bare: a ``TorchTrainer`` on 1 worker (2 CPUs) whose loop only writes the time it started;
- ours: ``Recoder(DynamicAutoencoder([32]), num_workers=1).train`` of ml-100k's training users
  (ratings >= 4, the tests' split) for 1 epoch, batch 100,

with timestamps inside: the driver's part before ``fit``, ``fit`` to the loop's start on the
worker, and in the worker (its functions wrapped for this run only) the optimizers' build, the
resume, the step count, the epoch's steps and the checkpoint's report, then the loop's end to
``fit``'s return and the driver's part after it.

    python benchmarks/bare_trainer.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import uuid

from _common import REPO, load_average
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

import recoder_dist.training.driver.launcher as launcher
from recoder_dist.model import Recoder
from recoder_dist.nn import DynamicAutoencoder
from recoder_dist.training.driver.launcher import init_local_ray

sys.path.insert(0, str(REPO))
from tests.ml100k import ml100k_split  # noqa: E402

STAMPS = tempfile.mkdtemp(prefix="bare-trainer-")
WRAPPED = ("build_optimizers", "_resume", "agreed_steps", "_run_steps", "_report_checkpoint")
DRIVER: dict[str, float] = {}


def timed_worker_loop(config: dict):
    """The worker loop, its steps' first start and end written to ``config["stamps"]``."""
    import recoder_dist.training.worker.worker_loop as loop

    stamps = {"loop_start": time.time()}

    def wrap(name):
        function = getattr(loop, name)

        def wrapper(*args, **kwargs):
            stamps.setdefault(name + "_start", time.time())
            value = function(*args, **kwargs)
            stamps.setdefault(name + "_end", time.time())
            return value

        setattr(loop, name, wrapper)

    for name in WRAPPED:
        wrap(name)
    try:
        return loop.worker_loop(config)
    finally:
        stamps["loop_end"] = time.time()
        with open(config["stamps"], "w") as f:
            json.dump(stamps, f)


class TimedTrainer(TorchTrainer):
    def __init__(self, *args, **kwargs):
        kwargs["train_loop_config"]["stamps"] = DRIVER["stamps"]
        super().__init__(*args, **kwargs)

    def fit(self):
        DRIVER["fit_call"] = time.time()
        try:
            return super().fit()
        finally:
            DRIVER["fit_return"] = time.time()


def bare(tag: str) -> dict:
    stamps = os.path.join(STAMPS, tag + ".json")

    def loop(config):
        with open(config["stamps"], "w") as f:
            json.dump({"loop_start": time.time()}, f)

    started = time.time()
    trainer = TorchTrainer(
        loop,
        train_loop_config={"stamps": stamps},
        scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 2}),
        run_config=RunConfig(name=f"bare-{uuid.uuid4().hex[:6]}", storage_path=STAMPS),
    )
    fit_call = time.time()
    trainer.fit()
    ended = time.time()
    with open(stamps) as f:
        loop_start = json.load(f)["loop_start"]
    return {
        "total": ended - started,
        "fit to loop": loop_start - fit_call,
        "loop to fit's return": ended - loop_start,
    }


def ours(tag: str, split) -> dict:
    DRIVER.clear()
    DRIVER["stamps"] = os.path.join(STAMPS, tag + ".json")
    started = time.time()
    recoder = Recoder(DynamicAutoencoder(hidden_layers=[32]), num_workers=1, seed=0)
    recoder.train(split.train, batch_size=100, num_epochs=1)
    ended = time.time()
    with open(DRIVER["stamps"]) as f:
        s = json.load(f)
    return {
        "total": ended - started,
        "driver before fit": DRIVER["fit_call"] - started,
        "fit to loop": s["loop_start"] - DRIVER["fit_call"],
        "loop to optimizers": s["build_optimizers_start"] - s["loop_start"],
        "optimizers' build": s["build_optimizers_end"] - s["build_optimizers_start"],
        "resume and step count": s["agreed_steps_end"] - s["_resume_start"],
        "to the first step": s["_run_steps_start"] - s["agreed_steps_end"],
        "the epoch's steps": s["_run_steps_end"] - s["_run_steps_start"],
        "checkpoint report": s["_report_checkpoint_end"] - s["_report_checkpoint_start"],
        "loop's end to fit's return": DRIVER["fit_return"] - s["loop_end"],
        "driver after fit": ended - DRIVER["fit_return"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    launcher.worker_loop = timed_worker_loop  # this process's runs only
    launcher.TorchTrainer = TimedTrainer
    init_local_ray()
    split = ml100k_split()
    for i in range(args.rounds):
        for side in ("bare", "ours") if i % 2 == 0 else ("ours", "bare"):
            load = load_average()
            figures = bare(f"bare{i}") if side == "bare" else ours(f"ours{i}", split)
            figures = {k: round(v, 2) for k, v in figures.items()}
            print(side, i + 1, f"load {load}", json.dumps(figures), flush=True)


if __name__ == "__main__":
    main()
