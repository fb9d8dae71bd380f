"""The no-shared-disk cluster and the S3 server of tests/multinode.py do what they claim: the
worker node sees neither the head's /tmp nor the test's files, it reaches the bucket with only
its own credentials, and `ray job submit` runs drivers on the head.

These tests connect through subprocesses: the test session has its own local Ray (ray_session),
which a `ray.init` here would collide with."""

from __future__ import annotations

import json
import os
import time
import uuid

import pandas as pd
import pytest
import torch

from recoder_dist.cli import main
from recoder_dist.datasets import load_prepared
from recoder_dist.metrics import NDCG
from recoder_dist.model import Recoder
from recoder_dist.nn import DynamicAutoencoder
from recoder_dist.sharded.checkpoint import shard_file
from recoder_dist.similarity import item_vectors
from recoder_dist.training.snapshot import load_snapshot
from tests.conftest import shared_data
from tests.multinode import WORKER_NODE, last_json
from tests.test_cli import brute_force_neighbours

pytestmark = pytest.mark.slow  # a two-node cluster, and jobs on it

# A driver's preamble: the two nodes' ids, and a task pinned to each. The head has 0 CPUs, so
# its task asks for none.
_NODES = f"""
import json, os, ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
ray.init()
alive = [n for n in ray.nodes() if n["Alive"]]
(worker_id,) = [n["NodeID"] for n in alive if {WORKER_NODE!r} in n["Resources"]]
(head_id,) = [n["NodeID"] for n in alive if n["NodeID"] != worker_id]
on_head = dict(
    num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(head_id, soft=False)
)
on_worker = dict(num_cpus=1, resources={{{WORKER_NODE!r}: 0.01}})
def node_id():
    return ray.get_runtime_context().get_node_id()
"""


def _driver_output(cluster, code: str) -> dict:
    """Runs a driver (the preamble, then `code`) and returns the JSON it printed last."""
    return last_json(cluster.run_driver(_NODES + code))


def test_the_worker_node_does_not_see_the_heads_tmp_and_vice_versa(
    no_shared_disk_cluster, tmp_path
):
    cluster = no_shared_disk_cluster
    marker = tmp_path / "written-by-the-test.txt"
    marker.write_text("on the head's disk")
    # Under /tmp itself, the worker node's tmpfs; a unique name, since /tmp here is shared.
    worker_file = f"/tmp/rdmn-{uuid.uuid4().hex[:8]}.txt"
    code = f"""
@ray.remote
def look(path, write=None):
    if write:
        with open(write, "w") as f:
            f.write("on the worker node's disk")
    return node_id(), os.path.exists(path)
head = look.options(**on_head).remote({str(marker)!r})
worker = look.options(**on_worker).remote({str(marker)!r}, {worker_file!r})
print(json.dumps(dict(head_id=head_id, worker_id=worker_id, head=ray.get(head),
                      worker=ray.get(worker))))
"""
    out = _driver_output(cluster, code)
    # Each task ran where it was sent, and only the head's sees the test's file.
    assert out["head"] == [out["head_id"], True]
    assert out["worker"] == [out["worker_id"], False], cluster.logs()
    # What the worker node writes under /tmp is on its tmpfs only.
    assert cluster.worker_view(worker_file).read_text() == "on the worker node's disk"
    assert not os.path.exists(worker_file)


def test_a_task_on_the_worker_node_writes_to_the_bucket_with_its_own_credentials(
    no_shared_disk_cluster,
):
    cluster = no_shared_disk_cluster
    s3 = cluster.s3
    # Nothing from here hands credentials to the cluster.
    assert not any(k.startswith("AWS_ACCESS") or k.startswith("AWS_SECRET") for k in cluster.env)
    key = "from-the-worker-node/hello.txt"
    code = f"""
@ray.remote
def write(uri, strip_credentials):
    # Imported here: pyarrow.fs (not pyarrow._fs, where a pickled FileSystem comes from)
    # registers the s3:// scheme.
    from pyarrow.fs import FileSystem

    if strip_credentials:  # as a node without an instance profile
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            os.environ.pop(name, None)
    fs, path = FileSystem.from_uri(uri)
    try:
        with fs.open_output_stream(path) as f:
            f.write(node_id().encode())
    except OSError as e:
        return str(e)
    return "written"

good = write.options(**on_worker).remote({s3.uri(key)!r}, False)
bare = write.options(**on_worker).remote({s3.uri("refused.txt")!r}, True)
print(json.dumps(dict(worker_id=worker_id, good=ray.get(good), bare=ray.get(bare))))
"""
    out = _driver_output(cluster, code)
    assert out["good"] == "written"
    # The test reads it back: written by the worker node.
    with s3.filesystem().open_input_stream(s3.path(key)) as f:
        assert f.read().decode() == out["worker_id"]
    # Without credentials the server refuses, as S3 would: the bucket does check them.
    assert out["bare"] != "written" and "refused.txt" in out["bare"]
    assert s3.filesystem().get_file_info(s3.path("refused.txt")).type.name == "NotFound"


