"""Inference-time folding of BatchNorm into the preceding convolution.

Measured on the 2-core AVX2 machine (fp32, channels_last, batch 16 at 256x256): the MobileNetV2
student runs about 1.6x faster folded; the ResNet-encoder nets gain 0-15%. Module paths (and
so taps) are unchanged: each folded BatchNorm becomes an ``nn.Identity``. The result is for
inference only (its ``state_dict`` no longer matches the unfolded network).
"""

from __future__ import annotations

import copy
import itertools

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _fold_pair(conv: nn.Module, bn: nn.Module) -> None:
    """Fold ``bn`` into ``conv`` in place (``torch.nn.utils.fusion`` does the arithmetic)."""
    assert isinstance(conv, _CONV) and isinstance(bn, _BN)
    assert bn.running_var is not None and bn.running_mean is not None
    with torch.no_grad():
        conv.weight, conv.bias = fuse_conv_bn_weights(
            conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias
        )


def fold_batchnorm(net: nn.Module, inplace: bool = False) -> nn.Module:
    """Fold every BatchNorm that directly follows a convolution inside an ``nn.Sequential``.

    Returns the folded network (a copy unless ``inplace``) in eval mode. Only BatchNorms with
    running statistics are folded; anything else is left as it is.
    """
    net = net if inplace else copy.deepcopy(net)
    net.eval()
    for parent in net.modules():
        if not isinstance(parent, nn.Sequential):
            continue
        children = list(parent.named_children())
        for (_, conv), (bn_name, bn) in itertools.pairwise(children):
            if (
                isinstance(conv, _CONV)
                and isinstance(bn, _BN)
                and bn.track_running_stats
                and bn.running_var is not None
                and conv.out_channels == bn.num_features
            ):
                _fold_pair(conv, bn)
                setattr(parent, bn_name, nn.Identity())
    return net
