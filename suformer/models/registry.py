"""One spec per model family: its config and model classes, presets, and the transformers layout its checkpoints
are read and written in (key renames, tied aliases, config.json both ways). `checkpoints.py` is generic over these
specs; each family's module registers its own (`t5.py`, `roformer.py` via their `*_layout.py`), so adding a family
is its model, its layout module and one import in `models/__init__.py`."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded as asked; the message names the file, key or field."""


@dataclass(frozen=True)
class FamilySpec:
    name: str
    config_cls: type
    model_cls: type
    presets: dict[str, dict]
    model_types: tuple[str, ...]  # config.json's model_type values that mean this family
    lora_targets: tuple[str, ...]  # the attention projections LoRA adapts by default
    # (config.json, the weights in the model's names, compat, overrides) -> the model's config. It may edit the
    # weights for what the config decides (T5: an untied head, its pre-scaling).
    config_from_json: Callable[[dict, dict, Optional[str], dict], object]
    config_to_json: Callable[[object], dict]
    renames: dict[str, str] = field(default_factory=dict)  # checkpoint key -> model key
    ignored_keys: tuple[str, ...] = ()  # in the public checkpoints, computed by the model instead
    tied_aliases: tuple[str, ...] = ()  # checkpoint keys that the model ties to `tie_target`
    tie_target: str = ""
    # (config, weights in checkpoint names) -> the weights as written, for what the model does differently
    adapt_saved_state: Callable[[object, dict], dict] = lambda config, state: state


FAMILIES: dict[str, FamilySpec] = {}


def register_family(spec: FamilySpec) -> FamilySpec:
    if spec.name in FAMILIES:
        raise ValueError(f"model family {spec.name!r} is registered twice")
    FAMILIES[spec.name] = spec
    return spec


def family_of(cfg: dict, where: str = "config.json") -> FamilySpec:
    """The family a config.json describes: suformer's own field, else transformers' model_type."""
    name = cfg.get("suformer", {}).get("family")
    if name in FAMILIES:
        return FAMILIES[name]
    for spec in FAMILIES.values():
        if cfg.get("model_type") in spec.model_types:
            return spec
    known = " or ".join("/".join(s.model_types) for s in FAMILIES.values())
    raise CheckpointError(f"{where}: model_type={cfg.get('model_type')!r} is none of {known}")
