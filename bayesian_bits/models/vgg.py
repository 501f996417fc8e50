"""VGG7 for CIFAR-10 (SPEC B §5): six 3×3 conv+BN+ReLU layers, three max-pools, two linear layers; float."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

# (in, out) per conv; None = MaxPool2d(2).
_PLAN = [(3, 128), (128, 128), None, (128, 256), (256, 256), None, (256, 512), (512, 512), None]


class VGG7(nn.Module):
    """The float `vggquantized` (12 979 082 parameters). Module names are the reference's: features.0, .1, .3, .4,
    .6, .7 convs (no bias; their BNs, in `norms`, fold into them when prepared), classifier.0 (with BN1d) and
    classifier.1 (the logits)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        convs = [step for step in _PLAN if step is not None]
        self.features = nn.Sequential(
            *(nn.MaxPool2d(2) if step is None else nn.Conv2d(*step, 3, 1, 1, bias=False) for step in _PLAN)
        )
        self.norms = nn.ModuleList([*(nn.BatchNorm2d(out) for _, out in convs), nn.BatchNorm1d(1024)])
        self.classifier = nn.Sequential(nn.Linear(512 * 4 * 4, 1024, bias=False), nn.Linear(1024, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        norms = iter(self.norms)
        for m in self.features:
            x = m(x) if isinstance(m, nn.MaxPool2d) else F.relu(next(norms)(m(x)))
        return self.classifier[1](F.relu(next(norms)(self.classifier[0](x.flatten(1)))))
