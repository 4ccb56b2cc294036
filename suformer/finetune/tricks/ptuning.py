"""P-tuning in Su's form (kexue.fm/archives/8295, bojone/P-tuning): classification as masked-language modelling.

The input becomes `[CLS] [u1][u2][u3][u4] [MASK] [u5]..[u8] text [SEP]`: eight `[unused]` tokens (ids 1-8 of
the BERT vocab) are the continuous prompt, and the MLM head's logits at `[MASK]` over one label word per class
(很 for positive, 不 for negative) are the class logits. With `freeze_model` (Su's few-shot setting) only the
prompt's eight embedding rows train: every other weight is frozen and the embedding's gradient is masked to those
rows. Su's lr is 6e-4. PEFT's P-tuning prepends encoder-produced virtual tokens instead of placing them around
`[MASK]`, and only for transformers models; this is the template form his results come from.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...models.layers import at_least_fp32
from ...models.outputs import ModelOutput
from .base import Trick, register_trick

PROMPT_IDS = tuple(range(1, 9))  # [unused1] .. [unused8]
LABEL_WORDS = ("不", "很")  # the words at [MASK] for negative and positive, as in Su's template
MASK_POSITION = 5  # [CLS] u1 u2 u3 u4 [MASK]


class PTuningClassifier(nn.Module):
    def __init__(self, mlm_model: nn.Module, label_word_ids: list[int], mask_id: int, cls_id: int,
                 freeze_model: bool = True):
        super().__init__()
        self.mlm = mlm_model
        self.register_buffer("label_word_ids", torch.tensor(label_word_ids), persistent=False)
        self.register_buffer("prefix", torch.tensor([cls_id, *PROMPT_IDS[:4], mask_id, *PROMPT_IDS[4:]]),
                             persistent=False)
        if freeze_model:
            for p in self.mlm.parameters():
                p.requires_grad_(False)
            self.word_embeddings.requires_grad_(True)
            rows = torch.zeros(self.word_embeddings.shape[0], 1)
            rows[list(PROMPT_IDS)] = 1.0
            self.word_embeddings.register_hook(lambda grad: grad * rows.to(grad))

    @property
    def word_embeddings(self) -> torch.Tensor:
        return self.mlm.get_input_embeddings().weight

    def templated(self, input_ids: torch.Tensor) -> torch.Tensor:
        """`[CLS] text [SEP]` rows -> `[CLS] u1..u4 [MASK] u5..u8 text [SEP]`."""
        return torch.cat([self.prefix.expand(len(input_ids), -1), input_ids[:, 1:]], dim=1)

    def forward(self, input_ids, attention_mask=None, labels=None) -> ModelOutput:
        ids = self.templated(input_ids)
        hidden = self.mlm.encode(ids, ids != self.mlm.config.pad_token_id)
        vocab_logits = self.mlm.mlm_head(self.mlm.head_dropout(hidden[:, MASK_POSITION]))
        logits = vocab_logits[:, self.label_word_ids]
        loss = F.cross_entropy(at_least_fp32(logits), labels) if labels is not None else None
        return ModelOutput(logits=logits, loss=loss)


@register_trick
class PTuning(Trick):
    name = "ptuning"
    changes_pretrained_model = True

    class Settings(Trick.Settings):
        ptuning: Literal["none", "prompt", "full"] = "none"  # Su's MLM template; "prompt" trains only it

    @staticmethod
    def active(tricks):
        return tricks.ptuning != "none"

    @staticmethod
    def check(cfg, task):
        if cfg.data.task != "sentiment":
            raise ValueError("tricks.ptuning casts classification as MLM at [MASK]: use it with data.task=sentiment")
        if cfg.tricks.lora_r:
            raise ValueError("tricks.ptuning and tricks.lora_r both choose what trains: pick one")

    def head(self, task, encoder, tokenizer):
        missing = [w for w in LABEL_WORDS if w not in tokenizer.vocab]
        if missing:
            raise ValueError(f"P-tuning's label words {missing} are not in the vocab {tokenizer.vocab_path}")
        return PTuningClassifier(encoder, [tokenizer.vocab[w] for w in LABEL_WORDS], tokenizer.mask_id,
                                 tokenizer.cls_id, freeze_model=self.settings.ptuning == "prompt")

    def parameter_groups(self, model, groups):
        if self.settings.ptuning == "prompt":  # 8 embedding rows train: weight decay would shrink all the others
            return [{**group, "weight_decay": 0.0} for group in groups]
        return groups
