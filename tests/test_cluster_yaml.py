"""cluster.yaml: Ray's own schema accepts it and refuses a misspelt key; its head runs no
training and hosts Tune's trial drivers; every node boots one pinned AMI with an instance profile
and pulls a pinned image of deploy/Dockerfile that already holds torch, so that setup installs
this repository only; its GPU node types, on Ray's fake multi-node provider, are added when a
training job asks for GPU workers and removed when idle. Nothing here reaches AWS."""

from __future__ import annotations

import copy
import json
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from tests.multinode import client_env, free_port, log_tail, stop_session

CLUSTER_YAML = Path(__file__).resolve().parents[1] / "cluster.yaml"
# The fake provider hard-codes this name for the head node it finds at start-up.
FAKE_HEAD_NODE_TYPE = "ray.head.default"


def _load(text: str | None = None) -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text() if text is None else text)


def _validate(config: dict) -> dict:
    """What `ray up` does to a config before anything reaches the cloud."""
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def _node_types(config: dict) -> tuple[dict, dict]:
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    workers = {name: t for name, t in types.items() if name != config["head_node_type"]}
    return head, workers


@pytest.fixture
def no_network(monkeypatch):
    """Fails any connection or DNS look-up: validation must work offline."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access during validation: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def test_cluster_yaml_passes_rays_validation(no_network):
    config = _load()
    prepared = _validate(config)
    assert prepared["provider"]["type"] == "aws"
    # prepare_config fills any missing top-level key from Ray's AWS defaults, whose
    # setup_commands install a nightly Ray wheel: every key must be ours.
    assert set(prepared) == set(config)


@pytest.mark.parametrize(
    "key, typo",
    [
        ("max_workers", "max_worker"),  # top level
        ("idle_timeout_minutes", "idle_timout_minutes"),  # top level
        ("min_workers", "min_worker"),  # its first occurrence: the first GPU node type
        ("head_image", "head_imag"),  # the docker section
    ],
)
def test_a_copy_with_a_misspelt_key_fails_validation(tmp_path, no_network, key, typo):
    text, count = re.subn(
        rf"^(\s*){key}:", rf"\g<1>{typo}:", CLUSTER_YAML.read_text(), count=1, flags=re.M
    )
    assert count == 1, f"no {key} key in cluster.yaml"
    misspelt = tmp_path / "cluster.yaml"
    misspelt.write_text(text)
    with pytest.raises(jsonschema.ValidationError, match=f"'{typo}' was unexpected"):
        _validate(_load(misspelt.read_text()))


def test_head_runs_no_training_and_gpu_workers_scale_from_zero():
    config = _load()
    head, workers = _node_types(config)
    # No CPU on the head: Ray Train workers and Ray Data tasks (>= 1 CPU each) cannot land there.
    assert head["resources"].get("CPU") == 0
    assert head["resources"].get("GPU", 0) == 0
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--num-cpus=0" in head_start
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in head_start
    # The dashboard (and its job API, which runs what it is sent) listens on localhost only.
    assert "--dashboard-host=127.0.0.1" in head_start
    assert "0.0.0.0" not in head_start

    assert workers
    for name, node_type in workers.items():
        assert node_type["resources"].get("GPU", 0) >= 1, name
        assert node_type["min_workers"] == 0, f"{name} would run (and bill) with no job"
        assert 1 <= node_type["max_workers"] <= config["max_workers"], name
    assert config["idle_timeout_minutes"] > 0

    # The package is synced to every node and installed there.
    assert config["file_mounts"] == {"~/recoder_dist": "."}
    assert any("pip install" in cmd and "~/recoder_dist" in cmd for cmd in config["setup_commands"])
    assert ".venv" in config["rsync_exclude"]


# --- What a real AWS boot needs: pinned images and AMI, instance profiles, trial drivers -----

DOCKERFILE = CLUSTER_YAML.parent / "deploy" / "Dockerfile"
# A pinned AMI id: ami- and 8 or 17 hex digits (not a placeholder such as ami-xxxxxxxx).
AMI_ID = re.compile(r"ami-(?:[0-9a-f]{8}|[0-9a-f]{17})")
PROFILE_ARN = re.compile(r"arn:aws:iam::(\d{12}):instance-profile/[\w+=,.@-]+")
ECR_IMAGE = re.compile(r"(\d{12})\.dkr\.ecr\.([a-z0-9-]+)\.amazonaws\.com/[\w./-]+:[\w.-]+")


def _dockerfile_args() -> dict[str, str]:
    return dict(re.findall(r"^ARG (\w+)=(\S+)$", DOCKERFILE.read_text(), flags=re.M))


def _images(config: dict) -> dict[str, str]:
    """Which image each node type's container runs (a node type's own docker section wins)."""
    docker = config["docker"]
    images = {}
    for name, node_type in config["available_node_types"].items():
        own = node_type.get("docker", {})
        if name == config["head_node_type"]:
            images[name] = docker.get("head_image") or docker["image"]
        else:
            images[name] = own.get("worker_image") or docker.get("worker_image") or docker["image"]
    return images


def test_every_node_type_has_an_instance_profile_and_workers_get_the_smaller_one():
    config = _load()
    _, workers = _node_types(config)
    arns = {}
    for name, node_type in config["available_node_types"].items():
        profile = node_type["node_config"].get("IamInstanceProfile")
        assert profile, f"{name} would reach the run bucket (and ECR) with no credentials"
        assert PROFILE_ARN.fullmatch(profile.get("Arn", "")), (name, profile)
        arns[name] = profile["Arn"]
    # The head's profile may launch instances; a worker's must not carry those rights.
    head_arn = arns[config["head_node_type"]]
    assert all(arns[name] != head_arn for name in workers), arns
    # One placeholder account, replaced once: the profiles' and the registry's.
    accounts = {PROFILE_ARN.fullmatch(arn).group(1) for arn in arns.values()}
    accounts |= {m.group(1) for m in map(ECR_IMAGE.fullmatch, _images(config).values()) if m}
    assert len(accounts) == 1, accounts


def test_every_node_type_boots_the_same_pinned_ami():
    config = _load()
    amis = {
        name: node_type["node_config"].get("ImageId")
        for name, node_type in config["available_node_types"].items()
    }
    # Without ImageId Ray falls back to its Ubuntu 18.04 Deep Learning AMI (driver too old).
    for name, ami in amis.items():
        assert ami and AMI_ID.fullmatch(ami), f"{name}: ImageId {ami!r} is not a pinned AMI id"
    assert len(set(amis.values())) == 1, amis


def test_images_are_pinned_builds_of_deploy_dockerfile_with_torch():
    config = _load()
    args = _dockerfile_args()
    ray_version, torch_version = args["RAY_VERSION"], args["TORCH_VERSION"]
    import ray

    # `ray up` and `ray job submit` run with this Ray; the cluster must run the same.
    assert ray_version == ray.__version__
    froms = {
        stage: image
        for image, stage in re.findall(r"^FROM (\S+) AS (\w+)$", DOCKERFILE.read_text(), re.M)
    }
    assert froms == {
        "gpu": "rayproject/ray:${RAY_VERSION}-py311-gpu",
        "cpu": "rayproject/ray:${RAY_VERSION}-py311-cpu",
    }

    _, workers = _node_types(config)
    images = _images(config)
    for name, image in images.items():
        repository, _, tag = image.rpartition(":")
        assert repository and "/" not in tag and tag not in ("", "latest"), (name, image)
        # Ray's stock images carry no torch: pip would fetch CUDA torch at every boot.
        assert not repository.startswith("rayproject/"), (name, image)
        assert f"ray{ray_version}-py311-torch{torch_version}" in tag, (name, image)
    assert images[config["head_node_type"]].endswith("-cpu")
    for name in workers:
        assert re.search(r"-cu\d+$", images[name]), (name, images[name])


def test_the_image_build_sends_only_what_it_mounts():
    mounted = set(re.findall(r"--mount=type=bind,source=([^,\s]+)", DOCKERFILE.read_text()))
    assert "pyproject.toml" in mounted
    ignore = DOCKERFILE.with_name("Dockerfile.dockerignore").read_text().splitlines()
    patterns = [line for line in ignore if line.strip() and not line.startswith("#")]
    # Everything ignored (above all .venv, gigabytes), then exactly the mounted files let back.
    assert patterns[0] == "*"
    assert {line[1:] for line in patterns[1:] if line.startswith("!")} == mounted
    for path in mounted:
        assert (CLUSTER_YAML.parent / path).is_file(), path


def test_nodes_install_this_repository_and_never_download_torch():
    config = _load()
    lists = (
        "initialization_commands",
        "setup_commands",
        "head_setup_commands",
        "worker_setup_commands",
    )
    commands = [cmd for key in lists for cmd in config[key]]
    commands += [
        cmd
        for node_type in config["available_node_types"].values()
        for key in lists
        for cmd in node_type.get(key, [])
    ]
    pip_installs = [cmd for cmd in commands if re.search(r"\bpip3? install\b", cmd)]
    # Only this repository; with torch already in the image pip finds it satisfied. An upgrade
    # flag would make pip fetch the newest torch (gigabytes) anyway.
    assert pip_installs == ["pip install -q -e ~/recoder_dist"], pip_installs
    assert not any("torch" in cmd for cmd in pip_installs)
    # The check that the image holds torch comes first: a stock image fails setup instead.
    setup = config["setup_commands"]
    assert "import torch" in setup[0]
    assert setup.index(pip_installs[0]) > 0


def test_images_are_pulled_from_ecr_after_a_login_in_the_clusters_region():
    config = _load()
    region = config["provider"]["region"]
    registries = set()
    for image in _images(config).values():
        match = ECR_IMAGE.fullmatch(image)
        assert match, f"{image} is not an ECR image"
        assert match.group(2) == region, image
        registries.add(image.split("/", 1)[0])
    # Ray does not log in to a registry: a host command must, before the pull.
    logins = " ".join(config["initialization_commands"])
    assert f"aws ecr get-login-password --region {region}" in logins
    for registry in registries:
        assert f"docker login --username AWS --password-stdin {registry}" in logins


def test_the_head_hosts_tunes_trial_drivers_and_no_training():
    config = _load()
    head, workers = _node_types(config)
    assert head["resources"]["CPU"] == 0
    assert head["resources"].get("trial_driver", 0) >= 1
    # Workers (GPU nodes, possibly spot) never advertise it: a trial driver must not land there.
    assert not any("trial_driver" in t["resources"] for t in workers.values())
    # `ray start` on the head advertises the same custom resources as the node type.
    head_start = " ".join(config["head_start_ray_commands"])
    match = re.search(r"--resources='([^']*)'", head_start)
    assert match, head_start
    custom = {k: v for k, v in head["resources"].items() if k not in ("CPU", "GPU")}
    assert json.loads(match.group(1)) == custom


# --- Autoscaling on Ray's fake multi-node provider -------------------------------------------


def _fake_config(config: dict, gcs_address: str) -> dict:
    """cluster.yaml's node types (names, resources, min/max) on the fake provider, with every
    key that the autoscaler reads (it does not fill defaults: the provider's example.yaml, where
    they would come from, is not shipped in the wheel)."""
    node_types = {}
    for name, node_type in config["available_node_types"].items():
        resources = dict(node_type["resources"])
        if name != config["head_node_type"]:
            # Each fake node is a real raylet on this machine: keep its object store small.
            resources["object_store_memory"] = 100 * 1024**2
        node_types[name] = {
            "resources": resources,
            "node_config": {},
            "min_workers": node_type.get("min_workers", 0),
            "max_workers": node_type.get("max_workers", 0),
        }
    return {
        "cluster_name": "recoder-dist-fake",
        "max_workers": config["max_workers"],
        "provider": {
            "type": "fake_multinode",
            # Fake nodes join this GCS; the default would be <ip>:6379.
            "gcs_address": gcs_address,
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
        },
        "available_node_types": node_types,
        "head_node_type": config["head_node_type"],
        "upscaling_speed": config["upscaling_speed"],
        "idle_timeout_minutes": 0.1,  # 6 s instead of cluster.yaml's minutes
        "auth": {},
        "docker": {},
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


def _monitor(fake_cluster) -> str:
    return "monitor.log:\n" + log_tail(fake_cluster["temp_dir"], "monitor.log")


@pytest.fixture
def fake_cluster():
    """A head started from cluster.yaml's node types with the fake provider; yields its
    dashboard address (jobs, state API), the child environment, the config and the temp dir;
    always torn down."""
    config = _load()
    assert config["head_node_type"] == FAKE_HEAD_NODE_TYPE, (
        "the fake provider names its head ray.head.default: keep that name in cluster.yaml"
    )
    import ray.util

    # Unix socket paths are limited to 107 bytes: a short temp dir under /tmp, not tmp_path.
    temp_dir = tempfile.mkdtemp(prefix="rdfake-", dir="/tmp")
    gcs_address = f"{ray.util.get_node_ip_address()}:{free_port()}"
    fake_yaml = Path(temp_dir) / "fake_cluster.yaml"
    fake_yaml.write_text(yaml.safe_dump(_fake_config(config, gcs_address)))

    # Token auth off, the venv first on PATH: the head, its fake nodes and the driver agree.
    env = client_env()
    head_env = dict(env, RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1")
    head_resources = config["available_node_types"][FAKE_HEAD_NODE_TYPE]["resources"]
    # `ray start` (the CLI's module, so that no script has to be on PATH). Every port it would
    # take by default is chosen free, since other Ray clusters may run on this machine, and the
    # temp dir keeps its address file (ray_current_cluster) out of /tmp/ray: a plain
    # `ray.init()` elsewhere never joins this cluster. The dashboard serves `ray job submit`.
    dashboard_port = free_port()
    ports = (
        "dashboard-agent-listen-port",
        "dashboard-agent-grpc-port",
        "ray-client-server-port",
        "runtime-env-agent-port",
        "metrics-export-port",
        "node-manager-port",
        "object-manager-port",
    )
    command = [
        sys.executable,
        "-m",
        "ray.scripts.scripts",
        "start",
        "--head",
        "--block",
        f"--port={gcs_address.rsplit(':', 1)[1]}",
        f"--temp-dir={temp_dir}",
        f"--autoscaling-config={fake_yaml}",
        f"--num-cpus={head_resources.get('CPU', 0)}",
        f"--num-gpus={head_resources.get('GPU', 0)}",
        "--object-store-memory=100000000",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard_port}",
        *(f"--{name}={free_port()}" for name in ports),
        "--disable-usage-stats",
    ]
    log_path = Path(temp_dir) / "ray_start.log"
    with open(log_path, "w") as log:
        leader = subprocess.Popen(
            command, env=head_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = time.monotonic() + 90
        while "Ray runtime started" not in log_path.read_text(errors="replace"):
            if leader.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"ray start failed:\n{log_path.read_text(errors='replace')[-3000:]}")
            time.sleep(0.5)
        yield {
            "dashboard": f"http://127.0.0.1:{dashboard_port}",
            "env": env,
            "config": config,
            "temp_dir": temp_dir,
        }
    finally:
        stop_session(leader)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _nodes(fake_cluster) -> list:
    """Every node the cluster has had, dead ones included (Ray's state API)."""
    from ray.util.state import list_nodes

    return list_nodes(address=fake_cluster["dashboard"], limit=1000, raise_on_missing_output=False)


def _gpus(resources: dict) -> float:
    """GPUs of an actor's resources; in a placement group bundle they are named
    GPU_group_<bundle index>_<group id>, with the same amount under GPU_group_<group id>."""
    return sum(v for k, v in resources.items() if re.fullmatch(r"GPU(_group_[0-9a-f]+)?", k))


def _alive(fake_cluster) -> list[str]:
    return sorted(n.node_id for n in _nodes(fake_cluster) if n.state == "ALIVE")


@pytest.mark.slow
def test_a_gpu_training_job_scales_the_fake_cluster_up_and_back_to_the_head(
    fake_cluster, prepared_ml100k, tmp_path
):
    from ray.util.state import list_actors

    from recoder_dist.model import Recoder
    from recoder_dist.nn import DynamicAutoencoder
    from tests.multinode import submit_job

    # min_workers 0: the head alone (0 CPUs, 0 GPUs) until a job asks for GPUs. The fake nodes
    # share this disk: the run storage may be a folder here.
    (head,) = _alive(fake_cluster)
    job = ["recoder-dist", "train", "--data", str(prepared_ml100k), "--checkpoint-dir"]
    job += [str(tmp_path / "ck"), "--epochs", "2", "--batch-size", "100", "--workers", "2"]
    # Ray would choose NCCL for workers that hold a GPU; these GPUs are fake and this torch a
    # CPU build without NCCL, so the job names gloo, as a user of such a cluster would.
    job += ["--hidden", "32", "--gpus", "--backend", "gloo"]
    # No uploaded working dir (the package is installed in the venv): the fake nodes share this
    # disk, and a node scaled down deletes the shared working dir's files, the head's driver's
    # working dir included, while the driver still evaluates the test users.
    result = submit_job(fake_cluster["dashboard"], *job, working_dir=None)
    assert result.returncode == 0, (
        f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}\n{_monitor(fake_cluster)}"
    )
    # The job trained and its snapshot loads.
    report = json.loads([ln for ln in result.stdout.splitlines() if ln.startswith("{")][-1])
    recoder = Recoder(DynamicAutoencoder(), num_workers=0)
    recoder.init_from_model_file(report["checkpoint"])
    assert recoder.current_epoch == 2 and recoder.model.hidden_layers == [32]
    # Ray gave the workers GPU ids; the GPUs being fake, they trained on CPU over gloo.
    assert "training on CPU" in result.stdout  # the rank-0 worker's note, on the console

    # Its Ray Train workers (training's 2; the 100 test users are scored in the driver) held one
    # GPU each, on nodes that the autoscaler added for them: nodes of cluster.yaml's GPU types.
    workers = list_actors(
        address=fake_cluster["dashboard"],
        filters=[("class_name", "=", "RayTrainWorker")],
        detail=True,
        raise_on_missing_output=False,
    )
    assert all(_gpus(w.required_resources) == 1 for w in workers), workers
    # A worker whose node the autoscaler removed before it started was never placed (no node).
    placed = [w for w in workers if w.node_id is not None]
    assert len(placed) >= 2, workers
    added = {n.node_id: n for n in _nodes(fake_cluster) if n.node_id != head}
    assert added and {w.node_id for w in placed} <= set(added), f"{workers}\n{added}"
    _, node_types = _node_types(fake_cluster["config"])
    for node in added.values():
        assert any(
            all(node.resources_total.get(k) == v for k, v in t["resources"].items())
            for t in node_types.values()
        ), f"{node.resources_total} is none of the GPU node types {node_types}"

    # Idle after the job: the autoscaler removes the GPU nodes, back to the head alone.
    deadline = time.monotonic() + 60
    while _alive(fake_cluster) != [head] and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _alive(fake_cluster) == [head], _monitor(fake_cluster)
