"""One spec per model family: its config and model classes, presets, and the adapter to the transformers layout its
checkpoints are read and written in: a template map between checkpoint keys and the model's own parameter names,
tied aliases, ignored keys, config.json both ways. `checkpoints.py` is generic over these specs; each family is a
package (`t5_pegasus/`, `roformer_v2/`) whose `layout.py` registers its spec, so adding a family is its package and
one import in `models/__init__.py`."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import cached_property
from typing import Callable, Optional

# The layer/block number in a key: its first all-digit component ("encoder.block.3.layer.0..." -> 3).
_LAYER_NUMBER = re.compile(r"(?<=\.)\d+(?=\.)")


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded as asked; the message names the file, key or field."""


def _rename(key: str, templates: dict[str, str]) -> Optional[str]:
    """`key` through a template map: an exact entry first, else the entry with "{}" for its layer number."""
    if key in templates:
        return templates[key]
    match = _LAYER_NUMBER.search(key)
    if match is None:
        return None
    target = templates.get(key[: match.start()] + "{}" + key[match.end():])
    return None if target is None else target.replace("{}", match.group(), 1)


@dataclass(frozen=True)
class FamilySpec:
    name: str
    config_cls: type
    model_cls: type
    presets: dict[str, dict]
    model_types: tuple[str, ...]  # config.json's model_type values that mean this family
    lora_targets: tuple[str, ...]  # the attention projections LoRA adapts by default
    # (config.json, the weights in checkpoint names, compat, overrides) -> the model's config. It may edit the
    # weights for what the config decides (T5: an untied head, its pre-scaling).
    config_from_json: Callable[[dict, dict, Optional[str], dict], object]
    config_to_json: Callable[[object], dict]
    # Checkpoint key template -> model key template, "{}" standing for the layer/block number; it must cover
    # every key of the model, so that a key it does not cover is an error rather than a silent drop.
    key_templates: dict[str, str] = field(default_factory=dict)
    ignored_keys: tuple[str, ...] = ()  # in the public checkpoints, computed by the model instead
    tied_aliases: tuple[str, ...] = ()  # checkpoint keys that the model ties to `tie_target` (a checkpoint key)
    tie_target: str = ""
    # (config, weights in checkpoint names) -> the weights as written, for what the model does differently
    adapt_saved_state: Callable[[object, dict], dict] = lambda config, state: state

    @cached_property
    def _model_to_checkpoint(self) -> dict[str, str]:
        inverse = {model: checkpoint for checkpoint, model in self.key_templates.items()}
        if len(inverse) != len(self.key_templates):
            raise ValueError(f"{self.name}: two checkpoint key templates map to the same model key")
        return inverse

    def model_key(self, checkpoint_key: str) -> Optional[str]:
        """The model's name for a checkpoint key; None where the templates do not cover it."""
        return _rename(checkpoint_key, self.key_templates)

    def checkpoint_key(self, model_key: str) -> str:
        """The checkpoint's name for one of the model's keys (every one is covered: a gap is a bug in the spec)."""
        key = _rename(model_key, self._model_to_checkpoint)
        if key is None:
            raise KeyError(f"{self.name}: no checkpoint key template covers the model key {model_key!r}")
        return key


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
