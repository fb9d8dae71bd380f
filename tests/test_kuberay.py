"""deploy/kuberay/: KubeRay's own CRDs (../shared/kuberay) accept the RayCluster and the RayJob,
and a copy with a misspelt key, a wrong type or a missing required field is refused; Ray's
autoscaler, reading the RayCluster, sees cluster.yaml's cluster; the RayJob's entrypoint is a
training command that our CLI accepts; bucket credentials come from service accounts, never from
the manifests. Nothing here reaches Kubernetes or AWS."""

from __future__ import annotations

import copy
import functools
import os
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml

from recoder_dist.cli import parser

ROOT = Path(__file__).resolve().parents[1]
MANIFESTS = ROOT / "deploy" / "kuberay"
CLUSTER_YAML = ROOT / "cluster.yaml"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
KUBERAY_CRDS = Path(os.environ.get("RECODER_DIST_KUBERAY_CRDS", ROOT.parent / "shared" / "kuberay"))
# ObjectMeta fields a manifest may set; the CRD leaves metadata to the API server's own schema.
OBJECT_META = {"name", "generateName", "namespace", "labels", "annotations"}
ROLE_ARN = re.compile(r"arn:aws:iam::(\d{12}):role/[\w+=,.@-]+")
ECR_ACCOUNT = re.compile(r"(\d{12})\.dkr\.ecr\.")
BUCKET_URI = re.compile(r"s3://([a-z0-9.-]+)/")


def _load(name: str) -> dict:
    return yaml.safe_load((MANIFESTS / name).read_text())


def _service_accounts() -> dict[str, dict]:
    docs = yaml.safe_load_all((MANIFESTS / "serviceaccounts.yaml").read_text())
    return {doc["metadata"]["name"]: doc for doc in docs}


@functools.cache
def _crds() -> dict[tuple[str, str, str], dict]:
    """(group, version, kind) -> openAPIV3Schema of every served version of the CRDs."""
    if not KUBERAY_CRDS.is_dir():
        if os.environ.get("CI") == "true":
            raise FileNotFoundError(f"{KUBERAY_CRDS} is missing: CI must validate the manifests")
        pytest.skip(f"{KUBERAY_CRDS} is absent (KubeRay's CRDs live in ../shared/kuberay)")
    schemas = {}
    for path in sorted(KUBERAY_CRDS.glob("*.yaml")):
        # libyaml's loader: the two CRDs are 43,000 lines, several times slower in pure Python.
        crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        spec = crd["spec"]
        for version in spec["versions"]:
            if version.get("served"):
                key = (spec["group"], version["name"], spec["names"]["kind"])
                schemas[key] = _as_json_schema(version["schema"]["openAPIV3Schema"])
    return schemas


