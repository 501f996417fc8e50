"""LeNet5 for MNIST (SPEC B §5): two 5×5 convs with max-pooling, two linear layers, no BN."""

from __future__ import annotations

from torch import Tensor, nn

from bayesian_bits.config import QuantConfig

from .common import Topology, check_input, conv, linear, sequential_topology


class LeNet5(nn.Module):
    """`lenet5quantized`; with config=None the float twin (same module names, no quantizers)."""

    mac_input_shape = (1, 1, 28, 28)  # batch-1 input of MAC counting (§3.2)

    def __init__(self, config: QuantConfig | None = None) -> None:
        super().__init__()
        self.features = nn.Sequential(
            conv(config, 1, 32, 5, bias=True, batch_norm=False, activation=nn.ReLU()),
            nn.MaxPool2d(2),
            conv(config, 32, 64, 5, bias=True, batch_norm=False, activation=nn.ReLU()),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            linear(config, 64 * 4 * 4, 512, activation=nn.ReLU()),
            linear(config, 512, 10, logits=True),
        )

    def forward(self, x: Tensor) -> Tensor:
        check_input(x, "LeNet5", 1, (28, 28))
        return self.classifier(self.features(x).flatten(1))

    def topology(self) -> Topology:
        """Sequential quantizer groups and input-channel pruning across every layer."""
        return sequential_topology(["features.0", "features.2", "classifier.0", "classifier.1"])
