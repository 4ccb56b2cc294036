"""Checkpoint import/export in the formats users have: transformers' MT5 layout (the public T5 PEGASUS port),
JunnYu's RoFormerV2 layout, and (import only) Su's bert4keras TensorFlow releases (bert4keras.py maps their names
onto these layouts' names). Generic over the families' specs (registry.py): a model names its parameters for what
they are, and its spec's key templates map them to and from the checkpoint's names. Weights are validated in
checkpoint names, so every missing, unexpected or mis-shaped tensor is an error that names it as the file does,
and only then renamed and loaded.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Optional

import torch

from ..storage import Location
from .bert4keras import is_bert4keras_dir, read_bert4keras
from .registry import FAMILIES, CheckpointError, FamilySpec, family_of

_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


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


def canonical_state(family: FamilySpec, state: dict[str, torch.Tensor], where: Path) -> dict[str, torch.Tensor]:
    """A checkpoint's weights less what the model computes or ties, still in checkpoint names; tied aliases must
    really equal what they alias."""
    state = dict(state)
    for key in family.ignored_keys:
        state.pop(key, None)
    target = family.tie_target
    for alias in family.tied_aliases:
        if alias in state:
            tensor = state.pop(alias)
            if target in state and not torch.equal(tensor, state[target]):
                raise CheckpointError(f"{where}: {alias} differs from {target}, but the model ties them")
            state.setdefault(target, tensor)
    return state


def load_state(model: torch.nn.Module, state: dict[str, torch.Tensor], where) -> None:
    """Strict load of weights in checkpoint names, with an error that names (in those names) every missing or
    unexpected key and every shape mismatch."""
    family = FAMILIES[model.config.family]
    expected = {family.checkpoint_key(k): v for k, v in untied_state(model).items()}
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
    # Every key is expected here, so the templates cover it.
    model.load_state_dict({family.model_key(k): v for k, v in state.items()}, strict=False)


def checkpoint_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights as its family's public checkpoints hold them: checkpoint names, one copy of each tied
    tensor, the family's adaptations (T5: a pre-scaled untied head); what `save_pretrained` writes."""
    config, family = model.config, FAMILIES[model.config.family]
    state = {family.checkpoint_key(k): v.detach().contiguous().cpu() for k, v in untied_state(model).items()}
    return family.adapt_saved_state(config, state)


def untied_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict less the keys that alias an earlier parameter (tied heads)."""
    seen, state = set(), {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) not in seen:
            state[name] = tensor
        seen.add(id(tensor))
    return state


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
            name, cfg, state = read_bert4keras(path)
        except ValueError as e:
            raise CheckpointError(str(e)) from None
        family = FAMILIES[name]
    else:
        if not config_file.exists():
            raise CheckpointError(f"{config_file}: not found")
        try:
            cfg = json.loads(config_file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{config_file}: not valid JSON ({e})") from None
        family = family_of(cfg, str(config_file))
        state = _read_weights(path)
    state = canonical_state(family, state, path)
    try:
        model = family.model_cls(family.config_from_json(cfg, state, compat, overrides))
    except KeyError as e:
        raise CheckpointError(f"{config_file}: missing field {e.args[0]!r}") from None
    load_state(model, state, path)
    return model.eval()


def save_pretrained(model, path) -> None:
    """Write config.json + model.safetensors in the family's public layout, atomically (temp files, then rename)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = checkpoint_state(model)
    cfg = FAMILIES[model.config.family].config_to_json(model.config)
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
