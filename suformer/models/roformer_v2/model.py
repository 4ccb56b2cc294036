"""RoFormerV2: char-level post-norm encoder with RoPE, no biases, parameter-free RMS norm, tied MLM head.

The model is `embeddings`, `layers[i]` (`attention.{query,key,value,output}`, `ffn_in`, `ffn_out`) and `mlm_head`
(tied to the word embeddings). Checkpoints keep JunnYu's RoFormer_pytorch names (`roformer.encoder.layer.N...`,
`cls.predictions.decoder`); layout.py maps between the two.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ...attention import AttentionMask, KVCache, Rotary, attention
from ...generation import search
from ...padding import IGNORE_INDEX
from ..flops import Count, attention_pairs, matmul, tokens
from ..layers import LayerStack
from ..outputs import ModelOutput


@dataclass
class RoFormerV2Config:
    vocab_size: int = 12000
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    type_vocab_size: int = 2
    dropout: float = 0.1
    attention_dropout: Optional[float] = None  # None: same as `dropout` (0.1 in the released configs)
    norm_eps: float = 1e-12
    rope_base: float = 10000.0
    # Entropy-invariant attention for length extrapolation: scale *= log(n)/log(logn_base) (Su; e.g. 512).
    logn_base: Optional[int] = None
    attention_backend: str = "auto"  # Triton kernels on CUDA, SDPA elsewhere
    pad_token_id: int = 0
    family: str = field(default="roformer_v2", init=False)

    def __post_init__(self):
        if self.attention_dropout is None:
            self.attention_dropout = self.dropout
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


ROFORMER_PRESETS = {
    "small": dict(hidden_size=384, num_layers=6, num_heads=6, intermediate_size=1536),
    "base": dict(hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072),
    "large": dict(hidden_size=1024, num_layers=24, num_heads=16, intermediate_size=4096),
    "tiny": dict(hidden_size=128, num_layers=2, num_heads=2, intermediate_size=256),
}


class RoFormerAttention(nn.Module):
    """Multi-head self-attention with RoPE: query/key/value projections, then the output projection."""

    def __init__(self, config: RoFormerV2Config):
        super().__init__()
        self.query = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.key = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.value = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.output = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.config = config
        self.rotary = Rotary(config.rope_base)

    def forward(self, x, mask, cache=None, query_offset=0):
        c = self.config
        split = lambda t: t.view(t.shape[0], t.shape[1], c.num_heads, c.head_dim).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        if cache is not None:
            k, v = cache.extend(k, v)
        out = attention(
            q, k, v, position=self.rotary, mask=mask, scale=1.0 / math.sqrt(c.head_dim),
            dropout_p=c.attention_dropout if self.training else 0.0, query_offset=query_offset,
            logn_base=c.logn_base, backend=c.attention_backend,
        )
        return self.output(out.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1))


class RoFormerLayer(nn.Module):
    """Post-norm: x = Norm(x + Drop(Attn(x))); x = Norm(x + Drop(FFN(x))); ReLU FFN, no biases."""

    def __init__(self, config: RoFormerV2Config):
        super().__init__()
        self.attention = RoFormerAttention(config)
        self.ffn_in = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.ffn_out = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.norm = nn.RMSNorm(config.hidden_size, eps=config.norm_eps, elementwise_affine=False)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x, mask, **kw):
        x = self.norm(x + self.dropout(self.attention(x, mask, **kw)))
        return self.norm(x + self.dropout(self.ffn_out(F.relu(self.ffn_in(x)))))


class RoFormerEmbeddings(nn.Module):
    def __init__(self, config: RoFormerV2Config):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.norm = nn.RMSNorm(config.hidden_size, eps=config.norm_eps, elementwise_affine=False)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, input_ids, token_type_ids, inputs_embeds=None):
        """`inputs_embeds` (word vectors, e.g. with soft-prompt vectors prepended) instead of `input_ids`."""
        words = self.word_embeddings(input_ids) if inputs_embeds is None else inputs_embeds
        # bert4keras order: dropout, then norm (identical to the ports' norm-then-dropout at inference).
        return self.norm(self.dropout(words + self.token_type_embeddings(token_type_ids)))


def roformer_v2_init_std(keras_shape: tuple[int, int], num_layers: int) -> float:
    """bert4keras RoFormerV2.initializer: std of the un-truncated normal for a Keras kernel of shape (in, out)."""
    fan = keras_shape[1] if (keras_shape[0] > 10000 or keras_shape[0] < 10) else keras_shape[0]
    return 1.13684723 / math.sqrt(fan) / math.sqrt(num_layers)


class RoFormerV2ForMaskedLM(LayerStack):
    def __init__(self, config: RoFormerV2Config):
        super().__init__()
        self.config = config
        self.embeddings = RoFormerEmbeddings(config)
        self.layers = nn.ModuleList([RoFormerLayer(config) for _ in range(config.num_layers)])
        self.head_dropout = nn.Dropout(config.dropout)
        self.mlm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.mlm_head.weight = self.embeddings.word_embeddings.weight
        self.init_weights()

    def get_input_embeddings(self) -> nn.Embedding:
        """The token embedding (transformers' accessor; the MLM head is tied to it)."""
        return self.embeddings.word_embeddings

    def stacked_layers(self) -> nn.ModuleList:
        return self.layers

    def forward_flops(self, batch: dict, count: Count = "real") -> int:
        """Matmul FLOPs of a forward pass over `batch` (models/flops.py for the conventions): every token passes
        every layer and the MLM head (a matmul, although tied to the embedding lookup); attention within each
        sequence, or each packed document."""
        c = self.config
        h = c.hidden_size
        ids = batch["input_ids"]
        mask = ids != c.pad_token_id if batch.get("attention_mask") is None else batch["attention_mask"].bool()
        n = tokens(mask, count)
        per_token = 4 * matmul(1, h, h) + matmul(1, h, c.intermediate_size) + matmul(1, c.intermediate_size, h)
        pairs = attention_pairs(mask, mask, count, batch.get("document_ids"))
        return c.num_layers * (n * per_token + 2 * 2 * h * pairs) + matmul(n, h, c.vocab_size)

    @torch.no_grad()
    def init_weights(self) -> None:
        """Every kernel ~ TruncatedNormal(0, std) cut at +-2 std, std = 1.1368/sqrt(fan_in * layers): the truncated
        normal's variance is 1/(fan_in * layers). Embeddings use the hidden size as fan (bert4keras' shape rule)."""
        for module in self.modules():
            # The tied head is the word embedding, initialised by the embedding's shape rule.
            if isinstance(module, (nn.Linear, nn.Embedding)) and module is not self.mlm_head:
                w = module.weight
                keras_shape = (w.shape[1], w.shape[0]) if isinstance(module, nn.Linear) else tuple(w.shape)
                std = roformer_v2_init_std(keras_shape, self.config.num_layers)
                nn.init.trunc_normal_(w, std=std, a=-2 * std, b=2 * std)

    def encode(self, input_ids, attention_mask=None, token_type_ids=None, cache=None, unilm=False, inputs_embeds=None,
               document_ids=None):
        """Final hidden states. `unilm`: bert4keras UniLM mask from token_type_ids (source 0, target 1);
        `document_ids` [B, L]: examples packed into each row, each attending only to itself (RoPE is relative, so
        an example's scores do not depend on where in the row it sits).

        With a `cache`, `input_ids` are only the new tokens; `attention_mask`/`token_type_ids` then cover the whole
        sequence so far (cache + new), since UniLM visibility depends on every segment id. `inputs_embeds` [B, L, H]
        replaces the word vectors of `input_ids` (soft prompts); `attention_mask` is then required.
        """
        if inputs_embeds is not None and attention_mask is None:
            raise ValueError("inputs_embeds needs an attention_mask (there are no ids to find the padding in)")
        if token_type_ids is None:
            like = input_ids if inputs_embeds is None else inputs_embeds[..., 0]
            token_type_ids = torch.zeros(like.shape, dtype=torch.long, device=like.device)
        offset = 0 if cache is None else cache.length
        key_padding = (input_ids != self.config.pad_token_id) if attention_mask is None else attention_mask.bool()
        new_types = token_type_ids[:, offset:] if cache is not None else token_type_ids
        mask = AttentionMask(
            key_padding=None if cache is not None and attention_mask is None else key_padding,
            segment_ids=token_type_ids if unilm else None, document_ids=document_ids,
        )
        x = self.embeddings(input_ids, new_types, inputs_embeds)
        for i in range(len(self.layers)):
            x = self.run_layer(i, x, mask, cache=None if cache is None else cache.layer(i), query_offset=offset)
        return x

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None, unilm=False,
                document_ids=None):
        """Masks default to `ids != pad`; `labels` -100 are ignored (MLM targets, or shifted UniLM targets);
        `document_ids` as in `encode`."""
        hidden = self.encode(input_ids, attention_mask, token_type_ids, unilm=unilm, document_ids=document_ids)
        logits = self.mlm_head(self.head_dropout(hidden))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX)
        return ModelOutput(logits=logits, loss=loss, hidden_states=hidden)

    def save_pretrained(self, path, **kwargs) -> None:
        from ..checkpoints import save_pretrained

        save_pretrained(self, path, **kwargs)

    def generate(self, input_ids, token_type_ids=None, attention_mask=None, *, eos_token_id=102, **options):
        """UniLM generation: `input_ids` is `[CLS] source [SEP]` (left-padded in a batch); returns target ids [B, T]
        ending with `eos_token_id` ([SEP]). Options as in `generation.search`."""
        ends_padded = (~attention_mask.bool()[:, -1] if attention_mask is not None
                       else input_ids[:, -1] == self.config.pad_token_id)
        if bool(ends_padded.any()):
            raise ValueError("UniLM generation continues each source at its end: left-pad the batch, "
                             "or pass one source")
        return search(self, lambda copies: UniLMStepper(self, input_ids, token_type_ids, attention_mask, copies),
                      input_ids, eos=eos_token_id, **options)


