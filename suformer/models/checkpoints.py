"""Checkpoint import/export in the formats users have: transformers' MT5 layout (the public T5 PEGASUS port),
JunnYu's RoFormerV2 layout, and (import only) Su's bert4keras TensorFlow releases (bert4keras.py maps their names
onto these layouts). Both models name their parameters after these layouts, so loading is validation plus two
renames; every missing, unexpected or mis-shaped tensor is an error that names it.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Optional

import torch

from ..storage import Location
from .bert4keras import is_bert4keras_dir, read_bert4keras
from .roformer import RoFormerV2Config, RoFormerV2ForMaskedLM
from .t5 import T5PegasusConfig, T5PegasusForConditionalGeneration


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded as asked; the message names the file, key or field."""


# Stacks own their bias table; checkpoints keep it under block 0 (transformers / mesh-TF naming).
_T5_RENAMES = {
    f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight": f"{stack}.relative_attention_bias.weight"
    for stack in ("encoder", "decoder")
}
_T5_ALIASES_OF_SHARED = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")
_ROFORMER_TIED_HEAD = "cls.predictions.decoder.weight"
_ROFORMER_IGNORED = ("roformer.encoder.embed_positions.weight", "roformer.embeddings.position_ids")
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


# -- config.json <-> typed config --------------------------------------------------------------------------------
def _t5_config_from_json(cfg: dict, compat: Optional[str], tied: bool, overrides: dict) -> T5PegasusConfig:
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


def _t5_config_to_json(c: T5PegasusConfig) -> dict:
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


def _roformer_config_from_json(cfg: dict, overrides: dict) -> RoFormerV2Config:
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


def _roformer_config_to_json(c: RoFormerV2Config) -> dict:
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


def detect_family(cfg: dict, where: str = "config.json") -> str:
    family = cfg.get("suformer", {}).get("family")
    if family:
        return family
    model_type = cfg.get("model_type")
    if model_type in ("mt5", "t5"):
        return "t5_pegasus"
    if model_type == "roformer":
        return "roformer_v2"
    raise CheckpointError(f"{where}: model_type={model_type!r} is neither T5/MT5 nor RoFormer")


# -- weights ------------------------------------------------------------------------------------------------------
def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if (path / "model.safetensors").exists():
        return load_file(path / "model.safetensors")
    if (path / "model.safetensors.index.json").exists():
        index = json.loads((path / "model.safetensors.index.json").read_text())
        state = {}
        for shard in sorted(set(index["weight_map"].values())):
            state.update(load_file(path / shard))
        return state
    if (path / "pytorch_model.bin").exists():
        return torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise CheckpointError(f"{path}: no weights file (looked for {', '.join(_WEIGHT_FILES)})")


def _canonical_state(family: str, state: dict[str, torch.Tensor], where: Path) -> dict[str, torch.Tensor]:
    """File keys -> model keys; tied aliases must really equal what they alias."""
    state = dict(state)
    if family == "t5_pegasus":
        for old, new in _T5_RENAMES.items():
            if old in state:
                state[new] = state.pop(old)
        aliases = _T5_ALIASES_OF_SHARED
        target = "shared.weight"
    else:
        for key in _ROFORMER_IGNORED:
            state.pop(key, None)
        aliases = (_ROFORMER_TIED_HEAD,)
        target = "roformer.embeddings.word_embeddings.weight"
    for alias in aliases:
        if alias in state:
            tensor = state.pop(alias)
            if target in state and not torch.equal(tensor, state[target]):
                raise CheckpointError(f"{where}: {alias} differs from {target}, but the model ties them")
            state.setdefault(target, tensor)
    return state


