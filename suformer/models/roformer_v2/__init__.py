"""The `roformer_v2` family: the model (model.py) and its checkpoint layout and registration (layout.py)."""
from . import layout  # noqa: F401 - registers the family
from .model import RoFormerLayer, RoFormerV2Config, RoFormerV2ForMaskedLM, roformer_v2_init_std

__all__ = ["RoFormerLayer", "RoFormerV2Config", "RoFormerV2ForMaskedLM", "roformer_v2_init_std"]
