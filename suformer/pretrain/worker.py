"""The Ray Train worker: plain PyTorch + a DeepSpeed engine + `ray.train.report`.

It resumes from the run's newest complete checkpoint (run_checkpoints.py) and replays exactly the same batches and
dropout masks. A NaN/inf loss on any rank skips that micro-batch on every rank, or stops the run without writing
a checkpoint (`train.nonfinite_loss`).
"""
from __future__ import annotations

import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from ..config import PretrainConfig
from ..storage import Location
from ..train.efficiency import apply_efficiency
from ..train.engine import deepspeed_engine, deepspeed_process_settings
from ..train.flops import device_peak, matmul_precision, training_flops
from ..train.memory import memory_stats
from ..train.model import model_from
from ..train.optimizers import build_optimizer
from ..train.schedules import lr_schedule
from ..train.seeding import seed_everything
from .batches import Batching, StreamPosition, micro_batches, step_sums, to_device, token_counts
from .run_checkpoints import (checkpoints_newest_first, newest_complete, prune_unregistered_checkpoints, restore,
                              save_checkpoint)
from .validation import Validation

STOPPED_TAG = "suformer.stopped"  # MLflow tag: why the workers stopped the run on purpose


def pretraining_model(cfg: PretrainConfig, vocab_size: int):
    """The model `cfg.model` describes: a preset's, or `model.init_from`'s weights."""
    m = cfg.model
    return model_from(m.family, m.preset, init_from=m.init_from, vocab_size=vocab_size, **m.config_overrides())


def optimizer_and_schedule(model, cfg: PretrainConfig):
    t = cfg.train
    optimizer = build_optimizer(model, t.optimizer, t.lr, t.weight_decay, t.adam_eps,
                                flat_partitions=t.engine_settings().flattens_parameters,
                                offloaded=t.offload_optimizer)
    return optimizer, lr_schedule(optimizer, t.warmup_steps, t.max_steps, t.schedule, t.min_lr_ratio)


def _finite_on_every_rank(loss: torch.Tensor) -> bool:
    """Whether every rank's loss is finite. All ranks must agree to skip a micro-batch together: a rank that
    went on to backward() alone would wait forever in its gradient all-reduce. The one value read per micro-batch
    is the price of deciding before backward(); with ZeRO the grad norm is read once per step anyway."""
    bad = (~torch.isfinite(loss.detach())).float().reshape(1)
    dist.all_reduce(bad)
    return bad.item() == 0


def _say(line: str) -> None:
    """A progress line, once: Ray Train patches print() in workers to also feed its logger (printed twice)."""
    sys.stdout.write(f"[suformer] {line}\n")
    sys.stdout.flush()


@dataclass
class _Progress:
    """What a checkpoint records beside the engine's state: the step, the data stream's position, the skips."""
    step: int = 0
    position: StreamPosition = field(default_factory=StreamPosition)
    nonfinite_skipped: int = 0


