"""Pretraining on a real local Ray cluster: DeepSpeed ZeRO 0-3 workers, `ray job submit`, worker failure.

As on a cluster whose nodes share no filesystem, the corpus and the run root are on a real S3 API (moto's server):
the vocab, shards, checkpoints, MLflow artifacts and exported models are written there. MLflow's database is the
one local file. The RoFormerV2 runs keep a local run root."""
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from types import SimpleNamespace

import pytest
import torch

from suformer.config import load_config
from suformer.corpora import peoples_daily
from suformer.pretrain.data.dataset import shard_files
from suformer.models import from_pretrained
from suformer.storage import Location

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "jobs" / "configs" / "t5_pegasus_tiny_cpu.yaml")


@pytest.fixture(scope="module")
def store(s3_server, tmp_path_factory):
    """Where the module's runs read and write. One run root for all of them (each its own run.name): the vocab
    and shards they share are built once, as a user's runs on one corpus share them. The corpus: People's Daily
    paragraphs, one document per line."""
    local = tmp_path_factory.mktemp("pretrain_local")
    corpus = Location.of(f"s3://{s3_server.bucket}/{local.name}/corpus/peoples_daily.txt")
    corpus.write_text("".join(f"{text}\n" for text in itertools.islice(peoples_daily(), 700)))
    return SimpleNamespace(corpus=corpus.uri, root=f"s3://{s3_server.bucket}/{local.name}/runs", local=local,
                           tracking_uri=f"sqlite:///{local}/mlflow.db")


def small(store, name, **train):
    """The default CPU config, shrunk to seconds: 600 documents, a few steps, every step logged."""
    sets = [f"data.corpus={store.corpus}", "data.txt_documents=line", f"run.root={store.root}",
            f"run.tracking_uri={store.tracking_uri}", f"run.name={name}", "data.max_documents=600",
            "data.rows_per_shard=40", "data.validation_examples=20", "data.vocab_size=3000", "train.log_every=1", "train.samples_to_log=1",
            "train.micro_batch_size=4"]
    sets += [f"train.{k}={v}" for k, v in train.items()]
    return sets


def loss_history(cfg, metric="train/loss"):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(cfg.tracking_uri)
    exp = client.get_experiment_by_name(cfg.run.experiment)
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`suformer.run_name` = '{cfg.run.name}'")
    assert len(runs) == 1, f"expected one MLflow run named {cfg.run.name}, found {len(runs)}"
    run = runs[0]
    history = client.get_metric_history(run.info.run_id, metric)
    return run, sorted((m.step, m.value) for m in history)


# The fault tests' run: checkpoints before and after the fault (at step 6), a warm-up to resume inside of.
FAULT_RUN = dict(max_steps=12, checkpoint_every=4, warmup_steps=2, max_failures=2, zero_stage=1)
BEST_RUN_LR = 5e-2  # AdamW on the tiny RoFormerV2: the held-out loss falls, then rises again within 4 steps


@pytest.fixture(scope="module")
def zero_runs(ray_cluster, store):
    """One run per ZeRO stage, each with the fault tests' settings: the stage-1 run is also the uninterrupted run
    those tests compare with (one Ray run fewer)."""
    from suformer.pretrain.driver import run_pretraining

    results = {}
    for stage in (0, 1, 2, 3):
        cfg = load_config(CONFIG, small(store, f"zero{stage}", **{**FAULT_RUN, "zero_stage": stage}))
        results[stage] = (cfg, run_pretraining(cfg))
    return results


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_each_zero_stage_trains_checkpoints_and_exports(zero_runs, stage):
    from mlflow.tracking import MlflowClient

    cfg, result = zero_runs[stage]
    run, history = loss_history(cfg)
    assert run.info.status == "FINISHED"
    # A SQLite store keeps its artifacts under the run root, not in whatever folder the driver started in.
    experiment = MlflowClient(cfg.tracking_uri).get_experiment(run.info.experiment_id)
    assert experiment.artifact_location == f"{cfg.run.root}/mlartifacts"
    assert run.info.artifact_uri.startswith(f"{cfg.run.root}/mlartifacts/")
    assert [s for s, _ in history] == list(range(1, 13))
    assert Location.of(result["checkpoint"]).name == "step-00000012"
    model = from_pretrained(result["model_dir"])
    assert model.config.vocab_size == 3000
    # Every stage computes the same function: same losses as plain data parallel (stage 0), in training and on
    # the held-out examples at every checkpoint.
    _, reference = loss_history(zero_runs[0][0])
    assert [v for _, v in history] == pytest.approx([v for _, v in reference], rel=1e-4)
    _, validation = loss_history(cfg, "val/loss")
    assert [s for s, _ in validation] == [4, 8, 12]
    assert [v for _, v in validation] == pytest.approx([v for _, v in loss_history(zero_runs[0][0], "val/loss")[1]],
                                                       rel=1e-4)


