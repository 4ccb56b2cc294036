"""MLflow: one run per training run name, found again when the run is resubmitted or restarted.

The job driver opens (or re-opens) the run, owns it (`owned_run`: its end status) and logs params and artifacts;
rank 0 of the workers logs metrics into the same run id. Steps already in the run are never logged again, so a
restart from a checkpoint that replays steps leaves each step once in the history.
"""
from __future__ import annotations

import contextlib
import logging
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

from .storage import Location

RUN_NAME_TAG = "suformer.run_name"
# The experiment's kind, for MLflow clients that read it. MLflow 3.17's UI itself follows its own GenAI / Model
# training switch instead (see browse_lines).
EXPERIMENT_KIND_TAGS = {"mlflow.experimentKind": "custom_model_development"}


def _client(tracking_uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


def _newest_run_named(client, experiment_id: str, run_name: str):
    found = client.search_runs([experiment_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{run_name}'",
                               order_by=["attributes.start_time DESC"], max_results=1)
    return found[0] if found else None


def open_run(tracking_uri: str, experiment: str, run_name: str, tags: Optional[dict] = None,
             run_root=None, resume: bool = True) -> tuple[str, bool]:
    """(run id, resumed): the newest run tagged with `run_name` in `experiment` (when `resume`), else a new one.

    With a SQLite store, a new experiment keeps its artifacts in `run_root`/mlartifacts: without that, MLflow puts
    them in ./mlruns of the current directory, which under `ray job submit` is a temporary upload directory. A
    tracking server decides where artifacts go itself."""
    client = _client(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    artifacts = None
    if run_root is not None and tracking_uri.startswith("sqlite:"):  # on object storage too (s3://.../mlartifacts)
        root = Location.of(run_root)
        artifacts = Path(root.path, "mlartifacts").as_uri() if root.is_local else (root / "mlartifacts").uri

    exp_id = exp.experiment_id if exp else client.create_experiment(experiment, artifact_location=artifacts,
                                                                    tags=EXPERIMENT_KIND_TAGS)
    found = _newest_run_named(client, exp_id, run_name) if resume else None
    if found:
        run_id = found.info.run_id
        client.update_run(run_id, status="RUNNING")
        return run_id, True
    run = client.create_run(exp_id, run_name=run_name, tags={RUN_NAME_TAG: run_name, **(tags or {})})
    return run.info.run_id, False


class MetricLogger:
    """Rank 0's metric sink: batches metrics, skips steps the run already has."""

    def __init__(self, tracking_uri: str, run_id: str, history_keys: tuple[str, ...] = ("train/loss",)):
        """`history_keys`: one metric of each set logged together (train/loss for the training window, val/loss
        for a validation), read back to find the last step each set was logged at: a resumed attempt replays
        steps, and logs each set once per step."""
        from mlflow.entities import Metric

        self._metric = Metric
        self.client, self.run_id = _client(tracking_uri), run_id
        self.last_steps = {key: max((m.step for m in self.client.get_metric_history(run_id, key)), default=-1)
                           for key in history_keys}
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # start/stop/"no GPU" INFO lines

        # CPU/memory/disk/network (and GPU with pynvml) of rank 0's node every 10 s, continuing after a restart.
        resumed = max(self.last_steps.values()) >= 0
        self.system = SystemMetricsMonitor(run_id, sampling_interval=10, resume_logging=resumed, node_id="rank0",
                                           tracking_uri=tracking_uri)
        self.system.start()

    def __enter__(self) -> "MetricLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        # One last sample, published before the monitor stops: MLflow's monitor publishes only after a full
        # sampling interval, so an attempt shorter than that (a quick resume) would record no system metrics.
        self.system.collect_metrics()
        self.system.publish_metrics(self.system.aggregate_metrics())
        self.system.finish()

    def log(self, step: int, metrics: dict[str, float], replayed_steps: str = "skip") -> None:
        """`metrics` holds one of the history keys; `replayed_steps="log"` for metrics that belong to a step
        already logged (a final summary)."""
        (key,) = [k for k in self.last_steps if k in metrics] if replayed_steps == "skip" else [None]
        if key is not None and step <= self.last_steps[key]:
            return
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[self._metric(k, float(v), now, step) for k, v in metrics.items()])
        if key is not None:
            self.last_steps[key] = step


def log_params(tracking_uri: str, run_id: str, params: dict, mutable: frozenset = frozenset()) -> None:
    """Params of a resubmitted run must match what the run already has (MLflow forbids changing them), except
    the `mutable` ones that do not change what was trained so far (e.g. train.max_steps to extend a run)."""
    from mlflow.entities import Param

    client = _client(tracking_uri)
    existing = client.get_run(run_id).data.params
    new = {k: str(v)[:6000] for k, v in params.items() if k not in existing}
    changed = changed_settings(existing, params, mutable)
    if changed:
        raise ValueError(f"run already exists with different settings for: {', '.join(changed)}; "
                         "use a new run.name or the original settings")
    items = [Param(k, v) for k, v in new.items()]
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=items[i : i + 100])


def changed_settings(existing: dict[str, str], params: dict, mutable: frozenset = frozenset()) -> list[str]:
    """Keys whose value differs from what the run recorded (MLflow params cannot change), mutable ones aside."""
    return sorted(k for k, v in params.items() if k in existing and k not in mutable and existing[k] != str(v)[:6000])


def recorded_params(tracking_uri: str, experiment: str, run_name: str) -> dict[str, str]:
    """The params of the newest run named `run_name` ({} if there is none yet), changing nothing."""
    if tracking_uri.startswith("sqlite:///") and not Path(tracking_uri.removeprefix("sqlite:///")).exists():
        return {}
    client = _client(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return {}
    found = _newest_run_named(client, exp.experiment_id, run_name)
    return found.data.params if found else {}


def log_counts(tracking_uri: str, run_id: str, counts: dict[str, int], prefix: str) -> None:
    """Counts known before training (e.g. skipped documents) as metrics at step 0, once per run."""
    from mlflow.entities import Metric

    client = _client(tracking_uri)
    existing = client.get_run(run_id).data.metrics
    now = int(time.time() * 1000)
    metrics = [Metric(f"{prefix}{k}", float(v), now, 0) for k, v in counts.items() if f"{prefix}{k}" not in existing]
    if metrics:
        client.log_batch(run_id, metrics=metrics)


def log_artifacts(tracking_uri: str, run_id: str, local_dir: str, artifact_path: Optional[str] = None) -> None:
    _client(tracking_uri).log_artifacts(run_id, local_dir, artifact_path)


def log_dataset(tracking_uri: str, run_id: str, name: str, source: str, digest: str, context: str) -> None:
    """Record the data a run used as an MLflow dataset input (the runs table's Dataset column): `source` is where
    it lives (a path or URI), `digest` what identifies its content, `context` its role ("train", "dev", ...)."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.exceptions import MlflowException
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    with warnings.catch_warnings():  # MLflow registers its local-file source twice ("" and "file") and says so
        warnings.filterwarnings("ignore", "The specified dataset source can be interpreted in multiple ways")
        resolved = resolve_dataset_source(source)
    dataset = MetaDataset(resolved, name=name, digest=digest[:36])
    inputs = [DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)])]
    client = _client(tracking_uri)
    try:
        client.log_inputs(run_id, inputs)
    except MlflowException:
        # MLflow's stores look the dataset up and insert it when missing, unguarded: runs logging the same new
        # dataset at once (a sweep's trials) collide on its unique key; the whole call was rolled back, and the
        # second try finds the dataset the winner inserted
        client.log_inputs(run_id, inputs)


def log_model(tracking_uri: str, run_id: str, local_dir: str, name: str, step: int, model_type: str) -> str:
    """The files of `local_dir` (a save_pretrained folder, as they are) as an MLflow 3 logged model of the run,
    linked to it at `step`: the run's Models column and the experiment's Models tab show it, and
    `models:/<model id>` URIs and the registry can name it. Returns the model id."""
    from mlflow.entities import LoggedModelOutput

    client = _client(tracking_uri)
    run = client.get_run(run_id)
    model = client.create_logged_model(run.info.experiment_id, name=name, source_run_id=run_id, model_type=model_type)
    try:
        client.log_model_artifacts(model.model_id, local_dir)
    except BaseException:
        client.finalize_logged_model(model.model_id, "FAILED")
        raise
    client.finalize_logged_model(model.model_id, "READY")
    client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step)])
    return model.model_id


def log_text(tracking_uri: str, run_id: str, text: str, artifact_file: str) -> None:
    _client(tracking_uri).log_text(run_id, text, artifact_file)


def create_child_run(tracking_uri: str, experiment: str, parent_run_id: str, run_name: str,
                     tags: Optional[dict] = None) -> str:
    """A new run nested under `parent_run_id` in the MLflow UI (the mlflow.parentRunId tag)."""
    client = _client(tracking_uri)
    exp_id = client.get_experiment_by_name(experiment).experiment_id
    run = client.create_run(exp_id, run_name=run_name, tags={"mlflow.parentRunId": parent_run_id, **(tags or {})})
    return run.info.run_id


def child_runs(tracking_uri: str, parent_run_id: str) -> list:
    client = _client(tracking_uri)
    experiment_id = client.get_run(parent_run_id).info.experiment_id
    return client.search_runs([experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'",
                              max_results=10000)


def set_tag(tracking_uri: str, run_id: str, key: str, value: str) -> None:
    _client(tracking_uri).set_tag(run_id, key, value)


def run_tags(tracking_uri: str, run_id: str) -> dict[str, str]:
    return _client(tracking_uri).get_run(run_id).data.tags


def delete_tag(tracking_uri: str, run_id: str, key: str) -> None:
    _client(tracking_uri).delete_tag(run_id, key)


def browse_lines(tracking_uri: str, run_id: str) -> str:
    """How to look at a run: the `mlflow ui` command for a local store, and the link to its experiment in the
    model-training view (MLflow 3's UI otherwise opens on its GenAI view, whatever the experiment's kind; it
    remembers the choice)."""
    served = tracking_uri.startswith(("http://", "https://"))
    experiment = _client(tracking_uri).get_run(run_id).info.experiment_id
    base = tracking_uri.rstrip("/") if served else "http://127.0.0.1:5000"
    command = "" if served else f"    mlflow ui --backend-store-uri {tracking_uri}\n"
    return f"{command}    {base}/#/experiments/{experiment}?workflowType=machine_learning"


def finish_run(tracking_uri: str, run_id: str, status: str = "FINISHED") -> None:
    """Mark a run ended with `status`: `owned_run` does it for the run a block owns; a driver settling runs whose own
    process could not (a sweep's stopped or lost trials) calls it directly."""
    _client(tracking_uri).set_terminated(run_id, status=status)


@dataclass
class OwnedRun:
    """The run an `owned_run` block holds. `end_status` is what a normal end of the block marks it: a block sets
    FAILED for an outcome that raises nothing (a sweep whose trials failed)."""

    id: str
    end_status: str = "FINISHED"


@contextlib.contextmanager
def owned_run(tracking_uri: str, run_id: str) -> Iterator[OwnedRun]:
    """Own the end of run `run_id` (as `open_run` or `create_child_run` made it) for the block: a normal end marks
    it `end_status` (FINISHED), Ctrl-C or a stop request KILLED, any other exception FAILED; the exception goes on.
    A process killed outright (SIGKILL, a lost node) marks nothing: the run stays RUNNING."""
    run = OwnedRun(run_id)
    try:
        yield run
    except BaseException as error:
        finish_run(tracking_uri, run_id, _status_after(error))
        raise
    finish_run(tracking_uri, run_id, run.end_status)


def _status_after(error: BaseException) -> str:
    # KeyboardInterrupt is Ctrl-C (or `ray job stop` with RAY_JOB_STOP_SIGNAL=SIGINT). SystemExit is `ray job stop`'s
    # SIGTERM, which ray.init's handler turns into SystemExit(15) on a driver and Ray into SystemExit(1) on a worker,
    # or Tune stopping a trial (tune.report raises SystemExit(0)). Each says the process was told to stop, not that
    # the work failed. SystemExit(0) is KILLED too, not FINISHED: the block never reached its end (a trial stopped
    # early has no test score), and FINISHED says the run is complete.
    return "KILLED" if isinstance(error, (KeyboardInterrupt, SystemExit)) else "FAILED"
