"""Fine-tuning with tricks: one process, plain PyTorch, tracked in MLflow (a Ray Tune trial runs exactly this).

Each epoch trains with the configured tricks, evaluates on dev (with the EMA weights when EMA is on), logs to
MLflow and hands the metrics to `report` (Tune's). The best dev epoch's weights are kept and scored on test, as Su
does ("best dev checkpoint, then test").
"""
from __future__ import annotations

import copy
import hashlib
import math
import os
import random
import resource
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from ..config import FinetuneConfig
from ..models import build_model, from_pretrained
from ..tasks.classification import SequenceClassifier, classification_metrics
from ..tasks.sentiment import LABELS, sentiment_splits
from ..tokenizer import Tokenizer, build_vocab, write_vocab
from ..tricks.adversarial import fgm_backward, gradient_penalty, pgd_backward
from ..tricks.child_tuning import ChildTuningD, ChildTuningF
from ..tricks.ema import ema_model
from ..tricks.layerwise_lr import layerwise_lr_groups
from ..tricks.lora import apply_lora, trainable_parameters
from ..tricks.rdrop import rdrop_loss, repeat_for_rdrop


def _tokenizer(cfg: FinetuneConfig, train_texts: list[str]) -> Tokenizer:
    if cfg.model.init_from:
        return Tokenizer.from_pretrained(cfg.model.init_from)
    key = hashlib.sha256(f"{cfg.data.task}|{cfg.data.split_seed}|{cfg.data.vocab_size}".encode()).hexdigest()[:16]
    path = Path(cfg.run.root).expanduser() / "vocab" / f"finetune-{key}" / "vocab.txt"
    if not path.exists():  # written once, atomically: concurrent trials share it
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.partial")
        write_vocab(build_vocab(train_texts, cfg.data.vocab_size, words=False), partial)
        partial.replace(path)
    return Tokenizer(path, pre_tokenize=None)


def _batches(rows: list[tuple[list[int], int]], batch_size: int, shuffle_seed: Optional[int] = None):
    order = list(range(len(rows)))
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(order)
    for start in range(0, len(order), batch_size):
        chosen = [rows[i] for i in order[start:start + batch_size]]
        longest = max(len(ids) for ids, _ in chosen)
        ids = torch.zeros(len(chosen), longest, dtype=torch.long)
        for i, (row, _) in enumerate(chosen):
            ids[i, :len(row)] = torch.tensor(row)
        yield {"input_ids": ids, "labels": torch.tensor([label for _, label in chosen])}


def build_classifier(cfg: FinetuneConfig, vocab_size: int) -> torch.nn.Module:
    m = cfg.model
    # The gradient penalty differentiates through attention twice: only the reference backend can.
    backend = "reference" if cfg.tricks.adversarial == "gradient_penalty" else m.attention_backend
    overrides = {"dropout": m.dropout, **({"attention_backend": backend} if backend else {})}
    encoder = from_pretrained(m.init_from, **overrides) if m.init_from else \
        build_model(m.family, m.preset, vocab_size=vocab_size, **overrides)
    model = SequenceClassifier(encoder, num_labels=len(LABELS), pooling=m.pooling, dropout=m.dropout)
    if cfg.tricks.lora_r:
        model = apply_lora(model, m.family, r=cfg.tricks.lora_r, alpha=cfg.tricks.lora_alpha,
                           trainable_modules=["classifier"])
    return model


@torch.no_grad()
def evaluate(model, rows, batch_size: int) -> dict[str, float]:
    was_training = model.training
    model.eval()
    predicted, labels = [], []
    for batch in _batches(rows, batch_size):
        predicted += model(input_ids=batch["input_ids"]).logits.argmax(-1).tolist()
        labels += batch["labels"].tolist()
    model.train(was_training)
    return classification_metrics(predicted, labels)


def _peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB; the process's peak RSS


