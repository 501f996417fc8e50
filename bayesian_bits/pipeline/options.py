"""The ``train`` flags: the reference's flags (§6.1) under their names and defaults, plus this project's extras."""

from __future__ import annotations

import argparse
import math
import sys
from typing import Any

from bbkernels.ladder import GATED_BITS

from ..experiments import EXPERIMENTS, GRAY_EXPERIMENTS, MODELS, parse_model_args, parse_overrides
from ..models import TIMM_PREFIX, TORCHVISION_PREFIX
from ..prepare import FIXED_BITS
from .errors import UsageError
from .optim import FINETUNE_LR, FINETUNE_OPTIMIZER, OPTIMIZERS
from .schedules import SCHEDULE_HELP, parse_lr_schedule

DEBUG_BATCHES = 11  # --debug: each epoch stops after this many batches (reference behaviour)


class _DoesNothing(argparse.Action):
    """A reference flag accepted so that the reference's commands still run; it changes nothing, and using it
    prints a warning that says so."""

    def __init__(self, *args: Any, reason: str, **kwargs: Any) -> None:
        super().__init__(*args, help=f"deprecated, does nothing: {reason}", **kwargs)
        self.reason = reason

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        print(f"{parser.prog}: warning: {option_string} is deprecated and does nothing: {self.reason}",
              file=sys.stderr)
        setattr(namespace, self.dest, True if self.nargs == 0 else values)


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """Register every ``train`` flag on ``parser``."""
    ref = parser.add_argument_group("experiment (reference flags)")
    ref.add_argument("--experiment", choices=list(EXPERIMENTS),
                     help="dataset: the paper's mnist, cifar10, imagenet; fashion-mnist; imagefolder (your images "
                     "at DATA_DIR/{train,val}/<class>/<image>). Required, except with --eval-only")
    ref.add_argument(
        "--data-dir",
        help="dataset root: MNIST, Fashion-MNIST and CIFAR-10 are downloaded here when missing; ImageNet must be at "
        "DATA_DIR/imagenet_raw/{train,val}/<class>/<image>. Required, except with --eval-only (default: the "
        "checkpoint's)",
    )
    ref.add_argument(
        "--model", help=f"model spec: {', '.join(MODELS)} (the paper's, each on its experiment; any on "
        "fashion-mnist and imagefolder), torchvision:<builder> (e.g. torchvision:resnet18), timm:<name> (e.g. "
        "timm:vit_tiny_patch16_224; pip install 'bayesian-bits[models]') or package.module:callable (a class or "
        "function returning an nn.Module, imported from the working directory or PYTHONPATH). Builders get "
        "num_classes= and in_channels= (timm: in_chans=) where they take them. Required, except with --eval-only"
    )
    ref.add_argument("--method", action=_DoesNothing, default="bayesian_bits", choices=["bayesian_bits"],
                     reason="Bayesian Bits is the only method")
    ref.add_argument("--pretrained", action="store_true", help="start from the builder's pretrained weights "
                     "(resnet18, mobilenetv2 and torchvision:<builder>: ImageNet, fetched into the torch hub cache "
                     "when missing; timm:<name>: timm's default, from the Hugging Face cache or hub)")
    ref.add_argument("--batch-size", type=int, default=64, help="global batch size, train and eval (default 64); "
                     "under torchrun each process takes BATCH_SIZE / WORLD_SIZE")
    ref.add_argument("--epochs", type=int, default=25, help="training epochs (default 25)")
    ref.add_argument("--eval-every", type=int, default=5,
                     help="epochs between evaluations and BOP tables (default 5; the last epoch is always evaluated)")
    ref.add_argument("--n-workers", "--workers", dest="n_workers", type=int, default=None,
                     help="data-loader worker processes (default: 2 mnist, 1 cifar10, min(64, CPUs) imagenet)")

    user = parser.add_argument_group("your model and data")
    user.add_argument("--trust-model-code", action="store_true",
                      help="--eval-only: import and run the package.module:callable model the checkpoint names "
                      "(from PYTHONPATH; passing --model with the same spec also confirms it). A file never chooses "
                      "code to run on its own")
    user.add_argument("--weights", metavar="PATH", help="float weights to start from: a state_dict file "
                      "(torch.save(model.state_dict(), PATH); read with weights_only=True), loaded before preparing")
    user.add_argument("--num-classes", type=int, help="classes of the model's head (default: the experiment's; "
                      "imagefolder: the number of class folders)")
    user.add_argument("--image-size", type=int, metavar="PIXELS", help="imagefolder: side the images are resized "
                      "and centre-cropped to (default 224)")
    user.add_argument("--channels", type=int, choices=[1, 3], help="imagefolder: read the images as grayscale (1) "
                      "or RGB (3) (default: as the first training image is); mnist, fashion-mnist: 3 repeats the "
                      "gray channel, for models built for RGB images (default 1)")
    user.add_argument("--model-args", nargs="+", default=[], metavar="KEY=VALUE",
                      help="further keywords of the --model builder (integers, numbers, true/false or text), e.g. "
                      "--model timm:vit_tiny_patch16_224 --model-args img_size=28 patch_size=4")
    user.add_argument("--mean", type=_floats, help="imagefolder: per-channel normalisation mean, comma-separated "
                      "(default: computed on the training images and stored in the checkpoint)")
    user.add_argument("--std", type=_floats, help="imagefolder: per-channel normalisation std (with --mean)")
    user.add_argument("--skip", action="append", default=[], metavar="PATTERN",
                      help="module-name pattern (fnmatch) whose conv/linear layers stay float; repeatable")
    user.add_argument("--override", action="append", default=[], metavar="PATTERN:KEY=VALUE[,KEY=VALUE]",
                      help="per-layer settings for modules matching PATTERN: weight_bits / act_bits "
                      f"({'/'.join(map(str, FIXED_BITS))} fixed, none = learned), prune (true/false), gamma_inits "
                      "(4 logits joined by '/'); e.g. --override 'conv1:weight_bits=8,act_bits=8'; repeatable, "
                      "later ones win")

    opt = parser.add_argument_group("optimisation (reference flags)")
    opt.add_argument("--optimizer", default="SGD", choices=OPTIMIZERS, help="weights optimizer (default SGD, "
                     "always momentum 0.9 with Nesterov)")
    opt.add_argument("--learning-rate", type=float, default=1e-2, help="weights learning rate (default 1e-2)")
    opt.add_argument("--optimizer-q", default=None, choices=OPTIMIZERS,
                     help="gates (gamma_*) optimizer (default: the weights optimizer)")
    opt.add_argument("--learning-rate-q", type=float, default=None,
                     help="gates learning rate; unset: the gates join the weights optimizer")
    opt.add_argument("--optimizer-s", default=None, choices=OPTIMIZERS,
                     help="ranges (x_max) optimizer (default: the previous group's optimizer)")
    opt.add_argument("--learning-rate-s", type=float, default=None,
                     help="ranges learning rate; unset: the ranges join the previous group's optimizer")
    opt.add_argument("--lr-schedule", default=None,
                     help=f"learning-rate schedule, stepped per epoch: {SCHEDULE_HELP}. "
                     "Default: 'linear' for mnist/cifar10, 'multistep:10:20:40' for imagenet")
    opt.add_argument("--weight-decay", type=float, default=0.0,
                     help="explicit L2 term weight_decay * 1/2 sum(theta^2) over the weights group (default 0)")
    opt.add_argument("--learn", default="wgs",
                     help="what to train: w weights, g gates, s ranges, b biases only (not with w); default wgs")

    bb = parser.add_argument_group("Bayesian Bits (reference flags)")
    bb.add_argument("--gating-lambda", type=float, default=0.0, help="regulariser strength (README 'MU'; default 0)")
    bb.add_argument("--target-rel-bops", type=float, default=None, metavar="P",
                    help="BOP budget in %% of W32A32 (the relative BOPs the report prints): the regulariser weight "
                    "follows it by dual ascent (--gating-lambda is then its start, default 0.1) and the model is "
                    "projected onto it at the end of gate training, ending in [0.9, 1] x P; needs --reg-type bop")
    bb.add_argument("--target-gbops", type=float, default=None, metavar="G",
                    help="the BOP budget in GBOPs instead of --target-rel-bops")
    bb.add_argument("--gating-method", default="l0", choices=["l0", "fixed"],
                    help="training gates: l0 = stochastic hard-concrete (default), fixed = hard sigmoid")
    for bits in GATED_BITS:
        bb.add_argument(f"--gamma-{bits}-init", type=float, default=6.0,
                        help=f"initial logit of the {bits}-bit gates (default 6)")
    bb.add_argument("--reg-type", default="const", choices=["const", "bop"],
                    help="regulariser level cost: const = 1 per level, bop = bit width x MACs / max MACs")
    bb.add_argument("--learned-scale", default=None,
                    help="'range' learns each quantizer's x_max; unset keeps the calibrated x_max fixed "
                    "(the reference's 'scale' mode is buggy and not implemented)")
    bb.add_argument("--weight-quant", action=argparse.BooleanOptionalAction, default=True,
                    help="quantize weights (default on)")
    bb.add_argument("--act-quant", action=argparse.BooleanOptionalAction, default=True,
                    help="quantize activations (default on); with either off, gates and ranges are not trained")
    bb.add_argument("--include-pruning", action="store_true", help="per-output-channel pruning gates on weights")
    bb.add_argument("--prune-only", action="store_true",
                    help="prune without quantizing (needs --include-pruning); with --fixed-8bit/--fixed-48bit: "
                    "fixed-bit quantization plus learned pruning")
    bb.add_argument("--fixed-8bit", action="store_true", help="fixed W8A8 quantization with learned ranges")
    bb.add_argument("--fixed-48bit", action="store_true", help="fixed W4A8 quantization with learned ranges")
    bb.add_argument("--bn-fold", default=None, choices=["exact", "fast"],
                    help="how BatchNorm folded into a quantized layer trains: exact = the paper's (a second, "
                    "float-weight conv gives the batch statistics), fast = one conv, batch statistics of its output "
                    "at the unfolded scale (default: exact for the paper models, fast for other models); eval and "
                    "export are the same for both")
    bb.add_argument("--static-fold-bn", action="store_true",
                    help="fold BatchNorm with its running statistics from the start (statistics frozen)")
    bb.add_argument("--checkpointing", action=_DoesNothing, nargs=0, default=False,
                    reason="the fused quantize-and-gate operator already saves only its input for the backward pass")
    bb.add_argument("--fixed-gate-finetune-epochs", type=int, default=0,
                    help="after training, freeze the gates (fixed bit widths and prune masks), fold BN and fine-tune "
                    "this many epochs (weights with --finetune-optimizer, ranges with Adam, both at "
                    "--finetune-learning-rate, cosine per iteration; default 0)")
    bb.add_argument("--finetune-optimizer", default=FINETUNE_OPTIMIZER, choices=OPTIMIZERS,
                    help=f"fine-tuning's weights optimizer (default {FINETUNE_OPTIMIZER}, the reference's; SGD always "
                    "with Nesterov momentum)")
    bb.add_argument("--finetune-learning-rate", type=float, default=FINETUNE_LR,
                    help=f"fine-tuning's starting learning rate for weights and ranges (default {FINETUNE_LR:g}, the "
                    "reference's)")

    out = parser.add_argument_group("output and state")
    out.add_argument("--logdir", default=None,
                     help="output folder (created): log, metrics.jsonl, summary.json, plots, checkpoints; "
                     "unset: nothing is written. One run at a time (locked); a folder that already holds a run "
                     "needs --resume or --overwrite")
    out.add_argument("--overwrite", action="store_true",
                     help="replace the run in --logdir (its log, metrics, summary, plots and checkpoints are deleted "
                     "first; a folder holding other files is refused)")
    out.add_argument("--make-subdir", action="store_true", help="write into a timestamped subfolder of --logdir")
    out.add_argument("--save-checkpoints", action="store_true",
                     help="keep every epoch's checkpoint (epoch_K.pth, epoch_FT-K.pth); without it only the "
                     "latest (last.pth) and the final ones (epoch_FINAL_PRE_FT.pth, epoch_FINAL.pth) are kept")
    out.add_argument("--log-every", type=int, default=None,
                     help="also write a progress line to the log every N iterations (default: epoch summaries only)")
    out.add_argument("--debug", action="store_true",
                     help=f"quick check: each epoch stops after {DEBUG_BATCHES} batches and nothing is written")
    out.add_argument("--eval-only", action="store_true",
                     help="evaluate --checkpoint and report its BOPs; no training. Model, data and quantization "
                     "options come from the checkpoint: a flag that contradicts it is an error")
    out.add_argument("--checkpoint", default=None, help="checkpoint to evaluate with --eval-only")
    out.add_argument("--resume", default=None, metavar="CHECKPOINT",
                     help="continue an interrupted run from its checkpoint (e.g. LOGDIR/last.pth) with the same flags: "
                     "one that changes the run (learning rates, epochs, schedule, model, quantization, seed, ...) "
                     "is refused with the list of differences")

    run = parser.add_argument_group("execution")
    run.add_argument("--seed", type=int, default=0, help="random seed; runs are deterministic on CPU (default 0)")
    run.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu); "
                     "under torchrun each process uses cuda:LOCAL_RANK")
    run.add_argument("--amp", default=None, choices=["bf16", "fp16"], help="CUDA mixed precision autocast")
    run.add_argument("--compile", action="store_true",
                     help="run the model under torch.compile for training and evaluation (compiling takes a while)")

    test = parser.add_argument_group("test hooks (smoke runs only; no accuracy is ever claimed from them)")
    test.add_argument("--synthetic", type=int, default=None, metavar="N",
                      help="replace the dataset with N random images per split of the experiment's shape")
    test.add_argument("--synthetic-image-size", type=int, default=None, metavar="S",
                      help="side of the synthetic images (default: the experiment's); needs --synthetic")
    test.add_argument("--max-batches", type=int, default=None, metavar="N",
                      help="stop each training epoch after N batches")


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: use comma-separated numbers, e.g. 0.5,0.5,0.5") from None


