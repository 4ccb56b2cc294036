"""How fast pretraining learns: held-out loss after N steps for our models under each setting, next to
transformers' reference models of the same size, trained side by side on the same examples in the same order.

    python benchmarks/convergence.py [--steps 400] [--families t5_pegasus roformer_v2] [--threads 2] [--seed 0]
        [--lr 1e-3] [--scaled adamw_scale=0.02 adafactor=0.01] [--rows TEXT ...]

Data: People's Daily paragraphs (the `make pretrain` corpus), a vocab built from them (8,000 tokens: jieba words +
characters for T5 PEGASUS, characters for RoFormerV2), examples made by the objectives of the data stage
(pegasus: max_source_len 256, max_target_len 64; mlm: max_len 128). The last 256 examples are held out; the
training batches (32 examples) come from the rest in one seeded order, the same for every row (`--seed` changes
the initialisations and that order, not the held-out examples).
Training: each row's optimizer (AdamW: lr 1e-3 or `--lr`, betas 0.9/0.999, eps 1e-6; AdamWScale and Adafactor:
the relative lr shown, `--scaled`; weight decay 0.01 on matrices), 20 linear warm-up steps, then constant; no dropout; one
process, `--threads` torch threads. Held-out loss: mean cross-entropy per predicted token over all 256 examples;
accuracy: argmax equal to the label, over the same tokens.

Rows (baselines: transformers' models of the same dims, their own initialisation, under AdamW; the baseline
trains first and each row prints when it is done; `--rows` picks rows by name):
  t5_pegasus   suformer in bert4keras mode (the default) and in hf mode, each under AdamW, AdamWScale and
               Adafactor (train.optimizer; under AdamW the bert4keras head's group compensates the output scale),
               transformers MT5ForConditionalGeneration
  roformer_v2  suformer RoFormerV2 under the same optimizers, transformers RoFormerForMaskedLM (v1),
               transformers BertForMaskedLM
"""
from __future__ import annotations

import argparse
import itertools
import platform
import random
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from suformer.config import DataSection
from suformer.corpora import peoples_daily
from suformer.pretrain.data.dataset import examples_from_documents
from suformer.pretrain.data.objectives import OBJECTIVES
from suformer.padding import IGNORE_INDEX
from suformer.models import build_model
from suformer.tokenizer import Tokenizer, build_vocab, write_vocab
from suformer.train.schedules import learning_rate_factor
from suformer.train.optimizers import adamw, optimizer_named, parameter_groups

HELD_OUT, BATCH, LR, EPS, DECAY, WARMUP = 256, 32, 1e-3, 1e-6, 0.01, 20
SCALED = [("adamw_scale", 2e-2), ("adafactor", 1e-2)]  # relative step sizes: nanoT5's and T5's
OBJECTIVE = {"t5_pegasus": "pegasus", "roformer_v2": "mlm"}


def examples(family: str, vocab_size: int = 8000) -> tuple[list[dict], list[dict], int]:
    """(training rows, held-out rows, vocab size) for one family, made as the data stage makes them."""
    documents = list(peoples_daily())
    objective = OBJECTIVE[family]
    data = DataSection(objective=objective, vocab_size=vocab_size, max_source_len=256, max_target_len=64, max_len=128)
    with tempfile.TemporaryDirectory() as tmp:
        vocab = Path(tmp, "vocab.txt")
        write_vocab(build_vocab(documents, vocab_size, words=objective == "pegasus"), vocab)
        tokenizer = Tokenizer(vocab, pre_tokenize=OBJECTIVES[objective].pre_tokenize)
    columns = examples_from_documents(documents, data, tokenizer)
    rows = [dict(zip(columns, values)) for values in zip(*columns.values())]
    random.Random(0).shuffle(rows)
    return rows[:-HELD_OUT], rows[-HELD_OUT:], len(tokenizer)


def model_inputs(family: str, batch: dict) -> dict:
    """What a model's forward takes, with attention masks for transformers' models (ours derive them from [PAD])."""
    if family == "t5_pegasus":
        return {"input_ids": batch["input_ids"], "attention_mask": batch["input_ids"] != 0,
                "decoder_input_ids": batch["decoder_input_ids"],
                "decoder_attention_mask": torch.cat([torch.ones_like(batch["decoder_input_ids"][:, :1]),
                                                    batch["decoder_input_ids"][:, 1:] != 0], 1)}
    return {"input_ids": batch["input_ids"], "attention_mask": batch["input_ids"] != 0}


def summed_loss(family: str, model, batch: dict) -> tuple[torch.Tensor, int, int]:
    """(summed token cross-entropy, predicted tokens, correct argmaxes) of one batch."""
    logits = model(**model_inputs(family, batch)).logits.float()
    labels = batch["labels"]
    loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    predicted = labels != IGNORE_INDEX
    return loss, int(predicted.sum()), int((logits.argmax(-1)[predicted] == labels[predicted]).sum())


def held_out(family: str, model, rows: list[dict], collate) -> tuple[float, float]:
    model.eval()
    loss, tokens, correct = 0.0, 0, 0
    with torch.no_grad():
        for start in range(0, len(rows), 64):
            batch_loss, batch_tokens, batch_correct = summed_loss(family, model, collate(rows[start:start + 64]))
            loss, tokens, correct = loss + float(batch_loss), tokens + batch_tokens, correct + batch_correct
    model.train()
    return loss / tokens, correct / tokens


