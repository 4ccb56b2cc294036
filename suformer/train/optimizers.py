"""The pretraining optimizers: AdamW, AdamW with steps scaled by each weight's RMS (nanoT5's "AdamWScale"), and
Adafactor.

T5 was pretrained with Adafactor, whose step is relative to each weight's RMS; nanoT5 reproduced T5 pretraining
with AdamW scaled the same way. Both need statistics of whole tensors (the weight's RMS; Adafactor also clips its
update by the update's RMS), but under DeepSpeed a client optimizer is handed flat fp32 partitions instead (ZeRO
1-3, and bf16 at stage 0): the tensors of a parameter group flattened into one and cut across the data-parallel
ranks. torch's and transformers' Adafactor would take the RMS of that slice, so the update would change with the
ZeRO stage and the number of workers: hence these. Every tensor gets a parameter group of its own, and a group's
statistics are summed over the ranks' partitions (DeepSpeed pads them with zeros, which add nothing): one small
all-reduce per `step()` call (DeepSpeed calls it once per group, or once for all when the state is offloaded).
Adafactor is unfactored: a partition is not a matrix, ZeRO divides the state anyway, and bert4keras' recipes ran
it unfactored too (min_dim_size_to_factor=1e6).
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

RMS_FLOOR = 1e-3  # the smallest weight RMS a step is scaled by (Adafactor's epsilon2, nanoT5's 1e-3)
ADAFACTOR_EPS = 1e-30  # added to the squared gradient (Adafactor's epsilon1)


def parameter_groups(model, optimizer: str, lr: float, weight_decay: float, eps: float) -> list[dict]:
    """Parameter groups. bert4keras excludes 'Norm' and 'bias' from weight decay: here every 1-d tensor.

    A weight read through a fixed multiplier m (`output_multipliers`: bert4keras mode's head, logits = W (h m),
    initialised at std 1 = its hf-mode twin's std d**-0.5 / m) must move as its twin W * m does. AdamW's step does
    not grow with the gradient, so it gets lr / m, eps * m and weight decay * m (without this the head moved
    sqrt(d_model) times slower in function space: 0.29 nats behind after 400 steps, benchmarks/convergence.py).
    A step scaled by the weight's RMS is already relative to the weight: there only the epsilons, whose units
    follow the weight's or its gradient's, carry m. Either way W * m follows the hf-mode head exactly (tested),
    while the function and the checkpoints stay bert4keras'."""
    multipliers = getattr(model, "output_multipliers", dict)()
    if optimizer != "adamw":  # one tensor per group: its statistics are the group's
        return [{"params": [p], "lr": lr, "weight_decay": weight_decay if p.ndim >= 2 else 0.0,
                 "eps": eps * m if optimizer == "adamw_scale" else ADAFACTOR_EPS * m * m, "floor": RMS_FLOOR / m}
                for name, p in model.named_parameters() for m in [multipliers.get(name, 1.0)]]
    groups: dict[tuple, list] = {}
    for name, p in model.named_parameters():
        m = multipliers.get(name, 1.0)
        decay = weight_decay if p.ndim >= 2 else 0.0
        groups.setdefault((lr / m, eps * m, decay * m), []).append(p)
    # Groups in a fixed order; no empty group (DeepSpeed drops them).
    return [{"params": params, "lr": g_lr, "eps": g_eps, "weight_decay": g_decay}
            for (g_lr, g_eps, g_decay), params in groups.items()]


def build_optimizer(model, name: str, lr: float, weight_decay: float, eps: float, flat_partitions: bool = False,
                    offloaded: bool = False) -> torch.optim.Optimizer:
    """Optimizer `name` (train.optimizer) over `parameter_groups`. `flat_partitions`: DeepSpeed will hand the
    optimizer flat partitions rather than the model's tensors (EngineSettings.flattens_parameters); `offloaded`:
    its state lives in CPU memory (ZeRO's offload_optimizer)."""
    groups = parameter_groups(model, name, lr, weight_decay, eps)
    return optimizer_named(name, groups, partitioned=flat_partitions, offloaded=offloaded)


def optimizer_named(name: str, groups: list[dict], partitioned: bool = False,
                    offloaded: bool = False) -> torch.optim.Optimizer:
    """The optimizer `name` (train.optimizer) over `parameter_groups(model, name, ...)`."""
    if name == "adamw":
        return adamw(groups, offloaded=offloaded)
    return {"adamw_scale": AdamWScale, "adafactor": Adafactor}[name](groups, partitioned=partitioned)


def adamw(groups: list[dict], offloaded: bool) -> torch.optim.Optimizer:
    """AdamW; DeepSpeed's CPU kernel of the same update when ZeRO keeps the state in CPU memory (DeepSpeed refuses
    a client AdamW there: PyTorch's loop over CPU tensors is several times slower)."""
    if offloaded:
        from .engine import deepspeed_process_settings
        from .jit_ops import load_deepspeed_ops

        deepspeed_process_settings(torch.cuda.is_available())
        load_deepspeed_ops(["CPUAdamBuilder"])  # under the build lock (jit_ops.py), not by DeepSpeedCPUAdam itself
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, betas=(0.9, 0.999), adamw_mode=True)
    return torch.optim.AdamW(groups, betas=(0.9, 0.999))