def test_validation_loss_is_the_exported_models_loss_on_the_held_out_examples(zero_runs):
    """The ZeRO-3 run (its 20 held-out examples make 5 micro-batches for 2 ranks: one rank runs a spare forward
    it does not count) against the exported model's loss on the same examples one at a time (no padding), with
    its own cross-entropy: the last shard files up to 20 rows, which no worker trained on."""
    import pyarrow.parquet as pq
    import torch.nn.functional as F
    from mlflow.tracking import MlflowClient

    from suformer.pretrain.batches import collate

    cfg, result = zero_runs[3]
    run, validation = loss_history(cfg, "val/loss")
    shards = Location.of(run.data.params["data.shards"])
    files, held = shard_files(shards), []
    while len(held) < 20:
        held = pq.read_table(files.pop(), filesystem=shards.fs).to_pylist() + held
    assert int(run.data.params["data.validation_rows"]) == len(held) >= 20
    model = from_pretrained(result["model_dir"])
    loss_sum = correct = predicted = 0
    with torch.no_grad():
        for row in held[:20]:
            batch = collate(cfg.data.objective, [row])
            logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits[0]
            labels = batch["labels"][0]
            loss_sum += F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum").item()
            correct += int(((logits.argmax(-1) == labels) & (labels != -100)).sum())
            predicted += int((labels != -100).sum())
    assert validation[-1] == (12, pytest.approx(loss_sum / predicted, rel=1e-4))
    accuracy = MlflowClient(cfg.tracking_uri).get_metric_history(run.info.run_id, "val/token_accuracy")
    # other batching, other float rounding: a near-tie may flip one token's argmax
    assert max(accuracy, key=lambda m: m.step).value == pytest.approx(correct / predicted, abs=1.01 / predicted)


def test_exported_weights_equal_across_zero_stages(zero_runs):
    states = [from_pretrained(zero_runs[s][1]["model_dir"]).state_dict() for s in (0, 2, 3)]
    for other in states[1:]:
        for key, value in states[0].items():
            assert torch.allclose(value, other[key], atol=1e-5), key


def _ray_cli(ray_cluster, *args, timeout=600):
    ray = str(Path(sys.executable).parent / "ray")
    return subprocess.run([ray, "job", *args], env=ray_cluster.env, capture_output=True, text=True, timeout=timeout)


def _wait_for_step(cfg, step, timeout=300, jobs=None, job_id=None):
    """Wait until `step` of the run is logged; given a submitted job (`jobs`, a JobSubmissionClient, and `job_id`),
    stop waiting once it has ended, and show what it printed."""
    deadline = time.time() + timeout
    while True:
        try:
            _, history = loss_history(cfg)
        except (AssertionError, AttributeError):  # no experiment or run yet
            history = []
        if history and history[-1][0] >= step:
            return history[-1][0]
        if time.time() > deadline or (jobs and jobs.get_job_status(job_id).is_terminal()):
            break
        time.sleep(0.2)
    printed = ""
    if jobs:
        printed = f"; job {jobs.get_job_status(job_id)}, its output ends:\n{jobs.get_job_logs(job_id)[-4000:]}"
    raise TimeoutError(f"step {step} of {cfg.run.name} was never logged{printed}")


