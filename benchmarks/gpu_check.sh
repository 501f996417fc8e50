#!/usr/bin/env bash
# One-shot GPU check: build the extensions, run the tests, run the benchmarks; under 10 minutes (the stages'
# time limits add up to 9.7).
#
# Needs only this repository and a system python with torch + triton (no network, no installs).
# Results go to $OUT (default ./bench_out): test logs, launch counts, ResNet-18 step (both BN folds), microbenchmark,
# ResNet-18 quantizer and compile CSVs.
# Every stage has its own time limit, so a slow or failing stage never starves the benchmarks.
# Usage: bash benchmarks/gpu_check.sh   (PYTHON=... to choose the interpreter; BENCH_GIT_COMMIT=... stamps the
# CSV rows with the commit when this copy of the tree has no .git)
set -u -o pipefail
SECONDS=0
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
export OUT=${OUT:-$PWD/bench_out}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
mkdir -p "$OUT"
status=0
stage() { echo; echo "=== $1 ($(date +%T))"; }

stage "environment"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "nvidia-smi: n/a"
$PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'gpu', torch.cuda.is_available())"
which nvcc || echo "nvcc not on PATH (CUDA_HOME=${CUDA_HOME:-unset})"

stage "build the C++/CUDA extensions (JIT, cached)"
timeout 150 $PY - <<'EOF' || status=1
import time
import bbkernels
from bbkernels import build, cpu, cuda, triton_kernels
build.main()  # availability never builds: prebuild the C++ (and CUDA) extensions here
for name, mod in (("cpu", cpu), ("cuda", cuda), ("triton", triton_kernels)):
    t0 = time.time()
    print(f"{name:7s} available={mod.available()} ({time.time() - t0:.0f} s)", flush=True)
print("available on cuda:", bbkernels.available_backends("cuda"), "default:", bbkernels.resolve_backend("cuda"))
EOF

stage "kernel tests (every backend against the reference, the BN fold op, both folds)"
timeout 120 $PY -m pytest -q -p no:cacheprovider tests/test_operator.py tests/test_backends_gpu.py \
    tests/test_fold_op.py tests/test_bn_fold.py 2>&1 | tee "$OUT/pytest_kernels.log" | tail -25 || status=1

stage "remaining tests (not marked slow; time-limited, so possibly partial)"
timeout 30 $PY -m pytest -q -p no:cacheprovider -m "not slow" tests \
    --ignore=tests/test_operator.py --ignore=tests/test_backends_gpu.py --ignore=tests/test_fold_op.py \
    --ignore=tests/test_bn_fold.py 2>&1 | tee "$OUT/pytest_rest.log" | tail -15 || status=1

stage "kernel launches per training step and eval forward (the same count on every machine)"
timeout 30 $PY -m benchmarks.launches --models resnet18 mobilenet_v2 --json "$OUT/launches.json" \
    2>&1 | grep -v "^   " || status=1

stage "ResNet-18 training step at ImageNet batch size: float, exact fold, fast fold"
timeout 110 $PY -m benchmarks.bench_resnet18_step --device cuda --batch 256 --steps 5 \
    --csv "$OUT/resnet18_step.csv" 2>&1 | tail -6 || status=1

stage "microbenchmark, 2^16 ... 2^26 elements"
if [ -f benchmarks/bench_quantizer.py ]; then
    timeout 45 $PY -m benchmarks.bench_quantizer --device cuda --sizes 16-26 --csv "$OUT/bench_quantizer.csv" \
        2>&1 | tail -40 || status=1
else
    echo "benchmarks/bench_quantizer.py missing: skipped"
fi

stage "ResNet-18: every quantizer of the model, forward + backward, one CUDA graph"
timeout 40 $PY -m benchmarks.bench_resnet18_quantizers --device cuda --batch 64 \
    --csv "$OUT/resnet18_quantizers.csv" 2>&1 | tail -12 || status=1

stage "--compile against eager: ResNet-18 training step and eval forward"
timeout 55 $PY -m benchmarks.bench_compile --device cuda --models resnet18 --batch 64 --steps 20 \
    --csv "$OUT/compile.csv" 2>&1 | tail -6 || status=1

echo; echo "gpu_check finished in ${SECONDS} s with status $status; outputs in $OUT"
exit $status