def _flag(name: str) -> str:
    return f"--{name.replace('_', '-')}"


# Integer flags: (minimum, maximum). The maxima keep what a number allocates (images, heads, batches) or seeds
# within what the machine and the random generators take.
INT_BOUNDS = {"batch_size": (1, 2**20), "epochs": (0, 10**6), "eval_every": (1, 10**6), "n_workers": (0, 1024),
              "fixed_gate_finetune_epochs": (0, 10**6), "log_every": (1, 10**9), "synthetic": (1, 10**6),
              "synthetic_image_size": (8, 4096), "max_batches": (1, 10**9), "num_classes": (1, 100_000),
              "image_size": (8, 4096), "seed": (0, 2**63 - 1)}
SYNTHETIC_ELEMENTS = 2**28  # a synthetic split holds at most this many values (1 GiB of fp32)
POSITIVE_FLOATS = ("learning_rate", "learning_rate_q", "learning_rate_s", "finetune_learning_rate")
NON_NEGATIVE_FLOATS = ("gating_lambda", "weight_decay")
FINITE_FLOATS = tuple(f"gamma_{bits}_init" for bits in GATED_BITS)


def check_numbers(args: argparse.Namespace) -> None:
    """Every numeric option within its bounds, finite where it must be, with the right sign (a ``UsageError`` naming
    the flag); run on the command line and on the options a checkpoint stores."""
    for name, (low, high) in INT_BOUNDS.items():
        value = getattr(args, name, None)
        if value is not None and not low <= value <= high:
            raise UsageError(f"{_flag(name)} must lie in [{low}, {high}], got {value}")
    for name in POSITIVE_FLOATS:
        value = getattr(args, name, None)
        if value is not None and not (math.isfinite(value) and value > 0):
            raise UsageError(f"{_flag(name)} must be a positive number, got {value}")
    for name in NON_NEGATIVE_FLOATS:
        value = getattr(args, name, None)
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise UsageError(f"{_flag(name)} must be a finite number ≥ 0, got {value}")
    for name in FINITE_FLOATS:
        value = getattr(args, name, None)
        if value is not None and not math.isfinite(value):
            raise UsageError(f"{_flag(name)} must be a finite gate logit, got {value}")
    for name in ("mean", "std"):
        values = getattr(args, name, None)
        if values is not None and not all(math.isfinite(v) for v in values):
            raise UsageError(f"{_flag(name)} {','.join(map(str, values))}: every value must be finite")
    if args.synthetic is not None:
        side = args.synthetic_image_size or 224
        if args.synthetic * 3 * side * side > SYNTHETIC_ELEMENTS:
            raise UsageError(f"--synthetic {args.synthetic} images of {side}×{side} would hold more than "
                             f"{SYNTHETIC_ELEMENTS:,} values; use fewer or smaller synthetic images")


