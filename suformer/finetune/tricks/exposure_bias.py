"""Exposure-bias mitigation by random replacement (kexue.fm/archives/7259, bojone/exposure_bias): at training time
the decoder reads its own mistakes, never the gold prefix alone, so it learns to recover from them. Half of the
samples are left unchanged; in the others 30% of the teacher-forced decoder inputs are replaced by tokens drawn
from the same target sequence. The targets stay unchanged."""
from __future__ import annotations

import torch
from pydantic import Field

from ...padding import IGNORE_INDEX
from .base import Trick, check_seq2seq, register_trick


def replace_decoder_inputs(decoder_input_ids: torch.Tensor, labels: torch.Tensor, sample_prob: float = 0.5,
                           token_prob: float = 0.3, generator: torch.Generator | None = None) -> torch.Tensor:
    """`decoder_input_ids` [B, T] (start token first) with replacements drawn from each row's own `labels`
    (-100 = padding). The start token and padded positions are never touched."""
    out = decoder_input_ids.clone()
    real = labels != IGNORE_INDEX
    for row in range(out.shape[0]):
        if torch.rand((), generator=generator) >= sample_prob:
            continue
        positions = real[row].nonzero().flatten()
        positions = positions[positions > 0]  # position 0 holds the start token
        chosen = positions[torch.rand(len(positions), generator=generator) < token_prob]
        pool = labels[row][real[row]]
        picks = torch.randint(len(pool), (len(chosen),), generator=generator)
        out[row, chosen] = pool[picks].to(out.dtype)
    return out


@register_trick
class ExposureBias(Trick):
    name = "exposure_bias"

    class Settings(Trick.Settings):
        exposure_bias_replace: float = Field(0.0, ge=0, lt=1)  # 0 off; Su replaces 0.3 of half the samples

    @staticmethod
    def active(tricks):
        return tricks.exposure_bias_replace > 0

    @staticmethod
    def check(cfg, task):
        check_seq2seq(cfg, task, "exposure_bias_replace")

    def setup(self, model, trainable, task, train):
        self.generator = torch.Generator().manual_seed(self.cfg.train.seed)

    def transform_batch(self, batch, model):  # the decoder reads a partly wrong prefix
        return {**batch, "decoder_input_ids": replace_decoder_inputs(
            model.shift_right(batch["labels"]), batch["labels"], token_prob=self.settings.exposure_bias_replace,
            generator=self.generator)}
