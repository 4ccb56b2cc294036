"""Ray processes: a job that starts its own local instance leaves none of them behind however it ends, never
joins another instance running on the machine, and local_cluster.sh refuses to start over a running cluster or
on ports in use, saying what to do."""
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parents[1]


def _own_ray_processes(driver_pid: int) -> list[str]:
    """Processes of the Ray instance a driver started: their command lines name its session folder, which Ray
    names after the driver's pid."""
    session = re.compile(rf"session_[\d_-]+_{driver_pid}\b")
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        line = " ".join(proc.info["cmdline"] or [])
        if session.search(line):
            found.append(line[:160])
    return found


def _wait_gone(driver_pid: int, timeout: float) -> list[str]:
    deadline = time.time() + timeout
    while (left := _own_ray_processes(driver_pid)) and time.time() < deadline:
        time.sleep(0.5)
    return left


@pytest.mark.slow
@pytest.mark.parametrize("ending", ["exit 2 after Ray started", "SIGTERM mid-run"])
def test_a_job_leaves_no_ray_process_of_its_own_behind_and_joins_no_other_instance(ray_cluster, tmp_path, ending):
    """The session's cluster runs on this machine too: a job without RAY_ADDRESS starts its own instance beside
    it (before, ray.init joined it and failed on num_cpus)."""
    env = {k: v for k, v in ray_cluster.env.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    sets = [f"run.root={tmp_path}", "data.max_documents=600", "data.validation_examples=20", "data.rows_per_shard=40",
            "train.max_steps=500"]
    if ending.startswith("exit 2"):  # one shard cannot feed two workers: found after the data stage ran on Ray
        sets[-2] = "data.rows_per_shard=100000"
    argv = [sys.executable, "jobs/pretrain.py"] + [a for s in sets for a in ("--set", s)]
    proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if ending.startswith("SIGTERM"):
        for line in proc.stdout:  # until the workers train
            if "[suformer] step " in line or "MLflow run" in line:
                break
        assert _own_ray_processes(proc.pid), "the job should be running its own Ray instance"
        proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=300)[0]
    if ending.startswith("exit 2"):
        assert proc.returncode == 2 and "cannot feed train.num_workers=2" in out, out[-3000:]
    else:
        assert proc.returncode != 0
    assert _wait_gone(proc.pid, timeout=30) == []
    assert "Connecting to existing Ray cluster" not in out


def test_local_cluster_start_over_the_running_cluster_says_how_to_use_or_stop_it(ray_cluster):
    proc = subprocess.run([str(ray_cluster.script), "start", "--workers", "0"], env=ray_cluster.node_env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "is already running on 127.0.0.1:" in proc.stderr, proc.stderr
    assert "env)" in proc.stderr and "stop" in proc.stderr and "Traceback" not in proc.stderr
    import ray

    assert ray.cluster_resources()["CPU"] >= 6  # untouched


def test_local_cluster_clears_a_stale_state_and_refuses_a_port_in_use(ray_cluster, tmp_path):
    state = tmp_path / "cluster"
    state.mkdir()
    (state / "ports").write_text("1\n2\n")  # a cluster that is gone (nothing listens on port 1)
    busy = ray_cluster.address.rsplit(":", 1)[1]  # the session cluster's GCS port
    env = {**ray_cluster.node_env, "SUFORMER_CLUSTER_DIR": str(state)}
    proc = subprocess.run([str(ray_cluster.script), "start", "--workers", "0", "--port", busy], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "no longer running: clearing its state" in proc.stdout, proc.stdout + proc.stderr
    assert f"port {busy} on 127.0.0.1 is in use" in proc.stderr and "--port P --dashboard-port D" in proc.stderr
    assert not (state / "ports").exists()
