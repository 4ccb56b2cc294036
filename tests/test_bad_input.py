"""Bad input on the cluster's side of the data stage (the corpus reader's own cases are in test_corpus): a bad line
past the preflight's sample, damaged prepared shards (left as they are and rebuilt, never trained on), vocabs that
do not fit `model.init_from`."""
import json
import os
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from suformer.config import DataSection
from suformer.pretrain.data.corpus import DataError
from suformer.pretrain.data.dataset import _shards_problem, prepare_shards

from test_config import pretrain_main


def _shard_dir(tmp_path, rows=(3, 2)):
    directory = tmp_path / "shards"
    directory.mkdir()
    for i, n in enumerate(rows):
        pq.write_table(pa.table({"input_ids": [[1, 2]] * n}), directory / f"shard-{i:05d}.parquet")
    ready = {"documents": 5, "examples": sum(rows), "shards": len(rows),
             "shard_rows": {f"shard-{i:05d}.parquet": n for i, n in enumerate(rows)}}
    (directory / "_READY.json").write_text(json.dumps(ready))
    return directory


def test_shard_damage_is_named(tmp_path):
    directory = _shard_dir(tmp_path)
    assert _shards_problem(directory) is None
    pq.write_table(pa.table({"input_ids": [[1, 2]] * 2}), directory / "shard-00000.parquet")
    assert _shards_problem(directory) == f"{directory / 'shard-00000.parquet'} has 2 rows, 3 were written"
    (directory / "shard-00001.parquet").write_bytes(b"garbage")
    (directory / "shard-00000.parquet").unlink()
    assert _shards_problem(directory) == f"{directory / 'shard-00000.parquet'} is missing"


@pytest.mark.slow
def test_damaged_shards_on_object_storage_are_kept_and_rebuilt(ray_cluster, s3_server, tmp_path, vocab_file):
    """Shards written to a real S3 API by the cluster's tasks (no renames: a fresh build folder, the marker last);
    a shard damaged afterwards is found, the damaged build is left as it is and a new build replaces it."""
    from suformer.storage import Location

    root = f"s3://{s3_server.bucket}/{tmp_path.name}"
    data = DataSection(corpus="peoples_daily", max_documents=120, rows_per_shard=20, vocab_size=3000)
    first = prepare_shards(data, vocab_file, root)
    assert first.uri.startswith(root) and not first.is_local
    ready = json.loads((first / "_READY.json").read_text())
    assert ready["documents"] == 120 and sum(ready["shard_rows"].values()) == ready["examples"]
    assert all(name.startswith(ready["build"] + "/shard-") for name in ready["shard_rows"])
    victim = first / next(iter(ready["shard_rows"]))
    victim.write_bytes(victim.read_bytes()[:100])

    again = prepare_shards(data, vocab_file, root)
    assert again == first and _shards_problem(again) is None
    rebuilt = json.loads((again / "_READY.json").read_text())
    assert rebuilt["build"] != ready["build"]
    assert sorted(rebuilt["shard_rows"].values()) == sorted(ready["shard_rows"].values())  # the same examples
    assert len(victim.read_bytes()) == 100  # the damaged build is kept, not deleted
    assert not Location.of(tmp_path / "data").exists()  # nothing written locally


def _checkpoint_dir(path, vocab_tokens):
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"family": "roformer_v2", "vocab_size": len(vocab_tokens)}))
    (path / "vocab.txt").write_text("\n".join(vocab_tokens) + "\n")
    return path


def test_init_from_uses_its_own_vocab_and_rejects_any_other(tmp_path):
    from suformer.pretrain.data.dataset import vocab_for_init

    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "甲", "乙"]
    model = _checkpoint_dir(tmp_path / "model", tokens)
    assert vocab_for_init(str(model), None).path == str(model / "vocab.txt")
    other = tmp_path / "other.txt"
    other.write_text("\n".join(tokens[:-1]) + "\n")
    with pytest.raises(DataError, match=r"other\.txt has 6 tokens, model\.init_from .* has vocab_size 7"):
        vocab_for_init(str(model), str(other))
    other.write_text("\n".join(tokens[:-1] + ["丙"]) + "\n")
    with pytest.raises(DataError, match="same size, different tokens"):
        vocab_for_init(str(model), str(other))
    with pytest.raises(DataError, match="is not a save_pretrained directory"):
        vocab_for_init(str(tmp_path), None)


