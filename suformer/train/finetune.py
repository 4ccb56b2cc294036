"""Fine-tuning with tricks: one process, plain PyTorch or a one-process DeepSpeed engine (`train.zero_stage`),
tracked in MLflow (a Ray Tune trial runs exactly this).

Written once against the Task interface (tasks/base.py): sentiment classification, sentence-pair similarity, NER
and idiom generation share the loop. Each epoch trains with the configured tricks, evaluates on dev (with the EMA
weights when EMA is on), logs to MLflow and hands the metrics to `report` (Tune's). The best dev epoch's weights
are kept and scored on test, as Su does ("best dev checkpoint, then test").
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
from tqdm import tqdm

from ..config import FinetuneConfig
from ..models import build_model, from_pretrained
from ..storage import Location
from ..tasks import task_for
from ..tasks.base import Task
from ..tokenizer import Tokenizer, build_vocab, write_vocab
from ..tricks.adversarial import fgm_backward, gradient_penalty, pgd_backward
from ..tricks.child_tuning import ChildTuningD, ChildTuningF
from ..tricks.ema import ema_model
from ..tricks.exposure_bias import replace_decoder_inputs
from ..tricks.layerwise_lr import layerwise_lr_groups
from ..tricks.lora import apply_lora, trainable_parameters
from ..tricks.rdrop import rdrop_loss, repeat_for_rdrop
from ..tricks.simcse import simcse_loss
from ..tricks.sparse_softmax import sparse_softmax_cross_entropy
from .optimizers import Adafactor, adamw


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


def build_model_for(cfg: FinetuneConfig, task: Task, tokenizer: Tokenizer) -> torch.nn.Module:
    """The task's model on a fresh or pretrained encoder, LoRA-wrapped when `tricks.lora_r` is set."""
    m = cfg.model
    # The gradient penalty differentiates through attention twice: only the reference backend can.
    backend = "reference" if cfg.tricks.adversarial == "gradient_penalty" else m.attention_backend
    overrides = {"dropout": m.dropout, **({"attention_backend": backend} if backend else {})}
    encoder = from_pretrained(m.init_from, **overrides) if m.init_from else \
        build_model(m.family, m.preset, vocab_size=len(tokenizer), **overrides)
    model = task.head(encoder, tokenizer)
    if cfg.tricks.lora_r:
        model = apply_lora(model, m.family, r=cfg.tricks.lora_r, alpha=cfg.tricks.lora_alpha,
                           trainable_modules=task.head_modules or None)
    return model


@torch.no_grad()
def evaluate(task: Task, model, features, batch_size: int) -> dict[str, float]:
    was_training = model.training
    model.eval()
    try:
        return task.evaluate(model, features, batch_size)
    finally:
        model.train(was_training)


def _peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB; the process's peak RSS


def _deepspeed_engine(model, optimizer, schedule, t):
    """A one-process DeepSpeed engine around the model, optimizer and schedule (a Tune trial is its own process,
    so the process group is a group of one)."""
    import torch.distributed as dist

    from .deepspeed_config import deepspeed_process_settings, use_bf16

    deepspeed_process_settings(torch.cuda.is_available())
    import deepspeed
    from .jit_ops import load_deepspeed_ops, ops_for

    load_deepspeed_ops(ops_for(torch.cuda.is_available()))
    if not dist.is_initialized():
        import socket

        with socket.socket() as s:  # a free port for the group's rendezvous
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "LOCAL_RANK": "0",
                           "WORLD_SIZE": "1"}.items():
            os.environ.setdefault(key, value)
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo", verbose=False)
    zero: dict = {"stage": t.zero_stage}
    if t.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
    config = {"train_micro_batch_size_per_gpu": t.batch_size, "gradient_accumulation_steps": 1,
              "gradient_clipping": t.grad_clip, "zero_optimization": zero,
              "bf16": {"enabled": use_bf16(t.precision, torch.cuda.is_available())},
              "steps_per_print": 10**9}
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=schedule, config=config)
    return engine


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


