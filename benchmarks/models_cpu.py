"""CPU benchmark: forward+backward tokens/s of our models next to transformers, and tokenizer throughput.

    python benchmarks/models_cpu.py                 # full run (about 10 minutes on 2 cores)
    python benchmarks/models_cpu.py --pairs 3 --quick

Models run in float32 with dropout off, random weights. Baselines, timed in the same run on the same inputs:
  T5 PEGASUS small  vs transformers MT5ForConditionalGeneration with the same dimensions (its default attention), at
                    batch 8 x (source 256, target 64) and batch 4 x (512, 256): interleaved pairs (baseline step,
                    then ours), the ratio of each pair, their median and range: on a shared 2-core machine single
                    steps vary by tens of percent, so a ratio of one pair, or of medians taken apart, says little
  RoFormerV2 base   vs transformers RoFormerForMaskedLM with the same dimensions (RoFormer v1 layout: it adds
                    biases, LayerNorm and an MLM transform, so it does slightly more work; transformers has no V2)
Tokenizer: characters/s on People's Daily paragraphs, next to jieba alone and transformers' Rust BertTokenizerFast.
"""
from __future__ import annotations

import argparse
import itertools
import platform
import statistics
import tempfile
import time

import torch

from suformer.corpora import peoples_daily
from suformer.models import build_model
from suformer.tokenizer import Tokenizer, build_vocab, write_vocab


