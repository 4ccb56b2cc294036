"""The `t5_pegasus` family: the model (model.py), its checkpoint layout and registration (layout.py), and the
mT5 weights re-indexed to the jieba vocab (mt5_transplant.py, used by `jobs/convert.py mt5-to-t5-pegasus`)."""
from . import layout  # noqa: F401 - registers the family
from .model import T5PegasusConfig, T5PegasusForConditionalGeneration

__all__ = ["T5PegasusConfig", "T5PegasusForConditionalGeneration"]
