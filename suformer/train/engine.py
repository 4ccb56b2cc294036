"""The DeepSpeed JSON, generated from the typed config with concrete values (raw deepspeed.initialize does not
resolve transformers' "auto")."""
from __future__ import annotations

import logging
import os
import warnings

from ..config import TrainSection


def _not_the_untested_optimizer_warning(record: logging.LogRecord) -> bool:
    return "untested optimizer" not in record.getMessage()


def deepspeed_process_settings(on_gpu: bool) -> None:
    """Before a process imports DeepSpeed: name its accelerator (left to guess on a CPU machine, DeepSpeed warns
    on every worker that it found no GPU), and hide torch's deprecation warning for a collective DeepSpeed 0.19
    calls at each step, which DeepSpeed has to change, not its users; and its warning about optimizers it does not
    know, for ours, which are tested under ZeRO (tests/test_optimizer.py)."""
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if on_gpu else "cpu")
    logging.getLogger("DeepSpeed").addFilter(_not_the_untested_optimizer_warning)  # the same filter added once
    warnings.filterwarnings("ignore", r"`torch\.distributed\.all_gather_into_tensor` is deprecated", FutureWarning)


def use_bf16(precision: str, on_gpu: bool) -> bool:
    """bf16 on GPU unless fp32 is asked for; fp32 on CPU (T5 diverges in fp16, so fp16 is not offered)."""
    return precision == "bf16" or (precision == "auto" and on_gpu)


def flattens_parameters(train: TrainSection) -> bool:
    """Whether DeepSpeed hands the optimizer flat fp32 partitions rather than the model's tensors: under ZeRO, and
    under bf16 at stage 0 (its BF16_Optimizer partitions the fp32 master weights too)."""
    return train.zero_stage > 0 or use_bf16(train.precision, train.use_gpu)


def deepspeed_config(train: TrainSection) -> dict:
    zero: dict = {"stage": train.zero_stage}
    if train.zero_stage >= 1:
        # GPU: copy gradients into one buffer (no fragmentation), overlap their reduction with the backward pass,
        # reduce-scatter them. CPU has no fragmentation to avoid and gloo's all-reduce is its fast path: without
        # these ZeRO-2 costs about 5 points less step time here (benchmarks/train_overhead.py).
        zero.update(contiguous_gradients=train.use_gpu, overlap_comm=train.use_gpu, reduce_scatter=train.use_gpu)
    if train.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
    if train.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": False}
    if train.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = False  # export gathers parameters itself
    ours = train.optimizer != "adamw"  # train/optimizers.py, made for flat partitions; DeepSpeed does not know it
    return {
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.grad_accum,
        "train_batch_size": train.micro_batch_size * train.grad_accum * train.num_workers,
        "gradient_clipping": train.grad_clip,
        "bf16": {"enabled": use_bf16(train.precision, train.use_gpu)},
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": ours,
        # Offloaded, our optimizers step in PyTorch on the CPU (DeepSpeed's CPU kernels are Adam's and Lion's).
        "zero_force_ds_cpu_optimizer": not ours,
        "steps_per_print": 10**9,  # progress lines come from the training loop
        "wall_clock_breakdown": False,
    }
