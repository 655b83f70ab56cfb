#!/usr/bin/env bash
# The prepared GPU check (H100/H200): build bem with CUDA for sm_90, run the test suite (which adds
# "cuda" to every device-parametrised test when a GPU is present), print the CUDA benchmark table.
#   bash benchmarks/gpu/run.sh            # on the GPU machine, from the repository root
# Needs torch (CUDA build), pybind11, scikit-build-core, cmake, ninja, nvcc; no network.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT_DIR=${OUT:-/tmp/bem-gpu}
mkdir -p "$OUT_DIR"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
t0=$(date +%s)
cmake -S . -B build/gpu -G Ninja -DBEM_CUDA=ON -DBEM_CUDA_ARCHITECTURES=90 -DBEM_BUILD_TESTS=OFF \
      -DPython_EXECUTABLE="$(command -v python3)" -Dpybind11_DIR="$(python3 -m pybind11 --cmakedir)" \
      > "$OUT_DIR/configure.log" 2>&1 || { tail -30 "$OUT_DIR/configure.log"; exit 1; }
cmake --build build/gpu -j 16 > "$OUT_DIR/build.log" 2>&1 || { grep -E "error|Error" -A3 "$OUT_DIR/build.log" | head -60; exit 1; }
echo "build: $(( $(date +%s) - t0 )) s"
export PYTHONPATH="$PWD/python" PYTHONUNBUFFERED=1
python3 -m bem info
timeout 240 python3 -m pytest -q -k "cuda" -p no:cacheprovider tests/ 2>&1 \
  | tee "$OUT_DIR/pytest-cuda.log" | tail -40
python3 benchmarks/gpu/bench_cuda.py 2>&1 | tee "$OUT_DIR/bench-cuda.md"
echo "total: $(( $(date +%s) - t0 )) s"
