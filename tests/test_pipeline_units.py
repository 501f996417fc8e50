"""Unit tests of the training pipeline's parts: optimizer grouping, schedules, checkpoints, option checks."""

from __future__ import annotations

import argparse
import os

import pytest
import torch
from torch import nn

from bayesian_bits import checkpoint_io
from bayesian_bits.cli import build_parser
from bayesian_bits.errors import UsageError
from bayesian_bits.pipeline import checkpoint
from bayesian_bits.pipeline.optim import (
    build_finetune_optimizers,
    build_optimizers,
    group_settings,
    param_kind,
    select_kinds,
    split_parameters,
)
from bayesian_bits.pipeline.options import check_train_options
from bayesian_bits.pipeline.schedules import build_schedulers, linear_decay_factor, parse_lr_schedule


class Quantizer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.x_max = nn.Parameter(torch.ones(1))
        self.gamma_4 = nn.Parameter(torch.ones(1))
        self.gamma_2 = nn.Parameter(torch.ones(3))


class Tiny(nn.Module):
    """Stand-in with the model side's naming: gates gamma_*, ranges x_max, BN's own 'weight'/'bias'."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3)
        self.bn = nn.BatchNorm2d(3)
        self.weight_quantizer = Quantizer()


def test_param_kinds_follow_the_reference_substring_rule() -> None:
    assert param_kind("features.0.weight_quantizer.gamma_8") == "gate"
    assert param_kind("features.0.weight_quantizer.x_max") == "range"
    assert param_kind("features.0.bn.gamma") == "weight"  # BN's gamma has no underscore
    groups = split_parameters(Tiny())
    assert [n for n, _ in groups["gate"]] == ["weight_quantizer.gamma_4", "weight_quantizer.gamma_2"]
    assert [n for n, _ in groups["range"]] == ["weight_quantizer.x_max"]
    assert len(groups["weight"]) == 4


def test_trailing_groups_without_learning_rate_merge_into_the_previous_one() -> None:
    slots = group_settings("SGD", 0.1, None, None, None, None)
    assert [(s.kinds, s.optimizer, s.lr) for s in slots] == [(("weight", "gate", "range"), "SGD", 0.1)]
    slots = group_settings("SGD", 3e-3, "Adam", 1e-3, "Adam", None)
    assert [(s.kinds, s.optimizer, s.lr) for s in slots] == [(("weight",), "SGD", 3e-3),
                                                             (("gate", "range"), "Adam", 1e-3)]
    slots = group_settings("SGD", 3e-3, None, None, "Adam", 1e-2)
    assert [s.kinds for s in slots] == [("weight", "gate"), ("range",)]


def test_optimizers_hold_their_groups_and_sgd_is_nesterov() -> None:
    model = Tiny()
    opts = build_optimizers(model, group_settings("SGD", 3e-3, "Adam", 1e-3, "Adam", 2e-3),
                            select_kinds("wgs", True))
    assert list(opts) == ["weight", "gate", "range"]
    sgd = opts["weight"].param_groups[0]
    assert sgd["nesterov"] and sgd["momentum"] == 0.9 and sgd["weight_decay"] == 0 and sgd["lr"] == 3e-3
    assert isinstance(opts["gate"], torch.optim.Adam) and len(opts["gate"].param_groups[0]["params"]) == 2
    assert opts["range"].param_groups[0]["lr"] == 2e-3


def test_learn_selection_freezes_what_it_leaves_out() -> None:
    model = Tiny()
    opts = build_optimizers(model, group_settings("Adam", 1e-3, None, None, None, None), select_kinds("bg", False))
    params = opts["weight"].param_groups[0]["params"]
    assert {id(p) for p in params} == {id(model.conv.bias), id(model.bn.bias)}
    assert not model.weight_quantizer.gamma_4.requires_grad  # gates off when a quantizer kind is off


def test_finetune_optimizers() -> None:
    opts = build_finetune_optimizers(Tiny())
    assert opts["weight"].param_groups[0]["lr"] == 1e-4 and opts["weight"].param_groups[0]["nesterov"]
    assert isinstance(opts["range"], torch.optim.Adam) and opts["range"].param_groups[0]["lr"] == 1e-4
    adam = build_finetune_optimizers(Tiny(), "Adam", 3e-4)  # --finetune-optimizer Adam --finetune-learning-rate 3e-4
    assert isinstance(adam["weight"], torch.optim.Adam) and adam["weight"].param_groups[0]["lr"] == 3e-4
    assert adam["range"].param_groups[0]["lr"] == 3e-4


def test_linear_decay_matches_the_reference_numbers() -> None:
    f = linear_decay_factor(100)
    assert f(66) == 1.0 and f(67) == pytest.approx(33 / 34) and f(99) == pytest.approx(1 / 34)
    g = linear_decay_factor(300)
    assert g(200) == 1.0 and g(299) == pytest.approx(0.01)


def test_schedule_parsing() -> None:
    assert parse_lr_schedule("multistep:10:20").milestones == (10, 20)
    assert parse_lr_schedule("MultiStepLR:10:20:40").milestones == (10, 20, 40)
    assert parse_lr_schedule("cosine:1e-5").eta_min == 1e-5
    assert parse_lr_schedule("none").kind == "none"
    for bad in ("step:10", "multistep", "multistep:20:10", "cosine:a", "linear:3", ""):
        with pytest.raises(UsageError, match="--lr-schedule"):
            parse_lr_schedule(bad)


def test_multistep_steps_every_optimizer_and_linear_only_the_weights() -> None:
    opts = build_optimizers(Tiny(), group_settings("SGD", 1.0, "Adam", 1.0, "Adam", 1.0), select_kinds("wgs", True))
    scheds = build_schedulers(parse_lr_schedule("multistep:1:2"), opts, 3)
    assert set(scheds) == {"weight", "gate", "range"}
    for o in opts.values():
        o.step()
    for s in scheds.values():
        s.step()
    assert all(o.param_groups[0]["lr"] == pytest.approx(0.1) for o in opts.values())
    assert set(build_schedulers(parse_lr_schedule("linear"), opts, 3)) == {"weight"}


def test_atomic_save_leaves_no_temporary_files(tmp_path) -> None:
    path = tmp_path / "last.pth"
    checkpoint_io.save({"model": {}, "phase": "train"}, path)
    checkpoint_io.save({"model": {"a": torch.ones(1)}, "phase": "train"}, path)
    assert os.listdir(tmp_path) == ["last.pth"]
    assert torch.equal(checkpoint_io.load_checkpoint(path, "--resume")["model"]["a"], torch.ones(1))


def test_rng_state_round_trip() -> None:
    state = checkpoint.rng_state()
    a = torch.rand(3)
    checkpoint.set_rng_state(state)
    assert torch.equal(torch.rand(3), a)


def test_bad_checkpoint_is_a_usage_error(tmp_path) -> None:
    with pytest.raises(UsageError, match="no such file"):
        checkpoint_io.load_checkpoint(tmp_path / "missing.pth", "--resume")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(UsageError, match="not readable"):
        checkpoint_io.load_checkpoint(junk, "--checkpoint")


def _args(*extra: str) -> argparse.Namespace:
    return build_parser().parse_args(["train", "--experiment", "mnist", "--data-dir", "d", "--model",
                                      "lenet5quantized", *extra])


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--prune-only"], "--prune-only needs --include-pruning"),
        (["--fixed-8bit", "--fixed-48bit"], "mutually exclusive"),
        (["--lr-schedule", "exponential"], "--lr-schedule"),
        (["--learned-scale", "scale"], "--learned-scale"),
        (["--learn", "wb"], "--learn"),
        (["--eval-only"], "--checkpoint"),
        (["--checkpoint", "x.pth"], "--eval-only"),
        (["--debug", "--logdir", "x"], "--debug"),
        (["--synthetic-image-size", "32"], "--synthetic"),
        (["--pretrained"], "--pretrained"),
        (["--epochs", "-1"], "--epochs"),
    ],
)
def test_contradictory_options_are_rejected(extra: list[str], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        check_train_options(_args(*extra))