class UniLMStepper:
    """The source (segment 0) in one pass, then target tokens (segment 1) one at a time; RoPE positions and the
    UniLM mask continue across the cache exactly as bert4keras' re-encoding of source + output does."""

    def __init__(self, model: RoFormerV2ForMaskedLM, input_ids, token_type_ids, attention_mask, copies: int):
        self.model = model
        self.source = input_ids.repeat_interleave(copies, dim=0)
        types = torch.zeros_like(input_ids) if token_type_ids is None else token_type_ids
        self.types = types.repeat_interleave(copies, dim=0)
        pad = (input_ids != model.config.pad_token_id) if attention_mask is None else attention_mask.bool()
        self.padding = pad.repeat_interleave(copies, dim=0)
        self.cache = KVCache(model.config.num_layers)

    def __call__(self, tokens: Optional[torch.Tensor]) -> torch.Tensor:
        if tokens is None:
            ids = self.source
        else:
            ids = tokens
            self.types = torch.cat([self.types, torch.ones_like(tokens)], dim=1)
            self.padding = torch.cat([self.padding, torch.ones_like(tokens, dtype=torch.bool)], dim=1)
        hidden = self.model.encode(ids, self.padding, self.types, cache=self.cache, unilm=True)
        return self.model.mlm_head(hidden[:, -1]).float()

    def reorder(self, rows: torch.Tensor) -> None:
        self.types, self.padding = self.types[rows], self.padding[rows]
        self.cache.reorder(rows)