class _PerTensor(torch.optim.Optimizer):
    """One tensor per group; `_rms` gives RMS values of whole tensors, however DeepSpeed cut them."""

    def __init__(self, params, defaults: dict, partitioned: bool):
        super().__init__(params, defaults)
        self.partitioned = partitioned
        for group in self.param_groups:
            if len(group["params"]) != 1:
                raise ValueError(f"{type(self).__name__} takes one tensor per parameter group "
                                 f"(optimizers.parameter_groups), got a group of {len(group['params'])}")
            group.setdefault("numel", group["params"][0].numel())  # the whole tensor's, before DeepSpeed cuts it

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        active = [(group, group["params"][0]) for group in self.param_groups
                  if group["params"] and group["params"][0].grad is not None]
        # Partitions: every group of the call at once, so one all-reduce; whole tensors: one at a time, so that
        # no more than one tensor's update is held besides the state.
        for chunk in ([active] if self.partitioned else [[pair] for pair in active]):
            if chunk:
                self._update(chunk)
        return loss

    def _rms(self, groups: list[dict], tensors: list[list[torch.Tensor]]) -> list[list[float]]:
        """RMS of each listed tensor as a whole: row i for groups[i], summed over the ranks' partitions."""
        sums = torch.stack([torch.stack([torch.linalg.vector_norm(t, dtype=torch.float64).square() for t in row])
                            for row in tensors])
        if self.partitioned:
            on = sums.device
            if dist.get_backend() == "nccl":  # offloaded state lives on the CPU; NCCL reduces GPU tensors only
                sums = sums.to(torch.device("cuda", torch.cuda.current_device()))
            dist.all_reduce(sums)
            sums = sums.to(on)
        numel = torch.tensor([[g["numel"]] for g in groups], dtype=sums.dtype, device=sums.device)
        return (sums / numel).sqrt().tolist()

    def _update(self, chunk: list[tuple[dict, torch.Tensor]]) -> None:
        raise NotImplementedError


class AdamWScale(_PerTensor):
    """AdamW whose step is multiplied by max(floor, RMS(weight)), as nanoT5's AdamWScale (decoupled weight decay
    applied after the step, by lr x weight_decay)."""

    def __init__(self, params, lr: float = 1e-2, betas=(0.9, 0.999), eps: float = 1e-6, weight_decay: float = 0.0,
                 floor: float = RMS_FLOOR, partitioned: bool = False):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, floor=floor),
                         partitioned)

    def _update(self, chunk):
        weight_rms = self._rms([g for g, _ in chunk], [[p] for _, p in chunk])
        for (group, p), (rms,) in zip(chunk, weight_rms):
            state = self.state[p]
            if not state:
                state.update(step=0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
            state["step"] += 1
            (beta1, beta2), step = group["betas"], state["step"]
            state["exp_avg"].mul_(beta1).add_(p.grad, alpha=1 - beta1)
            state["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
            size = group["lr"] * math.sqrt(1 - beta2**step) / (1 - beta1**step) * max(group["floor"], rms)
            p.addcdiv_(state["exp_avg"], state["exp_avg_sq"].sqrt().add_(group["eps"]), value=-size)
            if group["weight_decay"]:
                p.mul_(1 - group["lr"] * group["weight_decay"])


class Adafactor(_PerTensor):
    """Unfactored Adafactor with relative steps as T5 and bert4keras ran it: beta2_t = 1 - t**decay_rate, the
    update clipped to RMS <= clip_threshold, the step lr x max(floor, RMS(weight)), optional momentum (beta1) of
    the scaled update; weight decay decoupled, by lr x weight_decay (as torch.optim.Adafactor)."""

    def __init__(self, params, lr: float = 1e-2, beta1: float | None = None, decay_rate: float = -0.8,
                 eps: float = ADAFACTOR_EPS, clip_threshold: float = 1.0, weight_decay: float = 0.0,
                 floor: float = RMS_FLOOR, partitioned: bool = False):
        super().__init__(params, dict(lr=lr, beta1=beta1, decay_rate=decay_rate, eps=eps,
                                      clip_threshold=clip_threshold, weight_decay=weight_decay, floor=floor),
                         partitioned)

    def _update(self, chunk):
        updates = []
        for group, p in chunk:
            state = self.state[p]
            if not state:
                state.update(step=0, exp_avg_sq=torch.zeros_like(p))
                if group["beta1"]:
                    state["exp_avg"] = torch.zeros_like(p)
            state["step"] += 1
            beta2 = 1 - state["step"] ** group["decay_rate"]
            state["exp_avg_sq"].mul_(beta2).add_(p.grad.square().add_(group["eps"]), alpha=1 - beta2)
            updates.append(state["exp_avg_sq"].rsqrt().mul_(p.grad))
        statistics = self._rms([g for g, _ in chunk], [[p, u] for (_, p), u in zip(chunk, updates)])
        for (group, p), update, (weight_rms, update_rms) in zip(chunk, updates, statistics):
            update.mul_(group["lr"] * max(group["floor"], weight_rms) / max(1.0, update_rms / group["clip_threshold"]))
            if group["beta1"]:
                update = self.state[p]["exp_avg"].mul_(group["beta1"]).add_(update, alpha=1 - group["beta1"])
            if group["weight_decay"]:
                p.mul_(1 - group["lr"] * group["weight_decay"])
            p.sub_(update)
