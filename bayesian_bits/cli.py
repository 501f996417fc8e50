"""The ``bayesian-bits`` command line: ``bayesian-bits train ...`` (also ``python -m bayesian_bits.train ...``) and
``bayesian-bits export CHECKPOINT --format FORMAT -o OUT``.

Bad invocations, missing data, bad checkpoints and unwritable outputs end with exit status 2 and a one-line
message; a diverged run (NaN or infinite loss or weights) with status 1; Ctrl-C with 130 and SIGTERM with 143
(both leave the last checkpoint consistent and print how to resume).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from collections.abc import Sequence
from types import FrameType

from .errors import NonFiniteError, UsageError
from .pipeline.options import add_train_arguments, check_train_options

PROG = "bayesian-bits"
EXPORT_FORMATS = ("manifest", "pruned", "packed", "onnx")  # bayesian_bits.export.FORMATS, without importing torch here


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage dump): ``PROG: error: MESSAGE (see --help)``."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with its subcommands."""
    parser = Parser(
        prog=PROG,
        description="Bayesian Bits: learned mixed-precision quantization and pruning "
        "(van Baalen et al., NeurIPS 2020).",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)
    train = commands.add_parser(
        "train",
        help="train (and fine-tune) a quantized model: the paper's, a torchvision model or your own, on mnist, "
        "fashion-mnist, cifar10, imagenet or your images (imagefolder)",
        description="Train a Bayesian Bits model. Accepts the reference implementation's flags under the same "
        "names, defaults and meanings, so its README commands run with only the program name changed. "
        "Multi-GPU: launch with torchrun --nproc_per_node N -m bayesian_bits.train ...",
    )
    add_train_arguments(train)
    export = commands.add_parser(
        "export",
        help="export a trained checkpoint for deployment (manifest, pruned, packed or onnx)",
        description="Export a checkpoint written by bayesian-bits train (the model is rebuilt from the options stored "
        "in it; a package.module:callable model is imported only with --trust-model-code). manifest: JSON of "
        "bit widths, scales, kept channels and BOPs. pruned: float eval model with pruned channels removed "
        "(tensors and plain data, rebuilt by bayesian_bits.export.load_pruned). packed: integer weights at their "
        "learned bit widths, pruned channels dropped. onnx: "
        "QuantizeLinear/DequantizeLinear graph (opset 21) at the learned precisions, pruned channels removed; "
        "needs pip install 'bayesian-bits[onnx]'.",
    )
    export.add_argument("checkpoint", metavar="CHECKPOINT", help="epoch_FINAL.pth, last.pth or another checkpoint")
    export.add_argument("--format", required=True, choices=EXPORT_FORMATS, help="what to write")
    export.add_argument("-o", "--output", required=True, metavar="OUT", help="file to write")
    export.add_argument("--overwrite", action="store_true",
                        help="replace an existing OUT (never a training checkpoint, nor CHECKPOINT itself)")
    export.add_argument("--trust-model-code", action="store_true",
                        help="import and run the package.module:callable model the checkpoint names (a file never "
                        "chooses code to run on its own; the module must be importable from PYTHONPATH)")
    export.add_argument("--image-size", type=int, metavar="PIXELS",
                        help="input side the pruned/packed/onnx model is made for (default: the training images'; "
                        "resnet18 and mobilenetv2 only). Removed channels leave per-position bias maps behind "
                        "padded convs, which fix the input size")
    return parser


def one_line(text: str) -> str:
    """Collapse a message onto one line."""
    return " ".join(str(text).split())


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread where Ctrl-C raises ``KeyboardInterrupt`` (and handled the same way)."""


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise Terminated


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``bayesian-bits`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if in_main_thread else None
    try:
        return _command(args)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _command(args: argparse.Namespace) -> int:
    # Your --model package.module:callable imports from the working directory; a spec read from a file never does.
    if args.command == "train" and ":" in (args.model or "") and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        if args.command == "export":
            from .export import export  # heavy imports only once the command line is valid

            print(export(args.checkpoint, args.format, args.output, args.image_size, args.trust_model_code,
                         args.overwrite))
            return 0
        check_train_options(args)
        from .pipeline.runner import run

        run(args)
    except UsageError as exc:
        print(f"{PROG} {args.command}: error: {one_line(exc)}", file=sys.stderr)
        return 2
    except NonFiniteError as exc:
        print(f"{PROG} {args.command}: error: {one_line(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:
        hint = f"; continue with --resume {args.logdir}/last.pth" if getattr(args, "logdir", None) else ""
        what = "terminated (SIGTERM)" if isinstance(exc, Terminated) else "interrupted"
        print(f"{PROG} {args.command}: {what}{hint}", file=sys.stderr)
        return 143 if isinstance(exc, Terminated) else 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
