"""What a cluster does to a run, and what the user sees (issue 35): each test states the fault,
and checks that nothing is lost.

A lost node: the worker node's processes are killed at once, and a new node joins. A lost
driver of `recommend`: killed while its files go into the bucket.

Storage outage: the bucket stops answering in the middle of a run. The run's storage goes
through a FlakyProxy (tests/flaky_proxy.py) in front of the local S3 server, which refuses
every connection for the outage (moto's in-memory server would lose the bucket if it were
restarted). The run is a `recoder-dist train` job on the two-node cluster of
tests/multinode.py: the worker node's Train worker uploads the checkpoints (Ray Train's copy
into the run's storage, through recoder_dist's retrying filesystem), the head's Train
controller writes the run's state, and rank 0 exports the snapshots: every kind of process
that writes to the bucket meets the outage.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
import uuid
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from ray.job_submission import JobSubmissionClient

from recoder_dist.cli import main
from recoder_dist.datasets import load_prepared
from recoder_dist.model import Recoder
from recoder_dist.nn import DynamicAutoencoder
from recoder_dist.retry import RETRY_ENV
from recoder_dist.training.checkpoint import read_checkpoint
from recoder_dist.training.snapshot import load_snapshot
from tests.flaky_proxy import FlakyProxy
from tests.multinode import REPO, client_env, last_json, stop_session
from tests.test_inference import reference
from tests.test_multinode import bucket_files, training_job

pytestmark = pytest.mark.slow

EPOCHS = 4
SETTINGS = ("--epochs", str(EPOCHS), "--checkpoint-freq", "1", "--seed", "3")
# A report tick of 1 s (each checkpoint waits for one): the run is still going when the outage
# begins, at its first snapshot.
SLOW_REPORTS = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "1"}


@pytest.fixture
def bucket_credentials(no_shared_disk_cluster, monkeypatch):
    """This process reads the bucket like any node, with credentials in its environment."""
    for name, value in no_shared_disk_cluster.s3.credentials_env().items():
        monkeypatch.setenv(name, value)


@pytest.fixture(scope="module")
def straight_weights(prepared_ml100k, ray_session, tmp_path_factory) -> dict:
    """The final weights of the same run in this process (``--workers 0``), which a 1-worker
    run equals to the bit: a run that lost or repeated a step differs from them."""
    folder = tmp_path_factory.mktemp("straight")
    job = training_job(prepared_ml100k, str(folder / "ck"), str(folder / "runs"))
    assert main([*job[1:], *SETTINGS, "--workers", "0"]) == 0
    return load_snapshot(str(folder / "ck" / f"model_epoch_{EPOCHS}.model")).model_state


@dataclass
class OutageRun:
    status: str  # the job's final status
    logs: str  # the job's log
    before: set[str]  # the user's snapshots in the bucket when the outage began
    seen: dict[str, float]  # snapshot -> seconds from the outage's start to its first listing
    run_s: float  # from the outage's start to the job's end
    refused: int  # connections that the proxy refused


def first_snapshot(s3) -> bool:
    """The user's first snapshot is in the bucket."""
    return "model_epoch_1.model" in bucket_files(s3, "outage/ck")


def first_registered_checkpoint(s3, runs: str = "outage/runs") -> bool:
    """Ray Train's run state in the bucket (under ``runs``) lists a checkpoint (its controller
    registers one on its next tick after the upload): a run stopped now resumes from it."""
    states = [f for f in bucket_files(s3, runs) if f.endswith(_RUN_STATE)]
    if not states:
        return False
    with s3.filesystem().open_input_stream(s3.path(f"{runs}/{states[0]}")) as f:
        return b"epoch_" in f.read()


_RUN_STATE = "/checkpoint_manager_snapshot.json"


