"""T5 PEGASUS in transformers' MT5 layout (the public port's checkpoints): its key names onto the model's,
config.json both ways, the bias table kept under block 0, the tied embeddings, and an untied head stored pre-scaled
when the model scales its decoder output (so transformers computes the same logits)."""
from __future__ import annotations

import math
from typing import Optional

import torch

from ..registry import CheckpointError, FamilySpec, register_family
from .model import T5_PRESETS, T5PegasusConfig, T5PegasusForConditionalGeneration


def config_fields_from_json(cfg: dict, compat: Optional[str], tied: bool, overrides: dict) -> T5PegasusConfig:
    ours = cfg.get("suformer", {})
    compat = compat or ours.get("compat") or "bert4keras"
    ffn = cfg.get("feed_forward_proj", "gated-gelu")
    if not ffn.startswith("gated-gelu"):
        raise CheckpointError(f"config.json: feed_forward_proj={ffn!r}; T5 PEGASUS is T5.1.1 with a gated-GELU FFN")
    fields = dict(
        vocab_size=cfg["vocab_size"], d_model=cfg["d_model"], num_heads=cfg["num_heads"], head_dim=cfg["d_kv"],
        d_ff=cfg["d_ff"], num_encoder_layers=cfg["num_layers"],
        num_decoder_layers=cfg.get("num_decoder_layers") or cfg["num_layers"],
        num_buckets=cfg.get("relative_attention_num_buckets", 32),
        max_distance=cfg.get("relative_attention_max_distance", 128),
        dropout=cfg.get("dropout_rate", 0.1), norm_eps=cfg.get("layer_norm_epsilon", 1e-6),
        tie_word_embeddings=tied, compat=compat,
        pad_token_id=cfg.get("pad_token_id", 0),
        decoder_start_token_id=ours.get("decoder_start_token_id", 101), eos_token_id=ours.get("eos_token_id", 102),
    )
    if compat == "hf":  # exactly what transformers builds from this file
        fields["gelu_approximate"] = "tanh" if ffn == "gated-gelu" else "none"
        # transformers >= 5: MT5 never rescales; T5 rescales unless the file says tie_word_embeddings=false.
        fields["scale_decoder_output"] = cfg.get("model_type") == "t5" and cfg.get("tie_word_embeddings") is not False
    return T5PegasusConfig(**{**fields, **overrides})


def config_from_json(cfg: dict, state: dict, compat: Optional[str], overrides: dict) -> T5PegasusConfig:
    # Tied iff the head is absent or equal to the embedding: transformers >= 5 writes tie_word_embeddings=true
    # even for untied MT5 checkpoints, so the tensors decide.
    head = state.get("lm_head.weight")
    tied = head is None or ("shared.weight" in state and torch.equal(head, state["shared.weight"]))
    if tied:
        state.pop("lm_head.weight", None)
    config = config_fields_from_json(cfg, compat, tied, overrides)
    prescaled = cfg.get("suformer", {}).get("lm_head_prescaled", False)
    if prescaled and config.scale_decoder_output and "lm_head.weight" in state:
        state["lm_head.weight"] = state["lm_head.weight"] * math.sqrt(config.d_model)
    return config


def config_to_json(c: T5PegasusConfig) -> dict:
    return {
        "architectures": ["MT5ForConditionalGeneration"], "model_type": "mt5", "is_encoder_decoder": True,
        "vocab_size": c.vocab_size, "d_model": c.d_model, "d_kv": c.head_dim, "num_heads": c.num_heads,
        "d_ff": c.d_ff, "num_layers": c.num_encoder_layers, "num_decoder_layers": c.num_decoder_layers,
        "relative_attention_num_buckets": c.num_buckets, "relative_attention_max_distance": c.max_distance,
        "dropout_rate": c.dropout, "layer_norm_epsilon": c.norm_eps,
        # transformers' "gated-gelu" means the tanh GELU; "gated-gelu_python" is its exact erf GELU.
        "feed_forward_proj": "gated-gelu" if c.gelu_approximate == "tanh" else "gated-gelu_python",
        "tie_word_embeddings": c.tie_word_embeddings,
        "pad_token_id": c.pad_token_id, "eos_token_id": c.eos_token_id,
        "decoder_start_token_id": c.decoder_start_token_id,
        "suformer": {
            "family": "t5_pegasus", "compat": c.compat, "cross_attention_bias": c.cross_attention_bias,
            # The untied head is stored pre-multiplied by d_model**-0.5 when the model scales its decoder output,
            # so transformers (which does not scale an untied head) computes the same logits.
            "lm_head_prescaled": bool(c.scale_decoder_output and not c.tie_word_embeddings),
            "decoder_start_token_id": c.decoder_start_token_id, "eos_token_id": c.eos_token_id,
        },
    }


def _saved_state(config: T5PegasusConfig, state: dict) -> dict:
    if config.scale_decoder_output and not config.tie_word_embeddings:
        state["lm_head.weight"] = state["lm_head.weight"] * config.d_model**-0.5
    return state


def _key_templates() -> dict[str, str]:
    """transformers' MT5 names -> ours; "{}" is the block number. Stacks own their bias table, which checkpoints keep
    under block 0 (transformers / mesh-TF naming)."""
    templates = {"shared.weight": "shared.weight", "lm_head.weight": "lm_head.weight"}
    for stack in ("encoder", "decoder"):
        templates[f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"] = \
            f"{stack}.relative_attention_bias.weight"
        templates[f"{stack}.final_layer_norm.weight"] = f"{stack}.final_norm.weight"
        sublayers = [("SelfAttention", "self_attention", ("q", "k", "v", "o"))]
        if stack == "decoder":
            sublayers.append(("EncDecAttention", "cross_attention", ("q", "k", "v", "o")))
        sublayers.append(("DenseReluDense", "feed_forward", ("wi_0", "wi_1", "wo")))
        for index, (theirs, ours, weights) in enumerate(sublayers):
            layer, block = f"{stack}.block.{{}}.layer.{index}", f"{stack}.blocks.{{}}"
            templates[f"{layer}.layer_norm.weight"] = f"{block}.{ours}_norm.weight"
            templates.update({f"{layer}.{theirs}.{w}.weight": f"{block}.{ours}.{w}.weight" for w in weights})
    return templates


SPEC = register_family(FamilySpec(
    name="t5_pegasus", config_cls=T5PegasusConfig, model_cls=T5PegasusForConditionalGeneration, presets=T5_PRESETS,
    model_types=("mt5", "t5"), lora_targets=("q", "v"),
    config_from_json=config_from_json, config_to_json=config_to_json,
    key_templates=_key_templates(),
    tied_aliases=("encoder.embed_tokens.weight", "decoder.embed_tokens.weight"), tie_target="shared.weight",
    adapt_saved_state=_saved_state,
))
