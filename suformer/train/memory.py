"""A training process's memory, for the step line and MLflow: on a GPU the most allocated and reserved since the
start and the allocator's retries (it freed its cache to fit an allocation: fragmentation, an OOM's forerunner);
on CPU the process's peak resident set."""
from __future__ import annotations

import resource

import torch


def memory_stats(device: torch.device) -> dict[str, float]:
    if device.type == "cuda":
        return {"max_allocated_gib": torch.cuda.max_memory_allocated(device) / 2**30,
                "max_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30,
                "alloc_retries": float(torch.cuda.memory_stats(device).get("num_alloc_retries", 0))}
    return {"peak_rss_gib": peak_rss_bytes() / 2**30}


def peak_rss_bytes() -> int:
    """The process's peak resident set: the kernel's high-water mark of its own memory map (VmHWM). Not getrusage's
    ru_maxrss, which a process keeps across execve: a fresh worker started by a large process (a Ray worker, a
    benchmark's child) would report its parent's peak."""
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))
    except (OSError, StopIteration):  # not Linux
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def peak_memory_gib(device: torch.device) -> float:
    """The one figure: the GPU's most allocated, or the process's peak resident set."""
    stats = memory_stats(device)
    return stats.get("max_allocated_gib", stats.get("peak_rss_gib"))
