"""Make a model folder that `model.init_from` (pretraining, fine-tuning) and `from_pretrained` take.

    python jobs/convert.py mt5-to-t5-pegasus --mt5 DIR --vocab vocab.txt --out DIR [--compat bert4keras|hf]
    python jobs/convert.py bert4keras --src DIR --out DIR

mt5-to-t5-pegasus: T5 PEGASUS' starting point, a transformers-layout mT5 (config.json, model.safetensors or
pytorch_model.bin, spiece.model: e.g. google/mt5-base) re-indexed to a jieba word-level vocab the way
t5-pegasus' train.py did it (specials take <unk>'s row, words found in the sentencepiece vocab their row, the rest
the mean of their pieces' rows; the same for the untied LM head). Build the vocab with suformer (a pretraining
run without data.vocab writes one) or bring T5 PEGASUS' released vocab.txt.
bert4keras: Su's released TensorFlow checkpoints as published (chinese_t5_pegasus_{small,base},
chinese_roformer-v2-char_*), written in the transformers layout with their vocab and tokenizer settings.

The output folder must be new or empty; it appears complete or not at all.
Exit status: 0 done, 2 bad input (nothing written).
"""
import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from suformer.models import from_pretrained, save_pretrained
from suformer.models.checkpoints import CheckpointError
from suformer.tokenizer import Tokenizer


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    mt5 = commands.add_parser("mt5-to-t5-pegasus", help="initialise T5 PEGASUS from mT5 on a jieba word vocab")
    mt5.add_argument("--mt5", required=True, help="transformers-layout mT5 folder with spiece.model")
    mt5.add_argument("--vocab", required=True, help="the word-level vocab.txt (106 BERT specials first)")
    mt5.add_argument("--out", required=True)
    mt5.add_argument("--compat", choices=("bert4keras", "hf"), default="bert4keras",
                     help="bert4keras (default): what T5 PEGASUS' pretraining started from; hf: mT5's function")
    released = commands.add_parser("bert4keras", help="a released bert4keras TensorFlow checkpoint folder")
    released.add_argument("--src", required=True, help="folder with *.ckpt.index/data, (bert_)config.json, vocab.txt")
    released.add_argument("--out", required=True)
    args = parser.parse_args(argv)

    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        print(f"error: --out {out}: exists and is not an empty folder (nothing is overwritten)", file=sys.stderr)
        return 2
    try:
        if args.command == "mt5-to-t5-pegasus":
            model, tokenizer, summary = _from_mt5(args)
        else:
            model, tokenizer, summary = _from_bert4keras(args)
    except (CheckpointError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        save_pretrained(model, staging)
        tokenizer.save_pretrained(staging)
        if out.exists():
            out.rmdir()
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(summary)
    print(f"[suformer] wrote {out}: set model.init_from: {out.resolve()}")
    return 0


def _from_mt5(args):
    from suformer.models.t5_pegasus.mt5_transplant import convert_mt5

    vocab = Path(args.vocab)
    if not vocab.is_file():
        raise FileNotFoundError(f"--vocab {vocab}: not found")
    model, plan = convert_mt5(args.mt5, vocab, args.compat)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "vocab.txt").write_text("\n".join(plan.tokens) + "\n", encoding="utf-8")
        tokenizer = Tokenizer(Path(tmp) / "vocab.txt", pre_tokenize="jieba")
    summary = (f"[suformer] {len(plan.tokens)} tokens: 106 specials (<unk>'s row), {plan.matched} found in the "
               f"sentencepiece vocab, {plan.compound} compound (mean of their pieces' rows); compat={args.compat}")
    return model, tokenizer, summary


def _from_bert4keras(args):
    src = Path(args.src)
    model = from_pretrained(src)
    if not (src / "vocab.txt").is_file():
        raise FileNotFoundError(f"--src {src}: no vocab.txt")
    # T5 PEGASUS segments words with jieba; RoFormerV2's vocab is character-level.
    tokenizer = Tokenizer(src / "vocab.txt", pre_tokenize="jieba" if model.config.family == "t5_pegasus" else None)
    if len(tokenizer) != model.config.vocab_size:
        raise CheckpointError(f"{src / 'vocab.txt'}: {len(tokenizer)} tokens, the checkpoint has "
                              f"vocab_size {model.config.vocab_size}")
    params = sum(p.numel() for p in model.parameters())
    return model, tokenizer, f"[suformer] {model.config.family}: {params / 1e6:.1f}M parameters from {src}"


if __name__ == "__main__":
    sys.exit(main())
