"""``ray job submit`` of the CLI and of the Tune sweep against a real local cluster started with
``ray start``."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pandas as pd
import pytest

from recoder_dist.datasets import load_prepared
from recoder_dist.metrics import NDCG
from recoder_dist.model import Recoder
from recoder_dist.nn import DynamicAutoencoder

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's bin: `ray`, `recoder-dist`, `python`


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster():
    """A head node of our own. Stopped by signalling its process group, not `ray stop`, which
    would also kill the test session's Ray."""
    temp_dir = tempfile.mkdtemp(prefix="rds-", dir="/tmp")  # short: Unix socket paths
    dashboard = free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(PATH=f"{BIN}:{env['PATH']}", RAY_AUTH_MODE="disabled")
    # Every port explicit and free: the defaults (agent 52365, client server 10001, ...) may be
    # held by the test session's own Ray, and a head without its agent takes no job.
    ports = {
        name: free_port()
        for name in (
            "port",
            "dashboard-agent-listen-port",
            "dashboard-agent-grpc-port",
            "ray-client-server-port",
            "runtime-env-agent-port",
            "metrics-export-port",
            "node-manager-port",
            "object-manager-port",
        )
    }
    head = subprocess.Popen(
        [
            BIN / "ray",
            "start",
            "--head",
            "--block",
            *(f"--{name}={port}" for name, port in ports.items()),
            f"--dashboard-port={dashboard}",
            "--dashboard-host=127.0.0.1",
            "--num-cpus=3",
            f"--temp-dir={temp_dir}",
        ],
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    address = f"http://127.0.0.1:{dashboard}"
    try:
        yield address, env
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=5)
        except subprocess.TimeoutExpired:  # `ray start --block` can linger for ~30 s
            os.killpg(head.pid, signal.SIGKILL)
        subprocess.run(["pkill", "-f", temp_dir], check=False)  # anything that escaped
        shutil.rmtree(temp_dir, ignore_errors=True)


