"""``ray job submit`` of the CLI against a real local cluster started with ``ray start``."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

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


def submit(cluster, *entrypoint, timeout=300) -> subprocess.CompletedProcess:
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


@pytest.mark.slow
def test_training_job_succeeds_and_its_checkpoint_loads(cluster, prepared_ml100k, tmp_path):
    prepared = prepared_ml100k
    result = submit(
        cluster,
        "recoder-dist",
        "train",
        "--data",
        str(prepared),
        "--checkpoint-dir",
        str(tmp_path / "ck"),
        "--epochs",
        "2",
        "--batch-size",
        "100",
        "--workers",
        "2",
        "--hidden",
        "32",
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads([ln for ln in result.stdout.splitlines() if ln.startswith("{")][-1])
    recoder = Recoder(DynamicAutoencoder(), num_workers=0)
    recoder.init_from_model_file(report["checkpoint"])
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