class _Window:
    """The training metrics of one logging window. The sums (loss x tokens, correct, predicted tokens) stay on the
    device and are read once per window (a .item() per micro-batch would stall a GPU); the work (real and computed
    tokens, model FLOPs) is counted on the CPU from each micro-batch before it is copied to the device."""

    def __init__(self, engine, world: int, peak: Optional[float]):
        self.sums = torch.zeros(3, dtype=torch.float64, device=engine.device)
        self.device, self.world, self.peak, self.grad_norm = engine.device, world, peak, float("nan")
        self.reset()

    def reset(self) -> None:
        self.sums.zero_()
        self.work = [0, 0, 0]  # real tokens, computed tokens, model FLOPs
        self.start, self.steps, self.data_wait = time.perf_counter(), 0, 0.0

    def count(self, model, batch: dict) -> None:
        real, computed = token_counts(batch)
        self.work = [self.work[0] + real, self.work[1] + computed, self.work[2] + (training_flops(model, batch) or 0)]

    def metrics(self, learning_rate: float, nonfinite_skipped: int) -> dict[str, float]:
        """The window's means over every rank (one all-reduce); per device, the mean device's share."""
        totals = torch.cat([self.sums, torch.tensor(self.work, dtype=torch.float64, device=self.device)])
        dist.all_reduce(totals)
        loss_sum, correct, predicted, real, computed, flops = totals.tolist()
        elapsed = time.perf_counter() - self.start
        metrics = {
            "train/loss": loss_sum / max(predicted, 1), "train/token_accuracy": correct / max(predicted, 1),
            "train/lr": learning_rate, "train/grad_norm": self.grad_norm,
            "train/tokens_per_s": real / elapsed, "train/tokens_per_s_per_device": real / elapsed / self.world,
            "train/real_token_share": real / max(computed, 1),  # the rest is padding every matmul computes
            "train/step_time_s": elapsed / self.steps,
            "train/data_wait_s": self.data_wait / self.steps,  # rank 0's time blocked on input per step
            "train/data_wait_share": self.data_wait / elapsed,
            "train/nonfinite_skipped": nonfinite_skipped,  # micro-batches dropped for a NaN/inf loss, so far
            **{f"train/memory_{key}": value for key, value in memory_stats(self.device).items()},
        }
        if flops:  # model FLOPs of the real tokens (models/flops.py), recomputation not counted
            metrics["train/tflops_per_device"] = flops / elapsed / self.world / 1e12
            if self.peak:
                metrics["train/mfu"] = flops / elapsed / self.world / self.peak
        return metrics


def _resume_point(run_storage: Location, world: int, t):
    """The newest complete checkpoint to resume from (None: a fresh start); refuses what cannot be resumed."""
    checkpoints = checkpoints_newest_first(run_storage)
    resume = newest_complete(checkpoints, world) if checkpoints else None
    if resume and resume.needs_universal and t.optimizer == "adafactor":
        # DeepSpeed's universal converter reads Adam's two moments; Adafactor keeps one
        raise RuntimeError(f"{resume.directory.name} was written by {resume.state['world_size']} workers: a "
                           f"train.optimizer=adafactor run resumes with as many (train.num_workers="
                           f"{resume.state['world_size']}); another number needs adamw or adamw_scale")
    return resume


def _engine(cfg: PretrainConfig, vocab_size: int, resume):
    """(DeepSpeed engine, learning-rate schedule, what the efficiency switches did) around a new model (or
    `model.init_from`'s)."""
    t = cfg.train
    model = pretraining_model(cfg, vocab_size)
    efficiency = apply_efficiency(model, t.activation_checkpointing, t.activation_checkpointing_every, t.compile)
    optimizer, schedule = optimizer_and_schedule(model, cfg)
    engine = deepspeed_engine(model, optimizer, schedule, t.engine_settings(),
                              load_universal=bool(resume and resume.needs_universal))
    return engine, schedule, efficiency


def _restore(engine, resume, ctx, shards: list[str], fs, batching: Batching, t) -> _Progress:
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if rank == 0 and resume.skipped:
        _say(f"skipping incomplete checkpoints, newest first: {'; '.join(resume.skipped)}")
    if rank == 0 and resume.state["world_size"] != world:
        _say(f"{resume.directory.name} was written by {resume.state['world_size']} workers, this run has {world}: "
             "the rest of its epoch is dealt to them anew"
             + ("; loading it as a DeepSpeed universal checkpoint" if resume.needs_universal else ""))
    position = restore(engine, resume, rank, ctx.get_local_rank(), shards, fs, batching, int(t.cpus_per_worker))
    progress = _Progress(resume.state["step"], position, resume.state.get("nonfinite_skipped", 0))
    if rank == 0:
        _say(f"resumed from checkpoint at step {progress.step}")
    return progress