def run_through_an_outage(
    cluster, proxy, job, seconds: float, env_vars: dict, when=first_snapshot
) -> OutageRun:
    """Submits ``job``, starts an outage of ``seconds`` once ``when(s3)``, and waits for the
    job's end (which ends the outage too)."""
    s3 = cluster.s3
    job_id = f"outage-{uuid.uuid4().hex[:8]}"
    started = cluster.submit(*job, env_vars=env_vars, submission_id=job_id, wait=False)
    assert started.returncode == 0, started.stdout[-3000:] + started.stderr[-3000:]
    client = JobSubmissionClient(cluster.dashboard)
    deadline = time.monotonic() + 240
    while not when(s3):
        assert not client.get_job_status(job_id).is_terminal(), client.get_job_logs(job_id)
        assert time.monotonic() < deadline, client.get_job_logs(job_id)[-3000:]
        time.sleep(0.1)
    proxy.outage("refuse", seconds)
    began = time.monotonic()
    before = set(bucket_files(s3, "outage/ck"))
    seen = {}
    while not (status := client.get_job_status(job_id)).is_terminal():
        for name in bucket_files(s3, "outage/ck"):  # directly, not through the proxy
            seen.setdefault(name, round(time.monotonic() - began, 1))
        time.sleep(0.2)
    run_s = round(time.monotonic() - began, 1)
    proxy.restore()
    return OutageRun(status.value, client.get_job_logs(job_id), before, seen, run_s, proxy.refused)


def assert_the_bucket_holds_whole_checkpoints(s3, tmp_path) -> tuple[list[str], list[str]]:
    """Every snapshot of the user's (``outage/ck``) and every checkpoint that Ray Train's run
    state registers (``outage/runs/<run>/epoch_N``, which a resumed run restores) reads whole:
    checksums verified, the records of every epoch up to it. Returns the user's snapshots,
    and the checkpoint folders in the bucket that the run state does not register (a failed
    run's upload cut short: never restored, and written over when the run gets there again).
    """
    files = bucket_files(s3, "outage")
    snapshots = sorted(f for f in files if f.startswith("ck/model_epoch_"))
    for name in snapshots:
        assert load_snapshot(s3.uri(f"outage/{name}")).epoch == int(name[15:-6])
    fs = s3.filesystem()
    folders = {f.rsplit("/", 1)[0] for f in files if f.startswith("runs/") and "/epoch_" in f}
    registered = set()
    for state in [f for f in files if f.endswith(_RUN_STATE)]:
        with fs.open_input_stream(s3.path(f"outage/{state}")) as f:
            names = set(re.findall(r"epoch_\d+", f.read().decode()))
        registered |= {f"{state.rsplit('/', 1)[0]}/{name}" for name in names}
    assert registered and registered <= folders, (registered, files)
    for folder in sorted(registered):
        local = tmp_path / folder.replace("/", "_")
        local.mkdir(parents=True)
        for name in [f for f in files if f.startswith(folder + "/")]:
            with fs.open_input_stream(s3.path(f"outage/{name}")) as src:
                (local / name.rsplit("/", 1)[1]).write_bytes(src.read())
        snapshot, history = read_checkpoint(str(local))
        assert snapshot.epoch == int(folder.rsplit("_", 1)[1])
        assert [h["epoch"] for h in history] == list(range(1, snapshot.epoch + 1))
    return snapshots, sorted(folders - registered)


def assert_the_weights_of(s3, straight: dict, prefix: str = "outage") -> None:
    ours = load_snapshot(s3.uri(f"{prefix}/ck/model_epoch_{EPOCHS}.model")).model_state
    assert ours.keys() == straight.keys()
    for name in ours:
        assert torch.equal(ours[name], straight[name]), name


def retry_warnings(cluster) -> list[tuple[str, str]]:
    """(log file, line) of every retry warning in both nodes' Ray logs (the Train workers',
    the Train controller's, the job driver's)."""
    found = []
    for temp_dir in (cluster.head_temp_dir, cluster.worker_view(cluster.worker_temp_dir)):
        # Not session_latest: a link to an absolute path, which names the head's /tmp here.
        for log in sorted(temp_dir.glob("session_2*/logs/**/*")):
            if log.is_file() and log.suffix in (".out", ".err"):
                lines = log.read_text(errors="replace").splitlines()
                found += [(log.name, ln) for ln in lines if "retrying in" in ln]
    return found