def test_ray_job_submit_runs_the_driver_on_the_head_and_reports_failure(
    no_shared_disk_cluster, tmp_path
):
    cluster = no_shared_disk_cluster
    s3 = cluster.s3
    marker = tmp_path / "job-input.txt"
    marker.write_text("only the head sees this")
    # The driver sees the test's file (it runs on the head), its task on the worker node does
    # not, and the head's own credentials let it write to the bucket.
    code = f"""
import os, ray
from pyarrow.fs import FileSystem
ray.init()
@ray.remote(num_cpus=1, resources={{{WORKER_NODE!r}: 0.01}})
def sees(path):
    return os.path.exists(path)
assert os.path.exists({str(marker)!r}), "the driver does not run on the head"
assert not ray.get(sees.remote({str(marker)!r})), "the worker node sees the head's /tmp"
fs, path = FileSystem.from_uri({s3.uri("from-the-job.txt")!r})
with fs.open_output_stream(path) as f:
    f.write(b"job")
print("JOB-OK")
"""
    result = cluster.submit_cli("python", "-c", code)
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    assert "JOB-OK" in result.stdout
    with s3.filesystem().open_input_stream(s3.path("from-the-job.txt")) as f:
        assert f.read() == b"job"

    failed = cluster.submit_cli("python", "-c", "import sys; sys.exit(3)", working_dir=None)
    assert failed.returncode != 0, failed.stdout[-3000:]
    assert "failed" in failed.stdout + failed.stderr


# --- recoder-dist's jobs on this cluster ---------------------------------------------------------
# Their drivers run on the head and read the prepared data there (tmp_path is on its disk); the
# workers run on the worker node, which sees none of it: runs and snapshots go to the bucket.


def training_job(prepared, checkpoint_dir: str, storage: str, *extra: str) -> list[str]:
    """`recoder-dist train` on prepared ml-100k: 1 worker, batch 100, hidden [32]."""
    return [
        "recoder-dist",
        "train",
        "--data",
        str(prepared),
        "--checkpoint-dir",
        checkpoint_dir,
        "--storage",
        storage,
        "--batch-size",
        "100",
        "--workers",
        "1",
        "--hidden",
        "32",
        *extra,
    ]


def bucket_files(s3, prefix: str) -> list[str]:
    from pyarrow.fs import FileSelector

    selector = FileSelector(s3.path(prefix), recursive=True, allow_not_found=True)
    infos = s3.filesystem().get_file_info(selector)
    return sorted(
        i.path.removeprefix(s3.path(prefix) + "/") for i in infos if i.type.name == "File"
    )


@pytest.fixture
def bucket_credentials(no_shared_disk_cluster, monkeypatch):
    """This process reads the bucket like any node, with credentials in its environment."""
    for name, value in no_shared_disk_cluster.s3.credentials_env().items():
        monkeypatch.setenv(name, value)


def test_a_run_storage_on_the_heads_disk_is_refused_before_any_worker_starts(
    no_shared_disk_cluster, prepared_ml100k, tmp_path
):
    cluster = no_shared_disk_cluster
    job = training_job(prepared_ml100k, str(tmp_path / "ck"), str(tmp_path / "runs"))
    result = cluster.submit(*job, "--epochs", "1")
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-3000:]
    assert f"storage_path  {tmp_path / 'runs'} is not visible from node(s)" in output, output
    assert "s3://bucket/prefix" in output
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").glob("*/checkpoint_*"))