def _train_step(engine, stream, progress: _Progress, window: _Window, t, rank: int) -> Optional[str]:
    """One optimizer step over train.grad_accum finite micro-batches; returns why the run must stop, if it must."""
    micro = 0
    while micro < t.grad_accum:
        waited = time.perf_counter()
        batch, progress.position = next(stream)
        window.data_wait += time.perf_counter() - waited
        counted = batch
        batch = to_device(batch, engine.device)
        out = engine(**batch)
        if not _finite_on_every_rank(out.loss):
            # Skipped before backward(), so no NaN reaches gradients, optimizer state or a checkpoint.
            progress.nonfinite_skipped += 1
            if t.nonfinite_loss == "stop" or progress.nonfinite_skipped > t.max_nonfinite_skips:
                return (f"non-finite loss at step {progress.step + 1} ({progress.nonfinite_skipped} so far, "
                        f"train.nonfinite_loss={t.nonfinite_loss}, max_nonfinite_skips={t.max_nonfinite_skips})")
            if rank == 0:
                _say(f"step {progress.step + 1}: non-finite loss, micro-batch skipped on every rank "
                     f"({progress.nonfinite_skipped}/{t.max_nonfinite_skips} allowed)")
            continue
        micro += 1
        window.count(engine.module, counted)
        engine.backward(out.loss)
        if t.zero_stage == 0 and engine.is_gradient_accumulation_boundary():
            # DeepSpeed reports no global norm without ZeRO; measure it before step() clips.
            grads = [p.grad.detach().float().norm() for p in engine.module.parameters() if p.grad is not None]
            window.grad_norm = torch.stack(grads).norm().item()
        engine.step()
        window.sums += step_sums(out.loss, out.logits, batch)
    progress.step += 1
    window.steps += 1
    if t.zero_stage > 0:
        norm = engine.get_global_grad_norm()
        window.grad_norm = float(norm) if norm is not None else float("nan")
    return None


def _step_line(step: int, max_steps: int, m: dict[str, float]) -> str:
    """What a person sees at a glance (torchtitan's console line): progress, loss, throughput per device, model
    TFLOP/s and MFU where there is a peak, the share of real tokens, memory, time waiting for data, ETA."""
    eta = (max_steps - step) * m["train/step_time_s"]
    parts = [f"step {step}/{max_steps}", f"loss {m['train/loss']:.4f}", f"acc {m['train/token_accuracy']:.3f}",
             f"lr {m['train/lr']:.2e}", f"gnorm {m['train/grad_norm']:.3f}",
             f"{m['train/tokens_per_s_per_device']:,.0f} tok/s/dev"]
    if "train/tflops_per_device" in m:
        parts.append(f"{m['train/tflops_per_device']:.3g} TFLOP/s/dev")
    if "train/mfu" in m:
        parts.append(f"mfu {100 * m['train/mfu']:.1f}%")
    parts.append(f"real {100 * m['train/real_token_share']:.0f}%")
    if "train/memory_max_reserved_gib" in m:
        retries = m["train/memory_alloc_retries"]
        parts.append(f"mem {m['train/memory_max_reserved_gib']:.1f} GiB"
                     + (f" ({retries:.0f} alloc retries)" if retries else ""))
    else:
        parts.append(f"rss {m['train/memory_peak_rss_gib']:.1f} GiB")
    parts += [f"data wait {100 * m['train/data_wait_share']:.0f}%",
              f"ETA {time.strftime('%H:%M:%S', time.gmtime(eta))}"]
    return " | ".join(parts)


def _log_window(window: _Window, schedule, progress: _Progress, logger, t) -> None:
    metrics = window.metrics(schedule.get_last_lr()[0], progress.nonfinite_skipped)
    if logger:
        logger.log(progress.step, metrics)
        _say(_step_line(progress.step, t.max_steps, metrics))
    window.reset()


def _validate(validation: Validation, engine, window: _Window, logger, step: int, max_steps: int) -> dict:
    started = time.perf_counter()
    metrics = validation.evaluate(engine, engine.device)
    metrics["val/seconds"] = time.perf_counter() - started
    if logger:
        logger.log(step, metrics)
        _say(f"step {step}/{max_steps} | val loss {metrics['val/loss']:.4f} | "
             f"val acc {metrics['val/token_accuracy']:.3f} | {metrics['val/seconds']:.1f} s")
    window.start += metrics["val/seconds"]  # not counted as training time in tokens/s
    return metrics


