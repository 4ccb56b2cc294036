"""T5 PEGASUS: the mT5 (T5.1.1) encoder-decoder as trained in bert4keras, or exactly as transformers' MT5.

The model is `shared` (embeddings), `encoder`/`decoder` stacks of `blocks[i]` (`self_attention`, decoder-only
`cross_attention`, `feed_forward`, each with its pre-norm) owning their relative-position table, and `lm_head`.
Checkpoints keep transformers' MT5ForConditionalGeneration names (`encoder.block.N.layer.M.SelfAttention...`, the
bias table under block 0); layout.py maps between the two.

compat="bert4keras" (default) versus compat="hf" differ in exactly three points, each its own config field:
  gelu_approximate      "none" (exact erf GELU, bert4keras' 'gelu')  vs "tanh" (transformers' gated-gelu)
  scale_decoder_output  always x * d_model**-0.5 before the untied head  vs only when embeddings are tied
  cross_attention_bias  decoder cross-attention adds T_dec[bucket(max(i-j, 0))]  vs no bias
Dropout placement also follows the source: transformers adds dropout on attention probabilities and inside the FFN.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ...attention import AttentionMask, KVCache, T5RelativeBias, attention
from ...generation import search
from ...padding import IGNORE_INDEX
from ..flops import Count, attention_pairs, matmul, tokens
from ..layers import LayerStack
from ..outputs import ModelOutput

COMPAT_MODES = ("bert4keras", "hf")


@dataclass
class T5PegasusConfig:
    vocab_size: int = 50000
    d_model: int = 768
    num_heads: int = 12
    head_dim: int = 64
    d_ff: int = 2048
    num_encoder_layers: int = 12
    num_decoder_layers: int = 12
    num_buckets: int = 32
    max_distance: int = 128
    dropout: float = 0.1
    norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    compat: str = "bert4keras"
    # None: taken from `compat` (see module docstring); set explicitly to mix.
    gelu_approximate: Optional[str] = None
    scale_decoder_output: Optional[bool] = None
    cross_attention_bias: Optional[bool] = None
    attention_backend: str = "auto"  # Triton kernels on CUDA, SDPA elsewhere
    pad_token_id: int = 0
    decoder_start_token_id: int = 101  # [CLS]
    eos_token_id: int = 102  # [SEP]
    family: str = field(default="t5_pegasus", init=False)

    def __post_init__(self):
        if self.compat not in COMPAT_MODES:
            raise ValueError(f"compat must be one of {COMPAT_MODES}, got {self.compat!r}")
        as_trained = self.compat == "bert4keras"
        if self.gelu_approximate is None:
            self.gelu_approximate = "none" if as_trained else "tanh"
        if self.scale_decoder_output is None:
            self.scale_decoder_output = as_trained or self.tie_word_embeddings
        if self.cross_attention_bias is None:
            self.cross_attention_bias = as_trained
        if self.gelu_approximate not in ("none", "tanh"):
            raise ValueError(f"gelu_approximate must be 'none' or 'tanh', got {self.gelu_approximate!r}")

    @property
    def inner_dropout(self) -> float:
        """transformers' extra dropout (attention probabilities, FFN inner); bert4keras has none."""
        return self.dropout if self.compat == "hf" else 0.0


T5_PRESETS = {
    "base": dict(d_model=768, num_heads=12, head_dim=64, d_ff=2048, num_encoder_layers=12, num_decoder_layers=12),
    # 6 heads x 64 = 384 != d_model 512, as in mT5-small.
    "small": dict(d_model=512, num_heads=6, head_dim=64, d_ff=1024, num_encoder_layers=8, num_decoder_layers=8),
    "tiny": dict(d_model=128, num_heads=4, head_dim=32, d_ff=256, num_encoder_layers=2, num_decoder_layers=2),
}


