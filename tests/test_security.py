"""Security defaults against the real services: the local Ray cluster's job API and the MLflow tracking server,
and what a `ray job submit` uploads. What a job tracking into the login server records (no password in its
output, params or tags) is checked by test_pretrain's `ray job submit` end-to-end test."""
import os
import stat
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")


def _status(url, headers=None):
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def _basic(user, password):
    import base64

    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def test_job_api_requires_the_cluster_token(ray_cluster):
    jobs = ray_cluster.dashboard + "/api/jobs/"
    assert _status(jobs) == 401
    assert _status(jobs, {"Authorization": "Bearer " + "0" * 64}) in (401, 403)
    assert _status(jobs, {"Authorization": f"Bearer {ray_cluster.token}"}) == 200


def test_cluster_token_is_a_private_file(ray_cluster):
    token_file = Path(ray_cluster.env["RAY_AUTH_TOKEN_PATH"])
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(token_file.parent.stat().st_mode) == 0o700
    assert ray_cluster.token not in (token_file.parent / "head.log").read_text()


def test_tracking_server_requires_a_login(mlflow_server):
    search = mlflow_server.url + "/api/2.0/mlflow/experiments/search?max_results=1"
    assert _status(search) == 401
    assert _status(search, _basic("admin", "not-the-password")) == 401
    assert _status(search, _basic("admin", mlflow_server.password)) == 200
    # DNS rebinding: a request naming a foreign host is refused even with valid credentials.
    assert _status(search, {**_basic("admin", mlflow_server.password), "Host": "attacker.example"}) == 403
    auth_config = (mlflow_server.home / "store" / "basic_auth.ini").read_text()
    assert mlflow_server.password not in auth_config and mlflow_server.password not in mlflow_server.log.read_text()


def test_tracking_server_starts_without_mlflows_genai_job_runner(mlflow_server):
    """The job runner (huey consumers for GenAI scorers and trace rollups) is off unless asked for: the server
    is its own process and uvicorn's, not eight more."""
    import psutil

    lines = [" ".join(p.cmdline()) for p in psutil.Process(mlflow_server.pid).children(recursive=True)]
    assert any("uvicorn" in line for line in lines), lines
    assert not [line for line in lines if "huey" in line or "jobs._job_runner" in line]


@pytest.mark.parametrize("args,env,message", [
    ([], {}, "set MLFLOW_AUTH_ADMIN_PASSWORD"),
    (["--no-auth", "--host", "0.0.0.0"], {}, "refusing --no-auth on 0.0.0.0"),
    (["--bogus"], {"MLFLOW_AUTH_ADMIN_PASSWORD": "x" * 16}, "unknown option '--bogus'"),
])
def test_tracking_server_refuses_unsafe_starts(tmp_path, args, env, message):
    clean = {k: v for k, v in os.environ.items() if k != "MLFLOW_AUTH_ADMIN_PASSWORD"}
    proc = subprocess.run([str(REPO / "platform" / "mlflow_server.sh"), "--home", str(tmp_path), *args],
                          env={**clean, **env}, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and message in proc.stderr


def _submit(ray_cluster, working_dir, *entry):
    proc = subprocess.run([RAY, "job", "submit", "--address", ray_cluster.dashboard, "--working-dir", str(working_dir),
                           "--", *entry], env=ray_cluster.env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_job_uploads_leave_data_checkpoints_and_secrets_behind(ray_cluster, tmp_path):
    """A project directory with the repo's ignore files, the repo's code and everything that must not travel: the
    job sees all of the code (every tracked file of suformer/ and jobs/, whatever its directories are named) and
    nothing else."""
    project = tmp_path / "project"
    for name in (".gitignore", ".rayignore"):
        (project / name).parent.mkdir(parents=True, exist_ok=True)
        (project / name).write_text((REPO / name).read_text())
    tracked = subprocess.run(["git", "ls-files", "suformer", "jobs"], cwd=REPO, capture_output=True, text=True,
                             check=True).stdout.split()
    kept = [*tracked, "list_files.py"]
    left_behind = ["mlflow.db", "runs/demo/checkpoints/step-1/state.pt", "mlruns/0/meta.yaml", ".env", "auth_token",
                   "secrets/aws.key", "data/shard-00000.parquet", "model/model.safetensors", "mlflow-server/basic_auth.ini",
                   ".venv/bin/python", "suformer/pretrain/data/shard-00000.parquet"]
    for rel in kept + left_behind:
        (project / rel).parent.mkdir(parents=True, exist_ok=True)
        (project / rel).write_text("x")
    (project / "list_files.py").write_text(
        "import os\nfor d, _, fs in os.walk('.'):\n    for f in fs:\n        print('FILE', os.path.join(d, f)[2:])\n")
    out = _submit(ray_cluster, project, "python", "list_files.py")
    uploaded = {line.split("FILE ", 1)[1].strip() for line in out.splitlines() if "FILE " in line}
    assert len(tracked) > 50 and not set(kept) - uploaded, set(kept) - uploaded
    assert not uploaded & set(left_behind), uploaded & set(left_behind)


def test_node_metrics_are_where_the_readme_sends_prometheus_and_ask_no_token(ray_cluster):
    """The head's generated Prometheus config discovers every node's metrics endpoint, each serving Ray's series;
    the endpoints do not check the cluster token (why the README keeps them inside the cluster network)."""
    import json

    import ray
    import yaml

    session = Path(ray._private.worker.global_worker.node.get_session_dir_path())
    config = yaml.safe_load((session / "metrics" / "prometheus" / "prometheus.yml").read_text())
    [discovery] = config["scrape_configs"][0]["file_sd_configs"][0]["files"]
    targets = {t for group in json.loads(Path(discovery).read_text()) for t in group["targets"]}
    nodes = {f"{n['NodeManagerAddress']}:{n['MetricsExportPort']}" for n in ray.nodes() if n["Alive"]}
    assert nodes <= targets
    for target in nodes:
        with urllib.request.urlopen(f"http://{target}/metrics", timeout=10) as response:  # no Authorization header
            assert b"\nray_" in response.read()
