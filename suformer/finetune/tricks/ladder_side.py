"""Ladder Side-Tuning (kexue.fm/archives/9138, bojone/LST-CLUE): the pretrained "expert" stays frozen and runs
without a graph; a small side transformer (4 layers, hidden 128, 4 heads, FFN 512 in Su's setting) reads the
expert's embeddings and, before each of its layers, a projection of every `skip`-th expert layer's output, and the
task head sits on the side network. No gradient reaches the expert, so LST saves memory and time, not only
parameters. The side layers are RoFormerV2 layers (RoPE, no biases, RMS norm) with bert4keras' DeepNorm-style
initialisation, std 1.13684723 / sqrt(hidden) / sqrt(layers). Su trains them with lr 5e-3 and first-token pooling.
"""
from __future__ import annotations

import math
from dataclasses import replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field

from ...attention import AttentionMask
from ...models.layers import at_least_fp32
from ...models.outputs import ModelOutput
from ...models.roformer_v2 import RoFormerLayer
from .base import Trick, check_frozen_model_trick, register_trick


class LadderSideClassifier(nn.Module):
    def __init__(self, expert: nn.Module, num_labels: int, side_layers: int = 4, side_hidden: int = 128,
                 side_heads: int = 4, side_ffn: int = 512, dropout: float = 0.1):
        super().__init__()
        expert_layers = expert.config.num_layers
        if expert_layers % side_layers:
            raise ValueError(f"the expert's {expert_layers} layers do not split into {side_layers} side layers")
        self.expert, self.skip = expert, expert_layers // side_layers
        for p in self.expert.parameters():
            p.requires_grad_(False)
        side_config = replace(expert.config, hidden_size=side_hidden, num_heads=side_heads,
                              intermediate_size=side_ffn, num_layers=side_layers, dropout=dropout)
        width = expert.config.hidden_size
        self.side_input = nn.Linear(width, side_hidden, bias=False)
        self.ladders = nn.ModuleList(nn.Linear(width, side_hidden, bias=False) for _ in range(side_layers))
        self.side = nn.ModuleList(RoFormerLayer(side_config) for _ in range(side_layers))
        self.classifier = nn.Linear(side_hidden, num_labels)
        std = 1.13684723 / math.sqrt(side_hidden) / math.sqrt(side_layers)
        for module in [self.side_input, *self.ladders, *self.side.modules()]:
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=std)

    @property
    def word_embeddings(self) -> torch.Tensor:
        return self.expert.get_input_embeddings().weight

    @torch.no_grad()
    def expert_states(self, input_ids, key_padding) -> list[torch.Tensor]:
        """The expert's embedding output, then every layer's output (no graph: nothing flows back)."""
        self.expert.eval()  # frozen: no dropout either
        mask = AttentionMask(key_padding=key_padding)
        x = self.expert.embeddings(input_ids, torch.zeros_like(input_ids))
        states = [x]
        for i, layer in enumerate(self.expert.layers):
            x = layer(x, mask)
            states.append(x)
        return states

    def forward(self, input_ids, attention_mask=None, labels=None) -> ModelOutput:
        key_padding = (input_ids != self.expert.config.pad_token_id) if attention_mask is None else attention_mask.bool()
        states = self.expert_states(input_ids, key_padding)
        mask = AttentionMask(key_padding=key_padding)
        x = self.side_input(states[0])
        for i, (ladder, layer) in enumerate(zip(self.ladders, self.side)):
            x = layer(x + ladder(states[(i + 1) * self.skip]), mask)
        logits = self.classifier(x[:, 0])
        loss = F.cross_entropy(at_least_fp32(logits), labels) if labels is not None else None
        return ModelOutput(logits=logits, loss=loss)


@register_trick
class LadderSide(Trick):
    name = "ladder_side"
    changes_pretrained_model = True

    class Settings(Trick.Settings):
        ladder_side_layers: int = Field(0, ge=0)  # 0 off; Su's side network has 4 (hidden 128)

    @staticmethod
    def active(tricks):
        return tricks.ladder_side_layers > 0

    @staticmethod
    def check(cfg, task):
        check_frozen_model_trick(cfg, task, "ladder_side_layers", "Ladder Side-Tuning")

    def head(self, task, encoder, tokenizer):
        return LadderSideClassifier(encoder, len(task.labels), side_layers=self.settings.ladder_side_layers,
                                    dropout=self.cfg.model.dropout)
