#!/usr/bin/env bash
# GPU check of the QLoRA path: the 4-bit tests on CUDA, then one throughput line (snapshot ms, swap ms, tokens/s).
#
# The GPU machine has torch, transformers, peft and accelerate but no package registry, so the other wheels travel
# with the repo in wheels/ (ignored by git):
#   here, with PyPI:     bash scripts/gpu_check.sh --download
#   on the GPU machine:  bash scripts/gpu_check.sh            (writes to $OUT, else benchmarks/results/)
# Takes 2-4 minutes on an H100.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS="trl==1.16.0 datasets==5.2.0 bitsandbytes==0.50.2 transformers==5.23.0 peft==0.21.2 dill multiprocess"

if [ "${1:-}" = "--download" ]; then
  rm -rf wheels
  pip download -q --no-deps --only-binary=:all: --python-version "${GPU_PYTHON:-3.12}" \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d wheels $WHEELS
  du -sh wheels
  exit 0
fi

if [ -d wheels ]; then
  python3 -m pip install -q --no-index --no-deps --find-links wheels $WHEELS
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TMS_TEST_DEVICE="${TMS_TEST_DEVICE:-cuda}"
out="${OUT:-benchmarks/results}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null | tee "$out/gpu_device.txt" || true
python3 -m pytest -q -p no:cacheprovider tests/test_quantization.py 2>&1 | tail -n 15 | tee "$out/gpu_tests.txt"
python3 scripts/gpu_throughput.py --device "$TMS_TEST_DEVICE" --json "$out/gpu_throughput.json" | tee "$out/gpu_throughput.txt"
