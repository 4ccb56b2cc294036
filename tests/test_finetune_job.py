"""`jobs/finetune.py`: shipped configs, bad configs and data (exit 2 before any run exists), and a real run tracked
in MLflow."""
import importlib.util
import re
from pathlib import Path

import pytest

from suformer.config import FinetuneConfig, load_config

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "jobs" / "configs").glob("finetune_*.yaml"))


def finetune_main(argv):
    spec = importlib.util.spec_from_file_location("finetune_job", REPO / "jobs" / "finetune.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(argv)


def senteval_folder(folder: Path, bad_test_line: str = "") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for split in ("train", "valid", "test"):
        (folder / f"demo.{split}.data").write_text("今天天气很好\t天气不错\t1\n这家店很差\t服务很好\t0\n"
                                                   + (bad_test_line if split == "test" else ""), encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """Su's releases (the tiny fixtures of their layouts) converted as the benchmark configs say, by family."""
    from test_convert import convert_main

    folders = {}
    for family, name in (("roformer_v2", "chinese_roformer-v2-char_tiny"), ("t5_pegasus", "chinese_t5_pegasus_tiny")):
        folders[family] = tmp_path_factory.mktemp("released") / family
        src = REPO / "tests" / "fixtures" / "bert4keras" / name
        assert convert_main()(["bert4keras", "--src", str(src), "--out", str(folders[family])]) == 0
    return folders


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_shipped_finetune_configs_validate(path, tmp_path, released):
    """With their data and model folders in place (the configs name where users put them)."""
    import yaml

    overrides = []
    if "similarity" in path.stem:
        overrides.append(f"data.path={senteval_folder(tmp_path / 'pairs')}")
    if "classification" in path.stem or "title" in path.stem:
        (tmp_path / "data").mkdir()
        overrides.append(f"data.path={tmp_path / 'data'}")
    model = yaml.safe_load(path.read_text(encoding="utf-8"))["model"]
    if model.get("init_from"):
        overrides.append(f"model.init_from={released[model['family']]}")
    cfg = load_config(str(path), overrides, schema=FinetuneConfig)
    assert cfg.data.task in path.stem


@pytest.mark.parametrize("overrides, message", [
    (["model.family=t5_pegasus"], "data.task 'ner' fine-tunes roformer_v2, not model.family 't5_pegasus'"),
    (["tricks.rdrop_alpha=4"], "R-Drop's KL compares softmax outputs, which task 'ner' does not have"),
    (["tricks.exposure_bias_replace=0.3"], "tricks.exposure_bias_replace is a seq2seq trick"),
    (["data.task=similarity"], "the similarity task needs a senteval_cn folder"),
    (["tricks.ptuning=prompt"], "tricks.ptuning casts classification as MLM at [MASK]"),
    (["tricks.ladder_side_layers=2"], "Ladder Side-Tuning is built for the classification tasks"),
    (["data.task=sentiment", "tricks.ladder_side_layers=2", "tricks.adversarial=fgm"],
     "freezes the whole pretrained model, so tricks.adversarial"),
    (["data.task=sentiment", "tricks.prompt_tuning_tokens=20", "tricks.lora_r=8"],
     "tricks.prompt_tuning_tokens: prompt tuning freezes the whole pretrained model, so tricks.lora_r"),
    (["tricks.simcse=true"], "tricks.simcse trains sentence embeddings: use it with data.task=similarity"),
    (["tricks.lora_r=8", "tricks.adversarial=fgm"], "LoRA (tricks.lora_r) freezes"),
    (["model.init_from=/nonexistent/model"], "model.init_from '/nonexistent/model' has no config.json or vocab.txt"),
    (["data.max_len=3"], "data.max_len: Input should be greater than or equal to 8"),
])
def test_bad_finetune_configs_exit_2_naming_the_problem(overrides, message, capsys):
    argv = ["--config", str(REPO / "jobs" / "configs" / "finetune_ner_tiny_cpu.yaml")]
    for item in overrides:
        argv += ["--set", item]
    assert finetune_main(argv) == 2
    assert message in capsys.readouterr().err


def test_malformed_pair_data_exits_2_naming_file_and_line_before_a_run_exists(tmp_path, capsys):
    folder = senteval_folder(tmp_path / "pairs", bad_test_line="只有一列\n")
    argv = ["--config", str(REPO / "jobs" / "configs" / "finetune_similarity_cosent.yaml"),
            "--set", f"data.path={folder}", "--set", f"run.root={tmp_path / 'runs'}"]
    assert finetune_main(argv) == 2
    assert "demo.test.data:3: expected text1<TAB>text2<TAB>label, got 1 fields" in capsys.readouterr().err
    assert not (tmp_path / "runs" / "mlflow.db").exists()


def test_ner_job_learns_entities_and_tracks_the_run_in_mlflow(tmp_path, capsys):
    """The README's fine-tuning command on People's Daily NER: a randomly initialised RoFormerV2 tiny learns
    entities in seconds (an untrained pointer scores 0 F1), and the MLflow run holds params, per-epoch metrics
    and the best model."""
    from mlflow.tracking import MlflowClient

    from suformer.finetune.loop import load_finetuned

    argv = ["--config", str(REPO / "jobs" / "configs" / "finetune_ner_tiny_cpu.yaml"), "--set", f"run.root={tmp_path}",
            "--set", "data.max_train_examples=1200", "--set", "data.max_eval_examples=200", "--set", "data.max_len=64"]
    assert finetune_main(argv) == 0
    out = capsys.readouterr().out
    assert "[suformer] epoch 3/3 | loss" in out and "mlflow ui --backend-store-uri" in out
    assert re.search(r"http://127.0.0.1:5000/#/experiments/\d+\?workflowType=machine_learning", out)  # training view
    cfg = load_config(argv[1], argv[3::2], schema=FinetuneConfig)
    client = MlflowClient(cfg.tracking_uri)
    experiment = client.get_experiment_by_name(cfg.run.experiment)
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["data.task"] == "ner"
    losses = [m.value for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert len(losses) == 3 and losses[-1] < losses[0] / 2
    assert run.data.metrics["best_dev/f1"] > 0.3 and run.data.metrics["test/f1"] > 0.3, run.data.metrics
    (output,) = run.outputs.model_outputs  # the best model as an MLflow 3 logged model of the run
    assert output.step == 3 and client.get_logged_model(output.model_id).source_run_id == run.info.run_id
    assert {a.path for a in client.list_logged_model_artifacts(output.model_id)} >= {"model.pt", "vocab.txt"}
    inputs = {({t.key: t.value for t in d.tags}["mlflow.data.context"], d.dataset.name) for d in run.inputs.dataset_inputs}
    assert inputs == {("train", "ner"), ("dev", "ner"), ("test", "ner")}
    model, tokenizer, saved = load_finetuned(Path(cfg.run_dir.path) / "model")
    assert saved == cfg and type(model).__name__ == "GlobalPointerNER" and len(tokenizer) <= cfg.data.vocab_size


def test_sigterm_mid_run_ends_the_job_and_marks_its_mlflow_run_killed(tmp_path):
    """`ray job stop` sends the job SIGTERM: the process ends with 15 and the MLflow run says KILLED, not RUNNING
    for ever."""
    import signal
    import subprocess
    import sys

    from mlflow.tracking import MlflowClient

    sets = [f"run.root={tmp_path}", "data.max_train_examples=64", "data.max_eval_examples=16", "data.max_len=32",
            "train.batch_size=16", "train.epochs=1000"]
    argv = [sys.executable, "jobs/finetune.py"] + [a for s in sets for a in ("--set", s)]
    proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:  # until an epoch has been logged on the run
        if "[suformer] epoch 1/1000" in line:
            break
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 15, out[-3000:]
    cfg = load_config(None, sets, schema=FinetuneConfig)
    client = MlflowClient(cfg.tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name(cfg.run.experiment).experiment_id])
    assert run.info.status == "KILLED" and "train/loss" in run.data.metrics


def test_a_run_that_fails_mid_training_stops_sampling_system_metrics(tmp_path):
    """The run's system-metrics thread ends with the loop however it ends, so nothing keeps writing to a run its
    owner has already marked FAILED."""
    import threading

    from suformer import tracking
    from suformer.finetune.loop import finetune

    cfg = load_config(None, [f"run.root={tmp_path}", "data.max_train_examples=32", "data.max_eval_examples=16",
                             "data.max_len=32", "train.epochs=3"], schema=FinetuneConfig)
    run_id, _ = tracking.open_run(cfg.tracking_uri, cfg.run.experiment, cfg.run.name, run_root=tmp_path)

    def fail_after_the_first_epoch(metrics):
        assert any(t.name == "SystemMetricsMonitor" for t in threading.enumerate()), "the monitor should be sampling"
        raise RuntimeError("a failure mid-training")

    with pytest.raises(RuntimeError, match="mid-training"), tracking.owned_run(cfg.tracking_uri, run_id):
        finetune(cfg, run_id, report=fail_after_the_first_epoch)
    assert not [t for t in threading.enumerate() if t.name == "SystemMetricsMonitor" and t.is_alive()]
