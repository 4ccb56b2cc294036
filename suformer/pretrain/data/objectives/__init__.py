"""Pretraining objectives, one module each (see `base.Objective` for what a module provides). Adding one is its
module plus one line here."""
from .base import Objective
from .mlm import OBJECTIVE as MLM
from .pegasus import OBJECTIVE as PEGASUS
from .unilm import OBJECTIVE as UNILM

OBJECTIVES: dict[str, Objective] = {o.name: o for o in (PEGASUS, MLM, UNILM)}

__all__ = ["OBJECTIVES", "Objective"]