def submit(cluster, *entrypoint, options=(), timeout=300) -> subprocess.CompletedProcess:
    """`ray job submit [options] -- entrypoint`, with the repository as working directory."""
    address, env = cluster
    deadline = time.monotonic() + timeout
    while True:  # the job agent comes up a few seconds after the dashboard
        result = subprocess.run(
            [
                BIN / "ray",
                "job",
                "submit",
                "--address",
                address,
                "--working-dir",
                str(REPO),
                *options,
                "--",
                *entrypoint,
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        retry = "No available agent" in result.stderr or "Connection refused" in result.stderr
        if not retry or time.monotonic() > deadline:
            return result
        time.sleep(1)


def small_training_job(prepared: Path, checkpoint_dir: Path, *extra: str) -> list[str]:
    """`recoder-dist train` on prepared ml-100k: 2 epochs, batch 100, 2 workers, hidden [32]."""
    return [
        "recoder-dist",
        "train",
        "--data",
        str(prepared),
        "--checkpoint-dir",
        str(checkpoint_dir),
        "--epochs",
        "2",
        "--batch-size",
        "100",
        "--workers",
        "2",
        "--hidden",
        "32",
        *extra,
    ]


def job_snapshot(result: subprocess.CompletedProcess) -> Recoder:
    """The snapshot that a training job reported (its last JSON line), loaded in-process."""
    report = json.loads([ln for ln in result.stdout.splitlines() if ln.startswith("{")][-1])
    recoder = Recoder(DynamicAutoencoder(), num_workers=0)
    recoder.init_from_model_file(report["checkpoint"])
    return recoder


@pytest.mark.slow
def test_training_job_succeeds_and_its_checkpoint_loads(cluster, prepared_ml100k, tmp_path):
    result = submit(cluster, *small_training_job(prepared_ml100k, tmp_path / "ck"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    recoder = job_snapshot(result)
    assert recoder.current_epoch == 2 and recoder.model.hidden_layers == [32]


@pytest.mark.slow
def test_job_with_a_bad_argument_fails(cluster, tmp_path):
    result = submit(
        cluster,
        "recoder-dist",
        "train",
        "--data",
        str(tmp_path / "missing"),
        "--checkpoint-dir",
        str(tmp_path / "ck"),
    )
    assert result.returncode != 0
    assert "no split.json" in result.stdout + result.stderr


def ray_job(cluster, *args: str) -> subprocess.CompletedProcess:
    """`ray job <args>` against the cluster (status, stop, logs)."""
    address, env = cluster
    return subprocess.run(
        [BIN / "ray", "job", *args, "--address", address],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def trial_states(experiment: Path) -> dict[str, str]:
    """trial id -> status in the sweep's last saved experiment state ({} before the first).

    Read from Tune's JSON: ExperimentAnalysis would report a RUNNING trial as PENDING (the
    status it gets back when the experiment is restored)."""
    files = sorted(experiment.glob("experiment_state-*.json"))
    try:
        trials = json.loads(files[-1].read_text())["trial_data"] if files else []
    except (json.JSONDecodeError, FileNotFoundError):  # caught mid-write
        return {}
    return {t["trial_id"]: t["status"] for t in (json.loads(data) for data, _ in trials)}


@pytest.mark.slow
def test_sweep_job_stopped_mid_sweep_resumes_without_rerunning_finished_trials(
    cluster, prepared_ml100k, ray_session, tmp_path
):
    output = tmp_path / "sweep"
    sweep = ["python", "tune/sweep.py", "--data", str(prepared_ml100k), "--output", str(output)]
    grid = ["--lrs", "1e-3", "--batch-sizes", "50", "100", "--epochs", "1", "--eval-freq", "1"]
    tiny = ["--hidden", "32", "--concurrent", "1", "--cpus-per-worker", "0.5"]
    job_id = f"sweep-{uuid.uuid4().hex[:8]}"
    # Tune saves the experiment state every 10 s at first; every 0.5 s here, so that the state
    # on disk follows the trials closely enough to stop the job between them.
    runtime_env = json.dumps({"env_vars": {"TUNE_GLOBAL_CHECKPOINT_S": "0.5"}})
    started = submit(
        cluster,
        *sweep,
        *grid,
        *tiny,
        options=["--no-wait", "--submission-id", job_id, "--runtime-env-json", runtime_env],
    )
    assert started.returncode == 0, started.stdout[-3000:] + started.stderr[-3000:]

    # The job is stopped (SIGTERM, then SIGKILL) once trial 1 of 2 has finished and trial 2
    # runs (--concurrent 1 runs them one after the other).
    deadline = time.monotonic() + 240
    states, seen = trial_states(output / "tune"), []
    while sorted(states.values()) != ["RUNNING", "TERMINATED"]:
        if list(states.values()).count("TERMINATED") == 2 or time.monotonic() > deadline:
            logs = ray_job(cluster, "logs", job_id).stdout[-3000:]
            pytest.fail(f"no state with one trial finished, one running: {seen}\n{logs}")
        time.sleep(0.25)
        states = trial_states(output / "tune")
        if not seen or seen[-1][1] != states:
            seen.append((round(time.monotonic() - deadline + 240, 1), states))
    stopped = ray_job(cluster, "stop", job_id)  # waits until the job has exited
    assert stopped.returncode == 0 and "was stopped" in stopped.stdout, stopped
    states = trial_states(output / "tune")
    (finished,) = [t for t, status in states.items() if status == "TERMINATED"]
    (interrupted,) = set(states) - {finished}
    (finished_dir,) = (output / "tune").glob(f"*{finished}*")
    # Each trial's Ray Train run keeps its checkpoints in the sweep's storage.
    (snapshot,) = (output / "runs" / f"trial-{finished}").glob("checkpoint_*/snapshot.pt")
    before = (snapshot.stat().st_mtime_ns, (finished_dir / "result.json").read_bytes())

    resumed = submit(cluster, *sweep, *grid, *tiny, "--resume")  # the same command, resumed
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    summary = json.loads([ln for ln in resumed.stdout.splitlines() if ln.startswith("{")][-1])

    # Both trials are in the results, under the ids they had before the stop; the finished one
    # was not run again (its snapshot and results untouched), the interrupted one ran to its end.
    assert set(trial_states(output / "tune").values()) == {"TERMINATED"}
    table = pd.read_csv(output / "results.csv")
    assert sorted(table["trial_id"]) == sorted(states) and table["NDCG@100"].notna().all()
    assert summary["trials"] == 2 and summary["NDCG@100"] == table["NDCG@100"].max()
    assert (snapshot.stat().st_mtime_ns, (finished_dir / "result.json").read_bytes()) == before
    assert list((output / "runs" / f"trial-{interrupted}").glob("checkpoint_*/snapshot.pt"))

    # The exported best snapshot scores, evaluated here in-process, what the sweep reported.
    recoder = Recoder(DynamicAutoencoder(), num_workers=0)
    recoder.init_from_model_file(summary["snapshot"])
    validation = load_prepared(prepared_ml100k).split.validation
    score = recoder.evaluate(validation, 100, [NDCG(k=100)])["NDCG@100"]
    assert score == pytest.approx(summary["NDCG@100"], abs=1e-9)
