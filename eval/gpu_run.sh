#!/usr/bin/env bash
# What the device tool ran on the lent GPU machine for docs/results/sparse-gpu (see its
# README): the sparse kernel tests compiled for real, then eval/sparse_gpu_bench.py.
#
# That machine has torch and triton but neither FlashInfer nor pydantic, and no registry, so
# two ignored folders travel with the working tree: .whl/ (cp312 wheels of apache-tvm-ffi,
# pydantic, pydantic-core, annotated-types, typing-inspection) and .fi/site/ (FlashInfer
# 0.7.2 trimmed to the Python modules its import loads and the batch decode/prefill sources;
# its JIT builds the decode kernel there with the machine's nvcc). The trimmed copy was made
# by hand from .venv's flashinfer: the .py files `import flashinfer` loads, all of jit/ and
# triton/, data/include, the batch_decode*/batch_prefill* sources and tvm_ffi_utils.h of
# data/csrc, data/cccl/libcudacxx/include and data/cccl/cub/cub (CUDA 13.0's own CCCL lacks
# cuda::fast_mod_div); 46 MB, under the 64 MiB the device tool carries.
set -uo pipefail
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
    .whl/*.whl || exit 1
[ -e sgl_kvtier/kernels ] || ln -s ../kernels sgl_kvtier/kernels  # what the package maps
PY_BIN=$(dirname "$(python3 -c 'import sys; print(sys.executable)')")
export PATH="$PY_BIN:$PATH" PYTHONPATH="$PWD:/tmp/site:$PWD/.fi/site" PYTHONUNBUFFERED=1
export CUDA_HOME=${CUDA_HOME:-$(dirname "$(dirname "$(command -v nvcc)")")}
export FLASHINFER_WORKSPACE_BASE=/tmp MAX_JOBS=16
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem \
    --format=csv | tee "$OUT/nvidia-smi.txt"
echo "nvcc: $(command -v nvcc), ninja: $(command -v ninja), c++: $(command -v c++)"
timeout "${BENCH_TIMEOUT:-420}" python3 eval/sparse_gpu_bench.py --out "$OUT" "$@" 2>&1 \
    | tee "$OUT/bench.log" | grep -v '^\[' 
[ -n "${SKIP_TESTS:-}" ] && exit 0
timeout "${TEST_TIMEOUT:-120}" python3 -m pytest tests/unit/sparse/test_kernels.py \
    tests/unit/sparse/test_core.py tests/unit/sparse/test_flashinfer_glue.py -q \
    -p no:cacheprovider 2>&1 | tee "$OUT/kernel_tests.log" | tail -4