def finetune(cfg: FinetuneConfig, run_id: Optional[str] = None,
             report: Optional[Callable[[dict], None]] = None) -> dict:
    """Train, evaluate each epoch, test the best dev epoch. Metrics go to MLflow run `run_id` (if given) and to
    `report`. Returns the final metrics and the best model (LoRA merged)."""
    from .. import tracking

    t, tricks = cfg.train, cfg.tricks
    torch.set_num_threads(t.threads)
    torch.manual_seed(t.seed)
    random.seed(t.seed)
    np.random.seed(t.seed)
    splits = sentiment_splits(cfg.data.split_seed)
    train_rows = splits["train"][: cfg.data.max_train_examples]
    tokenizer = _tokenizer(cfg, [text for text, _ in train_rows])

    def encode(rows):
        return [(tokenizer.encode(text, cfg.data.max_len), label) for text, label in rows]

    train = encode(train_rows)
    dev = encode(splits["dev"][: cfg.data.max_eval_examples])
    test = encode(splits["test"][: cfg.data.max_eval_examples])

    model = build_classifier(cfg, len(tokenizer))
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = layerwise_lr_groups(model, t.lr, tricks.layerwise_lr_decay, t.weight_decay) \
        if tricks.layerwise_lr_decay else [{"params": trainable, "lr": t.lr, "weight_decay": t.weight_decay}]
    for group in groups:
        group.pop("names", None)
    optimizer = torch.optim.AdamW(groups)
    steps_per_epoch = math.ceil(len(train) / t.batch_size)
    total, warmup = steps_per_epoch * t.epochs, int(steps_per_epoch * t.epochs * t.warmup_ratio)
    schedule = torch.optim.lr_scheduler.LambdaLR(  # linear warm-up, then linear decay to 0
        optimizer, lambda s: s / warmup if s < warmup else max(0.0, (total - s) / max(1, total - warmup)))

    embedding = None if tricks.lora_r else model.word_embeddings
    child = None
    if tricks.child_tuning == "F":
        child = ChildTuningF(trainable, tricks.child_tuning_p)
    elif tricks.child_tuning == "D":  # one pass over the training set first, counted in the first epoch's time
        child = ChildTuningD.from_fisher(
            model, lambda: (model(**b).loss for b in _batches(train, t.batch_size)), tricks.child_tuning_p)
    ema = ema_model(model, tricks.ema_decay) if tricks.ema_decay else None

    def loss_of(batch):
        if tricks.rdrop_alpha:
            doubled = repeat_for_rdrop(batch)
            return lambda: rdrop_loss(model(input_ids=doubled["input_ids"]).logits, doubled["labels"],
                                      tricks.rdrop_alpha)
        return lambda: model(**batch).loss

    logger = tracking.MetricLogger(cfg.tracking_uri, run_id, history_key="dev/accuracy") if run_id else None
    best, best_state, metrics = -1.0, None, {}
    model.train()
    for epoch in range(1, t.epochs + 1):
        started, losses = time.perf_counter(), []
        for batch in _batches(train, t.batch_size, shuffle_seed=t.seed * 1000 + epoch):
            optimizer.zero_grad(set_to_none=True)
            compute_loss = loss_of(batch)
            if tricks.adversarial == "fgm":
                loss, _ = fgm_backward(compute_loss, embedding, tricks.adversarial_epsilon)
            elif tricks.adversarial == "pgd":
                loss, _ = pgd_backward(compute_loss, embedding, trainable, tricks.adversarial_epsilon,
                                       tricks.pgd_alpha, tricks.pgd_steps)
            elif tricks.adversarial == "gradient_penalty":
                loss = gradient_penalty(compute_loss(), embedding, tricks.adversarial_epsilon)
                loss.backward()
            else:
                loss = compute_loss()
                loss.backward()
            if child:
                child.mask_gradients()
            if t.grad_clip:
                torch.nn.utils.clip_grad_norm_(trainable, t.grad_clip)
            optimizer.step()
            schedule.step()
            if ema:
                ema.update_parameters(model)
            losses.append(loss.item())
        epoch_time = time.perf_counter() - started
        scored = ema.module if ema else model
        dev_metrics = evaluate(scored, dev, t.batch_size)
        metrics = {"epoch": epoch, "train/loss": float(np.mean(losses)), "dev/accuracy": dev_metrics["accuracy"],
                   "dev/macro_f1": dev_metrics["macro_f1"], "time/epoch_s": epoch_time,
                   "memory/peak_mb": _peak_memory_mb(), "params/trainable": trainable_parameters(model)}
        if dev_metrics["accuracy"] > best:
            best, best_state = dev_metrics["accuracy"], copy.deepcopy(scored.state_dict())
        if logger:
            logger.log(epoch, {k: v for k, v in metrics.items() if k != "epoch"})
        if report:
            report(metrics)

    final = ema.module if ema else model
    final.load_state_dict(best_state)
    if tricks.lora_r:
        final = final.merge_and_unload()
    test_metrics = evaluate(final, test, t.batch_size)
    summary = {**metrics, "best_dev/accuracy": best, "test/accuracy": test_metrics["accuracy"],
               "test/macro_f1": test_metrics["macro_f1"]}
    if logger:
        logger.log(t.epochs, {k: summary[k] for k in ("best_dev/accuracy", "test/accuracy", "test/macro_f1")},
                   replayed_steps="log")
        logger.close()
    return {"metrics": summary, "model": final, "tokenizer": tokenizer}