class T5Attention(nn.Module):
    def __init__(self, config: T5PegasusConfig):
        super().__init__()
        inner = config.num_heads * config.head_dim
        self.num_heads, self.head_dim = config.num_heads, config.head_dim
        self.q = nn.Linear(config.d_model, inner, bias=False)
        self.k = nn.Linear(config.d_model, inner, bias=False)
        self.v = nn.Linear(config.d_model, inner, bias=False)
        self.o = nn.Linear(inner, config.d_model, bias=False)
        self.dropout_p = config.inner_dropout
        self.backend = config.attention_backend

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.shape[0], x.shape[1], self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, x, *, position, mask, context=None, cache=None, query_offset=0):
        """Self-attention (context None) or cross-attention over `context`, optionally through the layer's part of
        a KVCache."""
        q = self._heads(self.q(x))
        if context is None:
            k, v = self._heads(self.k(x)), self._heads(self.v(x))
            if cache is not None:
                k, v = cache.extend(k, v)
        elif cache is not None and cache.cross is not None:
            k, v = cache.cross
        else:
            k, v = self._heads(self.k(context)), self._heads(self.v(context))
            if cache is not None:
                cache.cross = (k, v)
        out = attention(
            q, k, v, position=position, mask=mask, scale=1.0,  # T5: no 1/sqrt(d)
            dropout_p=self.dropout_p if self.training else 0.0, query_offset=query_offset, backend=self.backend,
        )
        return self.o(out.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1))


