"""The GPU cluster configs: valid for their tools, the shape the README promises, secure by default."""
import importlib.metadata
import importlib.util
import json
import re
from pathlib import Path

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
# Values that look like credentials: a long hex/base64 run, a literal password/token assignment.
SECRET_PATTERNS = [re.compile(r"[A-Za-z0-9+/]{40,}"), re.compile(r"(?i)(password|token|secret)\s*[:=]\s*['\"]?\w{6,}")]


def _no_literal_secrets(text: str):
    for pattern in SECRET_PATTERNS:
        hits = [m.group(0) for m in pattern.finditer(text) if "SecretId" not in m.group(0)]
        assert not hits, f"looks like a secret in a config: {hits}"


def test_ray_cluster_yaml_validates_against_rays_own_schema():
    (ray_dir,) = importlib.util.find_spec("ray").submodule_search_locations  # the file, without importing ray
    schema = json.loads((Path(ray_dir) / "autoscaler" / "ray-schema.json").read_text())
    config = yaml.safe_load((REPO / "ray_cluster.yaml").read_text())
    jsonschema.validate(config, schema)


def test_ray_cluster_yaml_shape_and_security():
    text = (REPO / "ray_cluster.yaml").read_text()
    config = yaml.safe_load(text)
    head = config["available_node_types"][config["head_node_type"]]
    gpu = config["available_node_types"]["gpu_8xh100"]
    assert head["resources"].get("GPU", 0) == 0 and gpu["resources"]["GPU"] == 8
    assert gpu["min_workers"] == 0 and gpu["max_workers"] >= 1  # autoscaling from zero
    assert config["docker"]["image"].startswith(f"rayproject/ray:{importlib.metadata.version('ray')}-")  # not the frozen ray-ml
    head_start = " ".join(config["head_start_ray_commands"])
    worker_start = " ".join(config["worker_start_ray_commands"])
    for start in (head_start, worker_start):
        assert "RAY_AUTH_MODE=token" in start and "RAY_AUTH_TOKEN_PATH=" in start and "RAY_AUTH_TOKEN=" not in start
    assert "--dashboard-host=127.0.0.1" in head_start
    assert "umask 077" in " ".join(config["setup_commands"])  # secrets land in private files
    _no_literal_secrets(text)


def test_kuberay_manifests_shape_and_security():
    docs = list(yaml.safe_load_all((REPO / "cluster" / "kuberay" / "raycluster.yaml").read_text()))
    cluster = next(d for d in docs if d["kind"] == "RayCluster")
    assert cluster["apiVersion"] == "ray.io/v1" and cluster["spec"]["authOptions"]["mode"] == "token"
    head = cluster["spec"]["headGroupSpec"]
    assert "dashboard-host" not in head["rayStartParams"] or head["rayStartParams"]["dashboard-host"] != "0.0.0.0"
    (workers,) = cluster["spec"]["workerGroupSpecs"]
    (container,) = workers["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 8 and workers["minReplicas"] == 0
    for env in container["env"]:
        assert "value" not in env and "secretKeyRef" in env["valueFrom"], env  # credentials only from Secrets
    assert {d["kind"] for d in docs} == {"RayCluster", "PersistentVolumeClaim", "NetworkPolicy"}
    job = yaml.safe_load((REPO / "cluster" / "kuberay" / "rayjob.yaml").read_text())
    assert job["kind"] == "RayJob" and job["spec"]["clusterSelector"]["ray.io/cluster"] == cluster["metadata"]["name"]
    assert "jobs/pretrain.py" in job["spec"]["entrypoint"]
    for path in (REPO / "cluster" / "kuberay").glob("*.yaml"):
        _no_literal_secrets(path.read_text())


def test_platform_is_not_a_python_package():
    """A top-level `platform` package would shadow the standard library module of the same name."""
    assert not (REPO / "platform" / "__init__.py").exists()
    assert not list((REPO / "platform").glob("*.py"))


@pytest.mark.parametrize("config", sorted((REPO / "jobs" / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_job_configs_hold_no_secrets(config):
    _no_literal_secrets(config.read_text())
