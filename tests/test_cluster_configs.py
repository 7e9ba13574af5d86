"""The cluster configs in cluster/: Ray's launcher schema and the fields KubeRay needs."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import ray
import ray.autoscaler
import yaml

import segsearch
from segsearch.cli import main
from segsearch.jobs import STORAGE_ENV, TRACKING_ENV, check_cluster_environment
from segsearch.ray_setup import SECRET_ENV
from segsearch.space import parse_space

CLUSTER = Path(__file__).resolve().parent.parent / "cluster"
RAY_VERSION = ray.__version__


def load_docs(path: Path) -> dict[str, dict]:
    """A manifest file's documents by kind."""
    docs = [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    return {doc["kind"]: doc for doc in docs}


def check_cluster_defaults(environ: dict[str, str]) -> None:
    """The cluster names shared storage on S3 and an MLflow server (`submit --cluster-defaults`)."""
    check_cluster_environment([STORAGE_ENV, TRACKING_ENV], environ)
    assert environ[STORAGE_ENV].startswith("s3://")


def search_args(command: str) -> list[str]:
    """Check `segsearch search ...` against the real CLI's options; return its arguments."""
    argv = shlex.split(command)
    assert argv[:2] == ["segsearch", "search"], command
    main.commands["search"].make_context("search", argv[2:])  # unknown options raise here
    return argv[2:]


# --- AWS: Ray cluster launcher ------------------------------------------------------------------


@pytest.fixture(scope="module")
def aws() -> dict:
    return yaml.safe_load((CLUSTER / "aws-gpu.yaml").read_text())


def test_aws_config_matches_rays_autoscaler_schema(aws):
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(aws, schema)
    # Ray's own checks on top of the schema (node types, worker counts), with AWS defaults filled
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(aws))


def test_aws_config_has_a_cpu_head_and_autoscaling_gpu_workers(aws):
    types = aws["available_node_types"]
    head = types[aws["head_node_type"]]
    assert head["resources"] == {"CPU": 0}
    assert re.match(r"[mcr]\d", head["node_config"]["InstanceType"])
    workers = [t for name, t in types.items() if name != aws["head_node_type"]]
    assert len(workers) == 1
    [gpu] = workers
    assert re.match(r"(g|p)\d", gpu["node_config"]["InstanceType"])
    assert 0 <= gpu["min_workers"] <= gpu["max_workers"] <= aws["max_workers"]
    for node_type in types.values():
        arn = node_type["node_config"]["IamInstanceProfile"]["Arn"]
        assert re.fullmatch(r"arn:aws:iam::\d{12}:instance-profile/[\w+=,.@-]+", arn)


def check_images(head: str, worker: str) -> None:
    """The Dockerfile's two variants of this segsearch release, from one repository."""
    dockerfile = (CLUSTER.parent / "Dockerfile").read_text()
    repository = head.rpartition(":")[0]
    assert head == f"{repository}:{segsearch.__version__}-cpu"
    assert worker == f"{repository}:{segsearch.__version__}-gpu"
    for image, build_arg in ((head, ""), (worker, " --build-arg VARIANT=gpu")):
        tag = image.rpartition("/")[2]
        assert f"docker build -t {tag}{build_arg} ." in dockerfile


def test_aws_config_runs_the_segsearch_images_with_token_auth(aws):
    docker = aws["docker"]
    check_images(docker["head_image"], docker["worker_image"])
    for key in ("setup_commands", "head_setup_commands", "worker_setup_commands"):
        assert aws[key] == [], "the image has everything; nothing is installed at start-up"
    assert aws["file_mounts"] == {"/home/ray/.ray/auth_token": "~/.ray/auth_token"}
    for commands in (aws["head_start_ray_commands"], aws["worker_start_ray_commands"]):
        [start] = [c for c in commands if "ray start" in c]
        assert "export RAY_AUTH_MODE=token;" in start
    [head_start] = [c for c in aws["head_start_ray_commands"] if "ray start" in c]
    assert "--head" in head_start and "--dashboard-host=0.0.0.0" in head_start


