"""Cost of a network: parameter count and multiply-accumulates (MACs) of one forward pass."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_T = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def count_parameters(net: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements (each shared tensor counted once)."""
    return sum(p.numel() for p in net.parameters() if p.requires_grad or not trainable_only)


def _layer_macs(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> int:
    if isinstance(module, _CONV):
        per_output = (module.in_channels // module.groups) * math.prod(module.kernel_size)
        return output.numel() * per_output
    if isinstance(module, _CONV_T):
        per_input = (module.out_channels // module.groups) * math.prod(module.kernel_size)
        return inputs[0].numel() * per_input
    if isinstance(module, nn.Linear):
        return output.numel() * module.in_features
    return 0


def count_macs(net: nn.Module, input_shape: Sequence[int]) -> int:
    """Multiply-accumulates of the conv, transposed-conv and linear layers in one forward pass.

    ``input_shape`` includes the batch dimension, e.g. ``(1, 1, 256, 256)``; the count covers
    the whole batch. Biases, norms, activations and resampling are not counted. The forward
    runs once on zeros, in eval mode, without gradients (the previous mode is restored).
    """
    total = 0

    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        nonlocal total
        total += _layer_macs(module, inputs, output)

    layers = [m for m in net.modules() if isinstance(m, (*_CONV, *_CONV_T, nn.Linear))]
    handles = [m.register_forward_hook(hook) for m in layers]
    first = next(net.parameters(), None)
    device = first.device if first is not None else torch.device("cpu")
    dtype = first.dtype if first is not None and first.is_floating_point() else torch.float32
    was_training = net.training
    try:
        net.eval()
        with torch.no_grad():
            net(torch.zeros(tuple(input_shape), device=device, dtype=dtype))
    finally:
        net.train(was_training)
        for h in handles:
            h.remove()
    return total
