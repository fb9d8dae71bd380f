"""The no-shared-disk cluster and the S3 server of tests/multinode.py do what they claim: the
worker node sees neither the head's /tmp nor the test's files, it reaches the bucket with only
its own credentials, and `ray job submit` runs drivers on the head.

These tests connect through subprocesses: the test session has its own local Ray (ray_session),
which a `ray.init` here would collide with."""

from __future__ import annotations

import json
import os
import uuid

from tests.multinode import WORKER_NODE

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
    """Runs a driver (the preamble, then `code`) and returns the JSON of its last line."""
    result = cluster.run_driver(_NODES + code)
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return json.loads(result.stdout.strip().splitlines()[-1])


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
    result = cluster.submit("python", "-c", code)
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    assert "JOB-OK" in result.stdout
    with s3.filesystem().open_input_stream(s3.path("from-the-job.txt")) as f:
        assert f.read() == b"job"

    failed = cluster.submit("python", "-c", "import sys; sys.exit(3)", working_dir=None)
    assert failed.returncode != 0, failed.stdout[-3000:]
    assert "failed" in failed.stdout + failed.stderr