def test_aws_nodes_provide_storage_and_tracking_but_no_credentials(aws):
    for commands in (aws["head_start_ray_commands"], aws["worker_start_ray_commands"]):
        [start] = [c for c in commands if "ray start" in c]
        exported = dict(re.findall(r"export (\w+)=([^;\s]+);", start))
        check_cluster_defaults(exported)
    text = yaml.safe_dump(aws)  # without comments
    assert not [name for name in SECRET_ENV if name in text]


# --- Kubernetes: KubeRay ----------------------------------------------------------------------


def check_cluster_spec(spec: dict) -> dict:
    """What KubeRay needs in a RayCluster spec (also a RayJob's rayClusterSpec); return the head."""
    assert spec["rayVersion"] == RAY_VERSION
    assert spec["authOptions"] == {"mode": "token"}
    head = spec["headGroupSpec"]
    assert all(isinstance(v, str) for v in head["rayStartParams"].values())  # KubeRay: strings
    assert head["rayStartParams"]["num-cpus"] == "0"
    [head_container] = head["template"]["spec"]["containers"]
    assert "nvidia.com/gpu" not in head_container["resources"]["limits"]
    assert {p["containerPort"] for p in head_container["ports"]} >= {6379, 8265}
    assert spec["workerGroupSpecs"]
    for group in spec["workerGroupSpecs"]:
        assert group["groupName"]
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        assert isinstance(group["rayStartParams"], dict)
        [worker] = group["template"]["spec"]["containers"]
        check_images(head_container["image"], worker["image"])
        resources = worker["resources"]
        assert int(resources["limits"]["nvidia.com/gpu"]) >= 1
        assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"]
        assert {"cpu", "memory"} <= set(resources["limits"])
        check_container_env(worker)
    check_container_env(head_container)
    return head


def check_container_env(container: dict) -> None:
    """Storage and tracking set for `--cluster-defaults`; credentials only from Secrets."""
    env = {item["name"]: item for item in container["env"]}
    check_cluster_defaults({name: item["value"] for name, item in env.items() if "value" in item})
    for name in SECRET_ENV:
        if name in env:
            assert set(env[name]) == {"name", "valueFrom"}, name
            assert set(env[name]["valueFrom"]) == {"secretKeyRef"}, name
    assert {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"} <= set(env)
    assert [set(source) for source in container.get("envFrom", [])] == [{"secretRef"}]


def test_raycluster_manifest_has_what_kuberay_needs():
    docs = load_docs(CLUSTER / "kuberay" / "raycluster.yaml")
    cluster = docs["RayCluster"]
    assert cluster["apiVersion"] == "ray.io/v1"
    assert cluster["metadata"]["name"]
    head = check_cluster_spec(cluster["spec"])
    account = docs["ServiceAccount"]["metadata"]
    assert head["template"]["spec"]["serviceAccountName"] == account["name"]
    assert account["annotations"]["eks.amazonaws.com/role-arn"].startswith("arn:aws:iam::")


def test_rayjob_manifest_runs_a_search_on_a_space_it_ships():
    docs = load_docs(CLUSTER / "kuberay" / "rayjob.yaml")
    job = docs["RayJob"]
    assert job["apiVersion"] == "ray.io/v1"
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert "clusterSelector" not in spec
    head = check_cluster_spec(spec["rayClusterSpec"])
    args = search_args(spec["entrypoint"])
    space_path = Path(args[0])
    assert args[args.index("--storage") + 1].startswith("s3://")
    # the space file is a ConfigMap key, mounted on the head where the entrypoint reads it
    pod = head["template"]["spec"]
    [mount] = [
        m for m in pod["containers"][0]["volumeMounts"] if m["mountPath"] == str(space_path.parent)
    ]
    [volume] = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    config_map = docs["ConfigMap"]
    assert volume["configMap"]["name"] == config_map["metadata"]["name"]
    space = parse_space(yaml.safe_load(config_map["data"][space_path.name]))
    assert space.name == args[args.index("--name") + 1]
    assert space.max_concurrent  # an autoscaling cluster starts with no GPU to count
