"""The model a run starts from: a preset's fresh one, or a save_pretrained folder's (local or a URI, copied once per
node), with the settings the run overrides."""
from __future__ import annotations

from typing import Optional

from ..models import build_model, from_pretrained
from ..storage import Location


def model_from(family: str, preset: str, *, init_from: Optional[str] = None, vocab_size: Optional[int] = None,
               **overrides):
    """`init_from`'s weights (its own architecture and vocab), else a new `family` `preset` of `vocab_size`."""
    if init_from:
        return from_pretrained(Location.of(init_from).local_folder(), **overrides).train()
    return build_model(family, preset, vocab_size=vocab_size, **overrides)
