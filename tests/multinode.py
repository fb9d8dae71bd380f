"""Ray clusters of our own on this machine, and a local S3 bucket, for tests that must see what a
real cluster does to storage.

Every process of an ordinary local cluster shares one disk, so a path that only the head (or
the driver) can read works in tests and fails on a real cluster. `no_shared_disk_cluster` gives
its worker node a private, empty /tmp (a tmpfs in a mount namespace of its own): a file that
the test or the head writes under /tmp, pytest's tmp_path included, is not there, and what the
worker node writes there is not on the head. Storage that both can reach is the `s3_server`
bucket, which refuses requests without valid credentials, as S3 does.

Use from a test:

    def test_training_checkpoints_to_s3(no_shared_disk_cluster):
        cluster = no_shared_disk_cluster
        result = cluster.submit("recoder-dist", "train", ...,
                                "--storage", cluster.s3.uri("runs/a"))
        assert result.returncode == 0, result.stdout + result.stderr
        cluster.s3.filesystem().get_file_info(cluster.s3.path("runs/a/..."))

Nothing here stops Ray by name (`ray stop` kills every Ray on the machine, the test session's
own included): each cluster is stopped by the session id of its own `ray start`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent  # `ray`, `python`, `recoder-dist`, `moto_server`
# A custom resource that only the worker node has: `resources={WORKER_NODE: 0.01}` pins a task.
WORKER_NODE = "worker_node"
# Ports that `ray start` would otherwise take at fixed defaults (agent 52365, client server
# 10001, ...), which another cluster on this machine may hold.
_NODE_PORTS = (
    "dashboard-agent-listen-port",
    "dashboard-agent-grpc-port",
    "runtime-env-agent-port",
    "metrics-export-port",
    "node-manager-port",
    "object-manager-port",
)
_HEAD_PORTS = (*_NODE_PORTS, "ray-client-server-port")


# --- Processes ----------------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port that is free now (another process may take it before it is used)."""
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def session_processes(sid: int) -> list[int]:
    """Live processes of session `sid` (zombies left to a non-reaping init are skipped)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        pid = int(entry)
        try:
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
            if state != "Z" and os.getsid(pid) == sid:
                pids.append(pid)
        except (FileNotFoundError, ProcessLookupError, PermissionError, IndexError):
            pass
    return pids


def stop_session(leader: subprocess.Popen, grace_s: float = 5.0) -> None:
    """Stops every process of the session that `leader` leads, and nothing else.

    A process group is not enough: the raylet puts each worker process in a group of its own.
    So `ray start` runs as the leader of a new session (start_new_session) and every process of
    its node (raylet, workers, agents, and nodes that it starts) inherits that session id: we
    signal exactly those. `--block` keeps the leader alive until now, so the session id cannot
    have been reused by another process.
    """
    sid = leader.pid
    members = [pid for pid in session_processes(sid) if pid != sid]
    for pid in members:
        _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and [p for p in session_processes(sid) if p != sid]:
        time.sleep(0.2)
    for pid in session_processes(sid):
        _signal(pid, signal.SIGKILL)
    leader.kill()
    leader.wait(timeout=30)


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def log_tail(temp_dir: str | Path, name: str, lines: int = 40) -> str:
    """The last lines of one of Ray's logs in a node's temp dir."""
    path = Path(temp_dir) / "session_latest" / "logs" / name
    if not path.exists():
        return f"({path} is absent)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def last_json(result: subprocess.CompletedProcess) -> dict:
    """A successful command's result: the last line of its stdout that is a JSON object. Not
    simply its last line: Ray relays its processes' messages (the raylet's, the autoscaler's)
    to a driver's stdout, and one may come after the result."""
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return json.loads([ln for ln in result.stdout.splitlines() if ln.startswith("{")][-1])


