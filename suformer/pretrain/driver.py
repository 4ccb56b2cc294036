"""Pretraining driver: config -> vocab + Parquet shards (Ray Data) -> TorchTrainer (DeepSpeed workers) -> export.

The driver owns the MLflow run (found again by run name when a job is resubmitted) and the final export; the
workers (`worker.train_loop_per_worker`) train and checkpoint into Ray Train storage under the run root. The run root
is a local or shared folder or an object-store prefix (`storage.Location`): vocab, shards, checkpoints and the
exported model all go through it, so the nodes need no shared filesystem.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
from pathlib import Path

import yaml
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from ..config import RESUBMIT_MUTABLE, PretrainConfig
from ..models.checkpoints import untied_state
from ..padding import IGNORE_INDEX
from ..ray_connect import connect_or_start
from ..storage import Location
from ..tokenizer import Tokenizer
from ..train.engine import deepspeed_config, deepspeed_process_settings
from .data.corpus import DataError, preflight
from .data.dataset import READY, ensure_vocab, prepare_shards, shard_rows
from .data.objectives import OBJECTIVES
from .run_checkpoints import CHECKPOINT_TAG
from .validation import split_validation
from .worker import STOPPED_TAG, pretraining_model, train_loop_per_worker

class TrainingStopped(RuntimeError):
    """The workers stopped the run on purpose (a non-finite loss); the latest checkpoint is the last good state."""


def _export(checkpoint, cfg: PretrainConfig, vocab_size: int, out_dir: Path) -> Path:
    """Consolidate the final DeepSpeed checkpoint (any ZeRO stage) into fp32 weights and save_pretrained them."""
    import torch

    deepspeed_process_settings(on_gpu=False)  # the consolidation runs on the driver's CPU
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with checkpoint.as_directory() as d:
        if cfg.train.zero_stage == 0:
            state = torch.load(Path(d) / CHECKPOINT_TAG / "mp_rank_00_model_states.pt", map_location="cpu",
                               weights_only=False)["module"]
        else:
            with contextlib.redirect_stdout(io.StringIO()):  # its step-by-step prints; errors still raise
                state = get_fp32_state_dict_from_zero_checkpoint(d, tag=CHECKPOINT_TAG)
    # The trained model's architecture: init_from's when set (its dimensions need not be a preset's), whose
    # weights the checkpoint's then replace.
    model = pretraining_model(cfg, vocab_size)
    missing, unexpected = model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    tied = set(model.state_dict()) - set(untied_state(model))  # the checkpoint may hold one copy only
    if unexpected or set(missing) - tied:
        raise RuntimeError(f"checkpoint does not match the model: missing {missing}, unexpected {unexpected}")
    model.save_pretrained(out_dir)
    return out_dir


def _checkpoint_to_export(result, train) -> tuple:
    """(checkpoint, its step): the last one, or the kept one with the lowest validation loss."""
    if train.export_checkpoint == "last":
        return result.checkpoint, train.max_steps
    scored = [(metrics["val_loss"], metrics["step"], checkpoint) for checkpoint, metrics in result.best_checkpoints
              if "val_loss" in metrics]
    loss, step, checkpoint = min(scored, key=lambda s: s[:2])
    print(f"[suformer] exporting the checkpoint of step {step}: lowest validation loss of the {len(scored)} kept "
          f"({loss:.4f})", flush=True)
    return checkpoint, step


def _samples(cfg: PretrainConfig, model_dir: Path, file: str, fs, count: int) -> str:
    """A few generations (T5) or MLM predictions (RoFormerV2) of the exported model on the first examples of
    `file` (a held-out one when there is validation)."""
    import pyarrow.parquet as pq
    import torch

    from ..models import from_pretrained
    from .batches import collate

    tokenizer = Tokenizer.from_pretrained(model_dir)
    model = from_pretrained(model_dir)
    rows = pq.read_table(file, filesystem=fs).slice(0, count).to_pylist()
    lines = []
    for row in rows:
        batch = collate(cfg.data.objective, [row])
        if cfg.data.objective == "pegasus":
            generated = model.generate(batch["input_ids"], max_new_tokens=min(cfg.data.max_target_len, 64))[0]
            lines += [f"source:    {tokenizer.decode(row['input_ids'])}",
                      f"reference: {tokenizer.decode(row['target_ids'])}",
                      f"generated: {tokenizer.decode(generated)}", ""]
        else:
            with torch.no_grad():
                logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits[0]
            predicted = [int(i) if lab == IGNORE_INDEX else int(logits[t].argmax())
                         for t, (i, lab) in enumerate(zip(batch["input_ids"][0], batch["labels"][0]))]
            lines += [f"input:     {tokenizer.decode(row['input_ids'])}",
                      f"predicted: {tokenizer.decode(predicted)}", ""]
    return "\n".join(lines)


def run_pretraining(cfg: PretrainConfig, corpus=None) -> dict:
    """Run (or resume) the configured pretraining; returns where the results are. `corpus` is the job's
    `corpus.preflight(cfg.data)`, made before anything started (made here when not given)."""
    from .. import tracking

    root = Location.of(cfg.run.root)
    # A local instance gets logical CPUs for the workers plus their Ray Data readers.
    connect_or_start(num_cpus=int(max(os.cpu_count() or 1, cfg.train.num_workers * cfg.train.cpus_per_worker + 2)))

    corpus = corpus or preflight(cfg.data)
    vocab = ensure_vocab(cfg.data, root, cfg.model.init_from, corpus)
    tokenizer = Tokenizer(vocab.local_file(), pre_tokenize=OBJECTIVES[cfg.data.objective].pre_tokenize)
    shards = prepare_shards(cfg.data, vocab, root, corpus)
    rows = shard_rows(shards)
    files, held_out = split_validation(list(rows), list(rows.values()), cfg.data.validation_examples)
    stats = json.loads((shards / READY).read_text())
    if len(files) < cfg.train.num_workers:
        raise DataError(f"data: {len(files)} shards to train on (of {len(rows)}, data.validation_examples="
                        f"{cfg.data.validation_examples} holding out {len(held_out)}) cannot feed train.num_workers="
                        f"{cfg.train.num_workers}; lower data.rows_per_shard, data.validation_examples or "
                        "train.num_workers")
    validation_rows = sum(rows[f] for f in held_out)
    print(f"[suformer] data: {stats['documents']} documents -> {stats['examples']} examples in "
          f"{stats['shards']} shards at {shards}"
          + (f"; {validation_rows} held out for validation ({len(held_out)} shards)" if held_out else ""), flush=True)
    repaired = {k: v for k, v in stats.items() if k.startswith(("skipped", "undecodable", "documents_with")) and v}
    if repaired:
        print(f"[suformer] data: skipped or repaired (also in MLflow as data/*): {repaired}", flush=True)

    uri = cfg.tracking_uri
    run_id, resumed = tracking.open_run(uri, cfg.run.experiment, cfg.run.name, run_root=root,
                                        tags={"model.family": cfg.model.family, "data.objective": cfg.data.objective})
    # Outside the owned block: a resubmission whose settings conflict with the run's is refused here, and must not
    # mark the earlier attempt's run FAILED.
    _log_setup(cfg, uri, run_id, shards, stats, validation_rows, tokenizer)
    with tracking.owned_run(uri, run_id):
        print(f"[suformer] MLflow run {run_id} ({'resumed' if resumed else 'new'}) in {uri}", flush=True)
        if tracking.run_tags(uri, run_id).get(STOPPED_TAG):
            tracking.delete_tag(uri, run_id, STOPPED_TAG)  # this attempt will set it again if it stops too

        storage = root / "checkpoints"  # Ray Train keeps this run's checkpoints in storage / run name
        result = _trainer(cfg, uri, run_id, len(tokenizer), storage, shards, files, held_out).fit()
        stopped = tracking.run_tags(uri, run_id).get(STOPPED_TAG)
        if stopped:
            latest = Location(storage.fs, result.checkpoint.path).uri if result.checkpoint else "none yet"
            raise TrainingStopped(f"training stopped: {stopped}. Last good checkpoint: {latest}. Resubmitting the "
                                  "same run.name resumes from it (--set train.nonfinite_loss=skip to skip the bad "
                                  "batches)")
        model_dir = _export_and_log(cfg, uri, run_id, result, storage, tokenizer, shards, (held_out or files)[0])
    return {"run_id": run_id, "model_dir": model_dir.uri, "tracking_uri": uri,
            "checkpoint": Location(storage.fs, result.checkpoint.path).uri,
            "experiment": cfg.run.experiment}


def _log_setup(cfg: PretrainConfig, uri: str, run_id: str, shards: Location, stats: dict, validation_rows: int,
               tokenizer: Tokenizer) -> None:
    """The run's params, data counts (`stats`: the shards' READY record), dataset and setup files."""
    from .. import tracking

    tracking.log_params(uri, run_id, {**cfg.flat(), "data.shards": shards.uri, "data.examples": stats["examples"],
                                      "data.validation_rows": validation_rows},
                        mutable=RESUBMIT_MUTABLE)
    # Documents, examples and what the data stage skipped or repaired (empty, over-long, NUL, invalid UTF-8).
    tracking.log_counts(uri, run_id, {k: v for k, v in stats.items() if isinstance(v, int)}, prefix="data/")
    # The shards as the run's dataset: their folder's name is the fingerprint of what made them.
    tracking.log_dataset(uri, run_id, name=cfg.data.corpus, source=shards.uri, digest=shards.name, context="train")
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "deepspeed.json").write_text(json.dumps(deepspeed_config(cfg.train.engine_settings()), indent=2))
        (Path(tmp) / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(), allow_unicode=True, sort_keys=False))
        tokenizer.save_pretrained(tmp)
        tracking.log_artifacts(uri, run_id, tmp, "setup")


def _trainer(cfg: PretrainConfig, uri: str, run_id: str, vocab_size: int, storage: Location, shards: Location,
             files: list, held_out: list) -> TorchTrainer:
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg.model_dump(), "run_id": run_id, "tracking_uri": uri,
                           "vocab_size": vocab_size, "checkpoints": (storage / cfg.run.name).uri,
                           "shards": shards.uri, "shard_files": files,
                           "validation_files": held_out},
        scaling_config=ScalingConfig(num_workers=cfg.train.num_workers, use_gpu=cfg.train.use_gpu,
                                     resources_per_worker={"CPU": cfg.train.cpus_per_worker},
                                     placement_strategy=cfg.train.placement_strategy),
        run_config=RunConfig(
            name=cfg.run.name, storage_path=storage.path, storage_filesystem=None if storage.is_local else storage.fs,
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            # By validation loss with export_checkpoint=best; Ray Train also keeps the latest, which resuming needs.
            checkpoint_config=CheckpointConfig(
                num_to_keep=cfg.train.keep_checkpoints, checkpoint_score_order="min",
                checkpoint_score_attribute="val_loss" if cfg.train.export_checkpoint == "best" else None),
        ),
    )


def _export_and_log(cfg: PretrainConfig, uri: str, run_id: str, result, storage: Location, tokenizer: Tokenizer,
                    shards: Location, sample_file: str) -> Location:
    """Export the chosen checkpoint to run.root/<run.name>/model and log it on the run (with samples of it on
    `sample_file` when configured); returns the model folder."""
    from .. import tracking

    model_dir = cfg.run_dir / "model"
    checkpoint, step = _checkpoint_to_export(result, cfg.train)
    tracking.set_tag(uri, run_id, "suformer.exported_checkpoint", Location(storage.fs, checkpoint.path).name)
    with tempfile.TemporaryDirectory() as tmp:  # made here, then copied to the run root (maybe object storage)
        exported = _export(checkpoint, cfg, len(tokenizer), Path(tmp) / "model")
        tokenizer.save_pretrained(exported)
        tracking.log_model(uri, run_id, str(exported), name=cfg.run.name, step=step, model_type=cfg.model.family)
        if cfg.train.samples_to_log:
            samples = _samples(cfg, exported, sample_file, shards.fs, cfg.train.samples_to_log)
            tracking.log_text(uri, run_id, samples, "samples.txt")
        model_dir.upload(exported)
    return model_dir