def check_train_options(args: argparse.Namespace) -> None:
    """Reject contradictory or impossible combinations with a ``UsageError`` naming the flag and the fix."""
    check_numbers(args)
    if not args.eval_only:
        missing = [f"--{k.replace('_', '-')}" for k in ("experiment", "data_dir", "model") if getattr(args, k) is None]
        if missing:
            raise UsageError(f"train needs {' and '.join(missing)} (only --eval-only takes them from its checkpoint)")
    check_model_options(args)
    if args.bn_fold is None and args.model is not None:
        args.bn_fold = "exact" if args.model in MODELS else "fast"
    if args.prune_only and not args.include_pruning:
        raise UsageError("--prune-only needs --include-pruning; add --include-pruning")
    if args.fixed_8bit and args.fixed_48bit:
        raise UsageError("--fixed-8bit and --fixed-48bit are mutually exclusive; pass at most one")
    if args.learned_scale not in (None, "range"):
        raise UsageError(
            f"--learned-scale {args.learned_scale!r} is not supported; use --learned-scale range "
            "(the reference's 'scale' mode is buggy and not implemented)"
        )
    learn = args.learn
    if not learn or set(learn) - set("wgsb") or len(set(learn)) != len(learn):
        raise UsageError(f"--learn {learn!r}: use letters from w (weights), g (gates), s (ranges), b (biases only)")
    if "w" in learn and "b" in learn:
        raise UsageError("--learn: 'b' (biases only) and 'w' (all weights) are mutually exclusive; keep one")
    if args.lr_schedule is not None:
        parse_lr_schedule(args.lr_schedule)
    if args.eval_only and args.checkpoint is None:
        raise UsageError("--eval-only needs --checkpoint PATH (a checkpoint written by bayesian-bits train)")
    if args.checkpoint is not None and not args.eval_only:
        raise UsageError("--checkpoint is read only with --eval-only; to continue training use --resume")
    if args.eval_only and args.resume is not None:
        raise UsageError("--eval-only and --resume exclude each other; use --checkpoint with --eval-only")
    if args.debug and args.logdir is not None:
        raise UsageError("--debug writes nothing; drop --logdir (or --debug)")
    if args.synthetic_image_size is not None and args.synthetic is None:
        raise UsageError("--synthetic-image-size needs --synthetic N")
    if args.make_subdir and args.logdir is None:
        raise UsageError("--make-subdir needs --logdir")
    if args.save_checkpoints and args.logdir is None:
        raise UsageError("--save-checkpoints needs --logdir")
    check_budget_options(args)
    if args.overwrite and args.logdir is None:
        raise UsageError("--overwrite needs --logdir")
    if args.overwrite and args.resume is not None:
        raise UsageError("--overwrite and --resume exclude each other: --resume continues the run, --overwrite "
                         "replaces it; keep one")