def client_env() -> dict[str, str]:
    """The environment for `ray start`, `ray job submit` and drivers: the venv first on PATH
    (a node runs `python` from the PATH of its `ray start`), no RAY_* of the caller's (an
    inherited RAY_ADDRESS would join another cluster), and token auth off everywhere, since
    Ray >= 2.59 turns it on for local clusters and head, nodes and clients must agree."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(
        PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
        RAY_AUTH_MODE="disabled",
        RAY_USAGE_STATS_ENABLED="0",
    )
    return env


def wait_for_line(log_path: Path, text: str, process: subprocess.Popen, timeout_s: float) -> None:
    """Waits until `text` appears in the log; fails the test with the log if the process exits
    first or the time runs out."""
    deadline = time.monotonic() + timeout_s
    while text not in log_path.read_text(errors="replace"):
        if process.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"{process.args!r} failed:\n{log_path.read_text(errors='replace')[-3000:]}")
        time.sleep(0.5)


# --- S3 -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class S3Server:
    """A moto S3 server on 127.0.0.1 with one bucket and one key pair that may use it."""

    endpoint: str  # http://127.0.0.1:PORT
    bucket: str
    access_key: str
    secret_key: str
    pid: int
    log: Path

    @property
    def host_port(self) -> str:
        return self.endpoint.removeprefix("http://")

    def credentials_env(self) -> dict[str, str]:
        """What an instance profile gives a node on AWS; the metadata service, which the AWS
        SDK would otherwise try (and wait for) when a key is missing, does not exist here."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def path(self, key: str = "") -> str:
        """`BUCKET/key`, the form a pyarrow filesystem takes."""
        return f"{self.bucket}/{key.lstrip('/')}".rstrip("/")

    def uri(self, key: str = "") -> str:
        """The URI that Ray (storage_path) and `pyarrow.fs.FileSystem.from_uri` accept; the
        credentials come from the environment of the process that opens it."""
        return f"s3://{self.path(key)}?endpoint_override={self.host_port}&scheme=http"

    def filesystem(self):
        """A pyarrow S3FileSystem with the server's credentials, for the test's own checks."""
        from pyarrow.fs import S3FileSystem

        return S3FileSystem(
            endpoint_override=self.endpoint,
            scheme="http",
            access_key=self.access_key,
            secret_key=self.secret_key,
            region="us-east-1",
            allow_bucket_creation=True,
        )


def _moto_request(endpoint: str, path: str, data: bytes | None = None) -> bytes:
    request = urllib.request.Request(
        endpoint + path,
        data=data,
        method="GET" if data is None else "POST",
        # moto reads the raw body; a form content type (urllib's default) would hide it.
        headers={"Content-Type": "text/plain"},
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        return response.read()


def _provision(endpoint: str, bucket: str) -> tuple[str, str]:
    """Creates the bucket and an IAM user allowed s3:*, whose key pair it returns, then turns
    on moto's request authentication: from then on a request without a valid signature fails
    (INVALID_ACCESS_KEY_ID, SIGNATURE_DOES_NOT_MATCH, or an error for an unsigned one), as on
    S3. By default moto takes anything, so a node without credentials would pass unseen."""
    import boto3

    anyone = {
        "endpoint_url": endpoint,
        "region_name": "us-east-1",
        "aws_access_key_id": "provisioning",
        "aws_secret_access_key": "provisioning",
    }
    iam = boto3.client("iam", **anyone)
    iam.create_user(UserName="ray-nodes")
    policy = {
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}],
    }
    iam.put_user_policy(UserName="ray-nodes", PolicyName="s3", PolicyDocument=json.dumps(policy))
    key = iam.create_access_key(UserName="ray-nodes")["AccessKey"]
    boto3.client("s3", **anyone).create_bucket(Bucket=bucket)
    # The number of requests still let through unauthenticated: none.
    _moto_request(endpoint, "/moto-api/reset-auth", b"0")
    return key["AccessKeyId"], key["SecretAccessKey"]


