"""The DeepSpeed engine both halves train with: its settings as values, the JSON generated from them with concrete
values (raw deepspeed.initialize does not resolve transformers' "auto"), and the engine itself.

Pretraining builds it on every Ray Train worker (the process group is Ray Train's); fine-tuning in one process (a
Tune trial), where a process group of one is made here.
"""
from __future__ import annotations

import logging
import os
import socket
import warnings
from dataclasses import dataclass


@dataclass(frozen=True)
class EngineSettings:
    """What a DeepSpeed engine is made from; each half's train section says how it fills these in."""
    micro_batch_size: int
    grad_accum: int = 1
    world_size: int = 1
    grad_clip: float = 1.0
    zero_stage: int = 0
    precision: str = "auto"  # auto: bf16 on a GPU, fp32 on CPU
    on_gpu: bool = False
    offload_optimizer: bool = False
    offload_params: bool = False
    # The optimizer is one of train/optimizers.py's own (DeepSpeed calls it untested; it steps in PyTorch when
    # offloaded), not torch's AdamW, for which DeepSpeed substitutes its fused kernels.
    own_optimizer: bool = False

    @property
    def bf16(self) -> bool:
        return use_bf16(self.precision, self.on_gpu)

    @property
    def flattens_parameters(self) -> bool:
        """Whether DeepSpeed hands the optimizer flat fp32 partitions rather than the model's tensors: under ZeRO,
        and under bf16 at stage 0 (its BF16_Optimizer partitions the fp32 master weights too)."""
        return self.zero_stage > 0 or self.bf16


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
    """bf16 on GPU unless fp32 is asked for; fp32 on CPU unless bf16 is (T5 diverges in fp16: not offered)."""
    return precision == "bf16" or (precision == "auto" and on_gpu)


def deepspeed_config(s: EngineSettings) -> dict:
    zero: dict = {"stage": s.zero_stage}
    if s.zero_stage >= 1:
        # Several GPUs: copy gradients into one buffer (no fragmentation), overlap their reduction with the backward
        # pass, reduce-scatter them. CPU has no fragmentation to avoid and gloo's all-reduce is its fast path:
        # without these ZeRO-2 costs about 5 points less step time here (benchmarks/train_overhead.py); one rank
        # has nothing to overlap.
        tuned = s.on_gpu and s.world_size > 1
        zero.update(contiguous_gradients=tuned, overlap_comm=tuned, reduce_scatter=tuned)
    if s.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
    if s.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": False}
    if s.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = False  # export gathers parameters itself
    return {
        "train_micro_batch_size_per_gpu": s.micro_batch_size,
        "gradient_accumulation_steps": s.grad_accum,
        "train_batch_size": s.micro_batch_size * s.grad_accum * s.world_size,
        "gradient_clipping": s.grad_clip,
        "bf16": {"enabled": s.bf16},
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": s.own_optimizer,
        # Offloaded, our optimizers step in PyTorch on the CPU (DeepSpeed's CPU kernels are Adam's and Lion's).
        "zero_force_ds_cpu_optimizer": not s.own_optimizer,
        "steps_per_print": 10**9,  # progress lines come from the training loops
        "wall_clock_breakdown": False,
    }


def _one_process_group(on_gpu: bool) -> None:
    """A process group of one (a fine-tuning run, a Tune trial): DeepSpeed's engine needs one."""
    import deepspeed

    with socket.socket() as s:  # a free port for the group's rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "LOCAL_RANK": "0",
                       "WORLD_SIZE": "1"}.items():
        os.environ.setdefault(key, value)
    deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo", verbose=False)


def deepspeed_engine(model, optimizer, schedule, settings: EngineSettings, load_universal: bool = False):
    """A DeepSpeed engine around the model, optimizer and schedule, in the process group there is (Ray Train's),
    or in a group of one."""
    import torch.distributed as dist

    from .jit_ops import load_deepspeed_ops, ops_for

    deepspeed_process_settings(settings.on_gpu)
    import deepspeed

    load_deepspeed_ops(ops_for(settings.on_gpu))
    if not dist.is_initialized():
        _one_process_group(settings.on_gpu)
    config = deepspeed_config(settings)
    if load_universal:
        config["checkpoint"] = {"load_universal": True}
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=schedule, config=config)
    return engine
