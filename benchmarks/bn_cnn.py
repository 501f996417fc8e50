"""The BN CNN of the Fashion-MNIST comparison of the two BN folds (RESULTS.md): the paper's VGG7 layout (six 3×3
conv + BN + ReLU, three max-pools, a BN linear layer and the logits) at a quarter of its width, for 28×28 images.
VGG7 itself expects 32×32 (its classifier takes 512·4·4 features) and costs about an hour per Fashion-MNIST epoch on
two CPU cores with the exact fold; this one about 16× less.

    bayesian-bits train --experiment fashion-mnist --model benchmarks.bn_cnn:vgg7_quarter ...
"""

from __future__ import annotations

from torch import nn

WIDTHS = (32, 32, None, 64, 64, None, 128, 128, None)  # None: MaxPool2d(2)


def vgg7_quarter(num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    """The float model: 3×3 convs without bias, each followed by BatchNorm and ReLU (prepare folds them)."""
    layers: list[nn.Module] = []
    channels = in_channels
    for width in WIDTHS:
        if width is None:
            layers.append(nn.MaxPool2d(2))
            continue
        layers += [nn.Conv2d(channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
        channels = width
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(channels * 3 * 3, 256, bias=False), nn.BatchNorm1d(256),
                         nn.ReLU(), nn.Linear(256, num_classes))