@pytest.fixture
def proxied_bucket(no_shared_disk_cluster, bucket_credentials):
    """A FlakyProxy before the cluster's bucket, and the bucket's ``outage/`` emptied (the
    S3 server lives for the session)."""
    s3 = no_shared_disk_cluster.s3
    fs = s3.filesystem()
    fs.delete_dir_contents(s3.path("outage"), missing_dir_ok=True)
    host, port = s3.host_port.split(":")
    with FlakyProxy(host, int(port)) as proxy:
        proxy.uri = lambda key: (
            f"s3://{s3.path(key)}?endpoint_override={proxy.host_port}&scheme=http"
        )
        yield proxy


def test_a_20_s_storage_outage_mid_run_delays_the_run_and_loses_nothing(
    no_shared_disk_cluster, proxied_bucket, prepared_ml100k, straight_weights, tmp_path
):
    """Every storage call retries (up to 120 s) until the bucket answers again; the epochs in
    between go on. The run ends with the weights of a straight run, to the bit, and every
    checkpoint in the bucket reads whole."""
    cluster, s3, proxy = no_shared_disk_cluster, no_shared_disk_cluster.s3, proxied_bucket
    job = training_job(prepared_ml100k, proxy.uri("outage/ck"), proxy.uri("outage/runs"), *SETTINGS)
    outage_s = 20.0
    run = run_through_an_outage(cluster, proxy, job, outage_s, SLOW_REPORTS)
    retries = retry_warnings(cluster)
    print(
        json.dumps(
            dict(
                outage_s=outage_s,
                status=run.status,
                snapshots_before_outage=sorted(run.before),
                snapshot_seen_after_outage_start_s=run.seen,
                outage_start_to_job_end_s=run.run_s,
                connections_refused=run.refused,
                retry_warnings=len(retries),
                retry_warnings_by_log={
                    log: sum(1 for lg, _ in retries if lg == log) for log, _ in retries
                },
                first_retry_warning=retries[0][1][:400] if retries else None,
            )
        )
    )
    assert f"model_epoch_{EPOCHS}.model" not in run.before, "the run ended before the outage"
    assert run.refused > 0 and retries, "nothing met the outage"
    assert run.status == "SUCCEEDED", run.logs[-5000:]
    assert (
        json.loads([ln for ln in run.logs.splitlines() if ln.startswith("{")][-1])["epoch"]
        == EPOCHS
    )
    snapshots, unregistered = assert_the_bucket_holds_whole_checkpoints(s3, tmp_path)
    assert snapshots == [f"ck/model_epoch_{e}.model" for e in range(1, EPOCHS + 1)]
    assert unregistered == []
    assert_the_weights_of(s3, straight_weights)