def test_ray_job_submit_end_to_end_and_after_a_killed_driver(ray_cluster, mlflow_server, store, tmp_path,
                                                          monkeypatch):
    """The README's path: `ray job submit -- python jobs/pretrain.py` against a token-auth cluster, tracking into
    the shared login server (the nodes hold its credentials; the submission carries none). The first submission's
    driver is SIGKILLed mid-run (its Train controller and workers die with it); submitting the same command again
    resumes from the last checkpoint into the same MLflow run and finishes it. The password shows up nowhere: not
    in the job's output, the run's params or tags."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    sets = small(store, "e2e", max_steps=30, checkpoint_every=10, log_every=5, lr=3e-3, warmup_steps=3)
    sets.append(f"run.tracking_uri={mlflow_server.url}")
    entry = [sys.executable.replace(" ", "\\ "), "jobs/pretrain.py", "--config", "jobs/configs/t5_pegasus_tiny_cpu.yaml"]
    for s in sets:
        entry += ["--set", s]
    submit = ["submit", "--address", ray_cluster.dashboard, "--working-dir", str(REPO)]
    cfg = load_config(CONFIG, sets)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", mlflow_server.username)  # this process reads the runs back
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", mlflow_server.password)

    first = _ray_cli(ray_cluster, *submit, "--no-wait", "--", *entry)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    job_id = re.search(r"raysubmit_\w+", first.stdout).group(0)
    jobs = JobSubmissionClient(ray_cluster.dashboard)
    # Ray Train may not have registered the step-10 checkpoint yet: resumed all the same
    _wait_for_step(cfg, 15, jobs=jobs, job_id=job_id)
    os.kill(int(jobs.get_job_info(job_id).driver_info.pid), signal.SIGKILL)
    deadline = time.time() + 60
    while not jobs.get_job_status(job_id).is_terminal() and time.time() < deadline:
        time.sleep(0.5)
    assert jobs.get_job_status(job_id) == JobStatus.FAILED
    assert loss_history(cfg)[0].info.status == "RUNNING"  # nobody closed the run: the driver died

    proc = _ray_cli(ray_cluster, *submit, "--", *entry)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "succeeded" in proc.stdout and f"{mlflow_server.url}/#/experiments/" in proc.stdout
    assert "[suformer] step 30/30" in proc.stdout and "ETA" in proc.stdout
    assert re.search(r"resumed from checkpoint at step (10|20)\b", proc.stdout), proc.stdout[-3000:]
    assert mlflow_server.password not in first.stdout + proc.stdout + proc.stderr

    run, history = loss_history(cfg)  # still one MLflow run for the name
    assert run.info.status == "FINISHED"
    assert run.data.tags["suformer.resumed_from"] in ("step-00000010", "step-00000020")
    assert [s for s, _ in history] == [5, 10, 15, 20, 25, 30]  # each step once
    assert run.data.params["train.zero_stage"] == "2" and run.data.params["model.family"] == "t5_pegasus"
    losses = [v for _, v in history]  # visibly falling, in training and on the held-out examples
    assert losses[-1] < losses[0] - 0.2 and sum(losses[3:]) < sum(losses[:3]) - 0.6, history
    validation = [v for _, v in loss_history(cfg, "val/loss")[1]]
    assert len(validation) == 3 and validation[-1] < validation[0], validation
    recorded = list(run.data.params.values()) + list(run.data.tags.values())
    assert not any(mlflow_server.password in str(value) for value in recorded)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(cfg.tracking_uri)
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")  # proxied by the server, no bucket creds in jobs
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"setup", "samples.txt"} <= artifacts
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # the UI opens on training runs
    (dataset,) = run.inputs.dataset_inputs  # the Dataset column: the shards, named by their fingerprint
    shards = Location.of(run.data.params["data.shards"])
    assert dataset.dataset.name == cfg.data.corpus and dataset.dataset.digest == shards.name[:36]
    assert shards.uri.startswith(f"{cfg.run.root}/data/") and shards.uri in dataset.dataset.source and {t.key: t.value for t in dataset.tags}["mlflow.data.context"] == "train"
    # The export as an MLflow 3 logged model of the run, at its last step, holding the save_pretrained files,
    # which the server proxies.
    (output,) = run.outputs.model_outputs
    model = client.get_logged_model(output.model_id)
    assert output.step == 30 and model.source_run_id == run.info.run_id and model.status == "READY"
    import mlflow.artifacts

    logged = Path(mlflow.artifacts.download_artifacts(model.artifact_location, dst_path=str(tmp_path / "logged"),
                                                      tracking_uri=cfg.tracking_uri))
    model_dir = (cfg.run_dir / "model").local_folder()  # the export, on S3
    exported = {p.name: p.read_bytes() for p in model_dir.iterdir()}
    assert {p.name: p.read_bytes() for p in logged.iterdir()} == exported and "config.json" in exported
    assert {"setup/deepspeed.json", "setup/vocab.txt", "setup/config.yaml"} <= {
        a.path for a in client.list_artifacts(run.info.run_id, "setup")}
    metrics = client.get_run(run.info.run_id).data.metrics
    assert any(k.startswith("system/") for k in metrics)
    assert metrics["data/documents"] == 600 and metrics["data/examples"] > 0 and metrics["val/loss"] > 0
    assert "[suformer] step 30/30 | val loss" in proc.stdout
    ours = from_pretrained(model_dir)
    from transformers import MT5ForConditionalGeneration

    theirs = MT5ForConditionalGeneration.from_pretrained(model_dir)
    assert theirs.config.vocab_size == ours.config.vocab_size


@pytest.fixture(scope="module")
def uninterrupted(zero_runs):
    """The fault tests' run without any fault (the ZeRO-1 run): its config, result and per-step losses."""
    cfg, result = zero_runs[FAULT_RUN["zero_stage"]]
    return cfg, result, [v for _, v in loss_history(cfg)[1]]


