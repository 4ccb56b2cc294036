"""What the efficiency levers do, per family, and whether the FLOPs the step line reports are what the model computes.

    python benchmarks/efficiency.py                          # every table (about 40 minutes on 2 cores)
    python benchmarks/efficiency.py --tables share flops     # the quick ones (a few minutes)

Tables, printed as markdown (benchmarks/RESULTS.md keeps them):
- share: real tokens in computed tokens (encoder and decoder inputs, padding included) per objective, with the
  shipped CPU configs' lengths and micro-batch sizes over every People's Daily paragraph: batches in order
  (train.batching=sequential, what the platform did before: the baseline) against grouped and packed.
- flops: each model's forward_flops formula ("computed": the padded shapes) against torch's FlopCounterMode on real
  batches of every objective, tiny and base presets, forward and forward+backward (= 3 forwards); beside it the
  real FLOPs the step line and MFU use.
- step: a training step (forward + backward) per family, at the tiny preset with the shipped config's shapes and at
  the base preset at 512 tokens: eager against torch.compile, activation checkpointing none / selective / full,
  batches in order against packed or grouped. Real tokens/s, peak memory above the model's own (each configuration
  in a fresh process, so the peak resident set is its own), the real-token share; baseline: eager, no
  checkpointing, the objective's own batching (tiny: also in order).

`step_figures` is also what benchmarks/first_gpu.py times on a GPU, with MFU.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from suformer.models import build_model  # noqa: E402
from suformer.train.efficiency import apply_efficiency  # noqa: E402
from suformer.train.memory import peak_rss_bytes  # noqa: E402

OBJECTIVE = {"t5_pegasus": "pegasus", "roformer_v2": "mlm"}
SHIPPED = {"pegasus": "t5_pegasus_tiny_cpu.yaml", "mlm": "roformer_v2_tiny_cpu.yaml",
           "unilm": "roformer_v2_tiny_cpu.yaml"}


def real_tokens(batch: dict) -> tuple[int, int]:
    real = computed = 0
    for key in ("input_ids", "decoder_input_ids"):
        if key in batch:
            real, computed = real + int((batch[key] != 0).sum()), computed + batch[key].numel()
    return real, computed


def step_figures(model, batches: list[dict], device, warmup: int = 1) -> dict:
    """Forward + backward over `batches` after `warmup` of them (a compiled model compiles there): seconds per step,
    real tokens/s, model TFLOP/s (3 forwards of the real tokens, models/flops.py), the first step's seconds. The
    gradients stay allocated between steps, as an optimizer keeps them."""
    def step(batch):
        model.zero_grad(set_to_none=False)
        model(**{k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}).loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize()

    began = time.perf_counter()
    for batch in batches[:warmup]:
        step(batch)
    first = time.perf_counter() - began
    seconds, tokens, flops = [], 0, 0
    for batch in batches[warmup:]:
        began = time.perf_counter()
        step(batch)
        seconds.append(time.perf_counter() - began)
        tokens += real_tokens(batch)[0]
        flops += 3 * model.forward_flops(batch, "real")
    total = sum(seconds)
    return {"step_s": statistics.median(seconds), "tokens_per_s": tokens / total, "tflops": flops / total / 1e12,
            "first_step_s": first}


# -- the data --------------------------------------------------------------------------------------------------
def synthetic_batches(family: str, count: int, rows: int, length: int, target: int = 128, vocab_size: int = 12000,
                      documents: int = 4) -> list[dict]:
    """Full-length micro-batches of random ids, as the objectives lay them out: T5 PEGASUS `rows` x (`length`
    source, `target` summary) tokens; RoFormerV2 MLM rows of `length` tokens packed with `documents` examples
    each, 15% of the positions predicted. No corpus or tokenizer needed (a GPU machine has torch and triton)."""
    generator = torch.Generator().manual_seed(0)
    made = []
    for _ in range(count):
        ids = torch.randint(106, vocab_size, (rows, length), generator=generator)
        if family == "t5_pegasus":
            summary = torch.randint(106, vocab_size, (rows, target + 1), generator=generator)
            made.append({"input_ids": ids, "decoder_input_ids": summary[:, :-1], "labels": summary[:, 1:]})
            continue
        labels = ids.masked_fill(torch.rand(ids.shape, generator=generator) > 0.15, -100)
        document_ids = (torch.arange(length) * documents // length + 1).expand(rows, -1)
        made.append({"input_ids": ids, "labels": labels, "document_ids": document_ids})
    return made


def shipped_data(objective: str, documents: int = None, **changes):
    """(DataSection, TrainSection, tokenizer) of the shipped CPU config for `objective`, vocab built from the
    corpus as its run would."""
    import itertools
    import tempfile

    from suformer.config import load_config
    from suformer.corpora import peoples_daily
    from suformer.pretrain.data.objectives import OBJECTIVES
    from suformer.tokenizer import Tokenizer, build_vocab, write_vocab

    cfg = load_config(str(ROOT / "jobs" / "configs" / SHIPPED[objective]),
                      [f"data.objective={objective}", *(f"{k}={v}" for k, v in changes.items())])
    texts = list(itertools.islice(peoples_daily(), documents))
    vocab = Path(tempfile.mkdtemp()) / "vocab.txt"
    words = OBJECTIVES[objective].vocab_words
    write_vocab(build_vocab(texts[:5000], cfg.data.vocab_size, words=words), vocab)
    return cfg, texts, Tokenizer(vocab, pre_tokenize=OBJECTIVES[objective].pre_tokenize)


def examples(objective: str, documents: int = None, **changes):
    from suformer.pretrain.data.dataset import examples_from_documents

    cfg, texts, tokenizer = shipped_data(objective, documents, **changes)
    columns = examples_from_documents(texts, cfg.data, tokenizer)
    rows = [dict(zip(columns, values)) for values in zip(*columns.values())]
    import random

    random.Random(0).shuffle(rows)  # as the shards are written
    return cfg, rows, len(tokenizer)


def planned(cfg, rows: list[dict], mode: str, windows: int = None) -> list[dict]:
    """Micro-batches of `rows` as a worker plans them, window by window."""
    from suformer.pretrain.batches import Batching
    from suformer.pretrain.data.objectives import OBJECTIVES

    batching = Batching.of(cfg.model_copy(update={"train": cfg.train.model_copy(update={"batching": mode})}))
    lengths = OBJECTIVES[cfg.data.objective].lengths
    batches = []
    for start in range(0, len(rows), batching.window_rows)[:windows]:
        window = rows[start:start + batching.window_rows]
        for batch in batching.plan([lengths(row) for row in window], f"{start}"):
            batches.append(batching.collate(window, batch))
    return batches


# -- tables ----------------------------------------------------------------------------------------------------
def share_table() -> list[str]:
    lines = ["| objective (shipped config) | micro-batch | in order (baseline) | grouped | packed |",
             "|---|---|---|---|---|"]
    for objective in ("pegasus", "mlm", "unilm"):
        cfg, rows, _ = examples(objective)
        shares = {}
        for mode in ("sequential", "grouped", "packed"):
            if mode == "packed" and objective == "pegasus":
                continue
            counts = [real_tokens(batch) for batch in planned(cfg, rows, mode)]
            shares[mode] = sum(r for r, _ in counts) / sum(c for _, c in counts)
        lines.append(f"| {objective} ({SHIPPED[objective]}, {len(rows):,} examples) | {cfg.train.micro_batch_size} | "
                     + " | ".join(f"{100 * shares[m]:.1f}%" if m in shares else "n/a (encoder-decoder)"
                                  for m in ("sequential", "grouped", "packed")) + " |")
        print(lines[-1], file=sys.stderr, flush=True)
    return lines


def flops_table() -> list[str]:
    from torch.utils.flop_counter import FlopCounterMode

    lines = ["| family | preset | objective, batch | formula fwd GFLOP | counted fwd | ratio | counted fwd+bwd / 3 | "
             "ratio | real GFLOP (share) |", "|---|---|---|---|---|---|---|---|---|"]
    for objective, family in (("pegasus", "t5_pegasus"), ("mlm", "roformer_v2"), ("unilm", "roformer_v2")):
        cfg, rows, vocab_size = examples(objective, documents=600)
        for preset, mode in (("tiny", "auto"), ("base", "auto")):
            batch = planned(cfg, rows, mode, windows=1)[0]
            model = build_model(family, preset, vocab_size=vocab_size, attention_backend="reference", dropout=0.0)
            formula, real = model.forward_flops(batch, "computed"), model.forward_flops(batch, "real")
            counted = []
            for backward in (False, True):
                counter = FlopCounterMode(display=False)
                with counter:
                    loss = model(**batch).loss
                    if backward:
                        loss.backward()
                counted.append(counter.get_total_flops() / (3 if backward else 1))
            shape = "x".join(str(n) for n in batch["input_ids"].shape)
            lines.append(f"| {family} | {preset} | {objective}, {shape} | {formula / 1e9:.2f} | "
                         f"{counted[0] / 1e9:.2f} | {counted[0] / formula:.3f} | {counted[1] / 1e9:.2f} | "
                         f"{counted[1] / formula:.3f} | {real / 1e9:.2f} ({real / formula:.0%}) |")
            print(lines[-1], file=sys.stderr, flush=True)
    return lines


STEP_CASES = {  # (family, preset): [(compile, checkpointing, batching)], the first the baseline
    ("t5_pegasus", "tiny"): [(False, "none", "sequential"), (False, "none", "auto"), (True, "none", "auto"),
                             (False, "selective", "auto"), (False, "full", "auto")],
    ("roformer_v2", "tiny"): [(False, "none", "sequential"), (False, "none", "auto"), (True, "none", "auto"),
                              (False, "selective", "auto"), (False, "full", "auto")],
    ("t5_pegasus", "base"): [(False, "none", "auto"), (True, "none", "auto"), (False, "selective", "auto"),
                             (False, "full", "auto")],
    ("roformer_v2", "base"): [(False, "none", "auto"), (True, "none", "auto"), (False, "selective", "auto"),
                              (False, "full", "auto")],
}
def one_step_case(case: dict) -> dict:
    """In a fresh process: one configuration's figures and its peak memory above the model's."""
    import psutil

    torch.manual_seed(0)
    if case["preset"] == "base":  # full length: 2 rows of 512 tokens (T5: and 128 summary tokens)
        vocab_size = 50000 if case["family"] == "t5_pegasus" else 12000
        batches = synthetic_batches(case["family"], case["steps"] + 1, 2, 512, vocab_size=vocab_size)
    else:  # the shipped CPU config's examples and micro-batches
        cfg, rows, vocab_size = examples(OBJECTIVE[case["family"]], documents=1500)
        batches = planned(cfg, rows, case["batching"], windows=1)[:case["steps"] + 1]
    model = build_model(case["family"], case["preset"], vocab_size=vocab_size, attention_backend="sdpa")
    apply_efficiency(model, case["checkpointing"], 2, case["compile"])
    # The model's own memory: weights, and gradients allocated by a step on a sliver of a batch (and kept).
    sliver = {k: v[:1, :8] if torch.is_tensor(v) else v for k, v in batches[0].items()}
    model(**sliver).loss.backward()
    resident = psutil.Process().memory_info().rss
    figures = step_figures(model, batches, torch.device("cpu"))
    counts = [real_tokens(batch) for batch in batches]
    figures["peak_gib"] = (peak_rss_bytes() - resident) / 2**30
    figures["share"] = sum(r for r, _ in counts) / sum(c for _, c in counts)
    figures["shape"] = "x".join(str(n) for n in batches[1]["input_ids"].shape)
    return figures


def step_table(steps: int) -> list[str]:
    lines = ["| family | preset | compile | checkpointing | batching | shape | real tokens/s | vs baseline | "
             "TFLOP/s | peak above model GiB | vs baseline | real share | first step s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for (family, preset), cases in STEP_CASES.items():
        baseline = None
        for compiled, checkpointing, batching in cases:
            case = dict(family=family, preset=preset, compile=compiled, checkpointing=checkpointing,
                        batching=batching, steps=steps if preset == "tiny" else 2)
            done = subprocess.run([sys.executable, __file__, "--one", json.dumps(case)], capture_output=True,
                                  text=True, cwd=ROOT)
            if done.returncode:
                print(done.stderr[-3000:], file=sys.stderr)
                raise RuntimeError(f"{case} failed")
            f = json.loads(done.stdout.strip().splitlines()[-1])
            baseline = baseline or f
            lines.append(f"| {family} | {preset} | {'yes' if compiled else 'no'} | {checkpointing} | {batching} | "
                         f"{f['shape']} | {f['tokens_per_s']:,.0f} | {f['tokens_per_s'] / baseline['tokens_per_s']:.2f}x | "
                         f"{f['tflops']:.3f} | {f['peak_gib']:.2f} | {f['peak_gib'] / baseline['peak_gib']:.2f}x | "
                         f"{100 * f['share']:.0f}% | {f['first_step_s']:.1f} |")
            print(lines[-1], file=sys.stderr, flush=True)
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tables", nargs="+", default=["share", "flops", "step"], choices=["share", "flops", "step"])
    parser.add_argument("--steps", type=int, default=6, help="timed steps per tiny configuration (base: 2)")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # a step configuration, run in a fresh process
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(one_step_case(json.loads(args.one))))
        return 0
    print(f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch "
          f"{torch.__version__}, {date.today().isoformat()}", flush=True)
    tables = {"share": share_table, "flops": flops_table, "step": lambda: step_table(args.steps)}
    for name in args.tables:
        print(f"\n## {name}\n", flush=True)
        print("\n".join(tables[name]()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
