"""ResNet-18 for ImageNet (SPEC B §5), converted from torchvision's model."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from bayesian_bits.config import QuantConfig
from bayesian_bits.quantizer import activation_quantizer

from .common import Group, Topology, check_input, conv, linear


class BasicBlock(nn.Module):
    """Two 3×3 conv+BN layers and a shortcut; `ReLU(features(x) + residual)` then the block's quantizer.

    The second conv's and the downsample's outputs (the tensors feeding the add) keep their own
    signed quantizers (§4.2), which BOP accounting leaves out.
    """

    def __init__(self, config: QuantConfig | None, inp: int, out: int, stride: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            conv(config, inp, out, 3, stride, 1, activation=nn.ReLU()),
            conv(config, out, out, 3, 1, 1),
        )
        self.downsample = nn.Sequential(conv(config, inp, out, 1, stride)) if stride != 1 or inp != out else None
        self.act_quantizer = None if config is None else activation_quantizer(config)

    def forward(self, x: Tensor) -> Tensor:
        residual = x if self.downsample is None else self.downsample(x)
        y = F.relu(self.features(x) + residual)
        return y if self.act_quantizer is None else self.act_quantizer(y)


class ResNet18(nn.Module):
    """`resnet18`: features.0 conv 7×7 + BN + ReLU, features.1 max-pool, features.2–5 layer1–4, avgpool, fc."""

    mac_input_shape = (1, 3, 223, 223)  # batch-1 input of MAC counting (§3.2)

    def __init__(self, config: QuantConfig | None = None, num_classes: int = 1000) -> None:
        super().__init__()
        stages = []
        inp = 64
        for out, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            stages.append(nn.Sequential(BasicBlock(config, inp, out, stride), BasicBlock(config, out, out, 1)))
            inp = out
        self.features = nn.Sequential(
            conv(config, 3, 64, 7, 2, 3, activation=nn.ReLU()), nn.MaxPool2d(3, 2, 1), *stages
        )
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = linear(config, 512, num_classes, logits=True)

    def forward(self, x: Tensor) -> Tensor:
        check_input(x, "ResNet18", 3)
        return self.fc(self.avgpool(self.features(x)).flatten(1))

    def topology(self) -> Topology:
        """Groups with downsample handling; pre-add quantizers in no group; input pruning only for each
        block's second conv (§3.5)."""
        topo = Topology(groups=[Group(None, ("features.0",))])
        feed = "features.0.act_quantizer"
        for s in range(2, 6):
            for b in range(2):
                block = f"features.{s}.{b}"
                first = (f"{block}.features.0",)
                if self.features[s][b].downsample is not None:
                    first += (f"{block}.downsample.0",)
                topo.groups.append(Group(feed, first))
                topo.groups.append(Group(f"{block}.features.0.act_quantizer", (f"{block}.features.1",)))
                topo.input_from[f"{block}.features.1"] = f"{block}.features.0"
                feed = f"{block}.act_quantizer"
        topo.groups.append(Group(feed, ("fc",)))
        return topo