def finetune(cfg: FinetuneConfig, run_id: Optional[str] = None,
             report: Optional[Callable[[dict], None]] = None, splits: Optional[dict] = None,
             progress: bool = False) -> dict:
    """Train, evaluate each epoch, test the best dev epoch. Metrics go to MLflow run `run_id` (if given) and to
    `report`. `splits`: the task's data when already read; `progress`: a bar with ETA per epoch. Returns the final
    metrics and the best model (LoRA merged)."""
    from .. import tracking

    t, tricks = cfg.train, cfg.tricks
    torch.set_num_threads(t.threads)
    torch.manual_seed(t.seed)
    random.seed(t.seed)
    np.random.seed(t.seed)
    task = task_for(cfg)
    splits = splits or task.splits()
    train_rows = splits["train"][: cfg.data.max_train_examples]
    tokenizer = _tokenizer(cfg, list(task.texts(train_rows)))
    train = task.encode(train_rows, tokenizer)
    dev = task.encode(splits["dev"][: cfg.data.max_eval_examples], tokenizer)
    test = task.encode(splits["test"][: cfg.data.max_eval_examples], tokenizer)
    if run_id:  # the rows each split used, identified by content: the runs table's Dataset column
        source = task.source()
        for split, rows in (("train", train_rows), ("dev", splits["dev"][: cfg.data.max_eval_examples]),
                            ("test", splits["test"][: cfg.data.max_eval_examples])):
            tracking.log_dataset(cfg.tracking_uri, run_id, name=cfg.data.task, source=source,
                                 digest=hashlib.sha256(repr(rows).encode()).hexdigest(), context=split)

    # A GPU when the process sees one (Ray gives a trial the GPUs it reserved: sweep.gpus_per_trial).
    task.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_model_for(cfg, task, tokenizer).to(task.device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    # P-tuning's prompt-only mode trains 8 rows of the embedding matrix: weight decay would shrink all the others.
    decay = 0.0 if tricks.ptuning == "prompt" else t.weight_decay
    groups = layerwise_lr_groups(model, t.lr, tricks.layerwise_lr_decay, decay) \
        if tricks.layerwise_lr_decay else [{"params": trainable, "lr": t.lr, "weight_decay": decay}]
    for group in groups:
        group.pop("names", None)
    if t.optimizer == "adafactor":  # one tensor per group: each step is relative to its own weight's RMS
        optimizer = Adafactor([{**g, "params": [p]} for g in groups for p in g["params"]], beta1=0.9)
    else:
        optimizer = adamw(groups, offloaded=t.zero_stage is not None and t.offload_optimizer)
    steps_per_epoch = math.ceil(len(train) / t.batch_size)
    total, warmup = steps_per_epoch * t.epochs, int(steps_per_epoch * t.epochs * t.warmup_ratio)
    schedule = torch.optim.lr_scheduler.LambdaLR(  # linear warm-up, then linear decay to 0 or constant
        optimizer, lambda s: s / warmup if s < warmup else 1.0 if t.schedule == "constant" else
        max(0.0, (total - s) / max(1, total - warmup)))

    embedding = None if tricks.lora_r else task.embedding(model)
    child = None
    if tricks.child_tuning == "F":
        child = ChildTuningF(trainable, tricks.child_tuning_p)
    elif tricks.child_tuning == "D":  # one pass over the training set first, counted in the first epoch's time
        child = ChildTuningD.from_fisher(
            model, lambda: (model(**b).loss for b in task.batches(train, t.batch_size)), tricks.child_tuning_p)
    ema = ema_model(model, tricks.ema_decay) if tricks.ema_decay else None
    replacement_rng = torch.Generator().manual_seed(t.seed)
    engine = _deepspeed_engine(model, optimizer, schedule, t) if t.zero_stage is not None else None
    backward = engine.backward if engine else torch.Tensor.backward

    def loss_of(batch):
        if tricks.exposure_bias_replace:  # seq2seq: the decoder reads a partly wrong prefix
            batch = {**batch, "decoder_input_ids": replace_decoder_inputs(
                model.shift_right(batch["labels"]), batch["labels"], token_prob=tricks.exposure_bias_replace,
                generator=replacement_rng)}
        if tricks.rdrop_alpha:
            doubled = repeat_for_rdrop(batch)
            inputs = {k: v for k, v in doubled.items() if k != "labels"}
            if "decoder_input_ids" not in inputs and task.family == "t5_pegasus":
                inputs["decoder_input_ids"] = model.shift_right(doubled["labels"])
            return lambda: rdrop_loss(model(**inputs).logits, doubled["labels"], tricks.rdrop_alpha)
        if tricks.simcse:  # both sides of each pair as unlabelled sentences, each seen twice (two dropout masks)
            return lambda: (simcse_loss(model.embed(batch["input_ids"].repeat_interleave(2, 0)))
                            + simcse_loss(model.embed(batch["pair_input_ids"].repeat_interleave(2, 0)))) / 2
        if tricks.sparse_softmax_k:
            return lambda: sparse_softmax_cross_entropy(model(**batch).logits, batch["labels"],
                                                        tricks.sparse_softmax_k)
        return lambda: model(**batch).loss

    logger = tracking.MetricLogger(cfg.tracking_uri, run_id, history_keys=(f"dev/{task.metric}",)) if run_id else None
    best, best_state, metrics = -math.inf, None, {}
    model.train()
    for epoch in range(1, t.epochs + 1):
        started, losses = time.perf_counter(), []
        for batch in tqdm(task.batches(train, t.batch_size, shuffle_seed=t.seed * 1000 + epoch), total=steps_per_epoch,
                          desc=f"epoch {epoch}/{t.epochs}", disable=not progress, mininterval=5):
            optimizer.zero_grad(set_to_none=True)
            compute_loss = loss_of(batch)
            if tricks.adversarial == "fgm":
                loss, _ = fgm_backward(compute_loss, embedding, tricks.adversarial_epsilon, backward,
                                       one_backward=engine is not None)
            elif tricks.adversarial == "pgd":
                loss, _ = pgd_backward(compute_loss, embedding, trainable, tricks.adversarial_epsilon,
                                       tricks.pgd_alpha, tricks.pgd_steps, backward, one_backward=engine is not None)
            elif tricks.adversarial == "gradient_penalty":
                loss = gradient_penalty(compute_loss(), embedding, tricks.adversarial_epsilon)
                backward(loss)
            else:
                loss = compute_loss()
                backward(loss)
            if child:
                child.mask_gradients()
            if engine:  # clipping, the optimizer and the schedule, as configured in _deepspeed_engine
                engine.step()
            else:
                if t.grad_clip:
                    torch.nn.utils.clip_grad_norm_(trainable, t.grad_clip)
                optimizer.step()
                schedule.step()
            if ema:
                ema.update_parameters(model)
            losses.append(loss.item())
        epoch_time = time.perf_counter() - started
        scored = ema.module if ema else model
        dev_metrics = evaluate(task, scored, dev, t.batch_size)
        metrics = {"epoch": epoch, "train/loss": float(np.mean(losses)),
                   "train/lr": max(g["lr"] for g in optimizer.param_groups),  # at the epoch's end
                   **{f"dev/{k}": v for k, v in dev_metrics.items()}, "time/epoch_s": epoch_time,
                   "memory/peak_mb": _peak_memory_mb(), "params/trainable": trainable_parameters(model)}
        score = dev_metrics[task.metric]
        score = -math.inf if math.isnan(score) else score  # e.g. Spearman of constant predictions: never the best
        if best_state is None or score > best:
            best, best_state = score, copy.deepcopy(scored.state_dict())
        if logger:
            logger.log(epoch, {k: v for k, v in metrics.items() if k != "epoch"})
        if report:
            report(metrics)

    final = ema.module if ema else model
    final.load_state_dict(best_state)
    if tricks.lora_r:
        final = final.merge_and_unload()
    tested = {f"test/{k}": v for k, v in evaluate(task, final, test, t.batch_size).items()}
    summary = {**metrics, f"best_dev/{task.metric}": best, **tested}
    if logger:
        logger.log(t.epochs, {k: summary[k] for k in (f"best_dev/{task.metric}", *tested)}, replayed_steps="log")
        logger.close()
    return {"metrics": summary, "model": final, "tokenizer": tokenizer}