def load_state(model: torch.nn.Module, state: dict[str, torch.Tensor], where) -> None:
    """Strict load with an error that names every missing/unexpected key and every shape mismatch."""
    expected = {k: v for k, v in model.state_dict().items() if k not in _tied_keys(model)}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(state) & set(expected))
        if state[k].shape != expected[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {', '.join(missing[:20])}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected[:20])}")
    if mismatched:
        problems.append(f"shape mismatches ({len(mismatched)}): {'; '.join(mismatched[:20])}")
    if problems:
        raise CheckpointError(f"{where}: weights do not match the config:\n  " + "\n  ".join(problems))
    model.load_state_dict(state, strict=False)


def _tied_keys(model: torch.nn.Module) -> set[str]:
    """State-dict keys that alias an earlier parameter (tied heads)."""
    seen, tied = {}, set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in seen:
            tied.add(name)
        seen[id(tensor)] = name
    return tied


def from_pretrained(path, compat: Optional[str] = None, **overrides):
    """Load a T5 PEGASUS (transformers MT5 layout) or RoFormerV2 (JunnYu layout) directory, or a bert4keras release
    as published (TensorFlow checkpoint + config.json/bert_config.json): a local path or a URI
    (`s3://bucket/runs/<name>/model`, copied once into the temp dir).

    `compat` applies to T5: "bert4keras" (default: the model as trained) or "hf" (exactly transformers' MT5).
    `overrides` replace config fields, e.g. attention_backend="reference" or dropout=0.0.
    """
    try:
        path = Location.of(path).local_folder()
    except FileNotFoundError:
        raise CheckpointError(f"{path}: not found") from None
    config_file = path / "config.json"
    if not any((path / name).exists() for name in _WEIGHT_FILES) and is_bert4keras_dir(path):
        try:
            family, cfg, state = read_bert4keras(path)
        except ValueError as e:
            raise CheckpointError(str(e)) from None
    else:
        if not config_file.exists():
            raise CheckpointError(f"{config_file}: not found")
        try:
            cfg = json.loads(config_file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{config_file}: not valid JSON ({e})") from None
        family = detect_family(cfg, str(config_file))
        state = _read_weights(path)
    state = _canonical_state(family, state, path)
    try:
        if family == "t5_pegasus":
            # Tied iff the head is absent or equal to the embedding: transformers >= 5 writes
            # tie_word_embeddings=true even for untied MT5 checkpoints, so the tensors decide.
            head = state.get("lm_head.weight")
            tied = head is None or ("shared.weight" in state and torch.equal(head, state["shared.weight"]))
            if tied:
                state.pop("lm_head.weight", None)
            config = _t5_config_from_json(cfg, compat, tied, overrides)
            model = T5PegasusForConditionalGeneration(config)
            prescaled = cfg.get("suformer", {}).get("lm_head_prescaled", False)
            if prescaled and config.scale_decoder_output and "lm_head.weight" in state:
                state["lm_head.weight"] = state["lm_head.weight"] * math.sqrt(config.d_model)
        elif compat not in (None, "bert4keras"):
            raise CheckpointError(f"compat={compat!r} applies to T5 PEGASUS only")
        else:
            model = RoFormerV2ForMaskedLM(_roformer_config_from_json(cfg, overrides))
    except KeyError as e:
        raise CheckpointError(f"{config_file}: missing field {e.args[0]!r}") from None
    load_state(model, state, path)
    return model.eval()


def save_pretrained(model, path) -> None:
    """Write config.json + model.safetensors in the public layout, atomically (temp files, then rename)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = model.config
    tied = _tied_keys(model)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items() if k not in tied}
    if config.family == "t5_pegasus":
        cfg = _t5_config_to_json(config)
        for old, new in _T5_RENAMES.items():
            state[old] = state.pop(new)
        if cfg["suformer"]["lm_head_prescaled"]:
            state["lm_head.weight"] = state["lm_head.weight"] * config.d_model**-0.5
    else:
        cfg = _roformer_config_to_json(config)
    _atomic_write(path / "model.safetensors", lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
    _atomic_write(path / "config.json", lambda tmp: Path(tmp).write_text(json.dumps(cfg, indent=2) + "\n"))


def _atomic_write(target: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
