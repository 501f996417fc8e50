#!/usr/bin/env bash
# The paper reproductions of the reference README (SPEC B §9), ready to run.
#
#   benchmarks/recipes/run.sh RECIPE DATA_DIR [LOGDIR] [extra train flags...]
#
# RECIPE: mnist (LeNet5), cifar10 (VGG7), imagenet (ResNet-18, with 10 fixed-gate fine-tuning epochs);
# imagefolder: a torchvision model (MODEL=torchvision:<builder>, default resnet18) from its ImageNet weights on your
# images at DATA_DIR/{train,val}/<class>/<image> (SIZE=<side>, default 224), with 5 fine-tuning epochs.
# Environment: MU=<gating lambda> overrides the recipe's, NPROC=<n> runs `torchrun --nproc_per_node n` (DDP;
# --batch-size stays the global batch), PRINT=1 prints the command instead of running it.
set -euo pipefail

usage() { echo "usage: $0 {mnist|cifar10|imagenet|imagefolder} DATA_DIR [LOGDIR] [extra flags...]" >&2; exit 2; }
[ $# -ge 2 ] || usage
RECIPE=$1 DATA_DIR=$2
shift 2
LOGDIR=runs/$RECIPE
if [ $# -ge 1 ] && [ "${1#-}" = "$1" ]; then LOGDIR=$1; shift; fi

COMMON=(--data-dir "$DATA_DIR" --learned-scale range --include-pruning --reg-type bop --learning-rate-q 1e-3
        --learning-rate-s 1e-3 --optimizer-q Adam --optimizer-s Adam)
case $RECIPE in
  mnist)  # expected: 99.30 % top-1 at 0.36 % relative BOPs (README, about 45 min on one GPU)
    FLAGS=(--experiment mnist --model lenet5quantized --batch-size 128 --optimizer Adam --learning-rate 1e-3
           --gating-lambda "${MU:-0.1}" --gamma-4-init 6 --gamma-8-init 6 --gamma-16-init -6 --gamma-32-init -6
           --epochs 100) ;;
  cifar10)  # expected: MU=0.01 -> 93.23 % at 0.51 %; MU=0.1 -> 91.96 % at 0.29 % (README, about 18 h)
    FLAGS=(--experiment cifar10 --model vggquantized --batch-size 128 --optimizer Adam --learning-rate 1e-3
           --gating-lambda "${MU:-0.01}" --gamma-4-init 6 --gamma-8-init 6 --gamma-16-init 6 --gamma-32-init 6
           --epochs 300) ;;
  imagenet)  # expected: the paper's Table 4 (appendix) for MU in {0.01, 0.03, 0.05, 0.07, 0.2}; days on 4 GPUs
    FLAGS=(--experiment imagenet --model resnet18 --batch-size 384 --optimizer SGD --learning-rate 3e-3
           --gating-lambda "${MU:-0.05}" --gamma-4-init 6 --gamma-8-init 6 --gamma-16-init 6 --gamma-32-init -6
           --epochs 30 --lr-schedule multistep:10:20 --pretrained --checkpointing --fixed-gate-finetune-epochs 10) ;;
  imagefolder)  # no reference numbers: your data. The head (another class count) starts from random weights
    FLAGS=(--experiment imagefolder --model "${MODEL:-torchvision:resnet18}" --pretrained --image-size "${SIZE:-224}"
           --batch-size 64 --optimizer SGD --learning-rate 3e-3 --gating-lambda "${MU:-0.05}" --gamma-4-init 6
           --gamma-8-init 6 --gamma-16-init 6 --gamma-32-init -6 --epochs 20 --lr-schedule multistep:10:15
           --fixed-gate-finetune-epochs 5) ;;
  *) usage ;;
esac

PYTHON=${PYTHON:-python}
if [ "${NPROC:-1}" -gt 1 ]; then
  LAUNCH=(torchrun --standalone --nproc_per_node "$NPROC" -m bayesian_bits.train)
else
  LAUNCH=("$PYTHON" -m bayesian_bits.train)
fi
CMD=("${LAUNCH[@]}" "${FLAGS[@]}" "${COMMON[@]}" --logdir "$LOGDIR" "$@")
if [ -n "${PRINT:-}" ]; then printf '%q ' "${CMD[@]}"; echo; else exec "${CMD[@]}"; fi
