"""RoFormerV2 in JunnYu's transformers layout (roformer_v2_chinese_char_*): its key names onto the model's, config.json
both ways, the MLM head tied to the word embeddings, and the position tables transformers keeps but RoPE computes."""
from __future__ import annotations

from typing import Optional

from ..registry import CheckpointError, FamilySpec, register_family
from .model import ROFORMER_PRESETS, RoFormerV2Config, RoFormerV2ForMaskedLM


def config_from_json(cfg: dict, state: dict, compat: Optional[str], overrides: dict) -> RoFormerV2Config:
    if compat not in (None, "bert4keras"):
        raise CheckpointError(f"compat={compat!r} applies to T5 PEGASUS only")
    if cfg.get("use_bias", True) or cfg.get("norm_type", "layer_norm") == "layer_norm":
        raise CheckpointError(
            "config.json describes RoFormer v1 (biases and LayerNorm: use_bias/norm_type); "
            "RoFormerV2 checkpoints set use_bias=false and a parameter-free norm_type"
        )
    if cfg.get("embedding_size", cfg["hidden_size"]) != cfg["hidden_size"]:
        raise CheckpointError("config.json: embedding_size != hidden_size is not a released RoFormerV2 shape")
    fields = dict(
        vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"], num_layers=cfg["num_hidden_layers"],
        num_heads=cfg["num_attention_heads"], intermediate_size=cfg["intermediate_size"],
        type_vocab_size=cfg.get("type_vocab_size", 2), dropout=cfg.get("hidden_dropout_prob", 0.1),
        attention_dropout=cfg.get("attention_probs_dropout_prob", 0.1), norm_eps=cfg.get("layer_norm_eps", 1e-12),
        rope_base=cfg.get("rotary_base", 10000.0), pad_token_id=cfg.get("pad_token_id", 0),
    )
    if cfg.get("hidden_act", "relu") != "relu":
        raise CheckpointError(f"config.json: hidden_act={cfg['hidden_act']!r}; RoFormerV2 uses relu")
    return RoFormerV2Config(**{**fields, **overrides})


def config_to_json(c: RoFormerV2Config) -> dict:
    return {
        "architectures": ["RoFormerForMaskedLM"], "model_type": "roformer",
        "vocab_size": c.vocab_size, "hidden_size": c.hidden_size, "embedding_size": c.hidden_size,
        "num_hidden_layers": c.num_layers, "num_attention_heads": c.num_heads,
        "intermediate_size": c.intermediate_size, "hidden_act": "relu", "type_vocab_size": c.type_vocab_size,
        "hidden_dropout_prob": c.dropout, "attention_probs_dropout_prob": c.attention_dropout,
        "layer_norm_eps": c.norm_eps, "rotary_base": c.rope_base, "max_position_embeddings": 512,
        "use_bias": False, "norm_type": "rms_norm", "rotary_value": False, "pad_token_id": c.pad_token_id,
        "suformer": {"family": "roformer_v2"},
    }


# JunnYu's names -> ours; "{}" is the layer number.
KEY_TEMPLATES = {
    "roformer.embeddings.word_embeddings.weight": "embeddings.word_embeddings.weight",
    "roformer.embeddings.token_type_embeddings.weight": "embeddings.token_type_embeddings.weight",
    **{f"roformer.encoder.layer.{{}}.attention.self.{name}.weight": f"layers.{{}}.attention.{name}.weight"
       for name in ("query", "key", "value")},
    "roformer.encoder.layer.{}.attention.output.dense.weight": "layers.{}.attention.output.weight",
    "roformer.encoder.layer.{}.intermediate.dense.weight": "layers.{}.ffn_in.weight",
    "roformer.encoder.layer.{}.output.dense.weight": "layers.{}.ffn_out.weight",
}

SPEC = register_family(FamilySpec(
    name="roformer_v2", config_cls=RoFormerV2Config, model_cls=RoFormerV2ForMaskedLM, presets=ROFORMER_PRESETS,
    model_types=("roformer",), lora_targets=("query", "key", "value"),
    config_from_json=config_from_json, config_to_json=config_to_json, key_templates=KEY_TEMPLATES,
    ignored_keys=("roformer.encoder.embed_positions.weight", "roformer.embeddings.position_ids"),
    tied_aliases=("cls.predictions.decoder.weight",), tie_target="roformer.embeddings.word_embeddings.weight",
))
