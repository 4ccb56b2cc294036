"""The data stage end to end on Ray (read, clean, count, examples, shuffle, Parquet): the driver's memory against
the corpus size and throughput per core; then the training side: time to a worker's first batch
when a run resumes at 10% and at 90% of an epoch.

    python benchmarks/data_stage.py [--sizes-mb 20 200] [--objectives pegasus mlm] [--cpus 2]

Corpora: People's Daily paragraphs recombined into documents of 4-12 paragraphs, one sentence per line, a blank
line between documents (BERT's layout), with a few bad lines injected (invalid UTF-8, NUL, empty), written once
into a temp dir. Each measurement is a fresh driver process (`--driver`) on a fresh local Ray instance with the
given CPUs and a prepared vocab, so the stage alone is timed and its driver's peak RSS is its own.

Baselines, run side by side: for memory, a driver that holds the corpus as a list of documents (what the data
stage did before it streamed: `list(read_documents(...))` before handing them to Ray); for the resume, reading
the epoch from its start up to the position (what a resume did before positions named a file).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def write_corpus(path: Path, megabytes: float, seed: int = 0) -> None:
    from suformer.corpora import peoples_daily

    paragraphs = list(peoples_daily())
    rng = random.Random(seed)
    target, written = megabytes * 2**20, 0
    with open(path, "wb") as f:
        while written < target:
            document = rng.sample(paragraphs, rng.randint(4, 12))
            sentences = [s + "。" for p in document for s in p.split("。") if s]
            block = ("\n".join(sentences) + "\n\n").encode()
            if rng.random() < 0.01:
                block = b"\xff\xfe\x00 broken line\n" + block
            f.write(block)
            written += len(block)


def peak_rss_mb() -> float:
    """This process's peak resident memory since it started: VmHWM, the high-water mark of its own address space.
    (Not getrusage's ru_maxrss: Linux carries that over an exec from the forked copy of the parent, so a driver
    started by a big parent reported the parent's size.)"""
    status = Path("/proc/self/status").read_text()
    return int(status.split("VmHWM:")[1].split()[0]) / 1024


def driver(args) -> None:
    """One measurement, in its own process: prints a JSON line."""
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    import ray

    from suformer.config import DataSection
    from suformer.pretrain.data.corpus import preflight
    from suformer.pretrain.data.dataset import prepare_shards, shard_files

    data = DataSection(corpus=args.corpus, objective=args.objective, vocab=args.vocab, max_len=512,
                       rows_per_shard=5000)
    if args.baseline:  # the old driver: every document in one list
        fs, files, _ = preflight(data)
        start = time.perf_counter()
        with open(files[0].path, encoding="utf-8", errors="replace") as f:
            documents = [d for d in f.read().split("\n\n") if d.strip()]
        print(json.dumps({"seconds": time.perf_counter() - start, "documents": len(documents),
                          "peak_rss_mb": peak_rss_mb()}))
        return
    ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    corpus = preflight(data)
    start = time.perf_counter()
    shards = prepare_shards(data, Path(args.vocab), Path(args.root), corpus)
    seconds = time.perf_counter() - start
    ready = json.loads((shards / "_READY.json").read_text())
    import pyarrow.parquet as pq

    tokens = sum(pq.read_table(p, columns=["num_tokens"]).column(0).to_numpy().sum()
                 for p in shard_files(shards))
    print(json.dumps({"seconds": seconds, "documents": ready["documents"], "examples": ready["examples"],
                      "tokens": int(tokens), "peak_rss_mb": peak_rss_mb()}))
    ray.shutdown()


def measure(**settings) -> dict:
    command = [sys.executable, __file__, "--driver"]
    for key, value in settings.items():
        command.append(f"--{key}" if value is True else f"--{key}={value}")
    out = subprocess.run(command, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def first_batch_after_resume(shards: list[Path]) -> list[tuple[str, str, float]]:
    """Time to worker 0's first micro-batch at 10% and 90% of its epoch (of 2 workers), the position read from a
    file as a checkpoint holds it; baseline: reading the epoch from its start up to the position."""
    import pyarrow.parquet as pq

    from suformer.pretrain.batches import Batching, StreamPosition, micro_batches

    shards = [str(p) for p in shards]
    files = shards[0::2]  # worker 0's
    sizes = [pq.ParquetFile(f).metadata.num_rows for f in files]
    batching = Batching("mlm", "packed", 8, capacity=512)
    next(micro_batches(shards, 0, 2, batching, StreamPosition()))  # warm-up: the first batch imports torch
    rows = []
    for share in (0.1, 0.9):
        target = int(sum(sizes) * share)
        index, row = 0, target
        while row > sizes[index]:
            row, index = row - sizes[index], index + 1
        start = time.perf_counter()
        next(micro_batches(shards, 0, 2, batching, StreamPosition(0, index, row)))
        rows.append((f"{share:.0%} ({target:,} rows)", "position (epoch, file, row): skip to it", time.perf_counter() - start))
        start = time.perf_counter()
        seen = 0
        for path in files:  # every row before the position read and converted, as a skip-by-reading resume does
            for batch in pq.ParquetFile(path).iter_batches(batch_size=256):
                seen += len(batch.to_pylist())
                if seen > target:
                    break
            if seen > target:
                break
        rows.append((f"{share:.0%} ({target:,} rows)", "read the epoch up to it (baseline)", time.perf_counter() - start))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes-mb", type=float, nargs="+", default=[20, 200])
    parser.add_argument("--objectives", nargs="+", default=["pegasus", "mlm"])
    parser.add_argument("--driver", action="store_true", help=argparse.SUPPRESS)
    for hidden in ("corpus", "objective", "vocab", "root"):
        parser.add_argument(f"--{hidden}", help=argparse.SUPPRESS)
    parser.add_argument("--cpus", type=int, default=2, help="Ray CPUs of the data stage")
    parser.add_argument("--baseline", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.driver:
        return driver(args)

    from suformer.corpora import peoples_daily
    from suformer.pretrain.data.dataset import shard_files
    from suformer.tokenizer import build_vocab, write_vocab

    print(f"# {platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sample = list(itertools.islice(peoples_daily(), 5000))
        vocabs = {"pegasus": tmp / "words.txt", "mlm": tmp / "chars.txt"}
        write_vocab(build_vocab(sample, 20000), vocabs["pegasus"])
        write_vocab(build_vocab(sample, 8000, words=False), vocabs["mlm"])
        rows = []
        for size in args.sizes_mb:
            corpus = tmp / f"corpus-{size:g}mb.txt"
            write_corpus(corpus, size)
            base = measure(corpus=corpus, objective="mlm", vocab=vocabs["mlm"], baseline=True)
            rows.append((f"{size:g} MB", "driver holding the documents (baseline)", "-", base["peak_rss_mb"]))
            # Every objective on the smallest corpus; the larger ones (the memory question) with MLM only.
            for objective in args.objectives if size == min(args.sizes_mb) else ["mlm"]:
                r = measure(corpus=corpus, objective=objective, vocab=vocabs[objective],
                            root=tmp / f"root-{size:g}-{objective}", cpus=args.cpus)
                rate = r["tokens"] / r["seconds"] / args.cpus
                rows.append((f"{size:g} MB", f"{objective}, {args.cpus} CPUs", f"{rate:,.0f} tok/s/core, "
                             f"{r['examples']:,} examples, {r['seconds']:.1f} s", r["peak_rss_mb"]))
        largest = tmp / f"root-{max(args.sizes_mb):g}-mlm" / "data"  # the resume rows: on MLM shards, if made
        resume_rows = first_batch_after_resume([Path(f) for f in shard_files(next(largest.iterdir()))]) \
            if largest.is_dir() else []
    print(f"| {'corpus':<8} | {'data stage':<42} | {'throughput':<46} | {'driver peak RSS':>15} |")
    print(f"|{'-' * 10}|{'-' * 44}|{'-' * 48}|{'-' * 17}|")
    for corpus, what, rate, rss in rows:
        print(f"| {corpus:<8} | {what:<42} | {rate:<46} | {rss:>12,.0f} MB |")
    if resume_rows:
        print(f"\n| {'resume of worker 0 of 2 at':<28} | {'first batch after':<52} | {'seconds':>8} |")
        print(f"|{'-' * 30}|{'-' * 54}|{'-' * 10}|")
    for at, what, seconds in resume_rows:
        print(f"| {at:<28} | {what:<52} | {seconds:>8.3f} |")


if __name__ == "__main__":
    main()