@pytest.fixture(scope="module")
def uninterrupted_losses(uninterrupted):
    return uninterrupted[2]


def _run_with_fault(cfg, fault):
    """Run `cfg`, calling `fault()` from a watcher thread once step 6 is logged; the run must survive it."""
    from suformer.pretrain.driver import run_pretraining

    done, errors = [], []

    def watch():
        try:
            _wait_for_step(cfg, 6)
            done.append(fault())
        except Exception as error:  # reported by the assertion below, not lost with the thread
            errors.append(repr(error))

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    result = run_pretraining(cfg)
    watcher.join(timeout=5)
    assert done, f"the fault was never injected: {errors or 'the watcher was still waiting'}"
    run, history = loss_history(cfg)  # one MLflow run for the name, asserted inside
    assert run.info.run_id == result["run_id"] and run.info.status == "FINISHED"
    assert [s for s, _ in history] == list(range(1, 13))  # every step exactly once
    state = json.loads((Location.of(result["checkpoint"]) / "train_state.json").read_text())
    assert state["run_id"] == result["run_id"] and state["step"] == 12
    return [v for _, v in history], done[0]


def _train_workers():
    from ray.util.state import list_actors

    # A generous timeout: the state API answers slowly on a loaded machine, and the fault must not miss its moment.
    return list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")], detail=True,
                       timeout=120)


def test_killed_worker_resumes_from_checkpoint_with_identical_losses(uninterrupted, store):
    def kill_one_worker():
        pid = _train_workers()[-1].pid
        os.kill(pid, signal.SIGKILL)
        return pid

    cfg = load_config(CONFIG, small(store, "faulty", **FAULT_RUN))
    losses, _ = _run_with_fault(cfg, kill_one_worker)
    assert losses == pytest.approx(uninterrupted[2], rel=1e-5)
    # and the held-out losses, the step-4 one from before the kill included (evaluating draws no random numbers)
    validation = [v for _, v in loss_history(cfg, "val/loss")[1]]
    assert validation == pytest.approx([v for _, v in loss_history(uninterrupted[0], "val/loss")[1]], rel=1e-5)


def _worker_node_of(pid: int):
    """The local cluster's worker node number hosting process `pid` (None on the head): Ray workers are children
    of their node's raylet, which runs in the node's temp dir (cluster/local_cluster.sh)."""
    parent = Path(f"/proc/{pid}/status").read_text().split("PPid:")[1].split()[0]
    found = re.search(r"suformer-ray-\d+-node(\d+)/", Path(f"/proc/{parent}/cmdline").read_text())
    return int(found.group(1)) if found else None