def test_prepare_train_evaluate_and_recommend_through_the_bucket(
    no_shared_disk_cluster, prepared_ml100k, bucket_credentials
):
    """Every location a URI: the prepared split, the snapshots, the runs and the output."""
    cluster, s3 = no_shared_disk_cluster, no_shared_disk_cluster.s3
    prepare = [
        "recoder-dist", "prepare", "--dataset", "ml-100k", "--data-dir",
        str(shared_data("ml-100k")), "--output", s3.uri("job/data"),
        "--val-users", "100", "--test-users", "100",
    ]  # fmt: skip
    last_json(cluster.submit(*prepare))
    # The same split as the fixture's, written by the same command to the head's disk.
    assert "split.json" in bucket_files(s3, "job/data")
    data = s3.uri("job/data")
    # 2 workers, the tables sharded: each writes its shard of a checkpoint into the bucket, and
    # rank 0 assembles the user's snapshot from them there.
    sharded = ("--epochs", "2", "--workers", "2")
    job = training_job(data, s3.uri("job/ck"), s3.uri("job/runs"), *sharded)
    trained = last_json(cluster.submit(*job))
    assert trained["checkpoint"] == s3.uri("job/ck/model_epoch_2.model")
    files = bucket_files(s3, "job")
    assert "ck/model_epoch_2.model" in files
    shards = [f for f in files if f.startswith("runs/") and "/epoch_2/shard_" in f]
    assert sorted(f.rsplit("/", 1)[1] for f in shards) == [shard_file(r, 2) for r in (0, 1)], files

    # evaluate reads the snapshot from the bucket and scores what training reported.
    evaluated = last_json(
        cluster.submit(
            "recoder-dist", "evaluate", "--checkpoint", trained["checkpoint"],
            "--data", data, "--workers", "1",
        )
    )  # fmt: skip
    for name, value in trained["test"].items():
        assert evaluated[name] == pytest.approx(value, abs=1e-12), name

    # recommend writes its Parquet into the bucket: every test user, 10 items each, none seen.
    recommended = last_json(
        cluster.submit(
            "recoder-dist", "recommend", "--checkpoint", trained["checkpoint"],
            "--data", data, "--output", s3.uri("job/recs"), "--top-k", "10",
        )
    )  # fmt: skip
    import pyarrow.dataset as ds

    table = ds.dataset(s3.path("job/recs"), filesystem=s3.filesystem(), format="parquet").to_table()
    test = load_prepared(prepared_ml100k).split.test
    assert table.num_rows == recommended["users"] == len(test.users)
    assert {len(items) for items in table.column("rank_items").to_pylist()} == {10}

    # similar-items writes its Parquet into the bucket: every item's 5 nearest, as brute force
    # finds them in the snapshot that it reads from the bucket.
    similar = last_json(
        cluster.submit(
            "recoder-dist", "similar-items", "--checkpoint", trained["checkpoint"],
            "--data", data, "--output", s3.uri("job/similar"), "--top-k", "5", "--workers", "2",
        )
    )  # fmt: skip
    table = ds.dataset(s3.path("job/similar"), filesystem=s3.filesystem(), format="parquet")
    rows = {row["item"]: row for row in table.to_table().to_pylist()}
    restored = Recoder(DynamicAutoencoder(), num_workers=0)
    restored.init_from_model_file(trained["checkpoint"])
    raw_of = {i: raw for raw, i in load_prepared(prepared_ml100k).item_id_map.items()}
    assert similar["items"] == len(rows) == len(raw_of)
    for i, (neighbours, _) in enumerate(brute_force_neighbours(item_vectors(restored), 5)):
        assert rows[raw_of[i]]["similar_items"] == [raw_of[j] for j in neighbours], i


