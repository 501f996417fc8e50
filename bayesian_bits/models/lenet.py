"""LeNet5 for MNIST (SPEC B §5): two 5×5 convs with ReLU and max-pooling, two linear layers, no BN; float."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class LeNet5(nn.Module):
    """The float `lenet5quantized` (582 026 parameters); `bayesian_bits.prepare` quantizes it. Module names are the
    reference's: features.0 and features.2 convs, classifier.0 and classifier.1 (the logits)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 32, 5), nn.MaxPool2d(2), nn.Conv2d(32, 64, 5), nn.MaxPool2d(2))
        self.classifier = nn.Sequential(nn.Linear(64 * 4 * 4, 512), nn.Linear(512, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        f, c = self.features, self.classifier
        x = f[3](F.relu(f[2](f[1](F.relu(f[0](x))))))
        return c[1](F.relu(c[0](x.flatten(1))))