def _save(engine, progress: _Progress, validated: Optional[dict], config: dict, rank: int, world: int) -> None:
    import ray.train

    with tempfile.TemporaryDirectory() as tmp:
        save_checkpoint(engine, Path(tmp), rank, progress.position, {
            "step": progress.step, "run_id": config["run_id"], "world_size": world,
            "nonfinite_skipped": progress.nonfinite_skipped})
        # val_loss: the score Ray Train keeps the best checkpoints by (train.export_checkpoint=best)
        ray.train.report({"step": progress.step, **({"val_loss": validated["val/loss"]} if validated else {})},
                         checkpoint=ray.train.Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=f"step-{progress.step:08d}")


def _metric_logger(config: dict, resume):
    from ..tracking import MetricLogger

    logger = MetricLogger(config["tracking_uri"], config["run_id"], ("train/loss", "val/loss"))
    if resume:  # where this attempt started, visible in the MLflow UI
        for key, value in resume.tags.items():
            logger.client.set_tag(logger.run_id, key, value)
    return logger


def train_loop_per_worker(config: dict) -> None:
    import ray.train

    cfg = PretrainConfig.model_validate(config["cfg"])
    t = cfg.train
    deepspeed_process_settings(t.use_gpu)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if not t.use_gpu:  # one intra-op thread per reserved CPU: no oversubscription between co-located workers
        torch.set_num_threads(max(1, int(t.cpus_per_worker)))
    seed_everything(t.seed + rank)

    # The shards were shuffled when written; a worker reads every world-th one.
    shards, fs = config["shard_files"], Location.of(config["shards"]).fs
    run_storage = Location.of(config["checkpoints"])
    resume = _resume_point(run_storage, world, t)
    engine, schedule, efficiency = _engine(cfg, config["vocab_size"], resume)
    batching = Batching.of(cfg)
    progress = _restore(engine, resume, ctx, shards, fs, batching, t) if resume else _Progress()
    logger = _metric_logger(config, resume) if rank == 0 else None
    stream = micro_batches(shards, rank, world, batching, progress.position, fs)
    validation = Validation(config["validation_files"], cfg.data.validation_examples, fs, cfg.data.objective,
                            t.micro_batch_size, rank, world) if config["validation_files"] else None
    peak, peak_line = device_peak(engine.device, matmul_precision(t.engine_settings().bf16))
    if rank == 0:
        _say(f"{batching.mode} micro-batches; {efficiency}; {peak_line}")
    eval_every = t.eval_every or t.checkpoint_every
    window, stopped, first_step = _Window(engine, world, peak), None, progress.step + 1
    while progress.step < t.max_steps:
        engine.train()
        stopped = _train_step(engine, stream, progress, window, t, rank)
        if stopped:
            break
        step, last = progress.step, progress.step == t.max_steps
        if step == first_step and t.compile and rank == 0:  # the layers compile in the first forward and backward
            _say(f"first step, compiling included: {time.perf_counter() - window.start:.1f} s")
        if step % t.log_every == 0 or last:
            _log_window(window, schedule, progress, logger, t)
        checkpoint_now = step % t.checkpoint_every == 0 or last
        validated = None
        if validation and (step % eval_every == 0 or last or (checkpoint_now and t.export_checkpoint == "best")):
            validated = _validate(validation, engine, window, logger, step, t.max_steps)
        if checkpoint_now:
            _save(engine, progress, validated, config, rank, world)
            if rank == 0:
                prune_unregistered_checkpoints(run_storage, t.keep_checkpoints)
    if logger:
        if stopped:  # the driver reads this tag after fit(); no checkpoint is written, the latest is the last good one
            _say(f"stopping: {stopped}; the latest checkpoint is the last good state")
            logger.client.set_tag(logger.run_id, STOPPED_TAG, stopped)
        logger.close()