def check_model_options(args: argparse.Namespace) -> None:
    """The model-spec and data flags: pretrained weights where they exist, ImageFolder-only flags, overrides."""
    model = args.model
    if args.pretrained and model is not None and model not in ("resnet18", "mobilenetv2") \
            and not model.startswith((TORCHVISION_PREFIX, TIMM_PREFIX)):
        raise UsageError(f"--pretrained: {model} has no pretrained weights (resnet18, mobilenetv2, "
                         "torchvision:<builder> and timm:<name> have); drop --pretrained, or load yours with "
                         "--weights PATH")
    if args.pretrained and args.weights is not None:
        raise UsageError("--pretrained and --weights both give the starting weights; keep one")
    if args.experiment not in (None, "imagefolder"):
        for flag in ("image_size", "mean", "std"):
            if getattr(args, flag) is not None:
                raise UsageError(f"--{flag.replace('_', '-')} applies to --experiment imagefolder only; drop it")
        if args.channels is not None and args.experiment not in GRAY_EXPERIMENTS:
            raise UsageError(f"--channels applies to --experiment imagefolder and {', '.join(GRAY_EXPERIMENTS)} "
                             f"only ({args.experiment} images are RGB); drop it")
    if (args.mean is None) != (args.std is None):
        raise UsageError("--mean and --std go together; pass both (or neither, to compute them)")
    if args.std is not None and min(args.std) <= 0:
        raise UsageError(f"--std {','.join(map(str, args.std))}: every std must be positive")
    parse_overrides(args.override)
    parse_model_args(args.model_args)


