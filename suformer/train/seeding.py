"""One seed for every generator a training process draws from."""
from __future__ import annotations

import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Python's, NumPy's and torch's global generators (dropout masks, shuffles, initialisations)."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)