def test_init_from_on_object_storage_gives_the_same_model_and_vocab(s3_server, tmp_path, char_vocab_file):
    """A save_pretrained folder on S3 as `model.init_from`: the vocab is its own vocab.txt there, and the model a
    worker builds from it equals the one built from the local folder it was uploaded from."""
    import torch

    from suformer.config import PretrainConfig
    from suformer.pretrain.data.dataset import vocab_for_init
    from suformer.models import build_model, from_pretrained
    from suformer.storage import Location
    from suformer.pretrain.worker import pretraining_model

    vocab = char_vocab_file.read_text(encoding="utf-8")
    model = build_model("roformer_v2", "tiny", vocab_size=len(vocab.splitlines()))
    model.save_pretrained(tmp_path / "model")
    (tmp_path / "model" / "vocab.txt").write_text(vocab, encoding="utf-8")
    remote = Location.of(f"s3://{s3_server.bucket}/init-from-{os.getpid()}/model")
    remote.upload(tmp_path / "model")

    assert vocab_for_init(remote.uri, None) == remote / "vocab.txt"
    cfg = PretrainConfig.model_validate({"model": {"family": "roformer_v2", "init_from": remote.uri},
                                         "data": {"objective": "mlm"}})
    built, local = pretraining_model(cfg, model.config.vocab_size).state_dict(), from_pretrained(tmp_path / "model").state_dict()
    assert built.keys() == local.keys() and all(torch.equal(built[k], local[k]) for k in local)
    # The folder written again with files of the same sizes (a re-run's export): the node's copy is not reused.
    time.sleep(1.1)  # object stores keep modification times to the second
    again = build_model("roformer_v2", "tiny", vocab_size=len(vocab.splitlines()))
    again.save_pretrained(tmp_path / "again")
    (tmp_path / "again" / "vocab.txt").write_text(vocab, encoding="utf-8")
    remote.upload(tmp_path / "again")
    reloaded, fresh = from_pretrained(remote.uri).state_dict(), again.state_dict()
    assert not all(torch.equal(fresh[k], local[k]) for k in local)
    assert all(torch.equal(reloaded[k], fresh[k]) for k in fresh)
    with pytest.raises(DataError, match="is not a save_pretrained directory"):
        vocab_for_init(f"s3://{s3_server.bucket}/init-from-{os.getpid()}/nothing-here", None)