def test_prepare_reads_events_from_the_bucket_on_the_cluster(
    no_shared_disk_cluster, bucket_credentials
):
    """Event files in the bucket, read, grouped and split by the worker node's tasks (the head
    has no CPU): the split of the documented rule, written back to the bucket."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from recoder_dist.datasets import StrongSplitConfig, load_movielens
    from tests.test_cluster_prepare import naive_split
    from tests.test_splits import raw_pairs

    cluster, s3 = no_shared_disk_cluster, no_shared_disk_cluster.s3
    events = load_movielens("ml-100k", shared_data("ml-100k"))[["user", "item", "value"]]
    for number, start in enumerate(range(0, len(events), 40_000)):
        table = pa.Table.from_pandas(events.iloc[start : start + 40_000], preserve_index=False)
        path = s3.path(f"events/part-{number}.parquet")
        pq.write_table(
            table.rename_columns(["uid", "iid", "rating"]), path, filesystem=s3.filesystem()
        )
    prepare = [
        "recoder-dist", "prepare", "--dataset", "events", "--input", s3.uri("events"),
        "--user-col", "uid", "--item-col", "iid", "--value-col", "rating",
        "--positive-above", "3.5", "--val-users", "50", "--test-users", "60", "--seed", "4",
        "--output", s3.uri("events-split"),
    ]  # fmt: skip
    last_json(cluster.submit(*prepare))
    config = StrongSplitConfig(num_val_users=50, num_test_users=60, seed=4)
    expected, users, items = naive_split(events, config, positive_above=3.5)
    prepared = load_prepared(s3.uri("events-split"))
    assert list(prepared.user_id_map) == users and list(prepared.item_id_map) == items
    pairs = raw_pairs(prepared.split, prepared.user_id_map, prepared.item_id_map)
    assert pairs == {name: expected.get(name, set()) for name in pairs}


def test_a_head_with_no_cpu_prepares_a_local_file(no_shared_disk_cluster, tmp_path):
    """A CSV on the head's disk, which the worker node does not see, prepared into a folder
    there: the head (0 CPUs) reads and writes with tasks that ask for none, the worker node
    parses, groups and splits. The split of the documented rule."""
    from recoder_dist.datasets import StrongSplitConfig, load_movielens
    from tests.test_cluster_prepare import naive_split
    from tests.test_splits import raw_pairs

    cluster = no_shared_disk_cluster
    events = load_movielens("ml-100k", shared_data("ml-100k"))[["user", "item", "value"]]
    source = tmp_path / "events.csv"
    events.rename(columns={"user": "uid", "item": "iid", "value": "rating"}).to_csv(
        source, index=False
    )
    prepare = [
        "recoder-dist", "prepare", "--dataset", "events", "--input", str(source),
        "--user-col", "uid", "--item-col", "iid", "--value-col", "rating",
        "--positive-above", "3.5", "--val-users", "50", "--test-users", "60", "--seed", "4",
        "--output", str(tmp_path / "split"),
    ]  # fmt: skip
    printed = last_json(cluster.submit(*prepare))
    config = StrongSplitConfig(num_val_users=50, num_test_users=60, seed=4)
    expected, users, items = naive_split(events, config, positive_above=3.5)
    prepared = load_prepared(tmp_path / "split")
    assert printed["users"] == len(users) and printed["test_users"] == 60
    assert list(prepared.user_id_map) == users and list(prepared.item_id_map) == items
    pairs = raw_pairs(prepared.split, prepared.user_id_map, prepared.item_id_map)
    assert pairs == {name: expected.get(name, set()) for name in pairs}
    assert set(expected) <= set(pairs)


def test_a_stopped_training_job_resubmitted_resumes_to_the_weights_of_a_straight_run(
    no_shared_disk_cluster, prepared_ml100k, bucket_credentials, ray_session, tmp_path
):
    """The straight run is the same command in this process (``--workers 0``): a 1-worker
    run ends with its weights to the bit, so a resumed job that lost or repeated a step still
    differs from it, and a straight job on the cluster would only add a job and a worker
    group to the test."""
    cluster, s3 = no_shared_disk_cluster, no_shared_disk_cluster.s3
    settings = ("--epochs", "8", "--checkpoint-freq", "1", "--seed", "3")
    job = training_job(prepared_ml100k, s3.uri("resume/ck"), s3.uri("resume/runs"), *settings)
    job_id = f"train-{uuid.uuid4().hex[:8]}"
    # A report tick of 1 s (each checkpoint waits for one): a window to stop the job in.
    slow_reports = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "1"}
    started = cluster.submit(*job, env_vars=slow_reports, submission_id=job_id, wait=False)
    assert started.returncode == 0, started.stdout[-3000:] + started.stderr[-3000:]
    deadline = time.monotonic() + 240
    while "ck/model_epoch_2.model" not in bucket_files(s3, "resume"):
        assert time.monotonic() < deadline, cluster.job("logs", job_id).stdout[-3000:]
        time.sleep(0.2)
    stopped = cluster.job("stop", job_id)  # waits until the job has exited
    assert stopped.returncode == 0 and "was stopped" in stopped.stdout, stopped
    reached = {f for f in bucket_files(s3, "resume") if f.startswith("ck/")}
    assert "ck/model_epoch_8.model" not in reached, "stopped too late to test anything"

    resumed = cluster.submit(*job)  # the same command: the same run name and storage
    assert last_json(resumed)["epoch"] == 8
    assert "resuming from the checkpoint of epoch " in resumed.stdout + resumed.stderr
    straight = tmp_path / "straight"
    straight_job = training_job(prepared_ml100k, str(straight / "ck"), str(straight / "runs"))
    assert main([*straight_job[1:], *settings, "--workers", "0"]) == 0
    ours = load_snapshot(s3.uri("resume/ck/model_epoch_8.model")).model_state
    theirs = load_snapshot(str(straight / "ck" / "model_epoch_8.model")).model_state
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name


def tune_states(s3, experiment: str) -> dict[str, str]:
    """trial id -> status in the sweep's last saved experiment state ({} before the first);
    read from Tune's JSON, which ExperimentAnalysis would report a RUNNING trial's as PENDING."""
    from pyarrow.fs import FileSelector

    fs = s3.filesystem()
    infos = fs.get_file_info(FileSelector(s3.path(experiment), allow_not_found=True))
    states = sorted(i.path for i in infos if i.base_name.startswith("experiment_state-"))
    if not states:
        return {}
    try:
        with fs.open_input_stream(states[-1]) as f:
            trials = json.loads(f.read())["trial_data"]
    except (json.JSONDecodeError, OSError):  # caught mid-write
        return {}
    return {t["trial_id"]: t["status"] for t in (json.loads(data) for data, _ in trials)}


def test_a_sweep_stopped_mid_way_resumes_without_rerunning_finished_trials(
    no_shared_disk_cluster, prepared_ml100k, bucket_credentials
):
    """The sweep's state, its trials' runs and its exports are in the bucket; stopped once one
    trial of two has finished, the same command with --resume runs only the other one."""
    cluster, s3 = no_shared_disk_cluster, no_shared_disk_cluster.s3
    sweep = [
        "python", "tune/sweep.py", "--data", str(prepared_ml100k), "--storage", s3.uri("sweep"),
        "--lrs", "1e-3", "--batch-sizes", "50", "100", "--epochs", "1", "--eval-freq", "1",
        "--hidden", "32", "--concurrent", "1", "--cpus-per-worker", "0.5",
    ]  # fmt: skip
    job_id = f"sweep-{uuid.uuid4().hex[:8]}"
    # Tune saves the experiment state every 10 s at first; every 0.5 s here, so that the state
    # in storage follows the trials closely enough to stop the job between them.
    often = {"TUNE_GLOBAL_CHECKPOINT_S": "0.5"}
    started = cluster.submit(*sweep, env_vars=often, submission_id=job_id, wait=False)
    assert started.returncode == 0, started.stdout[-3000:] + started.stderr[-3000:]

    deadline = time.monotonic() + 300
    states = tune_states(s3, "sweep/tune")
    while sorted(states.values()) != ["RUNNING", "TERMINATED"]:
        if list(states.values()).count("TERMINATED") == 2 or time.monotonic() > deadline:
            logs = cluster.job("logs", job_id).stdout[-5000:]
            pytest.fail(f"no state with one trial finished: {states}\n{logs}")
        time.sleep(0.25)
        states = tune_states(s3, "sweep/tune")
    stopped = cluster.job("stop", job_id)
    assert stopped.returncode == 0 and "was stopped" in stopped.stdout, stopped
    states = tune_states(s3, "sweep/tune")
    (finished,) = [t for t, status in states.items() if status == "TERMINATED"]
    (interrupted,) = set(states) - {finished}
    fs = s3.filesystem()
    (snapshot,) = [
        f for f in bucket_files(s3, f"sweep/runs/trial-{finished}") if f.endswith("snapshot.pt")
    ]
    before = fs.get_file_info(s3.path(f"sweep/runs/trial-{finished}/{snapshot}")).mtime

    summary = last_json(cluster.submit(*sweep, "--resume"))
    assert set(tune_states(s3, "sweep/tune").values()) == {"TERMINATED"}
    assert summary["trials"] == 2
    # The finished trial was not run again; the interrupted one ran to its end.
    assert fs.get_file_info(s3.path(f"sweep/runs/trial-{finished}/{snapshot}")).mtime == before
    assert any(
        f.endswith("snapshot.pt") for f in bucket_files(s3, f"sweep/runs/trial-{interrupted}")
    )
    with fs.open_input_stream(s3.path("sweep/results.csv")) as f:
        table = pd.read_csv(f)
    assert sorted(table["trial_id"]) == sorted(states) and table["NDCG@100"].notna().all()
    assert summary["NDCG@100"] == table["NDCG@100"].max()
    # best.model, exported into the bucket, scores (in-process, here) what the sweep reported.
    assert summary["snapshot"] == s3.uri("sweep/best.model")
    recoder = Recoder(DynamicAutoencoder(), num_workers=0)
    recoder.init_from_model_file(summary["snapshot"])
    validation = load_prepared(prepared_ml100k).split.validation
    score = recoder.evaluate(validation, 100, [NDCG(k=100)])["NDCG@100"]
    assert score == pytest.approx(summary["NDCG@100"], abs=1e-9)


def test_a_job_with_a_bad_argument_fails_in_one_line(no_shared_disk_cluster, tmp_path):
    result = no_shared_disk_cluster.submit(
        "recoder-dist", "train", "--data", str(tmp_path / "missing"), "--checkpoint-dir", "ck"
    )
    assert result.returncode != 0
    assert "recoder-dist: error: " in result.stdout + result.stderr
    assert "no split.json" in result.stdout + result.stderr
