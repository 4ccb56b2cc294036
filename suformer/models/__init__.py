"""T5 PEGASUS and RoFormerV2: `build_model(family, preset, **overrides)` and `from_pretrained(path, compat=None)`."""
from __future__ import annotations

from ..attention import AttentionMask, Rotary, T5RelativeBias, attention, available_backends, register_backend
from .checkpoints import CheckpointError, from_pretrained, save_pretrained
from .roformer import ROFORMER_PRESETS, RoFormerV2Config, RoFormerV2ForMaskedLM
from .t5 import T5_PRESETS, T5PegasusConfig, T5PegasusForConditionalGeneration

FAMILIES = {
    "t5_pegasus": (T5PegasusConfig, T5PegasusForConditionalGeneration, T5_PRESETS),
    "roformer_v2": (RoFormerV2Config, RoFormerV2ForMaskedLM, ROFORMER_PRESETS),
}


def build_model(family: str, preset: str = "base", **overrides):
    """A freshly initialised model. Overrides replace config fields (e.g. vocab_size, attention_backend,
    compat for T5); `dropout` sets every dropout rate of the model."""
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; choose from {sorted(FAMILIES)}")
    config_cls, model_cls, presets = FAMILIES[family]
    if preset not in presets:
        raise ValueError(f"unknown {family} preset {preset!r}; choose from {sorted(presets)}")
    fields = {**presets[preset], **overrides}
    if family == "roformer_v2" and "dropout" in overrides and "attention_dropout" not in overrides:
        fields["attention_dropout"] = overrides["dropout"]
    try:
        config = config_cls(**fields)
    except TypeError as e:
        raise ValueError(f"bad override for {family}: {e}") from None
    return model_cls(config)


__all__ = [
    "AttentionMask", "CheckpointError", "FAMILIES", "Rotary", "T5RelativeBias", "RoFormerV2Config",
    "RoFormerV2ForMaskedLM", "T5PegasusConfig", "T5PegasusForConditionalGeneration", "attention",
    "available_backends", "build_model", "from_pretrained", "register_backend", "save_pretrained",
]
