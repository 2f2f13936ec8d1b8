"""Cost of a network: parameter count and multiply-accumulates (MACs) of one forward pass."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_parameters(net: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements (each shared tensor counted once)."""
    return sum(p.numel() for p in net.parameters() if p.requires_grad or not trainable_only)


def count_macs(net: nn.Module, input_shape: Sequence[int]) -> int:
    """Multiply-accumulates of one forward pass, by ``torch.utils.flop_counter`` (its FLOPs / 2).

    Counted: convolutions, transposed convolutions and matrix products (linear layers,
    attention); biases, norms, activations and resampling are not. ``input_shape`` includes the
    batch dimension, e.g. ``(1, 1, 256, 256)``; the count covers the whole batch. The forward
    runs once on zeros, in eval mode, without gradients (the previous mode is restored).
    """
    first = next(net.parameters(), None)
    device = first.device if first is not None else torch.device("cpu")
    dtype = first.dtype if first is not None and first.is_floating_point() else torch.float32
    was_training = net.training
    try:
        net.eval()
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            net(torch.zeros(tuple(input_shape), device=device, dtype=dtype))
    finally:
        net.train(was_training)
    return counter.get_total_flops() // 2
