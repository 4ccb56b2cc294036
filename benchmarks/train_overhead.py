"""Platform overhead: the same tiny T5 PEGASUS and the same batches, trained by a plain PyTorch loop and by our
Ray Train + DeepSpeed ZeRO-2 loop (one worker, same thread count), steps/s side by side.

    python benchmarks/train_overhead.py [--steps 200] [--threads 1 2]

The platform's step time is its own `train/step_time_s` metric (wall time per step over each logging window,
including Ray Data ingestion, DeepSpeed, metric reduction and MLflow logging), first window dropped as warm-up.
The plain loop does forward, backward, clip, AdamW step on batches collated from the same Parquet rows. Two
figures per loop: the median step (steady state) and the mean over the whole run (epoch boundaries, checkpoint
and logging stalls included). One run per thread count: with as many threads as cores, Ray's own processes
(GCS, raylet, dashboard, the Train and Data actors) take cores from the compute; with a core to spare they run
beside it, as they run beside the step on a GPU node.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import torch

from suformer.config import load_config
from suformer.pretrain.data.dataset import shard_files
from suformer.pretrain.batches import collate
from suformer.pretrain.worker import optimizer_and_schedule, pretraining_model

CONFIG = Path(__file__).resolve().parents[1] / "jobs" / "configs" / "t5_pegasus_tiny_cpu.yaml"


def plain_loop(cfg, vocab_size, shards, steps, threads):
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = pretraining_model(cfg, vocab_size).train()
    optimizer, schedule = optimizer_and_schedule(model, cfg)
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
    return statistics.median(times[10:]), statistics.mean(times[10:])


def measure(root: str, steps: int, threads: int) -> dict:
    """Both loops at one thread count: (median, mean) s/step each, and the platform's mean wait for data."""
    from mlflow.tracking import MlflowClient

    from suformer.tokenizer import Tokenizer
    from suformer.pretrain.driver import run_pretraining

    cfg = load_config(str(CONFIG), [
        f"run.root={root}", f"run.name=overhead-{threads}", "train.num_workers=1", f"train.cpus_per_worker={threads}",
        "train.zero_stage=2", f"train.max_steps={steps}", "train.log_every=10",
        f"train.checkpoint_every={steps}", "train.samples_to_log=0", "data.max_documents=3000",
        "data.validation_examples=0",
    ])
    result = run_pretraining(cfg)
    client = MlflowClient(result["tracking_uri"])

    def windows(key):
        return [m.value for m in sorted(client.get_metric_history(result["run_id"], key), key=lambda m: m.step)][1:]

    ours = statistics.median(windows("train/step_time_s")), statistics.mean(windows("train/step_time_s"))
    vocab = len(Tokenizer.from_pretrained(result["model_dir"]))
    shards = Path(client.get_run(result["run_id"]).data.params["data.shards"])
    plain = plain_loop(cfg, vocab, shards, steps, threads)
    return {"cfg": cfg, "plain": plain, "ours": ours, "data_wait": statistics.mean(windows("train/data_wait_s"))}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2],
                        help="torch threads (and the worker's CPUs) in both loops; one run per value")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as root:
        results = {threads: measure(root, args.steps, threads) for threads in args.threads}

    cfg = next(iter(results.values()))["cfg"]
    print(f"# {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, tiny T5 PEGASUS, "
          f"micro-batch {cfg.train.micro_batch_size}, source <= {cfg.data.max_source_len} tokens, {args.steps} steps")
    print(f"| {'loop':<44} | threads | {'median s/step':>13} | {'vs plain':>8} | {'mean s/step':>11} | "
          f"{'vs plain':>8} |")
    print(f"|{'-' * 46}|---------|{'-' * 15}|{'-' * 10}|{'-' * 13}|{'-' * 10}|")
    for threads, r in results.items():
        plain = r["plain"]
        for name, (median, mean) in [("plain PyTorch (baseline)", plain),
                                     ("Ray Train + DeepSpeed ZeRO-2 + MLflow (ours)", r["ours"])]:
            print(f"| {name:<44} | {threads:>7} | {median:>13.4f} | {plain[0] / median:>7.2f}x | {mean:>11.4f} | "
                  f"{plain[1] / mean:>7.2f}x |")
    for threads, r in results.items():
        (plain_median, plain_mean), (median, mean) = r["plain"], r["ours"]
        print(f"{threads} thread(s): overhead {100 * (median / plain_median - 1):.1f}% of the plain step (median), "
              f"{100 * (mean / plain_mean - 1):.1f}% over the whole run; waiting for data "
              f"{1000 * r['data_wait']:.1f} ms/step")


if __name__ == "__main__":
    main()