# Options --eval-only takes from the command line; every other one comes from the checkpoint.
EVAL_FROM_COMMAND_LINE = ("eval_only", "checkpoint", "resume", "logdir", "make_subdir", "overwrite", "n_workers",
                          "device", "log_every", "save_checkpoints", "checkpointing", "batch_size", "amp", "compile",
                          "debug", "max_batches", "method", "trust_model_code")


def eval_only_args(args: argparse.Namespace, saved: dict[str, Any], defaults: dict[str, Any]) -> argparse.Namespace:
    """The options of ``--eval-only``: the checkpoint's ``saved`` options, with the command line's run settings
    (``EVAL_FROM_COMMAND_LINE``; ``--data-dir`` where given). A flag given on the command line (a value other than
    its default in ``defaults``) that differs from the checkpoint is a conflict: all of them are one
    ``UsageError``."""
    given = {k: v for k, v in vars(args).items() if k in defaults and v != defaults[k]}
    conflicts = [f"--{k.replace('_', '-')} {v!r} (checkpoint: {saved[k]!r})" for k, v in sorted(given.items())
                 if k not in EVAL_FROM_COMMAND_LINE and k != "data_dir" and k in saved and saved[k] != v]
    if conflicts:
        raise UsageError(f"--checkpoint {args.checkpoint}: --eval-only takes the model and quantization options "
                         f"from the checkpoint, and these flags contradict it: {'; '.join(conflicts)}. Drop them")
    merged = {**vars(args), **{k: v for k, v in saved.items() if k not in EVAL_FROM_COMMAND_LINE}}
    if args.data_dir is not None:
        merged["data_dir"] = args.data_dir
    return argparse.Namespace(**merged)


