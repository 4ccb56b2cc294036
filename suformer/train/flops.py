"""Model FLOPs utilisation: what a training step computes (each family's `forward_flops`, models/flops.py) against
what the device could do at its dense peak.

The peak table tells the form factors apart (an H100 PCIe peaks at 756 TFLOP/s in bf16, an SXM at 989) and the
precisions: bf16 tensor cores, TF32 tensor cores (fp32 matmuls when torch allows TF32), plain fp32. Figures are
NVIDIA's datasheets without sparsity, as Lightning's and Composer's tables give them. A device not in the table gets
no MFU, and a line saying so: an MFU against a guessed peak would be a wrong figure with a right-looking name.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class Peak:
    name: str
    bf16: float  # dense FLOP/s
    tf32: float
    fp32: float


# (pattern on torch.cuda.get_device_name(), peak); the first match wins, so the more specific name comes first.
PEAKS: list[tuple[str, Peak]] = [
    (r"H200 NVL", Peak("H200 NVL", bf16=835.5e12, tf32=417.5e12, fp32=60e12)),
    (r"H200", Peak("H200 SXM", bf16=989.5e12, tf32=494.5e12, fp32=67e12)),
    (r"H100 NVL", Peak("H100 NVL", bf16=835.5e12, tf32=417.5e12, fp32=60e12)),
    (r"H100 PCIe", Peak("H100 PCIe", bf16=756.5e12, tf32=378e12, fp32=51e12)),
    (r"H100.*(HBM3|SXM)", Peak("H100 SXM", bf16=989.5e12, tf32=494.5e12, fp32=67e12)),
    (r"A100.*(SXM|PCIE|PCIe)", Peak("A100", bf16=312e12, tf32=156e12, fp32=19.5e12)),  # the same for both
    (r"\bL4\b", Peak("L4", bf16=121e12, tf32=60e12, fp32=30.3e12)),
]


def matmul_precision(bf16: bool) -> str:
    """What the matmuls run in: bf16, or for fp32 tensors TF32 when torch allows it (not its default)."""
    if bf16:
        return "bf16"
    return "fp32" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def device_peak(device: torch.device, precision: str) -> tuple[Optional[float], str]:
    """(dense peak FLOP/s of one device at `precision`, a description), or (None, why no MFU is reported)."""
    if device.type != "cuda":
        return None, f"MFU not reported: no peak FLOP/s is known for a {device.type} device"
    name = torch.cuda.get_device_name(device)
    for pattern, peak in PEAKS:
        if re.search(pattern, name):
            return getattr(peak, precision), f"MFU against {peak.name} {precision} dense peak " \
                                              f"{getattr(peak, precision) / 1e12:.0f} TFLOP/s"
    return None, f"MFU not reported: no peak FLOP/s is known for {name!r} (add it to suformer/train/flops.py PEAKS)"


def training_flops(model, batch: dict) -> Optional[int]:
    """Model FLOPs of one training step over `batch` (3 forward passes, real tokens); None for a model that does
    not count its FLOPs."""
    forward_flops = getattr(model, "forward_flops", None)
    return 3 * forward_flops(batch, "real") if forward_flops else None
