"""Fine-tuning with tricks: one process, plain PyTorch or a one-process DeepSpeed engine (`train.zero_stage`),
tracked in MLflow (a Ray Tune trial runs exactly this).

Written once against the Task interface (tasks/base.py): sentiment classification, sentence-pair similarity, NER
and idiom generation share the loop. Each epoch trains with the configured tricks, evaluates on dev (with the EMA
weights when EMA is on), logs to MLflow and hands the metrics to `report` (Tune's). The best dev epoch's weights
are kept and scored on test, as Su does ("best dev checkpoint, then test").
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import math
import os
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from tqdm import tqdm

from ..config import FinetuneConfig
from ..storage import Location
from ..tokenizer import Tokenizer, build_vocab, write_vocab
from ..train.efficiency import apply_efficiency
from ..train.engine import deepspeed_engine
from ..train.memory import peak_memory_gib
from ..train.model import model_from
from ..train.optimizers import Adafactor, adamw
from ..train.schedules import lr_schedule
from ..train.seeding import seed_everything
from .tasks import task_for
from .tasks.base import Task
from .tricks import Trick, active_tricks
from .tricks.lora import trainable_parameters


def _tokenizer(cfg: FinetuneConfig, train_texts: list[str]) -> Tokenizer:
    if cfg.model.init_from:
        return Tokenizer.from_pretrained(Location.of(cfg.model.init_from).local_folder())
    d = cfg.data  # the vocab depends on exactly the training texts and its size
    source = f"{d.task}|{d.path}|{d.split_seed}|{d.max_train_examples}|{d.vocab_size}"
    key = hashlib.sha256(source.encode()).hexdigest()[:16]
    path = Path(cfg.run.root).expanduser() / "vocab" / f"finetune-{key}" / "vocab.txt"
    if not path.exists():  # written once, atomically: concurrent trials share it
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.partial")
        write_vocab(build_vocab(train_texts, cfg.data.vocab_size, words=False), partial)
        partial.replace(path)
    return Tokenizer(path, pre_tokenize=None)


def build_model_for(cfg: FinetuneConfig, task: Task, tokenizer: Tokenizer,
                    tricks: Optional[list[Trick]] = None) -> torch.nn.Module:
    """The task's model on a fresh or pretrained encoder, as the active tricks build and wrap it."""
    m, tricks = cfg.model, active_tricks(cfg) if tricks is None else tricks
    overrides = {"dropout": m.dropout, **({"attention_backend": m.attention_backend} if m.attention_backend else {})}
    for trick in tricks:
        overrides = trick.model_overrides(overrides)
    encoder = model_from(m.family, m.preset, init_from=m.init_from, vocab_size=len(tokenizer), **overrides)
    heads = [head for trick in tricks if (head := trick.head(task, encoder, tokenizer)) is not None]
    model = heads[0] if heads else task.head(encoder, tokenizer)
    for trick in tricks:
        model = trick.wrap_model(model, task)
    return model


@torch.no_grad()
def evaluate(task: Task, model, features, batch_size: int) -> dict[str, float]:
    was_training = model.training
    model.eval()
    try:
        return task.evaluate(model, features, batch_size)
    finally:
        model.train(was_training)


