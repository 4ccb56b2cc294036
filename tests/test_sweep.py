"""A real Ray Tune sweep of fine-tuning tricks on the session's Ray cluster, tracked as MLflow parent/child runs."""
import importlib.util
import os
from pathlib import Path

import pytest

from suformer.config import load_config

REPO = Path(__file__).resolve().parents[1]
SWEEP = str(REPO / "jobs" / "configs" / "sweep_sentiment_tiny_cpu.yaml")


def _job(name):
    spec = importlib.util.spec_from_file_location(f"{name}_job", REPO / "jobs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def sweep_main(argv):
    return _job("sweep").main(argv)


def _small(root):
    # An explicit store: the cluster's nodes have MLFLOW_TRACKING_URI (the session's server) in their environment.
    return [f"finetune.run.root={root}", f"finetune.run.tracking_uri=sqlite:///{root}/mlflow.db",
            "finetune.data.max_train_examples=400", "finetune.data.max_eval_examples=200"]


@pytest.mark.slow
def test_sweep_of_five_tricks_and_two_seeds_makes_parent_child_runs_table_plot_and_registers(ray_cluster, tmp_path):
    from mlflow.tracking import MlflowClient

    from suformer.config import SweepConfig
    from suformer.finetune.sweep import run_sweep

    sweep = load_config(SWEEP, _small(tmp_path), schema=SweepConfig)
    result = run_sweep(sweep)
    assert result["errors"] == 0 and result["children"] == 10

    client = MlflowClient(sweep.finetune.tracking_uri)
    parent = client.get_run(result["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["suformer.kind"] == "sweep"
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    pairs = sorted((c.data.tags["suformer.trick"], c.data.tags["suformer.seed"]) for c in children)
    assert pairs == sorted((t, s) for t in ("none", "fgm", "rdrop", "ema", "lora") for s in ("0", "1"))
    for child in children:
        assert child.info.status == "FINISHED"
        assert child.data.params["sweep.trick"] == child.data.tags["suformer.trick"]
        assert child.data.params["train.seed"] == child.data.tags["suformer.seed"]
        assert [m.step for m in client.get_metric_history(child.info.run_id, "dev/accuracy")] == [1, 2]
        assert 0 <= child.data.metrics["test/accuracy"] <= 1
    lora = next(c for c in children if c.data.tags["suformer.trick"] == "lora")
    none = next(c for c in children if c.data.tags["suformer.trick"] == "none")
    assert lora.data.params["tricks.lora_r"] == "8"
    assert lora.data.metrics["params/trainable"] < none.data.metrics["params/trainable"] / 10

    # The table's numbers are the children's, recomputed here from MLflow.
    rows = {r["trick"]: r for r in result["rows"]}
    assert set(rows) == {"none", "fgm", "rdrop", "ema", "lora"} and all(r["runs"] == 2 for r in rows.values())
    mean_of = lambda trick: sum(c.data.metrics["test/accuracy"] for c in children  # noqa: E731
                                if c.data.tags["suformer.trick"] == trick) / 2
    assert rows["none"]["mean"] == pytest.approx(mean_of("none"))
    assert rows["rdrop"]["diff_vs_none"] == pytest.approx(mean_of("rdrop") - mean_of("none"))
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "comparison")}
    assert {"comparison/comparison.md", "comparison/comparison.json", "comparison/comparison.png"} <= artifacts
    png = Path(client.download_artifacts(parent.info.run_id, "comparison/comparison.png", str(tmp_path)))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert "| none | 2 |" in result["table"] and "| lora | 2 |" in result["table"]

    name, version = result["registered"].split("/")
    registered = client.get_model_version(name, version)
    best = max(children, key=lambda c: c.data.metrics["best_dev/accuracy"])
    assert registered.run_id == best.info.run_id == parent.data.tags["suformer.best_child"]
    import mlflow
    import torch

    assert "MLFLOW_TRACKING_URI" not in os.environ  # registering did not leak the store into this process
    mlflow.set_tracking_uri(sweep.finetune.tracking_uri)
    loaded = mlflow.pytorch.load_model(f"models:/{name}/{version}").eval()
    os.environ.pop("MLFLOW_TRACKING_URI")  # set_tracking_uri exported it: later tests must not inherit this store
    with torch.no_grad():
        assert loaded(input_ids=torch.tensor([[2, 300, 400, 3]])).logits.shape == (1, 2)
    assert list(Path(result["tune_path"]).rglob("events.out.tfevents*"))  # TensorBoard on the Tune folder
    import subprocess
    import sys

    inspected = subprocess.run([str(Path(sys.executable).parent / "tensorboard"), "--inspect", "--logdir",
                                result["tune_path"]], capture_output=True, text=True, timeout=120)
    assert inspected.returncode == 0 and "dev/accuracy" in inspected.stdout, inspected.stderr[-2000:]  # sweep.py's command

    # The MLflow UI's compare view, rendered by real headless Chromium from a real `mlflow server`, lists every
    # child run with the trick as a param.
    render = _job("render_sweep")
    dom = render.render_compare_view(sweep.finetune.tracking_uri, sweep.finetune.run.experiment, sweep.name,
                                     tmp_path / "compare.png")
    assert f"Comparing {len(children)} Runs from 1 Experiment" in dom
    assert all(c.info.run_name in dom for c in children) and "sweep.trick" in dom and "test/accuracy" in dom
    assert (tmp_path / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("override,message", [
    ('tricks={"fgm": {"adversarial": "fgm"}}', "must include 'none'"),
    ('tricks={"none": {}, "bad": {"lora_r": 8, "adversarial": "fgm"}}', "tricks.bad: "),
    ('tricks={"none": {}, "sparse": {"sparse_softmax_k": 10}}', "tricks.sparse: "),
    ('search={"train.lr": {"lognormal": [1, 2]}}', "expected one of"),
    ('search={"train.lrate": {"loguniform": [1, 2]}}', "not a fine-tuning setting"),
    ("finetune.tricks.ema_decay=1.5", "finetune.tricks.ema_decay"),
])
def test_bad_sweep_configs_exit_2_naming_the_problem(override, message, capsys):
    assert sweep_main(["--config", SWEEP, "--set", override]) == 2
    assert message in capsys.readouterr().err


def test_comparison_statistics_against_welchs_formula():
    from scipy import stats

    from suformer.finetune.sweep import comparison

    none, fgm = [0.70, 0.74, 0.72], [0.75, 0.79]
    children = [{"trick": "none", "metrics": {"test/accuracy": v, "time/epoch_s": 2.0}} for v in none]
    children += [{"trick": "fgm", "metrics": {"test/accuracy": v, "time/epoch_s": 4.0}} for v in fgm]
    children += [{"trick": "stopped-early", "metrics": {"dev/accuracy": 0.6}}]  # no test score: left out
    rows = {r["trick"]: r for r in comparison(children, "test/accuracy")}
    assert set(rows) == {"none", "fgm"}
    assert rows["fgm"]["mean"] == pytest.approx(0.77) and rows["fgm"]["std"] == pytest.approx(0.0282842712)
    assert rows["fgm"]["diff_vs_none"] == pytest.approx(0.77 - 0.72)
    var_a, var_b = 0.0008 / 2, 0.0008 / 2 / 3  # sample variance / n: fgm (n=2), none (n=3)
    t = (0.77 - 0.72) / (var_a + var_b) ** 0.5
    dof = (var_a + var_b) ** 2 / (var_a**2 / 1 + var_b**2 / 2)
    assert rows["fgm"]["p_value"] == pytest.approx(2 * stats.t.sf(t, dof), rel=1e-6)
    assert rows["fgm"]["epoch_time_s"] == 4.0 and rows["none"]["runs"] == 3


def test_runs_their_trials_left_open_are_killed_if_tune_ended_the_trial_cleanly_else_failed(tmp_path):
    from suformer import tracking
    from suformer.finetune.sweep import STOPPED_EARLY_TAG, TRIAL_TAG, close_orphaned_runs

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    parent, _ = tracking.open_run(uri, "sweeps", "sweep", run_root=tmp_path)
    for trial in ("stopped", "crashed", "done"):
        tracking.create_child_run(uri, "sweeps", parent, trial, tags={TRIAL_TAG: trial})
    done = next(c for c in tracking.child_runs(uri, parent) if c.data.tags[TRIAL_TAG] == "done")
    tracking.finish_run(uri, done.info.run_id)

    close_orphaned_runs(uri, tracking.child_runs(uri, parent), clean_trials={"stopped", "done"})

    runs = {c.data.tags[TRIAL_TAG]: c for c in tracking.child_runs(uri, parent)}
    assert {t: r.info.status for t, r in runs.items()} == {"stopped": "KILLED", "crashed": "FAILED", "done": "FINISHED"}
    assert {t for t, r in runs.items() if r.data.tags.get(STOPPED_EARLY_TAG) == "true"} == {"stopped"}


class _HoldingProxy:
    """An HTTP proxy in front of the MLflow server that holds each request whose body contains `marker` for
    `hold_s` seconds before passing it on: a stopped trial marking its run is still inside that MLflow call when
    Tune tears its actor down, every time rather than on a loaded machine only."""

    def __init__(self, target: str, marker: bytes, hold_s: float):
        import http.server
        import threading
        import time
        import urllib.error
        import urllib.request

        proxy = self
        self.held = 0

        class Handler(http.server.BaseHTTPRequestHandler):
            def _forward(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if marker in body:
                    proxy.held += 1
                    time.sleep(hold_s)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
                request = urllib.request.Request(target + self.path, data=body if body else None, headers=headers,
                                                 method=self.command)
                try:
                    with urllib.request.urlopen(request, timeout=120) as response:
                        status, reply, content = response.status, response.headers, response.read()
                except urllib.error.HTTPError as e:
                    status, reply, content = e.code, e.headers, e.read()
                self.send_response(status)
                for key, value in reply.items():
                    if key.lower() not in ("transfer-encoding", "connection", "content-length", "server", "date"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(content)))
                self.end_headers()
                self.wfile.write(content)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _forward

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()


@pytest.mark.slow
def test_a_stopped_trial_cut_off_inside_its_mlflow_calls_still_ends_killed(ray_cluster, mlflow_server, tmp_path,
                                                                          monkeypatch):
    """Tune stops a trial after its first epoch (a stop criterion: the same path as an ASHA decision) while the
    trial's handler is held inside its MLflow call marking the run stopped early: the run ends KILLED and tagged,
    never FAILED, whatever the timing."""
    from mlflow.tracking import MlflowClient

    from suformer.config import SweepConfig
    from suformer.finetune.sweep import run_sweep

    proxy = _HoldingProxy(mlflow_server.url, marker=b"suformer.stopped_early", hold_s=8)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", mlflow_server.username)  # the nodes have them already
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", mlflow_server.password)
    sets = [f"finetune.run.root={tmp_path}", f"finetune.run.tracking_uri={proxy.url}", "name=stopped-trial",
            "finetune.run.experiment=stopped-trials", 'tricks={"none": {}}', "seeds=[0]", "register_as=null",
            "finetune.train.epochs=2", "finetune.data.max_train_examples=200", "finetune.data.max_eval_examples=100"]
    try:
        result = run_sweep(load_config(SWEEP, sets, schema=SweepConfig), stop={"epoch": 1})
    finally:
        proxy.close()
    assert proxy.held >= 1 and result["errors"] == 0 and result["children"] == 1

    client = MlflowClient(mlflow_server.url)
    (child,) = client.search_runs([client.get_run(result["parent_run_id"]).info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{result['parent_run_id']}'")
    assert child.info.status == "KILLED" and child.data.tags["suformer.stopped_early"] == "true"
    assert [m.step for m in client.get_metric_history(child.info.run_id, "dev/accuracy")] == [1]
    assert "test/accuracy" not in child.data.metrics
    assert client.get_run(result["parent_run_id"]).info.status == "FINISHED"


@pytest.mark.parametrize("path", sorted((REPO / "jobs" / "configs").glob("sweep_*.yaml")), ids=lambda p: p.stem)
def test_shipped_sweep_configs_validate(path):
    from suformer.config import SweepConfig
    from suformer.finetune.sweep import trial_config

    sweep = load_config(str(path), schema=SweepConfig)
    for trick in sweep.tricks:
        assert trial_config(sweep, trick, sweep.seeds[-1], {}).train.seed == sweep.seeds[-1]


@pytest.mark.slow
def test_sweep_submitted_with_ray_job_submit_optuna_search_and_asha(ray_cluster, tmp_path):
    """The README's `ray job submit -- python jobs/sweep.py` path, with Optuna proposing the learning rate and
    ASHA stopping weak trials: tricks and seeds still take turns, each trial an MLflow child run."""
    import subprocess
    import sys

    from mlflow.tracking import MlflowClient

    from suformer.config import SweepConfig

    sets = _small(tmp_path) + [
        "name=optuna-asha", 'tricks={"none": {}, "ema": {"ema_decay": 0.9}}', "seeds=[0]", "num_samples=2",
        "search_alg=optuna",
        'search={"train.lr": {"loguniform": [1.0e-4, 3.0e-3]}}', "scheduler=asha", "register_as=null",
        "finetune.train.epochs=2", "finetune.data.max_train_examples=200", "finetune.data.max_eval_examples=100"]
    entry = [sys.executable, "jobs/sweep.py", "--config", SWEEP]
    for item in sets:
        entry += ["--set", item]
    ray = str(Path(sys.executable).parent / "ray")
    proc = subprocess.run([ray, "job", "submit", "--address", ray_cluster.dashboard, "--working-dir", str(REPO), "--",
                           *entry], env=ray_cluster.env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "4 trials, 0 failed" in proc.stdout and "| none |" in proc.stdout, proc.stdout[-3000:]

    sweep = load_config(SWEEP, sets, schema=SweepConfig)
    client = MlflowClient(sweep.finetune.tracking_uri)
    experiment = client.get_experiment_by_name(sweep.finetune.run.experiment)
    (parent,) = client.search_runs([experiment.experiment_id],
                                   filter_string="tags.`suformer.kind` = 'sweep' and attributes.run_name = 'optuna-asha'")
    children = client.search_runs([experiment.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(c.data.tags["suformer.trick"] for c in children) == ["ema", "ema", "none", "none"]
    assert len({c.data.tags["suformer.trial_id"] for c in children}) == 4  # each run knows its Tune trial
    rates = [float(c.data.params["train.lr"]) for c in children]
    assert len(set(rates)) == 4 and all(1e-4 <= r <= 3e-3 for r in rates)  # proposed per trial, in range
    for child in children:  # a trial ASHA stopped has fewer epochs and no test score, but it is not a failure
        epochs = [m.step for m in client.get_metric_history(child.info.run_id, "dev/accuracy")]
        assert child.info.status in ("FINISHED", "KILLED") and epochs in ([1], [1, 2]), (child.info.status, epochs)
        assert ("test/accuracy" in child.data.metrics) == (child.info.status == "FINISHED")
        assert (child.data.tags.get("suformer.stopped_early") == "true") == (child.info.status == "KILLED")
    assert sum(c.info.status == "FINISHED" for c in children) >= 1  # ASHA keeps the best of each rung going