class T5GatedFFN(nn.Module):
    """T5.1.1 feed-forward: (act(x W_i0) * (x W_i1)) W_o, no biases.

    `inner_dropout` is transformers' extra dropout after the gate (bert4keras has none).
    """

    def __init__(self, d_model: int, d_ff: int, gelu_approximate: str, inner_dropout: float):
        super().__init__()
        self.wi_0 = nn.Linear(d_model, d_ff, bias=False)
        self.wi_1 = nn.Linear(d_model, d_ff, bias=False)
        self.wo = nn.Linear(d_ff, d_model, bias=False)
        self.gelu_approximate = gelu_approximate
        self.dropout = nn.Dropout(inner_dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = F.gelu(self.wi_0(x), approximate=self.gelu_approximate)
        return self.wo(self.dropout(gate * self.wi_1(x)))


class T5Block(nn.Module):
    """Pre-norm residual sublayers: self-attention, cross-attention over the encoder output (decoder only), and the
    gated FFN; each adds Drop(sublayer(Norm(x))) to x."""

    def __init__(self, config: T5PegasusConfig, is_decoder: bool):
        super().__init__()
        norm = lambda: nn.RMSNorm(config.d_model, eps=config.norm_eps)  # noqa: E731
        self.self_attention, self.self_attention_norm = T5Attention(config), norm()
        if is_decoder:
            self.cross_attention, self.cross_attention_norm = T5Attention(config), norm()
        self.feed_forward = T5GatedFFN(config.d_model, config.d_ff, config.gelu_approximate, config.inner_dropout)
        self.feed_forward_norm = norm()
        self.dropout = nn.Dropout(config.dropout)
        self.is_decoder = is_decoder

    def forward(self, x, *, position, mask, context=None, cross_position=None, cross_mask=None, cache=None,
                query_offset=0):
        cached = dict(cache=cache, query_offset=query_offset)
        x = x + self.dropout(self.self_attention(self.self_attention_norm(x), position=position, mask=mask, **cached))
        if self.is_decoder:
            attended = self.cross_attention(
                self.cross_attention_norm(x), context=context, position=cross_position, mask=cross_mask, **cached
            )
            x = x + self.dropout(attended)
        return x + self.dropout(self.feed_forward(self.feed_forward_norm(x)))


class T5Stack(LayerStack):
    """Encoder (bidirectional bias) or decoder (causal bias, cross-attention); embeddings are passed in."""

    def __init__(self, config: T5PegasusConfig, is_decoder: bool):
        super().__init__()
        self.config, self.is_decoder = config, is_decoder
        num_layers = config.num_decoder_layers if is_decoder else config.num_encoder_layers
        self.relative_attention_bias = nn.Embedding(config.num_buckets, config.num_heads)
        self.blocks = nn.ModuleList([T5Block(config, is_decoder) for _ in range(num_layers)])
        self.final_norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.dropout = nn.Dropout(config.dropout)

    def stacked_layers(self) -> nn.ModuleList:
        return self.blocks

    def forward(self, embeddings, padding_mask=None, context=None, context_mask=None, cache=None):
        bias = T5RelativeBias(
            self.relative_attention_bias.weight, bidirectional=not self.is_decoder,
            max_distance=self.config.max_distance, shared=self.layers_share_work,
        )
        offset = 0 if cache is None else cache.length
        self_mask = AttentionMask(key_padding=padding_mask, causal=self.is_decoder)
        cross_mask = AttentionMask(key_padding=context_mask)
        cross_bias = bias if self.config.cross_attention_bias else None
        x = self.dropout(embeddings)
        for i in range(len(self.blocks)):
            x = self.run_layer(i, x, position=bias, mask=self_mask, context=context, cross_position=cross_bias,
                               cross_mask=cross_mask, cache=None if cache is None else cache.layer(i),
                               query_offset=offset)
        return self.dropout(self.final_norm(x))


class T5PegasusForConditionalGeneration(nn.Module):
    def __init__(self, config: T5PegasusConfig):
        super().__init__()
        self.config = config
        self.shared = nn.Embedding(config.vocab_size, config.d_model)
        self.encoder = T5Stack(config, is_decoder=False)
        self.decoder = T5Stack(config, is_decoder=True)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.shared.weight
        self.apply(self._init_weights)

    def get_input_embeddings(self) -> nn.Embedding:
        """The token embedding shared by the encoder and decoder (transformers' accessor)."""
        return self.shared

    def _init_weights(self, module: nn.Module) -> None:
        """Mesh-TF / transformers T5 initialisation (T5 PEGASUS itself started from mT5's weights)."""
        c = self.config
        if isinstance(module, nn.RMSNorm):
            nn.init.ones_(module.weight)
        elif module is self.shared:
            nn.init.normal_(module.weight, std=1.0)
        elif module is self.lm_head and not c.tie_word_embeddings:
            # Unit-scale initial logits: transformers' std 1.0 for an untied T5.1.1 head assumes the decoder output
            # is scaled by d_model**-0.5 first (bert4keras mode); without that scale, std d_model**-0.5 does it.
            nn.init.normal_(module.weight, std=1.0 if c.scale_decoder_output else c.d_model**-0.5)
        elif isinstance(module, T5Stack):
            nn.init.normal_(module.relative_attention_bias.weight, std=c.d_model**-0.5)
        elif isinstance(module, T5Attention):
            nn.init.normal_(module.q.weight, std=(c.d_model * c.head_dim) ** -0.5)
            nn.init.normal_(module.k.weight, std=c.d_model**-0.5)
            nn.init.normal_(module.v.weight, std=c.d_model**-0.5)
            nn.init.normal_(module.o.weight, std=(c.num_heads * c.head_dim) ** -0.5)
        elif isinstance(module, T5GatedFFN):
            nn.init.normal_(module.wi_0.weight, std=c.d_model**-0.5)
            nn.init.normal_(module.wi_1.weight, std=c.d_model**-0.5)
            nn.init.normal_(module.wo.weight, std=c.d_ff**-0.5)

    def output_multipliers(self) -> dict[str, float]:
        """Parameters that act through a fixed multiplier, by name: bert4keras mode's untied head reads the decoder
        output times d_model**-0.5. The pretraining optimizer compensates (train/optimizers.py); tied embeddings, read
        unscaled at the input, cannot be."""
        c = self.config
        return {"lm_head.weight": c.d_model**-0.5} if c.scale_decoder_output and not c.tie_word_embeddings else {}

    def forward_flops(self, batch: dict, count: Count = "real") -> int:
        """Matmul FLOPs of a forward pass over `batch` (models/flops.py for the conventions): an encoder token
        passes the encoder; a decoder token the decoder's self- and cross-attention, its FFN and the head; the
        cross-attention keys and values are projected from the encoder's tokens in every decoder layer."""
        c = self.config
        d, inner, vocab = c.d_model, c.num_heads * c.head_dim, c.vocab_size
        encoder_mask = self._mask(batch["input_ids"], batch.get("attention_mask"))
        decoder_ids = batch["decoder_input_ids"] if "decoder_input_ids" in batch else batch["labels"]
        decoder_mask = self._mask(decoder_ids, batch.get("decoder_attention_mask"))
        enc, dec = tokens(encoder_mask, count), tokens(decoder_mask, count)
        per_token = 4 * matmul(1, d, inner) + 2 * matmul(1, d, c.d_ff) + matmul(1, c.d_ff, d)  # q k v o, gated FFN
        scores = 2 * 2 * inner  # per query-key pair: q.k and p.v
        encoder = enc * per_token + scores * attention_pairs(encoder_mask, encoder_mask, count)
        cross = (dec + enc) * 2 * matmul(1, d, inner) + scores * attention_pairs(decoder_mask, encoder_mask, count)
        decoder = dec * per_token + scores * attention_pairs(decoder_mask, decoder_mask, count) + cross
        return c.num_encoder_layers * encoder + c.num_decoder_layers * decoder + matmul(dec, d, vocab)

    def _mask(self, ids: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        return self.padding_mask(ids) if mask is None else mask.bool()

    # -- pieces used by generation ------------------------------------------------------------------------------
    def padding_mask(self, ids: torch.Tensor) -> torch.Tensor:
        """`ids != [PAD]`, with position 0 always visible (bert4keras' mask_zero, so a [PAD] start token works)."""
        mask = ids != self.config.pad_token_id
        mask[:, 0] = True
        return mask

    def encode(self, input_ids, attention_mask=None) -> torch.Tensor:
        mask = self.padding_mask(input_ids) if attention_mask is None else attention_mask.bool()
        return self.encoder(self.shared(input_ids), padding_mask=mask)

    def decode(
        self, decoder_input_ids, encoder_hidden_states, encoder_mask, decoder_attention_mask=None,
        cache: Optional[KVCache] = None,
    ):
        """Logits for `decoder_input_ids`; with a cache, only the new positions are passed and the cache grows."""
        if decoder_attention_mask is not None:
            decoder_attention_mask = decoder_attention_mask.bool()
        elif cache is None:
            decoder_attention_mask = self.padding_mask(decoder_input_ids)
        hidden = self.decoder(
            self.shared(decoder_input_ids), padding_mask=decoder_attention_mask,
            context=encoder_hidden_states, context_mask=encoder_mask, cache=cache,
        )
        if self.config.scale_decoder_output:
            hidden = hidden * self.config.d_model**-0.5
        return self.lm_head(hidden)

    def forward(
        self, input_ids, attention_mask=None, decoder_input_ids=None, decoder_attention_mask=None, labels=None,
        encoder_hidden_states=None,
    ) -> ModelOutput:
        """Masks default to `ids != pad` (bert4keras' mask_zero). `labels[t]` is the target of `logits[t]`
        (-100 ignored); without `decoder_input_ids` they are the labels shifted right after `[CLS]`."""
        if decoder_input_ids is None:
            if labels is None:
                raise ValueError("pass decoder_input_ids or labels")
            decoder_input_ids = self.shift_right(labels)
        encoder_mask = self.padding_mask(input_ids) if attention_mask is None else attention_mask.bool()
        if encoder_hidden_states is None:
            encoder_hidden_states = self.encoder(self.shared(input_ids), padding_mask=encoder_mask)
        logits = self.decode(decoder_input_ids, encoder_hidden_states, encoder_mask, decoder_attention_mask)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX)
        return ModelOutput(logits=logits, loss=loss, encoder_hidden_states=encoder_hidden_states)

    def shift_right(self, labels: torch.Tensor) -> torch.Tensor:
        shifted = labels.new_full(labels.shape, self.config.pad_token_id)
        shifted[:, 1:] = labels[:, :-1].masked_fill(labels[:, :-1] == IGNORE_INDEX, self.config.pad_token_id)
        shifted[:, 0] = self.config.decoder_start_token_id
        return shifted

    def save_pretrained(self, path, **kwargs) -> None:
        from ..checkpoints import save_pretrained

        save_pretrained(self, path, **kwargs)

    def generate(self, input_ids, attention_mask=None, **options) -> torch.Tensor:
        """Generated ids [B, T] after the `[CLS]` start, ending with `[SEP]`, right-padded with [PAD]. Options as in
        `generation.search`."""
        return search(self, lambda copies: T5Stepper(self, input_ids, attention_mask, copies), input_ids,
                      eos=self.config.eos_token_id, **options)


class T5Stepper:
    """Encoder once, then the decoder one token at a time from `[CLS]`."""

    def __init__(self, model: T5PegasusForConditionalGeneration, input_ids, attention_mask, copies: int):
        mask = model.padding_mask(input_ids) if attention_mask is None else attention_mask.bool()
        encoded = model.encode(input_ids, mask)
        self.model = model
        self.encoded = encoded.repeat_interleave(copies, dim=0)
        self.mask = mask.repeat_interleave(copies, dim=0)
        self.cache = KVCache(model.config.num_decoder_layers)
        start = model.config.decoder_start_token_id
        self.start = torch.full((self.encoded.shape[0], 1), start, device=input_ids.device)

    def __call__(self, tokens: Optional[torch.Tensor]) -> torch.Tensor:
        tokens = self.start if tokens is None else tokens
        return self.model.decode(tokens, self.encoded, self.mask, cache=self.cache)[:, -1].float()

    def reorder(self, rows: torch.Tensor) -> None:
        self.encoded, self.mask = self.encoded[rows], self.mask[rows]
        self.cache.reorder(rows)