def time_steps(step, steps: int, warmup: int = 1) -> float:
    """Median seconds per call after warm-up."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def train_step(model, inputs):
    def step():
        model.zero_grad(set_to_none=True)
        out = model(**inputs)
        out.logits.float().logsumexp(-1).mean().backward()  # same scalar for every model: no loss-function bias
    return step


def interleaved(steps: dict, pairs: int) -> dict[str, list[float]]:
    """Seconds per call of each named step, timed in turn `pairs` times (each warmed up once first): the steps share
    whatever else the machine does at each moment."""
    for step in steps.values():
        step()
    seconds = {name: [] for name in steps}
    for _ in range(pairs):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            seconds[name].append(time.perf_counter() - start)
    return seconds


def t5_rows(shapes, pairs):
    from transformers import MT5Config, MT5ForConditionalGeneration

    ours_b4k = build_model("t5_pegasus", "small", dropout=0.0)
    ours_hf = build_model("t5_pegasus", "small", dropout=0.0, compat="hf")
    c = ours_b4k.config
    hf = MT5ForConditionalGeneration(MT5Config(
        vocab_size=c.vocab_size, d_model=c.d_model, d_kv=c.head_dim, num_heads=c.num_heads, d_ff=c.d_ff,
        num_layers=c.num_encoder_layers, num_decoder_layers=c.num_decoder_layers, dropout_rate=0.0,
        feed_forward_proj="gated-gelu",
    ))
    rows = []
    for batch, source, target in shapes:
        x = torch.randint(106, c.vocab_size, (batch, source))
        y = torch.randint(106, c.vocab_size, (batch, target))
        ours_inputs = dict(input_ids=x, decoder_input_ids=y)
        hf_inputs = dict(input_ids=x, attention_mask=torch.ones_like(x), decoder_input_ids=y, use_cache=False)
        seconds = interleaved({"hf": train_step(hf.train(), hf_inputs),
                               "b4k": train_step(ours_b4k.train(), ours_inputs),
                               "hf-compat": train_step(ours_hf.train(), ours_inputs)}, pairs)
        tokens, workload = batch * (source + target), f"T5 small {batch}x({source}+{target})"
        rows.append((workload, f"transformers MT5 ({hf.config._attn_implementation})",
                     tokens / statistics.median(seconds["hf"]), 1.0, ""))
        for name, label in [("b4k", "suformer bert4keras, sdpa"), ("hf-compat", "suformer hf-compat, sdpa")]:
            ratios = [base / ours for base, ours in zip(seconds["hf"], seconds[name])]
            rows.append((workload, label, tokens / statistics.median(seconds[name]), statistics.median(ratios),
                         f"{min(ratios):.2f}-{max(ratios):.2f} over {pairs} pairs"))
    return rows


def roformer_rows(batch, length, steps):
    from transformers import RoFormerConfig, RoFormerForMaskedLM

    ours = build_model("roformer_v2", "base", dropout=0.0)
    c = ours.config
    hf = RoFormerForMaskedLM(RoFormerConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_hidden_layers=c.num_layers,
        num_attention_heads=c.num_heads, intermediate_size=c.intermediate_size, hidden_act="relu",
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, max_position_embeddings=length,
    ))
    x = torch.randint(106, c.vocab_size, (batch, length))
    tokens = batch * length
    baseline = time_steps(train_step(hf.train(), dict(input_ids=x, attention_mask=torch.ones_like(x))), steps)
    rows = [("RoFormerV2 base", "transformers RoFormer (v1 layout)", tokens / baseline, 1.0, "")]
    for backend in ("sdpa", "reference"):
        for m in ours.modules():
            if hasattr(m, "config"):
                m.config.attention_backend = backend
        seconds = time_steps(train_step(ours.train(), dict(input_ids=x)), steps)
        rows.append(("RoFormerV2 base", f"suformer, {backend}", tokens / seconds, baseline / seconds, ""))
    return rows


def tokenizer_rows(num_docs):
    import jieba
    from transformers import BertTokenizerFast

    docs = list(itertools.islice(peoples_daily(), num_docs + 2000))
    vocab_docs, docs = docs[:2000], docs[2000:]
    chars = sum(map(len, docs))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        word_vocab, char_vocab = f"{tmp}/words.txt", f"{tmp}/chars.txt"
        write_vocab(build_vocab(vocab_docs, 20000), word_vocab)
        write_vocab(build_vocab(vocab_docs, 8000, words=False), char_vocab)
        jieba.initialize()
        baseline = time_steps(lambda: [list(jieba.cut(d, HMM=False)) for d in docs], 1, warmup=0)
        rows.append(("tokenizer, jieba mode", "jieba.cut(HMM=False) alone", chars / baseline, 1.0, ""))
        ours = Tokenizer(word_vocab, pre_tokenize="jieba")
        cold = time_steps(lambda: ours.encode_batch(docs, maxlen=512), 1, warmup=0)
        warm = time_steps(lambda: ours.encode_batch(docs, maxlen=512), 1, warmup=0)
        rows.append(("tokenizer, jieba mode", "suformer (first pass)", chars / cold, baseline / cold, ""))
        rows.append(("tokenizer, jieba mode", "suformer (word cache warm)", chars / warm, baseline / warm, ""))
        fast = BertTokenizerFast(char_vocab, do_lower_case=True)
        baseline = time_steps(lambda: fast(docs, truncation=True, max_length=512), 1)
        rows.append(("tokenizer, char mode", "transformers BertTokenizerFast (Rust)", chars / baseline, 1.0, ""))
        ours = Tokenizer(char_vocab, pre_tokenize=None)
        seconds = time_steps(lambda: ours.encode_batch(docs, maxlen=512), 1)
        rows.append(("tokenizer, char mode", "suformer", chars / seconds, baseline / seconds, ""))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=7, help="interleaved timed pairs per T5 shape")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per RoFormer model (median is reported)")
    parser.add_argument("--docs", type=int, default=5000, help="paragraphs for the tokenizer benchmark")
    parser.add_argument("--quick", action="store_true", help="tokenizer and T5 only")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    rows = tokenizer_rows(args.docs) + t5_rows([(8, 256, 64), (4, 512, 256)], args.pairs)
    if not args.quick:
        rows += roformer_rows(8, 256, args.steps)
    print(f"| {'workload':<24} | {'implementation':<38} | {'throughput':>16} | {'vs baseline':>11} | spread |")
    print(f"|{'-' * 26}|{'-' * 40}|{'-' * 18}|{'-' * 13}|---|")
    for workload, impl, rate, ratio, spread in rows:
        unit = "chars/s" if workload.startswith("tokenizer") else "tokens/s"
        print(f"| {workload:<24} | {impl:<38} | {rate:>8,.0f} {unit:<7} | {ratio:>10.2f}x | {spread} |")


if __name__ == "__main__":
    main()