def test_an_outage_longer_than_the_retry_bound_fails_the_run_which_resubmitted_resumes(
    no_shared_disk_cluster, proxied_bucket, prepared_ml100k, straight_weights, tmp_path
):
    """With a retry bound of 6 s (the job's RECODER_DIST_STORAGE_RETRY_S) and an outage of
    30 s, a storage call gives up: the run fails, naming the URI (the controller's write of
    the run state or the worker's upload, whichever gives up first: both were seen). What it
    wrote reads whole; the same command, submitted again once the bucket answers (the outage
    is ended when the job has failed), resumes from the last checkpoint that Ray Train
    registered and ends with the weights of a straight run.

    The outage begins once the run's state lists a checkpoint: before that, the run has no
    checkpoint to resume from (Ray Train registers one on the controller's tick after the
    upload, and a controller that cannot write the run's state fails the run), and a
    resubmitted run starts over.

    The bound is a few tries long, not one: a bound shorter than one try retries nothing, so a
    connection reset before the outage would fail the run there."""
    cluster, s3, proxy = no_shared_disk_cluster, no_shared_disk_cluster.s3, proxied_bucket
    job = training_job(prepared_ml100k, proxy.uri("outage/ck"), proxy.uri("outage/runs"), *SETTINGS)
    short_retries = {**SLOW_REPORTS, RETRY_ENV: "6"}
    run = run_through_an_outage(
        cluster, proxy, job, 30.0, short_retries, when=first_registered_checkpoint
    )
    # Whichever gave up first: the Train controller writing the run state (a ControllerError
    # with our error as its message), or the worker uploading a checkpoint (a
    # WorkerGroupError, whose message Ray cuts to the end of the worker's error).
    failure = [ln for ln in run.logs.splitlines() if f"(retry bound 6 s, {RETRY_ENV})" in ln]
    snapshots, unregistered = assert_the_bucket_holds_whole_checkpoints(s3, tmp_path / "failed")
    print(
        json.dumps(
            dict(
                status=run.status,
                outage_start_to_job_end_s=run.run_s,
                error=run.logs.strip().splitlines()[-2:],
                snapshots_after_failure=snapshots,
                unregistered_folders_after_failure=unregistered,
            )
        )
    )
    assert run.status == "FAILED", run.logs[-5000:]
    assert failure and f"endpoint_override={proxy.host_port}" in failure[-1], run.logs[-5000:]
    # What the user sees last: one line (cli._outage), the traceback only with --verbose.
    last = run.logs.strip().splitlines()[-1]
    assert last.startswith("recoder-dist: error: storage unavailable: "), run.logs[-5000:]

    resumed = cluster.submit(*job)  # the same command: the same run name and storage
    assert last_json(resumed)["epoch"] == EPOCHS
    assert "resuming from the checkpoint of epoch " in resumed.stdout + resumed.stderr
    snapshots, unregistered = assert_the_bucket_holds_whole_checkpoints(s3, tmp_path / "again")
    assert unregistered == []
    assert snapshots == [f"ck/model_epoch_{e}.model" for e in range(1, EPOCHS + 1)]
    assert_the_weights_of(s3, straight_weights)


def test_a_lost_worker_node_is_replaced_and_the_run_resumes_to_the_weights_of_a_straight_run(
    no_shared_disk_cluster, bucket_credentials, prepared_ml100k, straight_weights
):
    """The worker node is killed mid-run, every process of it at once (its raylet, object
    store and Train worker: a spot instance taken back), and a new one like it joins (the
    autoscaler's replacement). With ``--max-failures 1``, Ray Train starts the worker group
    again on the new node, from the last checkpoint that it registered in the bucket, and the
    job ends with the weights of a straight run. The Train controller and the job's driver
    live on the head, which the loss does not touch."""
    cluster, s3 = no_shared_disk_cluster, no_shared_disk_cluster.s3
    s3.filesystem().delete_dir_contents(s3.path("lost"), missing_dir_ok=True)
    job = training_job(
        prepared_ml100k, s3.uri("lost/ck"), s3.uri("lost/runs"), *SETTINGS, "--max-failures", "1"
    )
    job_id = f"lost-node-{uuid.uuid4().hex[:8]}"
    # A report tick of 2 s: the run is still going when its first checkpoint is registered.
    slow = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "2"}
    started = cluster.submit(*job, env_vars=slow, submission_id=job_id, wait=False)
    assert started.returncode == 0, started.stdout[-3000:] + started.stderr[-3000:]
    client = JobSubmissionClient(cluster.dashboard)
    deadline = time.monotonic() + 240
    while not first_registered_checkpoint(s3, "lost/runs"):
        assert not client.get_job_status(job_id).is_terminal(), client.get_job_logs(job_id)
        assert time.monotonic() < deadline, client.get_job_logs(job_id)[-3000:]
        time.sleep(0.1)
    lost = time.monotonic()
    cluster.replace_worker_node()
    joined_s = round(time.monotonic() - lost, 1)
    while not (status := client.get_job_status(job_id)).is_terminal():
        time.sleep(0.2)
    logs = client.get_job_logs(job_id)
    print(
        json.dumps(
            dict(
                status=status.value,
                node_lost_to_new_node_joined_s=joined_s,
                node_lost_to_job_end_s=round(time.monotonic() - lost, 1),
                resumed=[ln for ln in logs.splitlines() if "resuming from" in ln],
            )
        )
    )
    assert status.value == "SUCCEEDED", logs[-5000:]
    assert "resuming from the checkpoint of epoch " in logs, logs[-5000:]
    assert json.loads([ln for ln in logs.splitlines() if ln.startswith("{")][-1])["epoch"] == EPOCHS
    assert_the_weights_of(s3, straight_weights, prefix="lost")


