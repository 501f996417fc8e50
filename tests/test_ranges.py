"""Learned ranges stay positive under any optimizer (ranges.py), and calibration never fails on what the weights
did: zero-initialised layers and scales start from a valid range with a warning."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torchvision
from torch import nn
from torch.nn.functional import cross_entropy

import bayesian_bits as bb
from bayesian_bits.ranges import RANGE_FLOOR
from tests.checks import ZOO_CONFIG

TINY_RANGE = 1e-5  # the scale of calibrated ranges in timm's efficientnet_b0 / mobilenetv3 at small inputs


def _ranges(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([q.x_max.detach() for _, q in bb.quantizers(model)])


def _tiny_range_model() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """A bias-free CNN calibrated on images of scale 1e-5: its activation ranges are about 1e-5."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.ReLU(),
                        nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.Tanh(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10, bias=False))
    x, y = torch.rand(8, 3, 16, 16) * TINY_RANGE, torch.randint(0, 10, (8,))
    model = bb.prepare(net, x[:1], ZOO_CONFIG)
    bb.calibrate(model, x[:2])
    assert float(_ranges(model).min()) < 2 * TINY_RANGE
    return model, x, y


@pytest.mark.parametrize("make_optimizer", [
    lambda params: torch.optim.Adam(params, lr=1e-2),
    lambda params: torch.optim.SGD(params, lr=1e-2, momentum=0.9),
], ids=["adam-1e-2", "sgd-momentum"])
def test_no_optimizer_drives_a_range_to_zero(make_optimizer):
    model, x, y = _tiny_range_model()
    optimizer = make_optimizer(model.parameters())
    floored = 0
    for _ in range(50):
        loss = cross_entropy(model(x), y) + 0.01 * bb.regularizer(model)
        assert torch.isfinite(loss)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        ranges = _ranges(model)
        assert bool((ranges > 0).all()), f"a range reached {float(ranges.min())}"
        floored += int((ranges == RANGE_FLOOR).sum())
    assert floored > 0, "these settings should have driven some range below zero (the projection never acted)"
    assert torch.isfinite(cross_entropy(model.eval()(x), y))


def test_ranges_above_the_floor_follow_the_optimizer_exactly():
    model, x, y = _tiny_range_model()
    with torch.no_grad():
        for _, q in bb.quantizers(model):
            q.x_max.fill_(2.0)
    ranges = [q.x_max for _, q in bb.quantizers(model)]
    optimizer = torch.optim.SGD(ranges, lr=1e-3)
    cross_entropy(model(x), y).backward()
    expected = [float(r - 1e-3 * r.grad) for r in ranges]
    optimizer.step()
    assert [float(r) for r in ranges] == expected


def test_copied_and_reloaded_ranges_are_projected_too():
    model, _, _ = _tiny_range_model()
    copied = copy.deepcopy(model)
    reloaded = copy.deepcopy(model)
    reloaded.load_state_dict(model.state_dict(), assign=True)  # new parameter objects
    for m in (copied, reloaded):
        ranges = [q.x_max for _, q in bb.quantizers(m)]
        for r in ranges:
            r.grad = torch.ones_like(r)
        torch.optim.SGD(ranges, lr=1.0).step()
        assert float(_ranges(m).min()) == RANGE_FLOOR


def test_zero_initialised_residual_scales_calibrate_with_a_warning():
    torch.manual_seed(0)
    model = bb.prepare(torchvision.models.resnet18(num_classes=10, zero_init_residual=True),
                       torch.zeros(1, 3, 32, 32), ZOO_CONFIG)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        bb.calibrate(model, torch.rand(2, 3, 32, 32))
    named = {str(w.message).split(":")[0] for w in caught if "all zero" in str(w.message)}
    # every block's last BN has γ = 0 (and β = 0), so its folded weight and its output are all zero
    assert named == {f"quantizer layer{i}.{j}.conv2.{kind}_quantizer" for i in range(1, 5) for j in range(2)
                     for kind in ("weight", "act")}
    x, y = torch.rand(4, 3, 32, 32), torch.randint(0, 10, (4,))
    cross_entropy(model(x), y).backward()
    assert all(torch.isfinite(q.x_max.grad).all() for _, q in bb.quantizers(model) if q.x_max.grad is not None)
