"""T5 PEGASUS and RoFormerV2: `build_model(family, preset, **overrides)` and `from_pretrained(path, compat=None)`."""
from __future__ import annotations

from ..attention import AttentionMask, Rotary, T5RelativeBias, attention, available_backends, register_backend
# Each family package registers itself; in this order, which the configs' error messages list.
from . import t5_pegasus, roformer_v2  # noqa: F401, I001
from .checkpoints import from_pretrained, save_pretrained
from .registry import FAMILIES, CheckpointError
from .roformer_v2 import RoFormerV2Config, RoFormerV2ForMaskedLM
from .t5_pegasus import T5PegasusConfig, T5PegasusForConditionalGeneration


def build_model(family: str, preset: str = "base", **overrides):
    """A freshly initialised model. Overrides replace config fields (e.g. vocab_size, attention_backend,
    compat for T5); `dropout` sets every dropout rate of the model."""
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; choose from {sorted(FAMILIES)}")
    spec = FAMILIES[family]
    if preset not in spec.presets:
        raise ValueError(f"unknown {family} preset {preset!r}; choose from {sorted(spec.presets)}")
    fields = {**spec.presets[preset], **overrides}
    try:
        config = spec.config_cls(**fields)
    except TypeError as e:
        raise ValueError(f"bad override for {family}: {e}") from None
    return spec.model_cls(config)


__all__ = [
    "AttentionMask", "CheckpointError", "FAMILIES", "Rotary", "T5RelativeBias", "RoFormerV2Config",
    "RoFormerV2ForMaskedLM", "T5PegasusConfig", "T5PegasusForConditionalGeneration", "attention",
    "available_backends", "build_model", "from_pretrained", "register_backend", "save_pretrained",
]