def test_a_driver_lost_while_writing_recommendations_resubmitted_writes_them_whole_once(
    s3_server, prepared_ml100k, tmp_path, monkeypatch
):
    """`recoder-dist recommend` (a driver on its own local Ray) writes into a fresh sibling of
    its output in the bucket, then moves the files into the output. Once the first file of the
    fresh folder is in the bucket, the bucket stalls (through a FlakyProxy) and the driver's
    session is killed: the write is cut mid-way. The same command, run again with the bucket
    back, leaves in the output every user's recommendations once, those of the model in this
    process, and deletes the killed run's fresh folder."""
    s3 = s3_server
    for name, value in s3.credentials_env().items():
        monkeypatch.setenv(name, value)
    s3.filesystem().delete_dir_contents(s3.path("lost-driver"), missing_dir_ok=True)
    recoder = Recoder(DynamicAutoencoder(hidden_layers=[32]), num_workers=0, seed=0)
    recoder.train(load_prepared(prepared_ml100k).split.train, num_epochs=2, batch_size=100)
    checkpoint = recoder.save_state(str(tmp_path / "model"))
    # An earlier output, which the new one replaces: a writer that added to it would leave
    # this user twice.
    expected = reference(recoder, prepared_ml100k, "train", 10)
    some_user = next(iter(expected))
    earlier = pa.table({"user": [some_user], "rank_items": [expected[some_user][::-1]]})
    pq.write_table(earlier, s3.path("lost-driver/recs/earlier.parquet"), filesystem=s3.filesystem())
    env = {**client_env(), **s3.credentials_env(), "PYTHONPATH": str(REPO)}
    host, port = s3.host_port.split(":")
    with FlakyProxy(host, int(port)) as proxy:
        output = (
            f"s3://{s3.path('lost-driver/recs')}?endpoint_override={proxy.host_port}&scheme=http"
        )
        command = [
            *("recoder-dist", "recommend", "--checkpoint", checkpoint),
            *("--data", str(prepared_ml100k), "--split", "train", "--top-k", "10"),
            *("--output", output),
        ]
        first = subprocess.Popen(
            command, env=env, stdout=subprocess.PIPE, text=True, start_new_session=True
        )
        deadline = time.monotonic() + 180
        while not any(".tmp-" in f for f in bucket_files(s3, "lost-driver")):
            assert first.poll() is None, "the run ended before its first file"
            assert time.monotonic() < deadline, "no file of the fresh folder in 180 s"
            time.sleep(0.05)
        proxy.outage("stall", 600)
        stop_session(first, grace_s=0)
        cut = bucket_files(s3, "lost-driver")
        proxy.restore()
        # Ray's relayed log lines may reach its stdout (the autoscaler's monitor, stopped with
        # the session, says so); its result, one JSON line, must not.
        printed = first.stdout.read()
        assert first.returncode < 0, f"the killed run finished: {first.returncode}\n{printed}"
        assert '{"output"' not in printed, f"the killed run finished:\n{printed}"

        again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert last_json(again)["users"] == 738
    rows = pq.read_table(s3.path("lost-driver/recs"), filesystem=s3.filesystem()).to_pylist()
    assert len(rows) == len({row["user"] for row in rows}) == 738  # each user once
    assert {row["user"]: row["rank_items"] for row in rows} == expected
    print(json.dumps({"cut_at": cut}))
    assert any(".tmp-" in f for f in cut)
    # The killed run's fresh folder is gone too.
    assert [f for f in bucket_files(s3, "lost-driver") if not f.startswith("recs/")] == []