def test_init_from_vocab_mismatch_exits_2_before_anything_starts(tmp_path, capsys):
    model = _checkpoint_dir(tmp_path / "model", ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    other = tmp_path / "vocab.txt"
    other.write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\n甲\n")
    config = tmp_path / "c.yaml"
    config.write_text(f"model: {{family: roformer_v2, init_from: '{model}'}}\n"
                      f"data: {{objective: mlm, vocab: '{other}'}}\n")
    assert pretrain_main()(["--config", str(config)]) == 2
    assert "has 6 tokens, model.init_from" in capsys.readouterr().err


def test_vocab_is_built_without_the_documents_training_skips(ray_cluster, tmp_path):
    from suformer.pretrain.data.dataset import ensure_vocab
    from suformer.tokenizer import load_vocab

    corpus = tmp_path / "c.txt"
    corpus.write_text("今天天气很好。\n" * 5 + "龘" * 80 + "\n")
    data = DataSection(corpus=str(corpus), vocab_size=200, max_document_chars=50, objective="mlm")
    vocab = load_vocab(ensure_vocab(data, tmp_path).local_file())

    assert "天" in vocab and "龘" not in vocab


def test_resubmitting_a_run_name_with_other_settings_exits_2_before_anything_starts(tmp_path, capsys):
    """MLflow params cannot change: a resubmission that would train differently is refused up front, naming the
    keys; settings that only extend or watch the run (max_steps, ...) may change."""
    from suformer import tracking
    from suformer.config import RESUBMIT_MUTABLE, load_config

    config = "jobs/configs/t5_pegasus_tiny_cpu.yaml"
    sets = [f"run.root={tmp_path}", "run.name=taken"]
    cfg = load_config(config, sets)
    run_id, _ = tracking.open_run(cfg.tracking_uri, cfg.run.experiment, cfg.run.name)
    tracking.log_params(cfg.tracking_uri, run_id, cfg.flat())
    tracking.finish_run(cfg.tracking_uri, run_id)

    args = ["--config", config] + [a for s in sets + ["train.lr=0.5", "train.max_steps=999"] for a in ("--set", s)]
    assert pretrain_main()(args) == 2
    err = capsys.readouterr().err
    assert "run.name 'taken' already exists with other values for train.lr:" in err and "max_steps" not in err
    recorded = tracking.recorded_params(cfg.tracking_uri, cfg.run.experiment, cfg.run.name)
    longer = load_config(config, sets + ["train.max_steps=999"])
    assert tracking.changed_settings(recorded, longer.flat(), RESUBMIT_MUTABLE) == []
    from mlflow.tracking import MlflowClient

    assert MlflowClient(cfg.tracking_uri).get_run(run_id).info.status == "FINISHED"  # untouched


@pytest.mark.slow
def test_a_bad_line_past_the_preflight_sample_stops_the_stage_naming_it(ray_cluster, tmp_path, vocab_file, news):
    corpus = tmp_path / "big.jsonl"
    lines = [json.dumps({"text": news[i % len(news)]}, ensure_ascii=False) for i in range(6000)]  # > 1 MiB
    corpus.write_text("\n".join(lines[:5000] + ['{"text": "坏"'] + lines[5000:]) + "\n")
    assert corpus.stat().st_size > 2**20
    data = DataSection(corpus=str(corpus), rows_per_shard=200)
    with pytest.raises(DataError, match=r"big\.jsonl:5001: not a JSON object") as raised:
        prepare_shards(data, vocab_file, tmp_path)
    assert "Traceback" not in str(raised.value)
    assert not list((tmp_path / "data").glob("*/_READY.json"))  # nothing marked ready


def test_an_object_storage_run_root_without_a_tracking_store_or_a_bucket_exits_2(tmp_path, capsys, monkeypatch):
    """MLflow's database cannot live in a bucket: the job says which setting to add before anything starts; a
    bucket that does not exist or cannot be reached is named too."""
    from suformer.config import FinetuneConfig

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    args = ["--config", "jobs/configs/t5_pegasus_tiny_cpu.yaml", "--set", "run.root=s3://bucket/runs"]
    assert pretrain_main()(args) == 2
    assert "run.root='s3://bucket/runs' is on object storage" in capsys.readouterr().err
    tracking = ["--set", f"run.tracking_uri=sqlite:///{tmp_path}/mlflow.db"]
    with monkeypatch.context() as unreachable:  # AWS' own endpoint: no such host here
        unreachable.delenv("AWS_ENDPOINT_URL", raising=False)
        assert pretrain_main()(args + tracking) == 2
        assert "error: run.root 's3://bucket/runs': " in capsys.readouterr().err
    if os.environ.get("AWS_ENDPOINT_URL"):  # the suite's S3 server, when it runs: a bucket it does not have
        assert pretrain_main()(args + tracking) == 2
        assert "error: run.root 's3://bucket/runs': bucket 'bucket' not found" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
    with pytest.raises(ValueError, match="fine-tuning keeps its runs on a local or shared filesystem"):
        FinetuneConfig.model_validate({"run": {"root": "s3://bucket/runs"}})