def test_lost_worker_node_the_run_finishes_on_the_remaining_nodes(ray_cluster, store, uninterrupted_losses):
    """A third node joins, the workers are spread over the nodes, and a node holding one of them is killed whole
    (raylet, agents, workers) mid-run: Ray marks it dead, Train restarts the group on the nodes left from the
    last checkpoint, and the losses equal the uninterrupted run's. The restarted workers find the checkpoint on
    S3; vocab, shards, checkpoints, MLflow artifacts and the exported model are there, nothing in a local run
    folder: MLflow's database is the one local file."""
    import ray

    subprocess.run([str(ray_cluster.script), "add-node", "--cpus", "3"], env=ray_cluster.node_env, check=True,
                   capture_output=True)
    deadline = time.time() + 60
    while ray.cluster_resources().get("CPU", 0) < 9 and time.time() < deadline:
        time.sleep(0.5)

    def remove_a_worker_node():
        node = next(n for n in map(_worker_node_of, (w.pid for w in _train_workers())) if n is not None)
        subprocess.run([str(ray_cluster.script), "remove-node", str(node)], env=ray_cluster.node_env, check=True,
                       capture_output=True)
        return node

    cfg = load_config(CONFIG, small(store, "node-lost", **FAULT_RUN, placement_strategy="SPREAD"))
    losses, _ = _run_with_fault(cfg, remove_a_worker_node)
    assert losses == pytest.approx(uninterrupted_losses, rel=1e-5)
    assert len([n for n in ray.nodes() if n["Alive"]]) == 2  # the suite's cluster size again
    written = Location.of(store.root).files()
    assert {"vocab", "data", "checkpoints", "node-lost", "mlartifacts"} <= {name.split("/")[0] for name in written}
    assert "node-lost/model/config.json" in written and "node-lost/model/vocab.txt" in written
    assert os.listdir(store.local) == ["mlflow.db"] and not Path("s3:").exists()



@pytest.fixture(scope="module")
def roformer_root(tmp_path_factory):
    return tmp_path_factory.mktemp("roformer")  # both objectives count the same character vocab: built once


