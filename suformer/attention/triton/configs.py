"""Launch configurations of the attention kernels: the candidates a GPU run autotunes among, and the CPU one.

Each GPU candidate is compile-checked for its architecture, A100 (sm_80) or H100/H200 (sm_90), in bf16 and fp16 by
`python -m suformer.attention.triton.compile_check` (benchmarks/RESULTS.md keeps its table): none overruns the target's
shared memory in any position scheme or mask profile, and at head dims up to 64 none spills registers in the model
profiles (T5 encoder, decoder and cross attention, RoFormerV2 MLM and UniLM, all in training). At head dim 128 the
backward kernels spill in some profiles in every tile that fits; the table says how much.

Why these tiles: the software pipeliner multi-buffers every load in the loop, the gathered T5 bias tile and the
RoPE cos/sin tiles included (fp32), so shared memory grows with BLOCK_M x BLOCK_N and the stage count; the
backward kernels keep two [BLOCK_N, D] fp32 accumulators and four [BLOCK_M, BLOCK_N] fp32 tiles live, so they
take small query tiles (dK/dV) or 8 warps, as in the Triton tutorial's separate backward tiles.

The first candidate is the launch without autotuning; `AUTOTUNE` (in flash.py) picks the fastest per shape class.
The check compiles with the pinned triton (3.9) for bf16 and fp16 (and FP32_GPU_CONFIG in fp32); the suite runs
its quick subset (sm_90 defaults of the model profiles), the whole matrix is run by hand.
"""
from __future__ import annotations

import triton

KERNELS = ("fwd", "dkdv", "dq")


def _config(block_m: int, block_n: int, num_warps: int, num_stages: int) -> triton.Config:
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=num_warps, num_stages=num_stages)


# {architecture: {kernel: {head-dim class: [candidates]}}}. Architectures: 90 for Hopper (wgmma) and later, 80 for
# Ampere (mma.sync, whose accumulator layout needs more registers: smaller backward tiles). Head dims up to 64 use
# the 64 class (the tile's D is padded to a power of two), up to 128 the 128 class. (BLOCK_M, BLOCK_N): query and key
# tile rows.
_HOPPER = {
    "fwd": {
        64: [_config(128, 64, 8, 3), _config(128, 64, 8, 2), _config(64, 64, 4, 3), _config(128, 32, 4, 3)],
        128: [_config(128, 64, 8, 2), _config(64, 64, 4, 2), _config(128, 32, 8, 2)],
    },
    "dkdv": {
        64: [_config(32, 64, 8, 3), _config(64, 32, 8, 3), _config(128, 32, 8, 2), _config(64, 32, 4, 3)],
        128: [_config(64, 32, 8, 3), _config(32, 64, 8, 3), _config(64, 64, 8, 2)],
    },
    "dq": {
        64: [_config(128, 64, 8, 3), _config(64, 64, 4, 3), _config(128, 64, 8, 2), _config(64, 32, 4, 2)],
        128: [_config(64, 32, 4, 2), _config(128, 32, 8, 2), _config(64, 64, 4, 2)],
    },
}
_AMPERE = {
    "fwd": {
        64: [_config(128, 64, 8, 3), _config(128, 64, 8, 2), _config(128, 32, 8, 2)],
        128: [_config(64, 64, 4, 2), _config(128, 32, 8, 2), _config(128, 64, 8, 2)],
    },
    "dkdv": {
        64: [_config(64, 32, 8, 2), _config(32, 32, 8, 2), _config(32, 32, 4, 2)],
        128: [_config(32, 32, 8, 2), _config(32, 64, 8, 3)],
    },
    "dq": {
        64: [_config(64, 32, 8, 2), _config(32, 64, 8, 2), _config(64, 32, 8, 3), _config(32, 64, 4, 2)],
        128: list(_HOPPER["dq"][128]),
    },
}
GPU_CONFIGS: dict[int, dict[str, dict[int, list[triton.Config]]]] = {80: _AMPERE, 90: _HOPPER}

# Under the CPU interpreter speed is the number of numpy ops: small tiles, and warps and stages mean nothing.
CPU_CONFIG = _config(16, 16, 1, 1)
# float32 on a GPU (ieee dots, no tensor cores: tests) without autotuning: one small tile, compile-checked too.
FP32_GPU_CONFIG = _config(32, 32, 4, 2)
# The dropout-mask kernel (tests and debugging only) is not tuned.
KEEP_MASK_CONFIG = _config(16, 16, 4, 1)
# Per-key-tile tables (the bias-table gradient partials, the first query row of each UniLM key tile) are sized for
# tiles of KEY_GRAIN keys, which every BLOCK_N is a multiple of, so the host can size them before the tile is chosen
# (tile pid_n reads the query start at grain pid_n * BLOCK_N / KEY_GRAIN).
KEY_GRAIN = 16
MAX_HEAD_DIM = 128


def head_dim_class(head_dim: int) -> int:
    return 64 if head_dim <= 64 else 128


def arch_class(capability: tuple[int, int]) -> int:
    """90 from Hopper on, 80 before. Checked for sm_80 (A100) and sm_90 (H100/H200) only: GPUs with less shared
    memory per block (sm_86/sm_89, about 99 KiB) fit only some candidates, which autotuning finds (it skips those
    that do not compile); the first-candidate launch (SUFORMER_KERNEL_AUTOTUNE=0) may not fit there."""
    return 90 if capability[0] >= 9 else 80


def candidates(kernel: str, head_dim: int, arch: int) -> list[triton.Config]:
    return GPU_CONFIGS[arch][kernel][head_dim_class(head_dim)]


def with_blocks(config: triton.Config, block_m: int, block_n: int) -> triton.Config:
    """`config` with other tile sizes (tests that cut sequences into unequal tiles)."""
    return _config(block_m, block_n, config.num_warps, config.num_stages)