@contextlib.contextmanager
def running_s3_server(log_dir: Path):
    """Starts moto_server on a free port of 127.0.0.1 and yields an S3Server; kills it by its pid
    at exit."""
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log_path = Path(log_dir) / "moto_server.log"
    with open(log_path, "w") as log:
        server = subprocess.Popen(
            [VENV_BIN / "moto_server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=client_env(),
        )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                _moto_request(endpoint, "/moto-api/data.json")
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"moto_server did not start:\n{log_path.read_text()[-3000:]}")
                time.sleep(0.2)
        bucket = f"recoder-dist-{uuid.uuid4().hex[:8]}"
        access_key, secret_key = _provision(endpoint, bucket)
        yield S3Server(endpoint, bucket, access_key, secret_key, server.pid, log_path)
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=10)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A local S3 server with a bucket (see S3Server); its log is in a temp dir. One for the
    session: the modules that use it (test_storage, test_multinode) write under keys of their
    own, and each start of moto_server (with the IAM user and the bucket) costs seconds."""
    with running_s3_server(tmp_path_factory.mktemp("s3")) as server:
        yield server


# --- A cluster whose worker node shares no disk with the head --------------------------------


@dataclass
class NoSharedDiskCluster:
    """A head (0 CPUs) and one worker node (2 CPUs, resource WORKER_NODE) with a private /tmp."""

    gcs_address: str  # ip:port, for `ray.init(address=...)` and `ray start --address`
    dashboard: str  # http://127.0.0.1:PORT, for `ray job submit --address` and the state API
    env: dict[str, str]  # for drivers and `ray job submit`: RAY_ADDRESS, no AWS credentials
    s3: S3Server
    head_temp_dir: Path  # on the host's disk
    worker_temp_dir: Path  # inside the worker node's tmpfs: see worker_view
    worker_pid: int  # its `ray start`, which lives in the worker node's mount namespace
    _start_worker_node: Callable[[], subprocess.Popen] = field(repr=False, default=None)

    def replace_worker_node(self) -> None:
        """Kills the worker node at once (its raylet, object store and workers: a spot instance
        taken back), and starts a new one like it, with an empty /tmp (an autoscaler's
        replacement); returns once the GCS counts it."""
        known = _alive_nodes(self.dashboard)
        for pid in session_processes(self.worker_pid):  # every process of the node, no grace
            _signal(pid, signal.SIGKILL)
        self.worker_pid = self._start_worker_node().pid
        _wait_for_new_node(self.dashboard, known)

    def worker_view(self, path: str | Path) -> Path:
        """`path` as the worker node sees it, readable from here while the node runs (the
        kernel resolves /proc/PID/root in that process's mount namespace)."""
        return Path(f"/proc/{self.worker_pid}/root") / Path(path).relative_to("/")

    def run_driver(self, code: str, timeout: float = 120) -> subprocess.CompletedProcess:
        """Runs `python -c code` on this machine's disk (the head's), with RAY_ADDRESS set: a
        driver that calls `ray.init()` joins this cluster, through the head's raylet."""
        return subprocess.run(
            [VENV_BIN / "python", "-c", code],
            env=self.env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def submit(self, *entrypoint: str, **options) -> subprocess.CompletedProcess:
        """A job through Ray's job SDK on this cluster, see :func:`submit_job` (``options``
        are its keywords); the job's driver runs on the head, with the head's environment
        (its credentials included)."""
        return submit_job(self.dashboard, *entrypoint, **options)

    def submit_cli(
        self, *entrypoint: str, working_dir: Path | None = REPO, timeout: float = 300
    ) -> subprocess.CompletedProcess:
        """`ray job submit`, the command itself, see :func:`submit_job_cli`."""
        return submit_job_cli(
            self.dashboard, self.env, *entrypoint, working_dir=working_dir, timeout=timeout
        )

    def job(self, command: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        """`ray job COMMAND --address DASHBOARD ARGS` (stop, logs, status); `stop` waits until
        the job has exited."""
        return subprocess.run(
            [VENV_BIN / "ray", "job", command, "--address", self.dashboard, *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def logs(self) -> str:
        """The tails of both nodes' logs, for a failing assertion's message."""
        logs = [
            ("head", self.head_temp_dir, "gcs_server.out"),
            ("head", self.head_temp_dir, "raylet.out"),
            ("worker node", self.worker_view(self.worker_temp_dir), "raylet.out"),
        ]
        return "\n".join(
            f"--- {node} {name}:\n{log_tail(temp_dir, name, 20)}" for node, temp_dir, name in logs
        )


# Whether a job is over, asked this often: `ray job submit` follows the job's log instead, with
# 1 s sleeps at each end of the log on both sides, so it returns seconds after the job's end.
JOB_POLL_S = 0.2


def submit_job(
    dashboard: str,
    *entrypoint: str,
    working_dir: Path | None = REPO,
    env_vars: dict[str, str] | None = None,
    submission_id: str | None = None,
    wait: bool = True,
    timeout: float = 300,
) -> subprocess.CompletedProcess:
    """Submits `entrypoint` as a job through Ray's job SDK (`JobSubmissionClient`, on which
    `ray job submit` is built: the same request, the same shell-quoted entrypoint and uploaded
    working dir), and waits for its end unless not `wait`. Returns the job's whole log as
    stdout, its final status and message as stderr, and returncode 0 for a job that
    SUCCEEDED (1 otherwise). The CLI itself is tested by submit_job_cli's callers; it costs
    about 6 s more a job (its imports, and its log tail's 1 s sleeps at the job's end)."""
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(dashboard)
    runtime_env = {}
    if working_dir is not None:
        runtime_env["working_dir"] = str(working_dir)
    if env_vars:
        runtime_env["env_vars"] = env_vars
    deadline = time.monotonic() + timeout
    while True:  # the job agent comes up a few seconds after the dashboard
        try:
            job_id = client.submit_job(
                entrypoint=shlex.join(entrypoint),
                runtime_env=runtime_env or None,
                submission_id=submission_id,
            )
            break
        except Exception as e:
            retry = "No available agent" in str(e) or "Connection refused" in str(e)
            if not retry or time.monotonic() > deadline:
                raise
            time.sleep(1)
    if not wait:
        return subprocess.CompletedProcess(entrypoint, 0, f"Job '{job_id}' submitted", "")
    while not (status := client.get_job_status(job_id)).is_terminal():
        if time.monotonic() > deadline:
            client.stop_job(job_id)
            raise subprocess.TimeoutExpired(list(entrypoint), timeout, client.get_job_logs(job_id))
        time.sleep(JOB_POLL_S)
    message = client.get_job_info(job_id).message
    return subprocess.CompletedProcess(
        entrypoint,
        0 if status.value == "SUCCEEDED" else 1,
        client.get_job_logs(job_id),
        f"Job '{job_id}' {status.value.lower()}: {message}",
    )


def submit_job_cli(
    dashboard: str,
    env: dict,
    *entrypoint: str,
    working_dir: Path | None = REPO,
    timeout: float = 300,
) -> subprocess.CompletedProcess:
    """`ray job submit --address DASHBOARD [--working-dir DIR] -- entrypoint`, waiting for the
    job's end (the command exits non-zero when the job fails)."""
    command = [VENV_BIN / "ray", "job", "submit", "--address", dashboard]
    if working_dir is not None:
        command += ["--working-dir", str(working_dir)]
    command += ["--", *entrypoint]
    deadline = time.monotonic() + timeout
    while True:  # the job agent comes up a few seconds after the dashboard
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
        retry = "No available agent" in result.stderr or "Connection refused" in result.stderr
        if not retry or time.monotonic() > deadline:
            return result
        time.sleep(1)


def mount_namespaces_permitted() -> str | None:
    """None when this process may give a child a private mount namespace with a tmpfs over
    /tmp; otherwise why not."""
    if shutil.which("unshare") is None:
        return "no unshare command"
    probe = ["unshare", "-m", "--propagation", "private", "mount", "-t", "tmpfs", "tmpfs", "/tmp"]
    result = subprocess.run(probe, capture_output=True, text=True)
    if result.returncode != 0:
        return f"{shlex.join(probe)} is not permitted here: {result.stderr.strip()}"
    return None


def _ray_start(*args: str, ports) -> list[str]:
    return [
        str(VENV_BIN / "ray"),
        "start",
        "--block",
        *args,
        *(f"--{name}={free_port()}" for name in ports),
        # The object store is shared memory (/dev/shm), common to both nodes: keep it small.
        "--object-store-memory=100000000",
        "--disable-usage-stats",
    ]


def _alive_nodes(dashboard: str) -> set[str]:
    """The ids of the nodes that the GCS counts alive (none while the dashboard does not
    answer yet)."""
    from ray.util.state import list_nodes

    try:
        nodes = list_nodes(address=dashboard, raise_on_missing_output=False)
    except Exception:  # the dashboard may not answer yet
        return set()
    return {n.node_id for n in nodes if n.state == "ALIVE"}


def _wait_for_new_node(dashboard: str, known: set[str], timeout_s: float = 60) -> None:
    """Waits until the GCS counts a node alive that is not in ``known``, besides the head."""
    deadline = time.monotonic() + timeout_s
    while len(_alive_nodes(dashboard) - known) < (1 if known else 2):
        if time.monotonic() > deadline:
            pytest.fail(f"the worker node did not join: alive {_alive_nodes(dashboard)}")
        time.sleep(0.5)


@contextlib.contextmanager
def running_no_shared_disk_cluster(s3: S3Server, private_dirs=("/tmp",)):
    """Starts the head, then the worker node with a tmpfs over each of `private_dirs`; yields a
    NoSharedDiskCluster; stops both (by session id) at exit, and the tmpfs goes with the worker
    node's mount namespace when its last process exits."""
    import ray.util

    # Unix socket paths are limited to 107 bytes: short temp dirs, not pytest's tmp_path.
    head_temp_dir = Path(tempfile.mkdtemp(prefix="rdmn-", dir="/tmp"))
    # Inside the worker node's own tmpfs, so the same name would not collide; another name
    # makes a path of one node that reaches the other stand out in an error message.
    worker_temp_dir = Path("/tmp/rdmn-worker")
    ip = ray.util.get_node_ip_address()
    gcs_address = f"{ip}:{free_port()}"
    dashboard_port = free_port()

    base = {k: v for k, v in client_env().items() if not k.startswith("AWS_")}
    # Both nodes have credentials in their environment, as an instance profile gives them;
    # drivers and job submissions from here do not, so nothing relies on them passing any.
    # The Train controller picks up reports on its polling tick (2 s by default), which every
    # checkpoint of a run waits for; a local cluster's tick can be short (as launcher.py's).
    node_env = dict(base, RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="0.25", **s3.credentials_env())
    head_command = _ray_start(
        "--head",
        f"--port={gcs_address.rsplit(':', 1)[1]}",
        f"--temp-dir={head_temp_dir}",
        "--num-cpus=0",
        "--num-gpus=0",
        # As cluster.yaml's head: the resource that Tune's trial drivers ask for, so they run
        # here and read what the drivers read (the prepared data on this disk).
        f"--resources={json.dumps({'trial_driver': 4})}",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard_port}",
        ports=_HEAD_PORTS,
    )
    worker_command = _ray_start(
        f"--address={gcs_address}",
        f"--temp-dir={worker_temp_dir}",
        "--num-cpus=2",
        "--num-gpus=0",
        f"--resources={json.dumps({WORKER_NODE: 1})}",
        ports=_NODE_PORTS,
    )
    # unshare and bash exec in place, so the pid we hold is the worker node's `ray start`.
    steps = [f"mount -t tmpfs tmpfs {shlex.quote(str(d))}" for d in private_dirs]
    worker_shell = " && ".join([*steps, f"exec {shlex.join(worker_command)}"])
    worker_argv = ["unshare", "-m", "--propagation", "private", "bash", "-c", worker_shell]

    head, workers = None, []
    try:
        # The logs are on the host: the worker node writes its own through the inherited fd.
        with open(head_temp_dir / "head_ray_start.log", "w") as log:
            head = subprocess.Popen(
                head_command,
                env=node_env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        wait_for_line(head_temp_dir / "head_ray_start.log", "Ray runtime started", head, 90)

        def start_worker_node() -> subprocess.Popen:
            log_path = head_temp_dir / f"worker_ray_start_{len(workers)}.log"
            with open(log_path, "w") as log:
                workers.append(
                    subprocess.Popen(
                        worker_argv,
                        env=node_env,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                )
            wait_for_line(log_path, "Ray runtime started", workers[-1], 90)
            return workers[-1]

        worker = start_worker_node()
        dashboard = f"http://127.0.0.1:{dashboard_port}"
        _wait_for_new_node(dashboard, known=set())  # the head
        yield NoSharedDiskCluster(
            gcs_address=gcs_address,
            dashboard=dashboard,
            env=dict(base, RAY_ADDRESS=gcs_address),
            s3=s3,
            head_temp_dir=head_temp_dir,
            worker_temp_dir=worker_temp_dir,
            worker_pid=worker.pid,
            _start_worker_node=start_worker_node,
        )
    finally:
        for leader in [*workers, head]:
            if leader is not None:
                stop_session(leader)
        shutil.rmtree(head_temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def no_shared_disk_cluster(request):
    """A two-node Ray cluster whose worker node has a private /tmp (see NoSharedDiskCluster).
    Skips where mount namespaces are not permitted, except under CI=true, where it fails."""
    reason = mount_namespaces_permitted()
    if reason is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must run the multi-node tests: {reason}")
        pytest.skip(reason)
    # Asked for only now, so that a skip does not start (and wait for) the S3 server first.
    s3 = request.getfixturevalue("s3_server")
    with running_no_shared_disk_cluster(s3) as cluster:
        yield cluster
