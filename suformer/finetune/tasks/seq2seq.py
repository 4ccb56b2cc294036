"""What the T5 PEGASUS tasks share: (source, target) rows, teacher-forced labels, and the scores of Su's T5 PEGASUS
fine-tuning script (t5-pegasus finetune.py): character-level ROUGE-1/2/L F1 (the `rouge` package) and BLEU (NLTK,
smoothing method 1) on lowercased text, averaged over the examples, an empty prediction scoring 0."""
from __future__ import annotations

from ...padding import IGNORE_INDEX, pad
from .base import Task


def char_rouge_bleu(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Mean character-level ROUGE-1/2/L F1 and BLEU, as Su's script computes them."""
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
    from rouge import Rouge

    rouge, smooth = Rouge(), SmoothingFunction().method1
    totals = {"rouge_1": 0.0, "rouge_2": 0.0, "rouge_l": 0.0, "bleu": 0.0}
    for predicted, reference in zip(predictions, references):
        if not predicted.strip():
            continue
        hyp, ref = " ".join(predicted).lower(), " ".join(reference).lower()
        scores = rouge.get_scores(hyps=hyp, refs=ref)[0]
        totals["rouge_1"] += scores["rouge-1"]["f"]
        totals["rouge_2"] += scores["rouge-2"]["f"]
        totals["rouge_l"] += scores["rouge-l"]["f"]
        totals["bleu"] += sentence_bleu([ref.split(" ")], hyp.split(" "), smoothing_function=smooth)
    return {k: v / max(1, len(references)) for k, v in totals.items()}


class Seq2SeqTask(Task):
    """Rows are (source, target) strings; features (source ids, target labels, target text). The source is cut to
    `data.max_len` tokens, the target to `target_len` (both keep [SEP], as bert4keras' truncation does)."""
    family = "t5_pegasus"
    softmax_outputs = True
    seq2seq = True
    target_len: int | None = None

    def texts(self, rows):
        return [text for pair in rows for text in pair]

    def encode(self, rows, tokenizer):
        return [(tokenizer.encode(src, self.cfg.data.max_len), tokenizer.encode(tgt, self.target_len)[1:], tgt)
                for src, tgt in rows]

    def collate(self, features):
        return {"input_ids": pad([f[0] for f in features]), "labels": pad([f[1] for f in features], IGNORE_INDEX)}

    def head(self, encoder, tokenizer):
        self.tokenizer = tokenizer  # to decode what evaluate() generates
        return encoder  # T5 PEGASUS is already a seq2seq model with its LM head

    def embedding(self, model):
        return model.get_input_embeddings().weight
