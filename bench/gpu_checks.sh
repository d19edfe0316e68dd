#!/usr/bin/env bash
# Every GPU check of pycnn in one run, for a machine with an NVIDIA GPU, CuPy, numba-cuda
# and PyTorch (CUDA): correctness of the cuda backend on the real device, then the training
# step against PyTorch, then the per-op benchmarks.  Results land in $OUT (default
# ./gpu-results): gpu.txt, tests.txt, step.txt/step.json, step_igemm.txt/.json, step_igemm_tf32.txt/.json, profile.txt,
# ops.txt.
#
#   bash bench/gpu_checks.sh                  # everything (about 6 minutes on an H200 before the profile stage)
#   STAGES=tests,step bash bench/gpu_checks.sh
#   STEP_BATCHES=256 STEP_REPEATS=1 bash bench/gpu_checks.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-results}
STAGES=${STAGES:-tests,step,igemm,profile,ops}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}

{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  $PY -c "import sys, numpy, cupy, numba; from importlib.metadata import version as v
print('python', sys.version.split()[0], '| numpy', numpy.__version__, '| cupy', cupy.__version__,
      '| numba', numba.__version__, '| numba-cuda', v('numba-cuda'), '| torch', v('torch'))"
} 2>&1 | tee "$OUT/gpu.txt"

status=0
if [[ ",$STAGES," == *",tests,"* ]]; then
  timeout "${TESTS_TIMEOUT:-300}" $PY -m pytest -q -p no:cacheprovider -W ignore::RuntimeWarning \
    tests/test_cuda_backend.py tests/test_cuda_engine.py tests/test_cuda_fused.py tests/test_cuda_loss.py \
    tests/test_cuda_ptx.py tests/test_cuda_graph.py tests/test_cuda_igemm.py 2>&1 | tee "$OUT/tests.txt" || status=1
fi
if [[ ",$STAGES," == *",step,"* ]]; then
  timeout "${STEP_TIMEOUT:-360}" $PY bench/gpu_step.py --batches "${STEP_BATCHES:-256,64,1024}" \
    --repeats "${STEP_REPEATS:-2}" --json "$OUT/step.json" 2>&1 | tee "$OUT/step.txt" || status=1
fi
if [[ ",$STAGES," == *",igemm,"* ]]; then
  # the whole step with the implicit-GEMM conv instead of im2col + cuBLAS (what decides the default)
  PYCNN_CUDA_CONV=igemm timeout "${IGEMM_TIMEOUT:-240}" $PY bench/gpu_step.py --batches "${IGEMM_BATCHES:-64,256}" \
    --repeats 1 --frameworks pycnn,pycnn-graph,torch-fp32 --json "$OUT/step_igemm.json" 2>&1 \
    | tee "$OUT/step_igemm.txt" || status=1
  # and its TF32 tensor-core build against PyTorch's TF32 (cuDNN's default)
  PYCNN_CUDA_CONV=igemm_tf32 timeout "${IGEMM_TIMEOUT:-240}" $PY bench/gpu_step.py --batches "${IGEMM_BATCHES:-64,256}" \
    --repeats 1 --frameworks pycnn,pycnn-graph,torch-tf32 --json "$OUT/step_igemm_tf32.json" 2>&1 \
    | tee "$OUT/step_igemm_tf32.txt" || status=1
fi
if [[ ",$STAGES," == *",profile,"* ]]; then
  # device time per op, the multi-tensor optimizer against one launch per parameter, the
  # regularisation term's one read against one per parameter, host enqueue time
  timeout "${PROFILE_TIMEOUT:-180}" $PY bench/gpu_step.py --profile --batches 256 2>&1 | tee "$OUT/profile.txt" \
    || status=1
fi
if [[ ",$STAGES," == *",ops,"* ]]; then
  timeout "${OPS_TIMEOUT:-240}" $PY -m pytest -q -s -p no:cacheprovider bench/test_cuda.py --benchmark-only \
    --benchmark-columns=median 2>&1 | grep -v "^  \|^-\|^Name\|^$" | tee "$OUT/ops.txt" || status=1
fi
exit $status
