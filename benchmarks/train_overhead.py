"""Platform overhead: the same tiny T5 PEGASUS and the same batches, trained by a plain PyTorch loop and by our
Ray Train + DeepSpeed ZeRO-2 loop (one worker, same thread count), steps/s side by side.

    python benchmarks/train_overhead.py [--steps 80] [--threads 2]

The platform's step time is its own `train/step_time_s` metric (wall time per step over each logging window,
including Ray Data ingestion, DeepSpeed, metric reduction and MLflow logging), first window dropped as warm-up.
The plain loop does forward, backward, clip, AdamW step on batches collated from the same Parquet rows.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import torch

from suformer.config import load_config
from suformer.data.dataset import shard_files
from suformer.train.batches import collate
from suformer.train.loop import _optimizer, build

CONFIG = Path(__file__).resolve().parents[1] / "jobs" / "configs" / "t5_pegasus_tiny_cpu.yaml"


def plain_loop(cfg, vocab_size, shards, steps, threads):
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build(cfg, vocab_size).train()
    optimizer, schedule = _optimizer(model, cfg)
    rows = [r for f in shard_files(shards) for r in pq.read_table(f).to_pylist()]
    mb = cfg.train.micro_batch_size
    times = []
    for step in range(steps):
        start = time.perf_counter()
        batch = collate("pegasus", rows[(step * mb) % len(rows):][:mb])
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times[10:])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    from mlflow.tracking import MlflowClient

    from suformer.train.pretrain import run_pretraining

    with tempfile.TemporaryDirectory() as root:
        cfg = load_config(str(CONFIG), [
            f"run.root={root}", "run.name=overhead", "train.num_workers=1", f"train.cpus_per_worker={args.threads}",
            "train.zero_stage=2", f"train.max_steps={args.steps}", "train.log_every=10",
            f"train.checkpoint_every={args.steps}", "train.samples_to_log=0", "data.max_documents=3000",
        ])
        result = run_pretraining(cfg)
        client = MlflowClient(result["tracking_uri"])
        windows = sorted(client.get_metric_history(result["run_id"], "train/step_time_s"), key=lambda m: m.step)
        ours = statistics.median(m.value for m in windows[1:])
        waits = sorted(client.get_metric_history(result["run_id"], "train/data_wait_s"), key=lambda m: m.step)
        data_wait = statistics.median(m.value for m in waits[1:])
        from suformer.tokenizer import Tokenizer

        vocab = len(Tokenizer.from_pretrained(result["model_dir"]))
        shards = Path(client.get_run(result["run_id"]).data.params["data.shards"])
        plain = plain_loop(cfg, vocab, shards, args.steps, args.threads)

    print(f"# {platform.machine()}, torch {torch.__version__}, {args.threads} threads, tiny T5 PEGASUS, "
          f"micro-batch {cfg.train.micro_batch_size}, source <= {cfg.data.max_source_len} tokens")
    print(f"| {'loop':<44} | {'s/step':>8} | {'steps/s':>8} | {'vs plain':>8} |")
    print(f"|{'-' * 46}|{'-' * 10}|{'-' * 10}|{'-' * 10}|")
    print(f"| {'plain PyTorch (baseline)':<44} | {plain:>8.4f} | {1 / plain:>8.2f} | {1.0:>7.2f}x |")
    print(f"| {'Ray Train + DeepSpeed ZeRO-2 + MLflow (ours)':<44} | {ours:>8.4f} | {1 / ours:>8.2f} | "
          f"{plain / ours:>7.2f}x |")
    print(f"overhead: {100 * (ours / plain - 1):.1f}% of the plain step time, of which waiting for data "
          f"{1000 * data_wait:.1f} ms/step ({100 * data_wait / plain:.1f}%)")


if __name__ == "__main__":
    main()
