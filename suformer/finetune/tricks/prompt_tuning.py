"""Prompt tuning (Lester et al. 2021) through PEFT: `num_virtual_tokens` trainable vectors are prepended to the
input's word vectors and the whole pretrained model is frozen; with a classification task the head trains too.

PEFT's prompt learning drives transformers models: it reads a `config` with `to_dict()`, finds the word
embeddings with `get_input_embeddings()`, and calls the model with `inputs_embeds` (plus `output_attentions`,
`output_hidden_states`, `return_dict`, which mean nothing here). `PromptTunedClassifier` is that surface over a
`SequenceClassifier`: the soft prompt is PEFT's, the pooling knows the `[CLS]` token now sits after it.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field

from ...models.layers import at_least_fp32
from ...models.outputs import ModelOutput
from ..tasks.classification import SequenceClassifier
from .base import Trick, check_frozen_model_trick, register_trick


class _ConfigView(dict):
    """A dict with attribute access and `to_dict()`, the two ways PEFT reads a model config."""

    def __getattr__(self, key):
        try:
            return self[key]
        except KeyError:
            raise AttributeError(key) from None

    def to_dict(self) -> dict:
        return dict(self)


class PromptTunedClassifier(nn.Module):
    def __init__(self, classifier: SequenceClassifier, num_virtual_tokens: int):
        super().__init__()
        self.model, self.num_virtual_tokens = classifier, num_virtual_tokens
        c = classifier.encoder.config
        self.config = _ConfigView(model_type=c.family, vocab_size=c.vocab_size, hidden_size=c.hidden_size,
                                  num_layers=c.num_layers, num_attention_heads=c.num_heads)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.encoder.get_input_embeddings()

    @property
    def device(self) -> torch.device:
        return self.model.classifier.weight.device

    def forward(self, inputs_embeds, attention_mask=None, labels=None, output_attentions=None,
                output_hidden_states=None, return_dict=None) -> ModelOutput:
        hidden = self.model.encoder.encode(None, attention_mask, inputs_embeds=inputs_embeds)
        if self.model.pooling == "cls":
            pooled = hidden[:, self.num_virtual_tokens]  # [CLS] follows the virtual tokens
        else:  # the real tokens only
            real = attention_mask.clone()
            real[:, : self.num_virtual_tokens] = 0
            pooled = self.model.pool(hidden, real)
        logits = self.model.classifier(self.model.dropout(pooled))
        loss = F.cross_entropy(at_least_fp32(logits), labels) if labels is not None else None
        return ModelOutput(logits=logits, loss=loss)


def apply_prompt_tuning(classifier: SequenceClassifier, num_virtual_tokens: int):
    """The PEFT-wrapped classifier: only the soft prompt (initialised from sampled vocabulary vectors, as Lester
    recommends over random ones) and the classification head train."""
    from peft import PromptTuningConfig, PromptTuningInit, TaskType, get_peft_model

    config = PromptTuningConfig(task_type=TaskType.FEATURE_EXTRACTION, num_virtual_tokens=num_virtual_tokens,
                                prompt_tuning_init=PromptTuningInit.SAMPLE_VOCAB)
    model = get_peft_model(PromptTunedClassifier(classifier, num_virtual_tokens), config)
    for p in classifier.classifier.parameters():
        p.requires_grad_(True)
    return model


@register_trick
class PromptTuning(Trick):
    name = "prompt_tuning"

    class Settings(Trick.Settings):
        prompt_tuning_tokens: int = Field(0, ge=0)  # 0 off; a PEFT soft prompt of that many vectors

    @staticmethod
    def active(tricks):
        return tricks.prompt_tuning_tokens > 0

    @staticmethod
    def check(cfg, task):
        check_frozen_model_trick(cfg, task, "prompt_tuning_tokens", "prompt tuning")

    def wrap_model(self, model, task):
        return apply_prompt_tuning(model, self.settings.prompt_tuning_tokens)
