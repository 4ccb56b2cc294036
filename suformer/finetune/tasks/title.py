"""CSL title generation (CLGE): T5 PEGASUS reads a paper's abstract and writes its title, the benchmark of T5
PEGASUS' published table (t5-pegasus README; kexue.fm/archives/8209).

Data as t5-pegasus finetune.py reads it: a folder with `train.tsv`, `val.tsv` and `test.tsv`, each line
`title<TAB>content`. Decoding is bert4keras' beam search (`data.num_beams`; the table has beams 1, 2 and 3) with at
most `data.max_target_len` tokens; the dev metric that picks the epoch is BLEU, as in Su's script.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .base import text_lines
from .seq2seq import Seq2SeqTask, char_rouge_bleu
from .registry import register_task

SPLIT_FILES = {"train": "train.tsv", "dev": "val.tsv", "test": "test.tsv"}


def read_csl(path) -> list[tuple[str, str]]:
    """(content, title) rows of a CSL file: `title<TAB>content` per line, surrounding whitespace stripped."""
    rows = []
    for number, line in text_lines(path):
        line = line.strip()
        if not line:
            continue
        fields = line.split("\t")
        if len(fields) != 2 or not all(fields):
            raise ValueError(f"{path}:{number}: expected title<TAB>content, got {len(fields)} field(s)"
                             + (" with an empty one" if len(fields) == 2 else ""))
        title, content = fields
        rows.append((content, title))
    if not rows:
        raise ValueError(f"{path}: no title/content lines")
    return rows


@register_task("title")
class TitleTask(Seq2SeqTask):
    metric = "bleu"
    data_folder = "a CSL folder (train.tsv, val.tsv, test.tsv: title<TAB>content)"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.target_len = cfg.data.max_target_len

    def splits(self):
        folder = Path(self.cfg.data.path).expanduser()
        missing = [name for name in SPLIT_FILES.values() if not (folder / name).is_file()]
        if missing:
            raise FileNotFoundError(f"data.path {folder}: {', '.join(missing)} not found (CSL as t5-pegasus reads "
                                    "it: train.tsv, val.tsv, test.tsv)")
        return {split: read_csl(folder / name) for split, name in SPLIT_FILES.items()}

    @torch.no_grad()
    def evaluate(self, model, features, batch_size):
        predictions = []
        for batch in self.batches(features, batch_size):
            generated = model.generate(batch["input_ids"], max_new_tokens=self.target_len,
                                       num_beams=self.cfg.data.num_beams)
            predictions += [self.tokenizer.decode(row) for row in generated.tolist()]
        return char_rouge_bleu(predictions, [f[2] for f in features])
