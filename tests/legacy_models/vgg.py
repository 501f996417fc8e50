"""VGG7 for CIFAR-10 (SPEC B §5): six 3×3 conv+BN+ReLU layers, three max-pools, two linear layers."""

from __future__ import annotations

from torch import Tensor, nn

from bayesian_bits.config import QuantConfig

from .common import Topology, check_input, conv, linear, sequential_topology

# (in, out) per conv; None = MaxPool2d(2).
_PLAN = [(3, 128), (128, 128), None, (128, 256), (256, 256), None, (256, 512), (512, 512), None]


class VGG7(nn.Module):
    """`vggquantized`; with config=None the float twin (same module names, no quantizers)."""

    mac_input_shape = (1, 3, 32, 32)  # batch-1 input of MAC counting (§3.2)

    def __init__(self, config: QuantConfig | None = None) -> None:
        super().__init__()
        self.features = nn.Sequential(
            *(nn.MaxPool2d(2) if step is None else conv(config, *step, 3, 1, 1, activation=nn.ReLU()) for step in _PLAN)
        )
        self.classifier = nn.Sequential(
            linear(config, 512 * 4 * 4, 1024, batch_norm=True, activation=nn.ReLU()),
            linear(config, 1024, 10, logits=True),
        )

    def forward(self, x: Tensor) -> Tensor:
        check_input(x, "VGG7", 3, (32, 32))
        return self.classifier(self.features(x).flatten(1))

    def topology(self) -> Topology:
        """Sequential quantizer groups and input-channel pruning across every layer."""
        convs = [f"features.{i}" for i, step in enumerate(_PLAN) if step is not None]
        return sequential_topology([*convs, "classifier.0", "classifier.1"])