def train_defaults() -> dict[str, Any]:
    """Every ``train`` flag's default value (by destination name)."""
    parser = argparse.ArgumentParser(add_help=False)
    add_train_arguments(parser)
    return vars(parser.parse_args([]))


def check_budget_options(args: argparse.Namespace) -> None:
    """The BOP budget flags: one target, positive, with the BOP-weighted regulariser, on a training run."""
    given = [(f, v) for f, v in (("--target-rel-bops", args.target_rel_bops), ("--target-gbops", args.target_gbops))
             if v is not None]
    if not given:
        return
    if len(given) > 1:
        raise UsageError("--target-rel-bops and --target-gbops are two units for one budget; pass one of them")
    flag, value = given[0]
    if not (math.isfinite(value) and value > 0):
        raise UsageError(f"{flag} must be a positive number, got {value}")
    if args.reg_type != "bop":
        raise UsageError(f"{flag} steers the BOP-weighted regulariser; add --reg-type bop")
    if args.eval_only:
        raise UsageError(f"{flag} sets a budget for training; --eval-only trains nothing, drop {flag}")
    if args.gating_lambda < 0:
        raise UsageError(f"--gating-lambda {args.gating_lambda}: the initial regulariser weight must be positive "
                         "(0 or unset starts at 0.1)")