def save_finetuned(out: dict, cfg: FinetuneConfig, folder: Path) -> None:
    """The best model's weights (LoRA merged), its tokenizer and the fine-tuning config, in one folder."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(out["model"].state_dict(), folder / "model.pt")
    out["tokenizer"].save_pretrained(folder)
    (folder / "finetune.json").write_text(cfg.model_dump_json(indent=2))


def load_finetuned(folder: Path) -> tuple[torch.nn.Module, Tokenizer, FinetuneConfig]:
    """What `save_finetuned` wrote, as a ready model (no LoRA wrapper: the adapters are merged)."""
    cfg = FinetuneConfig.model_validate_json((folder / "finetune.json").read_text())
    plain = cfg.model_copy(update={"tricks": cfg.tricks.model_copy(update={"lora_r": 0})})
    tokenizer = Tokenizer.from_pretrained(folder)
    model = build_model_for(plain, task_for(plain), tokenizer)
    model.load_state_dict(torch.load(folder / "model.pt", weights_only=True))
    return model.eval(), tokenizer, cfg


def _encoded_splits(cfg: FinetuneConfig, task: Task, splits: Optional[dict], run_id: Optional[str]):
    """(tokenizer, {split: encoded rows}), each split cut to its configured size; the rows each split used are
    logged as the run's datasets, identified by content (the runs table's Dataset column)."""
    from .. import tracking

    splits = splits or task.splits()
    rows = {"train": splits["train"][: cfg.data.max_train_examples],
            **{name: splits[name][: cfg.data.max_eval_examples] for name in ("dev", "test")}}
    tokenizer = _tokenizer(cfg, list(task.texts(rows["train"])))
    if run_id:
        source = task.source()
        for split, used in rows.items():
            tracking.log_dataset(cfg.tracking_uri, run_id, name=cfg.data.task, source=source,
                                 digest=hashlib.sha256(repr(used).encode()).hexdigest(), context=split)
    return tokenizer, {split: task.encode(used, tokenizer) for split, used in rows.items()}


def _optimizer(cfg: FinetuneConfig, model, trainable: list, tricks: list[Trick], train_size: int):
    """(optimizer, schedule, steps per epoch): AdamW or Adafactor over the tricks' parameter groups, a linear
    warm-up, then linear decay to 0 or constant."""
    t = cfg.train
    groups = [{"params": trainable, "lr": t.lr, "weight_decay": t.weight_decay}]
    for trick in tricks:
        groups = trick.parameter_groups(model, groups)
    if t.optimizer == "adafactor":  # one tensor per group: each step is relative to its own weight's RMS
        optimizer = Adafactor([{**g, "params": [p]} for g in groups for p in g["params"]], beta1=0.9)
    else:
        optimizer = adamw(groups, offloaded=t.zero_stage is not None and t.offload_optimizer)
    steps_per_epoch = math.ceil(train_size / t.batch_size)
    total = steps_per_epoch * t.epochs
    return optimizer, lr_schedule(optimizer, int(total * t.warmup_ratio), total, t.schedule), steps_per_epoch


class _Steps:
    """One optimizer step at a time, with the tricks' hooks where they act: plain PyTorch, or a one-process
    DeepSpeed engine (which then owns clipping, the optimizer and the schedule)."""

    def __init__(self, cfg: FinetuneConfig, model, trainable: list, optimizer, schedule, tricks: list[Trick]):
        self.t, self.model, self.trainable, self.tricks = cfg.train, model, trainable, tricks
        self.optimizer, self.schedule = optimizer, schedule
        self.engine = None if cfg.train.zero_stage is None else deepspeed_engine(
            model, optimizer, schedule, cfg.train.engine_settings(torch.cuda.is_available()))
        self.backward = self.engine.backward if self.engine else torch.Tensor.backward

    def loss_closure(self, batch: dict):
        for trick in self.tricks:
            batch = trick.transform_batch(batch, self.model)
        closures = [c for trick in self.tricks if (c := trick.loss(batch, self.model)) is not None]
        return closures[0] if closures else lambda: self.model(**batch).loss

    def __call__(self, batch: dict) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        compute_loss = self.loss_closure(batch)
        losses = [loss for trick in self.tricks if (loss := trick.backward(compute_loss, self.backward)) is not None]
        if losses:
            loss = losses[0]
        else:
            loss = compute_loss()
            self.backward(loss)
        for trick in self.tricks:
            trick.after_backward()
        if self.engine:
            self.engine.step()
        else:
            if self.t.grad_clip:
                torch.nn.utils.clip_grad_norm_(self.trainable, self.t.grad_clip)
            self.optimizer.step()
            self.schedule.step()
        for trick in self.tricks:
            trick.after_step(self.model)
        return loss.item()


def _scored_model(model, tricks: list[Trick]):
    """The model evaluated and kept: the trained one, or what a trick keeps instead (EMA's average)."""
    return next((m for trick in tricks if (m := trick.eval_model(model)) is not None), model)


def finetune(cfg: FinetuneConfig, run_id: Optional[str] = None,
             report: Optional[Callable[[dict], None]] = None, splits: Optional[dict] = None,
             progress: bool = False) -> dict:
    """Train, evaluate each epoch, test the best dev epoch. Metrics go to MLflow run `run_id` (if given) and to
    `report`. `splits`: the task's data when already read; `progress`: a bar with ETA per epoch. Returns the final
    metrics and the best model (LoRA merged)."""
    from .. import tracking

    t = cfg.train
    torch.set_num_threads(t.threads)
    seed_everything(t.seed)
    task = task_for(cfg)
    tokenizer, data = _encoded_splits(cfg, task, splits, run_id)
    # A GPU when the process sees one (Ray gives a trial the GPUs it reserved: sweep.gpus_per_trial).
    task.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tricks = active_tricks(cfg)
    model = build_model_for(cfg, task, tokenizer, tricks).to(task.device)
    apply_efficiency(model, t.activation_checkpointing, t.activation_checkpointing_every, t.compile)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer, schedule, steps_per_epoch = _optimizer(cfg, model, trainable, tricks, len(data["train"]))
    for trick in tricks:
        trick.setup(model, trainable, task, data["train"])
    step = _Steps(cfg, model, trainable, optimizer, schedule, tricks)

    # Closed however the loop ends: its system-metrics thread would otherwise go on sampling into an ended run.
    logger = tracking.MetricLogger(cfg.tracking_uri, run_id, history_keys=(f"dev/{task.metric}",)) if run_id else None
    with logger or contextlib.nullcontext():
        best, best_state, metrics = -math.inf, None, {}
        model.train()
        for epoch in range(1, t.epochs + 1):
            started = time.perf_counter()
            batches = task.batches(data["train"], t.batch_size, shuffle_seed=t.seed * 1000 + epoch)
            losses = [step(batch) for batch in tqdm(batches, total=steps_per_epoch, desc=f"epoch {epoch}/{t.epochs}",
                                                    disable=not progress, mininterval=5)]
            epoch_time = time.perf_counter() - started
            scored = _scored_model(model, tricks)
            dev_metrics = evaluate(task, scored, data["dev"], t.batch_size)
            metrics = {"epoch": epoch, "train/loss": float(np.mean(losses)),
                       "train/lr": max(g["lr"] for g in optimizer.param_groups),  # at the epoch's end
                       **{f"dev/{k}": v for k, v in dev_metrics.items()}, "time/epoch_s": epoch_time,
                       "memory/peak_mb": peak_memory_gib(task.device) * 1024,
                       "params/trainable": trainable_parameters(model)}
            score = dev_metrics[task.metric]
            score = -math.inf if math.isnan(score) else score  # e.g. Spearman of constant predictions: never the best
            if best_state is None or score > best:
                best, best_state = score, copy.deepcopy(scored.state_dict())
            if logger:
                logger.log(epoch, {k: v for k, v in metrics.items() if k != "epoch"})
            if report:
                report(metrics)

        final = _scored_model(model, tricks)
        final.load_state_dict(best_state)
        for trick in tricks:
            final = trick.final_model(final)
        tested = {f"test/{k}": v for k, v in evaluate(task, final, data["test"], t.batch_size).items()}
        summary = {**metrics, f"best_dev/{task.metric}": best, **tested}
        if logger:
            logger.log(t.epochs, {k: summary[k] for k in (f"best_dev/{task.metric}", *tested)}, replayed_steps="log")
    return {"metrics": summary, "model": final, "tokenizer": tokenizer}