def _as_json_schema(schema):
    """OpenAPI v3's differences from JSON Schema (draft 4), as the CRDs use them: `nullable`,
    and an int-or-string field with no type of its own. jsonschema ignores the other
    x-kubernetes-* keys; _undeclared reads them."""
    if isinstance(schema, list):
        return [_as_json_schema(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: v if k in ("enum", "default") else _as_json_schema(v) for k, v in schema.items()}
    if out.get("x-kubernetes-int-or-string") and "type" not in out and "anyOf" not in out:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if out.pop("nullable", False) and "type" in out:
        out["type"] = [out["type"], "null"]
    return out


def _schema(manifest: dict) -> dict:
    group, _, version = manifest["apiVersion"].rpartition("/")
    key = (group, version, manifest["kind"])
    schemas = _crds()
    if key not in schemas:
        raise ValueError(f"no served CRD version for {key} in {KUBERAY_CRDS}: {sorted(schemas)}")
    return schemas[key]


def _schema_errors(manifest: dict) -> list[str]:
    validator = jsonschema.Draft4Validator(_schema(manifest))
    return [f"{_path(e.absolute_path)}: {e.message}" for e in validator.iter_errors(manifest)]


def _path(keys) -> str:
    """spec.workerGroupSpecs[0].minReplicas, from its keys and list indices."""
    return "".join(f"[{k}]" if isinstance(k, int) else f".{k}" for k in keys).lstrip(".")


def _undeclared(value, schema: dict, path: str) -> list[str]:
    """What the API server would silently drop, or could not be checked here.

    A CRD's structural schema makes the API server prune unknown fields instead of refusing
    them, so a misspelt key passes JSON Schema (no additionalProperties: false) and then simply
    does nothing. Every key must be declared. Also reports duplicate keys in lists that
    Kubernetes merges by key (x-kubernetes-list-type: map/set), and fields that carry CEL rules
    (x-kubernetes-validations), which no offline check evaluates: the manifests set none.
    """
    problems = []
    if schema.get("x-kubernetes-validations") and value is not None:
        problems.append(f"{path}: has CEL rules that are not checked offline")
    if isinstance(value, dict) and not schema.get("x-kubernetes-preserve-unknown-fields"):
        declared = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        for key, item in value.items():
            where = f"{path}.{key}" if path else key
            if key in declared:
                problems += _undeclared(item, declared[key], where)
            elif isinstance(extra, dict):
                problems += _undeclared(item, extra, where)
            elif extra is not True:
                problems.append(f"{where}: not declared in the CRD (the API server drops it)")
    elif isinstance(value, list) and "items" in schema:
        list_type = schema.get("x-kubernetes-list-type")
        if list_type == "map":
            keys = schema.get("x-kubernetes-list-map-keys", [])
            identities = [tuple(item.get(k) for k in keys) for item in value]
        else:
            identities = [repr(item) for item in value] if list_type == "set" else []
        if len(set(identities)) != len(identities):
            problems.append(f"{path}: duplicate items in a list of type {list_type}")
        for i, item in enumerate(value):
            problems += _undeclared(item, schema["items"], f"{path}[{i}]")
    return problems


def _problems(manifest: dict) -> list[str]:
    schema = _schema(manifest)
    metadata = manifest.get("metadata", {})
    problems = _schema_errors(manifest)
    problems += [f"metadata.{k}: not an ObjectMeta field" for k in set(metadata) - OBJECT_META]
    body = {k: v for k, v in manifest.items() if k != "metadata"}
    return problems + _undeclared(body, schema, "")


# --- The CRDs accept the manifests, and refuse broken copies --------------------------------


@pytest.mark.parametrize("name", ["raycluster.yaml", "rayjob.yaml"])
def test_manifest_passes_kuberays_crd(name):
    manifest = _load(name)
    assert manifest["apiVersion"] == "ray.io/v1"  # the CRDs' storage version
    assert _problems(manifest) == []


def _parent(manifest: dict, path: str) -> tuple:
    """The container of a dotted path's last key ([i] indexes a list), and that key."""
    keys = [int(k) if k.isdigit() else k for k in re.split(r"\.|\[(\d+)\]\.?", path) if k]
    *parents, last = keys
    target = manifest
    for key in parents:
        target = target[key]
    return target, last


def _set(manifest: dict, path: str, value) -> None:
    """Sets a dotted path, or deletes it when value is None."""
    target, last = _parent(manifest, path)
    if value is None:
        del target[last]
    else:
        target[last] = value


def _rename(manifest: dict, path: str, new_key: str) -> None:
    target, last = _parent(manifest, path)
    target[new_key] = target.pop(last)


MISSPELT = [
    ("raycluster.yaml", "spec.enableInTreeAutoscaling", "enableInTreeAutoScaling"),
    ("raycluster.yaml", "spec.autoscalerOptions.idleTimeoutSeconds", "idleTimeoutSecond"),
    (
        "raycluster.yaml",
        "spec.workerGroupSpecs[0].template.spec.serviceAccountName",
        "serviceAcountName",
    ),
    ("rayjob.yaml", "spec.clusterSelector", "clusterSelecter"),
    ("rayjob.yaml", "spec.entrypoint", "entryPoint"),
]


@pytest.mark.parametrize("name, path, typo", MISSPELT)
def test_a_misspelt_key_is_refused_though_the_crd_schema_alone_accepts_it(name, path, typo):
    manifest = _load(name)
    _rename(manifest, path, typo)
    # Plain JSON Schema validation passes it: the API server would prune it without a word.
    assert _schema_errors(manifest) == []
    where = path.rsplit(".", 1)[0] + "." + typo
    assert _problems(manifest) == [f"{where}: not declared in the CRD (the API server drops it)"]


WRONG_TYPE = [
    ("raycluster.yaml", "spec.workerGroupSpecs[0].minReplicas", "0", "is not of type 'integer'"),
    ("raycluster.yaml", "spec.enableInTreeAutoscaling", "true", "is not of type 'boolean'"),
    ("raycluster.yaml", "spec.headGroupSpec.rayStartParams.num-cpus", 0, "is not of type"),
    ("raycluster.yaml", "spec.autoscalerOptions.upscalingMode", "Slow", "is not one of"),
    ("rayjob.yaml", "spec.entrypoint", ["python", "-m", "recoder_dist"], "is not of type"),
]


@pytest.mark.parametrize("name, path, value, message", WRONG_TYPE)
def test_a_wrong_type_is_refused(name, path, value, message):
    manifest = _load(name)
    _set(manifest, path, value)
    problems = _problems(manifest)
    assert len(problems) == 1 and problems[0].startswith(f"{path}: "), problems
    assert message in problems[0]


MISSING = [
    ("raycluster.yaml", "spec.headGroupSpec", "'headGroupSpec' is a required property"),
    ("raycluster.yaml", "spec.workerGroupSpecs[1].groupName", "'groupName' is a required"),
    ("raycluster.yaml", "spec.workerGroupSpecs[0].maxReplicas", "'maxReplicas' is a required"),
    (
        "raycluster.yaml",
        "spec.headGroupSpec.template.spec.containers[0].name",
        "'name' is a required property",
    ),
]


@pytest.mark.parametrize("name, path, message", MISSING)
def test_a_missing_required_field_is_refused(name, path, message):
    manifest = _load(name)
    _set(manifest, path, None)
    problems = _problems(manifest)
    assert len(problems) == 1 and message in problems[0], problems


def test_a_duplicate_container_port_is_refused():
    manifest = _load("raycluster.yaml")
    ports = manifest["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"]
    ports.append(dict(ports[0], name="gcs-again"))
    problems = _problems(manifest)
    assert problems == [
        "spec.headGroupSpec.template.spec.containers[0].ports: duplicate items in a list of "
        "type map"
    ]


def test_a_field_with_cel_rules_is_reported_since_nothing_here_evaluates_them():
    manifest = _load("rayjob.yaml")
    manifest["spec"]["deletionStrategy"] = {"onSuccess": {"policy": "DeleteCluster"}}
    # Valid JSON Schema, but the API server's CEL rule wants onFailure too: unchecked here.
    assert _schema_errors(manifest) == []
    assert _problems(manifest) == [
        "spec.deletionStrategy: has CEL rules that are not checked offline"
    ]


# --- The same cluster as cluster.yaml, as Ray's autoscaler sees it ---------------------------


def _autoscaler_view(raycluster: dict) -> dict:
    """The autoscaling config that the autoscaler sidecar on the head derives from this
    RayCluster (Ray's own function, private: a Ray upgrade that moves it fails here, loudly)."""
    from ray.autoscaler._private.kuberay.autoscaling_config import (
        _derive_autoscaling_config_from_ray_cr,
    )

    cr = copy.deepcopy(raycluster)
    cr["metadata"].setdefault("namespace", "default")  # given by `kubectl apply -n`
    return _derive_autoscaling_config_from_ray_cr(cr)


def _mismatches(raycluster: dict, cluster: dict) -> list[str]:
    """Where the RayCluster's cluster differs from cluster.yaml's, where it matters."""
    view = _autoscaler_view(raycluster)
    types = cluster["available_node_types"]
    head = types[cluster["head_node_type"]]
    found = []
    view_head = view["available_node_types"][view["head_node_type"]]["resources"]
    for resource, amount in head["resources"].items():
        if view_head.get(resource) != amount:
            found.append(f"head {resource}: {view_head.get(resource)} != {amount}")
    for key in ("max_workers", "idle_timeout_minutes", "upscaling_speed"):
        if view[key] != cluster[key]:
            found.append(f"{key}: {view[key]} != {cluster[key]}")

    groups = {g["groupName"]: g for g in raycluster["spec"]["workerGroupSpecs"]}
    # cluster.yaml's gpu.1x is the group gpu-1x (a dot is awkward in pod names).
    names = {name.replace(".", "-"): name for name in types if name != cluster["head_node_type"]}
    if set(groups) != set(names):
        return found + [f"worker groups {sorted(groups)} != {sorted(names)}"]
    for group_name, type_name in names.items():
        node_type, seen = types[type_name], view["available_node_types"][group_name]
        for key in ("min_workers", "max_workers"):
            if seen[key] != node_type[key]:
                found.append(f"{group_name} {key}: {seen[key]} != {node_type[key]}")
        if seen["resources"].get("GPU") != node_type["resources"]["GPU"]:
            found.append(f"{group_name} GPU: {seen['resources'].get('GPU')}")
        # A pod gets less than its VM: what the kubelet and daemonsets keep.
        if not 1 <= seen["resources"]["CPU"] <= node_type["resources"]["CPU"]:
            found.append(f"{group_name} CPU: {seen['resources']['CPU']}")
        selector = groups[group_name]["template"]["spec"].get("nodeSelector", {})
        instance_type = selector.get("node.kubernetes.io/instance-type")
        if instance_type != node_type["node_config"]["InstanceType"]:
            found.append(f"{group_name} instance type: {instance_type}")
    return found


def test_autoscaler_sees_cluster_yamls_cluster():
    cluster = yaml.safe_load(CLUSTER_YAML.read_text())
    raycluster = _load("raycluster.yaml")
    assert raycluster["spec"]["enableInTreeAutoscaling"] is True
    assert raycluster["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    assert _mismatches(raycluster, cluster) == []
    view = _autoscaler_view(raycluster)
    assert view["available_node_types"]["headgroup"]["resources"]["CPU"] == 0
    assert {
        name: t["resources"]["GPU"]
        for name, t in view["available_node_types"].items()
        if "GPU" in t["resources"]
    } == {"gpu-1x": 1, "gpu-4x": 4}


def _gpus_of_first_group(raycluster: dict, count: str) -> None:
    resources = raycluster["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    resources["resources"]["limits"]["nvidia.com/gpu"] = count
    resources["resources"]["requests"]["nvidia.com/gpu"] = count


UNLIKE_CLUSTER_YAML = {
    # A misspelt Ray flag is a key of a string map: the CRD cannot see it, Ray's reading can.
    "num-cpus misspelt": (
        lambda rc: _rename(rc, "spec.headGroupSpec.rayStartParams.num-cpus", "num-cpu"),
        "head CPU: 6 != 0",
    ),
    "no trial_driver": (
        lambda rc: _set(rc, "spec.headGroupSpec.rayStartParams.resources", None),
        "head trial_driver: None != 16",
    ),
    "more workers": (
        lambda rc: _set(rc, "spec.workerGroupSpecs[1].maxReplicas", 3),
        "max_workers: 7 != 6",
    ),
    "shorter idle timeout": (
        lambda rc: _set(rc, "spec.autoscalerOptions.idleTimeoutSeconds", 60),
        "idle_timeout_minutes: 1.0 != 10",
    ),
    "GPUs per pod": (lambda rc: _gpus_of_first_group(rc, "2"), "gpu-1x GPU: 2"),
}


@pytest.mark.parametrize("change", UNLIKE_CLUSTER_YAML)
def test_a_cluster_unlike_cluster_yamls_is_reported(change):
    mutate, mismatch = UNLIKE_CLUSTER_YAML[change]
    raycluster = _load("raycluster.yaml")
    mutate(raycluster)
    assert mismatch in _mismatches(raycluster, yaml.safe_load(CLUSTER_YAML.read_text()))


def test_images_and_ray_version_are_cluster_yamls():
    import ray

    docker = yaml.safe_load(CLUSTER_YAML.read_text())["docker"]
    ray_version = re.search(r"^ARG RAY_VERSION=(\S+)$", DOCKERFILE.read_text(), re.M).group(1)
    spec = _load("raycluster.yaml")["spec"]
    # The images' Ray (deploy/Dockerfile), the one pyproject and CI install, and KubeRay's.
    assert spec["rayVersion"] == ray_version == ray.__version__
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]
    assert head == docker["head_image"]
    for group in spec["workerGroupSpecs"]:
        assert group["template"]["spec"]["containers"][0]["image"] == docker["image"]


# --- The job: a command our CLI accepts, on this cluster, with the bucket as storage ---------


def _entrypoint_args(rayjob: dict) -> list[str]:
    argv = shlex.split(rayjob["spec"]["entrypoint"])
    # The package is the job's working directory, not installed: `python -m`, not the script.
    assert argv[:3] == ["python", "-m", "recoder_dist"], argv
    return argv[3:]


def test_rayjob_trains_on_the_clusters_gpus_with_the_bucket_as_storage():
    rayjob, raycluster = _load("rayjob.yaml"), _load("raycluster.yaml")
    assert rayjob["spec"]["clusterSelector"] == {"ray.io/cluster": raycluster["metadata"]["name"]}
    args = parser().parse_args(_entrypoint_args(rayjob))
    assert args.command == "train" and args.gpus
    # At most every GPU the worker groups can scale to: a larger request is never met.
    node_types = _autoscaler_view(raycluster)["available_node_types"].values()
    gpus = sum(t["max_workers"] * t["resources"].get("GPU", 0) for t in node_types)
    assert 1 <= args.workers <= gpus
    runtime_env = yaml.safe_load(rayjob["spec"]["runtimeEnvYAML"])
    assert set(runtime_env) == {"working_dir"}
    # Ray's remote working_dir: a zip; every node fetches it with its service account.
    uris = [args.data, args.checkpoint_dir, args.storage, runtime_env["working_dir"]]
    assert runtime_env["working_dir"].endswith(".zip")
    assert len({BUCKET_URI.match(uri).group(1) for uri in uris}) == 1, uris


def test_a_flag_our_cli_does_not_know_fails_the_entrypoint_check(capsys):
    rayjob = _load("rayjob.yaml")
    rayjob["spec"]["entrypoint"] = rayjob["spec"]["entrypoint"].replace(
        "--eval-freq", "--evaluation-freq"
    )
    with pytest.raises(SystemExit) as exit_info:
        parser().parse_args(_entrypoint_args(rayjob))
    assert exit_info.value.code == 2
    assert "--evaluation-freq" in capsys.readouterr().err


# --- Credentials: service accounts, never secrets in the manifests ---------------------------


def _walk(value):
    """Every (key, value) pair of nested mappings."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield key, item
            yield from _walk(item)
    elif isinstance(value, list):
        for item in value:
            yield from _walk(item)


def test_pods_reach_the_bucket_through_service_accounts_and_no_secret():
    accounts = _service_accounts()
    for name, account in accounts.items():
        assert account["apiVersion"] == "v1" and account["kind"] == "ServiceAccount"
        arn = account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"]
        assert ROLE_ARN.fullmatch(arn), (name, arn)
    spec = _load("raycluster.yaml")["spec"]
    head_account = spec["headGroupSpec"]["template"]["spec"]["serviceAccountName"]
    worker_accounts = {
        g["template"]["spec"]["serviceAccountName"] for g in spec["workerGroupSpecs"]
    }
    assert {head_account} | worker_accounts == set(accounts)
    # The operator binds the autoscaler's Kubernetes rights to the head's account only.
    assert head_account not in worker_accounts

    texts = [path.read_text() for path in sorted(MANIFESTS.glob("*.yaml"))]
    for text in texts:
        for doc in yaml.safe_load_all(text):
            keys = {key for key, _ in _walk(doc)}
            assert not keys & {"secretKeyRef", "secretRef", "imagePullSecrets"}, keys
            names = {item.get("name", "") for key, v in _walk(doc) if key == "env" for item in v}
            assert not any(n.startswith(("AWS_ACCESS", "AWS_SECRET", "AWS_SESSION")) for n in names)
    # One placeholder account, replaced once: the roles', the registry's and the bucket's.
    text = "\n".join(texts)
    accounts_seen = set(ROLE_ARN.findall(text)) | set(ECR_ACCOUNT.findall(text))
    accounts_seen |= {m.group(1) for m in re.finditer(r"s3://recoder-dist-(\d{12})-", text)}
    assert len(accounts_seen) == 1, accounts_seen
