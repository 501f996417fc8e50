"""Small float models for the prepare zoo tests: a custom CNN, an MLP and a transformer encoder."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn


class SmallCNN(nn.Module):
    """Conv1d and Conv2d with dilation, reflect padding, groups, a skip concatenation and GELU/SiLU activations."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1, padding_mode="reflect")
        self.bn = nn.BatchNorm2d(16)
        self.dilated = nn.Conv2d(16, 16, 3, padding=2, dilation=2, bias=False)
        self.grouped = nn.Conv2d(32, 32, 3, padding=1, groups=4)
        self.seq = nn.Conv1d(32, 24, 3, padding=1)
        self.head = nn.Linear(24, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn(self.stem(x)))
        x = torch.cat([x, F.gelu(self.dilated(x))], dim=1)
        x = F.silu(self.grouped(x))
        x = F.max_pool2d(x, 2).flatten(2)  # N × 32 × L
        x = torch.sigmoid(self.seq(x)).mean(2)
        return self.head(x)


class MLP(nn.Module):
    """Three linear layers with BN1d and Tanh/ReLU6."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.fc1 = nn.Linear(3 * 16 * 16, 64)
        self.bn1 = nn.BatchNorm1d(64)
        self.fc2 = nn.Linear(64, 32)
        self.fc3 = nn.Linear(32, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.tanh(self.bn1(self.fc1(x.flatten(1))))
        return self.fc3(F.relu6(self.fc2(x)))


class EncoderBlock(nn.Module):
    """Pre-norm self-attention written with nn.Linear and matmul, then a GELU MLP; residual adds."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.fc2 = nn.Linear(2 * dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        n, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(d // self.heads), dim=-1)
        x = x + self.proj((att @ v).transpose(1, 2).reshape(n, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class TinyTransformer(nn.Module):
    """Patch embedding (a strided conv), two encoder blocks, mean pooling, a linear head."""

    def __init__(self, num_classes: int = 10, dim: int = 32) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 4, stride=4)
        self.pos = nn.Parameter(torch.zeros(1, 16, dim))
        self.blocks = nn.Sequential(EncoderBlock(dim, 4), EncoderBlock(dim, 4))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2) + self.pos
        return self.head(self.norm(self.blocks(x)).mean(1))


def small_cnn() -> nn.Module:
    """Factory for tests and the CLI (`--model tests.zoo:small_cnn`)."""
    return SmallCNN()


# name → (float model builder, input side): the models `prepare` is tested and benchmarked on.
ZOO = {
    "resnet50": (lambda: torchvision.models.resnet50(num_classes=10), 32),
    "mobilenet_v3_small": (lambda: torchvision.models.mobilenet_v3_small(num_classes=10), 32),
    "efficientnet_b0": (lambda: torchvision.models.efficientnet_b0(num_classes=10), 32),
    "regnet_x_400mf": (lambda: torchvision.models.regnet_x_400mf(num_classes=10), 32),
    "shufflenet_v2_x0_5": (lambda: torchvision.models.shufflenet_v2_x0_5(num_classes=10), 32),
    "vgg11_bn": (lambda: torchvision.models.vgg11_bn(num_classes=10), 32),
    "small_cnn": (SmallCNN, 16),
    "mlp": (MLP, 16),
    "transformer": (TinyTransformer, 16),
}


def small_cnn_for(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """Factory taking the CLI's keywords (`--model tests.zoo:small_cnn_for`): a 1x1 conv from ``in_channels`` to
    SmallCNN's three input channels, then SmallCNN with ``num_classes`` outputs."""
    return nn.Sequential(nn.Conv2d(in_channels, 3, 1), SmallCNN(num_classes))


def zoo_float_model(name: str) -> tuple[nn.Module, Tensor]:
    """Zoo model `name` (seeded init) and a batch of 4 inputs; its BN running statistics are those of that batch,
    so eval outputs have the scale a trained model's have (torchvision's untrained MobileNetV3 gives logits of about
    1e-10 with the default statistics)."""
    build, side = ZOO[name]
    torch.manual_seed(0)
    model = build()
    x = torch.rand(4, 3, side, side, generator=torch.Generator().manual_seed(1))
    return settled(model, x), x


def settled(model: nn.Module, x: Tensor) -> nn.Module:
    """`model` in eval mode with BatchNorm running statistics set to those of the batch `x`."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.momentum = 1.0
    with torch.no_grad():
        model.train()(x)
    for m in norms:
        m.momentum = 0.1
    return model.eval()
