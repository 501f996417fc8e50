"""Bayesian Bits: learned mixed-precision quantization and pruning (van Baalen et al., NeurIPS 2020).

Public API (what a training pipeline calls, in order):

    config = QuantConfig(gamma_4_init=6, ..., include_pruning=True, reg_type="bop")
    model = prepare(float_model, example_inputs, config)   # any exportable model; or build_model("resnet18", config)
    calibrate(model, images)             # no_grad, train mode: sets ranges/signs (§1.2); before any optimizer
    freeze_batch_norm(model)             # only with --static-fold-bn
    assign_macs(model)                   # only for reg_type "bop" (§3.2); MACs of the example input
    loss = ce + lam * regularizer(model) # §3.4
    report = bop_report(model); print(format_report(report))   # §3.5–3.6, §6.10
    convert_to_fixed(model)              # fixed-gate fine-tuning (§6.9); then build new optimizers

Parameter names contain `gamma_` (gates) and `x_max` (ranges) for the optimizer grouping of §6.3.
"""

from .bops import assign_macs, bop_report, count_macs, expected_bops, expected_relative_bops, format_report
from .budget import BopBudget
from .calibration import calibrate, freeze_batch_norm
from .config import QuantConfig
from .finetune import convert_to_fixed
from .layers import QuantConv1d, QuantConv2d, QuantLayer, QuantLinear
from .models import MODELS, build_float_model, build_model
from .prepare import prepare
from .quantizer import BayesianBitsQuantizer, FixedQuantizer, Mode, quantizers
from .regularizer import regularizer

__all__ = [
    "MODELS",
    "BayesianBitsQuantizer",
    "BopBudget",
    "FixedQuantizer",
    "Mode",
    "QuantConfig",
    "QuantConv1d",
    "QuantConv2d",
    "QuantLayer",
    "QuantLinear",
    "assign_macs",
    "bop_report",
    "build_float_model",
    "build_model",
    "calibrate",
    "convert_to_fixed",
    "count_macs",
    "expected_bops",
    "expected_relative_bops",
    "format_report",
    "freeze_batch_norm",
    "prepare",
    "quantizers",
    "regularizer",
]
