"""MobileNetV2 (width 1.0) for ImageNet (SPEC B §5), converted from torchvision's model."""

from __future__ import annotations

from torch import Tensor, nn

from bayesian_bits.config import QuantConfig
from bayesian_bits.quantizer import activation_quantizer

from .common import Group, Topology, check_input, conv, linear

# (expansion t, output channels c, repeats n, first stride s)
_SETTINGS = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]


class InvertedResidual(nn.Module):
    """conv.0 1×1 expand + ReLU6 (absent when t = 1), 3×3 depthwise + ReLU6 (never pruned, A2), 1×1 projection.

    With a residual connection the block quantizes `x + conv(x)` with its own (signed) quantizer.
    """

    def __init__(self, config: QuantConfig | None, inp: int, oup: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = inp * expand
        layers = [conv(config, inp, hidden, 1, activation=nn.ReLU6())] if expand != 1 else []
        layers += [
            conv(config, hidden, hidden, 3, stride, 1, groups=hidden, activation=nn.ReLU6(), prune=False),
            conv(config, hidden, oup, 1),
        ]
        self.conv = nn.Sequential(*layers)
        self.use_res_connect = stride == 1 and inp == oup
        self.act_quantizer = activation_quantizer(config) if (config is not None and self.use_res_connect) else None

    def forward(self, x: Tensor) -> Tensor:
        if not self.use_res_connect:
            return self.conv(x)
        y = x + self.conv(x)
        return y if self.act_quantizer is None else self.act_quantizer(y)


class MobileNetV2(nn.Module):
    """`mobilenetv2`: features.0 stem, features.1–17 inverted residuals, features.18 1×1 conv to 1280,
    features.19 global average pool, classifier = Dropout(0.0), linear."""

    mac_input_shape = (1, 3, 223, 223)  # batch-1 input of MAC counting (§3.2)

    def __init__(self, config: QuantConfig | None = None, num_classes: int = 1000) -> None:
        super().__init__()
        blocks: list[nn.Module] = [conv(config, 3, 32, 3, 2, 1, activation=nn.ReLU6())]
        inp = 32
        for t, c, n, s in _SETTINGS:
            for i in range(n):
                blocks.append(InvertedResidual(config, inp, c, s if i == 0 else 1, t))
                inp = c
        blocks.append(conv(config, inp, 1280, 1, activation=nn.ReLU6()))
        blocks.append(nn.AdaptiveAvgPool2d(1))  # = AvgPool2d(7) at 224×224, and works for other sizes
        self.features = nn.Sequential(*blocks)
        self.classifier = nn.Sequential(nn.Dropout(0.0), linear(config, 1280, num_classes, logits=True))

    def forward(self, x: Tensor) -> Tensor:
        check_input(x, "MobileNetV2", 3)
        return self.classifier(self.features(x).flatten(1))

    def topology(self) -> Topology:
        """Sequential groups through the blocks; residual blocks' projection quantizers in no group. Input
        pruning is counted for every layer fed directly by a prunable layer (A2 fix; the reference counted none)."""
        topo = Topology(groups=[Group(None, ("features.0",))])
        feed, prev = "features.0.act_quantizer", "features.0"
        for i in range(1, 18):
            block = self.features[i]
            for j in range(len(block.conv)):
                name = f"features.{i}.conv.{j}"
                topo.groups.append(Group(feed, (name,)))
                if prev is not None:
                    topo.input_from[name] = prev
                feed, prev = f"{name}.act_quantizer", name
            if block.use_res_connect:  # the add keeps every channel alive
                feed, prev = f"features.{i}.act_quantizer", None
        for name in ("features.18", "classifier.1"):
            topo.groups.append(Group(feed, (name,)))
            if prev is not None:
                topo.input_from[name] = prev
            feed, prev = f"{name}.act_quantizer", name
        return topo
