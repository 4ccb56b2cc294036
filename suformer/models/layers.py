"""What the models, tasks and tricks share: the logits' dtype, and stacks of layers that can recompute their
activations in the backward pass.

Norms are torch's own `nn.RMSNorm` (with gain for T5, parameter-free for RoFormerV2); position schemes live with
attention (suformer.attention.positions).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 logits up to float32 for a softmax or loss; float64 stays float64 (exact reference tests)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


class LayerStack(nn.Module):
    """A module whose forward runs a list of layers (`stacked_layers`), any of which may be activation-checkpointed:
    its activations are dropped after the forward pass and recomputed in the backward one, trading about a third
    more compute for the memory they held. `train.efficiency.set_activation_checkpointing` chooses the layers."""

    checkpointed_layers: frozenset = frozenset()
    compiled: bool = False  # each layer compiled on its own (train.efficiency.compile_layers)

    @property
    def layers_share_work(self) -> bool:
        """Whether a layer may reuse what another computed in the same pass (T5's materialised position bias): not
        when a layer is recomputed in the backward pass, nor when each is a compiled graph of its own."""
        return not self.checkpointed_layers and not self.compiled

    def stacked_layers(self) -> nn.ModuleList:
        raise NotImplementedError

    def run_layer(self, index: int, *args, **kwargs):
        layer = self.stacked_layers()[index]
        if index in self.checkpointed_layers and torch.is_grad_enabled():
            # Non-reentrant: keyword arguments pass through and parameters need no grad-requiring input; the RNG
            # state is restored for the recomputation, so dropout draws the same masks.
            return checkpoint(layer, *args, use_reentrant=False, **kwargs)
        return layer(*args, **kwargs)