def transformers_model(name: str, vocab: int):
    import transformers

    if name == "mt5":
        config = transformers.MT5Config(vocab_size=vocab, d_model=128, d_kv=32, num_heads=4, d_ff=256, num_layers=2,
                                        num_decoder_layers=2, dropout_rate=0.0, feed_forward_proj="gated-gelu",
                                        tie_word_embeddings=False, decoder_start_token_id=101, pad_token_id=0)
        return transformers.MT5ForConditionalGeneration(config)
    dims = dict(vocab_size=vocab, hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256,
                hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, max_position_embeddings=512)
    if name == "roformer":
        return transformers.RoFormerForMaskedLM(transformers.RoFormerConfig(**dims))
    return transformers.BertForMaskedLM(transformers.BertConfig(**dims))


def optimizer(name: str, lr: float):
    """A factory of our pretraining optimizer `name` over our parameter groups, as train.optimizer builds it."""
    def make(model):
        return optimizer_named(name, parameter_groups(model, name, lr, DECAY, EPS))
    return make


def reference_adamw(lr: float):
    """transformers' models: AdamW with one learning rate, decay on matrices only."""
    def make(model):
        params = list(model.parameters())
        return adamw([{"params": [p for p in params if p.ndim >= 2], "lr": lr, "weight_decay": DECAY, "eps": EPS},
                      {"params": [p for p in params if p.ndim < 2], "lr": lr, "weight_decay": 0.0, "eps": EPS}],
                     offloaded=False)
    return make


def contenders(family: str, vocab: int, lr: float = LR, scaled_rates=tuple(SCALED)):
    """(row name, model factory, optimizer factory) in table order; `lr`: every AdamW row's."""
    ours = lambda **kw: build_model(family, "tiny", vocab_size=vocab, dropout=0.0, **kw)  # noqa: E731
    settings = [(f"adamw lr {lr:g}", optimizer("adamw", lr))] + [
        (f"{name} lr {rate:g}", optimizer(name, rate)) for name, rate in scaled_rates]
    if family == "t5_pegasus":
        return ([(f"suformer, compat={compat}, {label}", lambda compat=compat: ours(compat=compat), make)
                 for compat in ("bert4keras", "hf") for label, make in settings]
                + [("transformers MT5ForConditionalGeneration (baseline)", lambda: transformers_model("mt5", vocab),
                    reference_adamw(lr))])
    return ([(f"suformer RoFormerV2, {label}", ours, make) for label, make in settings]
            + [("transformers RoFormerForMaskedLM, v1 (baseline)", lambda: transformers_model("roformer", vocab),
                reference_adamw(lr)),
               ("transformers BertForMaskedLM", lambda: transformers_model("bert", vocab), reference_adamw(lr))])


def train(family: str, make_model, make_optimizer, train_rows, held_rows, steps: int, every: int, seed: int) -> dict:
    collate = OBJECTIVES[OBJECTIVE[family]].collate
    torch.manual_seed(seed)
    model = make_model().train()
    optimizer = make_optimizer(model)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: learning_rate_factor(s, WARMUP, steps, "constant", 1.0))
    order = itertools.cycle(random.Random(seed + 1).sample(range(len(train_rows)), len(train_rows)))
    curve, seconds = {}, 0.0
    for step in range(1, steps + 1):
        batch = collate([train_rows[next(order)] for _ in range(BATCH)])
        start = time.perf_counter()
        loss, tokens, _ = summed_loss(family, model, batch)
        optimizer.zero_grad()
        (loss / tokens).backward()
        optimizer.step()
        schedule.step()
        seconds += time.perf_counter() - start
        if step % every == 0:
            curve[step] = held_out(family, model, held_rows, collate)
    return {"curve": curve, "seconds": seconds}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--every", type=int, default=100, help="held-out evaluation every N steps")
    parser.add_argument("--families", nargs="+", default=["t5_pegasus", "roformer_v2"], choices=list(OBJECTIVE))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0, help="initialisations and batch order")
    parser.add_argument("--lr", type=float, default=LR, help="every AdamW row's learning rate, baselines' too")
    parser.add_argument("--scaled", nargs="*", default=[f"{name}={rate:g}" for name, rate in SCALED],
                        metavar="OPTIMIZER=LR", help="our rows under adamw_scale / adafactor at these relative rates")
    parser.add_argument("--rows", nargs="*", metavar="TEXT",
                        help="only the rows whose name holds one of these (the baseline always runs)")
    args = parser.parse_args()
    scaled_rates = [(name, float(rate)) for name, rate in (item.split("=") for item in args.scaled)]
    torch.set_num_threads(args.threads)
    print(f"# {platform.machine()}, {args.threads} threads, torch {torch.__version__}, {args.steps} steps of "
          f"{BATCH}, held-out {HELD_OUT}, seed {args.seed}")
    for family in args.families:
        train_rows, held_rows, vocab = examples(family)
        steps = list(range(args.every, args.steps + 1, args.every))
        print(f"\n## {family}: {len(train_rows)} training examples, vocab {vocab}; held-out loss (accuracy) by step")
        print("| model | " + " | ".join(f"step {s}" for s in steps) + " | train s | vs baseline at the end |")
        print("|---|" + "---|" * (len(steps) + 2))
        rows = contenders(family, vocab, args.lr, scaled_rates)
        rows = sorted((row for row in rows if "baseline" in row[0] or not args.rows
                       or any(text in row[0] for text in args.rows)), key=lambda row: "baseline" not in row[0])
        baseline = None  # trained first, so that each row prints as soon as it is done
        for name, make, make_optimizer in rows:
            r = train(family, make, make_optimizer, train_rows, held_rows, args.steps, args.every, args.seed)
            baseline = r["curve"][steps[-1]][0] if baseline is None else baseline
            cells = " | ".join(f"{r['curve'][s][0]:.3f} ({r['curve'][s][1]:.1%})" for s in steps)
            print(f"| {name} | {cells} | {r['seconds']:.0f} | {r['curve'][steps[-1]][0] - baseline:+.3f} nats |",
                  flush=True)


if __name__ == "__main__":
    main()