@pytest.mark.parametrize("objective", ["mlm", "unilm"])
def test_roformer_v2_objectives_train_and_export(ray_cluster, roformer_root, tmp_path, objective):
    """Both objectives train and export. The MLM run trains in bf16 on the CPU (the GPU's precision path) with
    selective activation checkpointing, on packed rows, and logs what the step line shows. The UniLM run exports
    its best checkpoint instead of its last: a learning rate high enough that the validation loss turns back up, a
    checkpoint (and so a validation) at every step, one kept besides the best."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from mlflow.tracking import MlflowClient

    from suformer.pretrain.driver import run_pretraining

    best = objective == "unilm"
    steps = 4 if best else 3
    sets = [f"run.root={roformer_root}", f"run.name=roformer-{objective}", f"data.objective={objective}",
            "data.max_documents=400", "data.rows_per_shard=40", "data.validation_examples=20",
            "data.vocab_size=2000", "data.max_len=96", f"train.max_steps={steps}",
            f"train.checkpoint_every={1 if best else 3}", "train.log_every=1", "train.micro_batch_size=4",
            "train.samples_to_log=1"]
    if best:
        sets += ["train.export_checkpoint=best", "train.keep_checkpoints=1", f"train.lr={BEST_RUN_LR}",
                 "train.warmup_steps=0", "train.schedule=constant"]
    else:
        sets += ["train.precision=bf16", "train.activation_checkpointing=selective"]
    cfg = load_config(str(REPO / "jobs" / "configs" / "roformer_v2_tiny_cpu.yaml"), sets)
    result = run_pretraining(cfg)
    run, history = loss_history(cfg)
    assert [s for s, _ in history] == list(range(1, steps + 1)) and run.info.status == "FINISHED"
    model = from_pretrained(result["model_dir"])
    assert model.config.family == "roformer_v2" and model.config.vocab_size == 2000
    samples = MlflowClient(cfg.tracking_uri).download_artifacts(run.info.run_id, "samples.txt", str(tmp_path))
    assert "predicted:" in Path(samples).read_text()
    if not best:
        logged = run.data.metrics
        assert logged["train/real_token_share"] > 0.9  # packed rows
        assert logged["train/tflops_per_device"] > 0 and logged["train/memory_peak_rss_gib"] > 0.1
        assert "train/mfu" not in logged  # no peak is known for a CPU
        return
    _, validation = loss_history(cfg, "val/loss")
    assert [s for s, _ in validation] == [1, 2, 3, 4]
    best_step = min(validation, key=lambda sv: sv[1])[0]
    assert best_step < steps, f"the validation loss never turned up ({validation}): best and last coincide"
    assert run.data.tags["suformer.exported_checkpoint"] == f"step-{best_step:08d}"
    # Ray Train kept the best checkpoint and the latest (which resuming needs), nothing else.
    folders = {c.name: c for c in (Location.of(cfg.run.root) / "checkpoints" / cfg.run.name).folders()
               if c.name.startswith("step-")}
    assert sorted(folders) == [f"step-{best_step:08d}", f"step-{steps:08d}"]
    state = get_fp32_state_dict_from_zero_checkpoint(str(folders[f"step-{best_step:08d}"].path), tag="state")
    exported = model.state_dict()
    for key, value in state.items():
        assert torch.equal(exported[key], value.float()), key


def test_resubmitting_the_same_run_name_resumes_it(zero_runs):
    """A finished run extended with more steps continues from its last checkpoint, in the same MLflow run; also
    when Ray Train never registered that checkpoint (a driver killed between the workers writing it and the
    controller recording it leaves no snapshot naming it), and with fewer workers than wrote it (ZeRO-2 state
    loaded through a universal checkpoint: tests/test_resharding.py compares that state)."""
    from suformer.pretrain.driver import run_pretraining

    cfg, first = zero_runs[2]
    longer = cfg.model_copy(update={"train": cfg.train.model_copy(update={"max_steps": 16})})
    again = run_pretraining(longer)
    run, history = loss_history(longer)
    assert again["run_id"] == first["run_id"] == run.info.run_id
    assert run.data.tags["suformer.resumed_from"] == "step-00000012"
    assert [s for s, _ in history] == list(range(1, 17))
    assert Location.of(again["checkpoint"]).name == "step-00000016"

    # Ray Train's record of step 16 lost, and a node lost and not replaced: the run goes on from step 16 with one
    # worker, the global batch kept by grad_accum.
    snapshot = Location.of(cfg.run.root) / "checkpoints" / cfg.run.name / "checkpoint_manager_snapshot.json"
    snapshot.fs.delete_file(snapshot.path)
    fewer = cfg.model_copy(update={"train": cfg.train.model_copy(update={"max_steps": 20, "num_workers": 1,
                                                                         "grad_accum": 2})})
    again = run_pretraining(fewer)
    run, history = loss_history(fewer)
    assert again["run_id"] == first["run_id"]
    assert run.data.tags["suformer.resumed_from"] == "step-00000016"
    assert run.data.tags["suformer.resharded"] == "2 -> 1 workers"
    assert [s for s, _ in history] == list(range(1, 21))
    assert json.loads((Location.of(again["checkpoint"]) / "train_state.json").read_text())["world_size"] == 1


def test_damaged_latest_checkpoint_falls_back_to_the_previous_complete_one(uninterrupted):
    """A checkpoint truncated after it was written (a lost copy, a full disk) is recognised on resume from its
    manifest: resubmitting the finished uninterrupted run, whose newest checkpoint (step 12) is now damaged, trains
    steps 9-12 again from the previous complete one (step 8), ends with the same weights as before and writes a
    complete step-12 checkpoint in place of the damaged one."""
    from suformer.pretrain.run_checkpoints import checkpoint_problem
    from suformer.pretrain.driver import run_pretraining

    cfg, first, _ = uninterrupted
    before = from_pretrained(first["model_dir"]).state_dict()
    latest = Location.of(first["checkpoint"])
    assert latest.name == "step-00000012" and (latest.parent / "step-00000008").is_dir()
    files = latest.files()
    victim = max(files, key=files.get)  # the largest object of the checkpoint, cut in half in place
    (latest / victim).write_bytes((latest / victim).read_bytes()[: files[victim] // 2])

    again = run_pretraining(cfg)
    assert again["checkpoint"] == latest.uri and checkpoint_problem(latest) is None
    run, history = loss_history(cfg)
    assert run.data.tags["suformer.resumed_from"] == "step-00000008"
    assert f"step-00000012 ({victim} has" in run.data.tags["suformer.skipped_checkpoints"]
    assert [s for s, _ in history] == list(range(1, 13))
    after = from_pretrained(again["model_dir"]).state_dict()
    for key, value in before.items():
        assert torch.allclose(value, after[key], atol=1e-5), key


def test_checkpoint_problem_names_the_damage(tmp_path):
    from suformer.pretrain.run_checkpoints import checkpoint_problem, write_manifest

    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "shard.pt").write_bytes(b"x" * 100)
    (tmp_path / "train_state.json").write_text(json.dumps({"step": 2, "world_size": 1}))
    assert checkpoint_problem(tmp_path) == "manifest_rank0.json is missing"
    write_manifest(tmp_path, 0)
    assert checkpoint_problem(tmp_path) is None
    (tmp_path / "state" / "shard.pt").write_bytes(b"x" * 60)
    assert checkpoint_problem(tmp_path) == "state/shard.pt has 60 bytes, 100 were written"
    (tmp_path / "state" / "shard.pt").unlink()
    assert checkpoint_problem(tmp_path) == "state/shard.pt is missing"
    # another rank's files still being copied in: an empty or cut JSON file is an incomplete checkpoint
    for name in ("manifest_rank0.json", "train_state.json"):
        full = (tmp_path / name).read_text()
        for part in ("", full[: len(full) // 2]):
            (tmp_path / name).write_text(part)
            assert checkpoint_problem(tmp_path) == f"{name} is incomplete"
        (tmp_path / name).write_text(full)


def _model_with_a_damaged_token(zero_runs, out_dir):
    """The stage-0 run's exported model with one token's embedding row set to inf, as in a damaged checkpoint:
    every micro-batch holding that token has a NaN loss, the others train normally. The token is one that the
    first micro-batch of neither worker holds, and about one example in twenty does."""
    import pyarrow.parquet as pq
    from mlflow.tracking import MlflowClient

    cfg, result = zero_runs[0]
    run = MlflowClient(cfg.tracking_uri).get_run(result["run_id"])
    shards = Location.of(run.data.params["data.shards"])
    tables = [pq.read_table(f, filesystem=shards.fs) for f in shard_files(shards)]  # worker r reads [r::workers]
    rows = [set(r["input_ids"]) | set(r["target_ids"]) for t in tables for r in t.to_pylist()]
    first_batches = set().union(*(set(r["input_ids"]) | set(r["target_ids"])
                                  for t in tables[:2] for r in t.slice(0, 4).to_pylist()))
    frequency = {}
    for tokens in rows:
        for t in tokens:
            frequency[t] = frequency.get(t, 0) + 1
    token = min((t for t in frequency if t not in first_batches and t > 105),
                key=lambda t: abs(frequency[t] / len(rows) - 0.05))
    model = from_pretrained(result["model_dir"])
    with torch.no_grad():
        model.shared.weight[token] = float("inf")
    model.save_pretrained(out_dir)
    (Path(out_dir) / "vocab.txt").write_bytes((Location.of(result["model_dir"]) / "vocab.txt").read_bytes())
    return out_dir


def _nonfinite_entries(state_dict):
    return sum(int((~torch.isfinite(v)).sum()) for v in state_dict.values())


@pytest.fixture(scope="module")
def damaged_model(zero_runs, tmp_path_factory):
    return _model_with_a_damaged_token(zero_runs, tmp_path_factory.mktemp("damaged_model"))


# The damaged row is inf from the start, so the config's adamw_scale (steps scaled by each weight's RMS) would turn
# the whole embedding non-finite at the first step; AdamW's steps are per element, so only that row stays damaged
# and a NaN reaching any other weight shows. Batches in the order the examples were written: the damaged token was
# chosen from that order (in no worker's first micro-batch, in about one example in twenty), while grouped batches
# would start from a shuffled window and might not meet it within the run.
PER_ELEMENT_STEPS = dict(optimizer="adamw", lr=1e-3, batching="sequential")


def test_nonfinite_loss_is_skipped_on_every_rank_and_counted(damaged_model, store):
    from mlflow.tracking import MlflowClient

    from suformer.pretrain.driver import run_pretraining

    cfg = load_config(CONFIG, small(store, "skip-nan", max_steps=6, checkpoint_every=3, max_failures=0,
                                    nonfinite_loss="skip", zero_stage=3, **PER_ELEMENT_STEPS)
                      + [f"model.init_from={damaged_model}"])
    result = run_pretraining(cfg)
    run, history = loss_history(cfg)
    assert run.info.status == "FINISHED" and [s for s, _ in history] == list(range(1, 7))
    assert all(torch.isfinite(torch.tensor(v)) for _, v in history)
    skipped = MlflowClient(cfg.tracking_uri).get_metric_history(run.info.run_id, "train/nonfinite_skipped")
    assert max(m.value for m in skipped) > 0, "the damaged token never came up: no skip was exercised"
    state = json.loads((Location.of(result["checkpoint"]) / "train_state.json").read_text())
    assert state["nonfinite_skipped"] == max(m.value for m in skipped)
    exported = from_pretrained(result["model_dir"]).state_dict()
    assert _nonfinite_entries(exported) == exported["shared.weight"].shape[1], "a skipped NaN reached the weights"


def test_nonfinite_loss_can_stop_the_run_keeping_the_last_good_checkpoint(damaged_model, store):
    from suformer.pretrain.driver import TrainingStopped, run_pretraining

    cfg = load_config(CONFIG, small(store, "stop-nan", max_steps=20, checkpoint_every=1, max_failures=0,
                                    nonfinite_loss="stop", **PER_ELEMENT_STEPS)
                      + [f"model.init_from={damaged_model}"])
    with pytest.raises(TrainingStopped, match=r"non-finite loss at step (\d+)") as stop:
        run_pretraining(cfg)
    stopped_at = int(re.search(r"non-finite loss at step (\d+)", str(stop.value)).group(1))
    run, history = loss_history(cfg)
    assert run.info.status == "FAILED" and "non-finite loss" in run.data.tags["suformer.stopped"]
    assert [s for s, _ in history] == list(range(1, stopped_at))
    checkpoints = [c for c in (Location.of(cfg.run.root) / "checkpoints" / "stop-nan").folders()
                   if c.name.startswith("step-")]
    assert checkpoints[-1].name == f"step-{stopped_at - 1:08d}" and checkpoints[-1].uri in str(stop.value)
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoints[-1].local_folder()), tag="state")
    assert _nonfinite_entries(state) == state["shared.weight"].shape[1]  # only the damaged row


def test_a_converted_mt5_pretrains_through_the_job(ray_cluster, store, tiny_mt5, tmp_path):
    """The T5 PEGASUS path: `jobs/convert.py mt5-to-t5-pegasus`, then `jobs/pretrain.py` with model.init_from. The
    run trains the converted model on its own vocab: the export keeps the vocab, and its weights are a few small
    steps from the converted ones (a fresh initialisation would be nowhere near them)."""
    from test_config import pretrain_main
    from test_convert import convert_main

    mt5_dir, vocab = tiny_mt5
    converted = tmp_path / "t5_pegasus"
    assert convert_main()(["mt5-to-t5-pegasus", "--mt5", str(mt5_dir), "--vocab", str(vocab),
                           "--out", str(converted)]) == 0
    sets = small(store, "from-mt5", max_steps=3, checkpoint_every=3, optimizer="adamw", lr=1e-3) + [
        f"model.init_from={converted}"]
    assert pretrain_main()(["--config", CONFIG] + [a for s in sets for a in ("--set", s)]) == 0
    cfg = load_config(CONFIG, sets)
    run, history = loss_history(cfg)
    assert run.info.status == "FINISHED" and [s for s, _ in history] == [1, 2, 3]
    exported = cfg.run_dir / "model"
    assert (exported / "vocab.txt").read_bytes() == (converted / "vocab.txt").read_bytes()
    start, end = from_pretrained(converted).state_dict(), from_pretrained(exported.uri).state_dict()
    assert start.keys() == end.keys()
    for key in start:
        moved = (end[key] - start[key]).norm() / start[key].norm()
        assert 0 < moved < 0.1, f"{key} moved by {moved:.3f} of its norm"
