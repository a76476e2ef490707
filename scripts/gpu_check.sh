#!/usr/bin/env bash
# GPU checks, in one go: the QLoRA and routing tests on CUDA, a 4-bit throughput line, and benchmarks/speed.py on the tiny model
# and on SmolLM2-135M's architecture (random weights: the embedded model's 98 MB file does not travel to the GPU
# machine, its config, tokenizer and data do).
#
# The GPU machine has torch, transformers, peft and accelerate but no package registry, so the other wheels travel
# with the repo in wheels/, and the SmolLM2 bundle in .gpu_bundle/ (both ignored by git):
#   here, with PyPI:     bash scripts/gpu_check.sh --download
#   on the GPU machine:  bash scripts/gpu_check.sh [STEP...]  (writes to $OUT, else benchmarks/results/gpu/)
# STEPs: gpu_tests gpu_throughput speed_smollm2_random_micro gpu_tests_meter gpu_tests_online speed_tiny (the default: all six, about
# 8 minutes on an H100) and speed_smollm2_random (SmolLM2's training runs, about 6 minutes more). Each step runs even if an earlier
# one fails or times out; the exit status is the number of failed steps.
set -uo pipefail
cd "$(dirname "$0")/.."
WHEELS="trl==1.16.0 datasets==5.2.0 bitsandbytes==0.50.2 transformers==5.23.0 peft==0.21.2 dill multiprocess"
BUNDLE=.gpu_bundle/smollm2

if [ "${1:-}" = "--download" ]; then
  set -e
  rm -rf wheels
  pip download -q --no-deps --only-binary=:all: --python-version "${GPU_PYTHON:-3.12}" \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d wheels $WHEELS
  # The lent GPUs run CUDA 13: bitsandbytes' libraries for ROCm and older CUDA would push what travels past 64 MiB.
  python - <<'PY'
import glob, os, re, zipfile
drop = re.compile(r"bitsandbytes/libbitsandbytes_(rocm\d+|cuda1[12]\d)\.so")
for wheel in glob.glob("wheels/bitsandbytes-*.whl"):
    with zipfile.ZipFile(wheel) as old, zipfile.ZipFile(wheel + ".tmp", "w", zipfile.ZIP_DEFLATED) as new:
        for item in old.infolist():
            if drop.fullmatch(item.filename):
                continue
            data = old.read(item)
            if item.filename.endswith(".dist-info/RECORD"):
                keep = [line for line in data.decode().splitlines() if not drop.fullmatch(line.split(",")[0])]
                data = ("\n".join(keep) + "\n").encode()
            new.writestr(item, data)
    os.replace(wheel + ".tmp", wheel)
PY
  python benchmarks/speed.py --export_bundle "$BUNDLE"
  du -sh wheels "$BUNDLE"
  exit 0
fi

if [ -d wheels ]; then
  python3 -m pip install -q --no-index --no-deps --find-links wheels $WHEELS || exit 1
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export TMS_TEST_DEVICE="${TMS_TEST_DEVICE:-cuda}"
out="${OUT:-benchmarks/results/gpu}"
mkdir -p "$out"
failed=0
SELECTED="${*:-gpu_tests gpu_throughput speed_smollm2_random_micro gpu_tests_meter gpu_tests_online speed_tiny}"
step() {  # step NAME COMMAND...: run (if selected), keep the log in $out/NAME.txt, count a failure
  local name=$1; shift
  [[ " $SELECTED " == *" $name "* ]] || return 0
  echo "== $name: $*"
  local started=$SECONDS
  "$@" 2>&1 | tee "$out/$name.txt" | grep -v -E "it/s\]|examples/s\]|Loading weights" || true
  local rc=${PIPESTATUS[0]}
  echo "== $name: exit $rc after $((SECONDS - started)) s"
  [ "$rc" = 0 ] || failed=$((failed + 1))
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu_device.txt"
python3 -c "import torch, transformers, peft, trl, bitsandbytes; print('torch', torch.__version__, '| transformers', \
transformers.__version__, '| peft', peft.__version__, '| trl', trl.__version__, '| bitsandbytes', bitsandbytes.__version__)" \
  | tee -a "$out/gpu_device.txt"
# In order of what a short session most needs; each step has a time limit so that the later ones still run.
step gpu_tests timeout 180 python3 -m pytest -q -p no:cacheprovider tests/test_history.py tests/test_routing.py \
  tests/test_quantization.py
step gpu_throughput timeout 150 python3 scripts/gpu_throughput.py --device "$TMS_TEST_DEVICE" --json "$out/gpu_throughput.json"
if [ -d "$BUNDLE" ]; then
  step speed_smollm2_random_micro timeout 300 python3 benchmarks/speed.py --model "$BUNDLE" --micro_only \
    --output "$out/speed_smollm2_random_micro_cuda.json"
fi
# The forgetting meter and self-rehearsal on a CUDA model (their greedy answers and forward passes), and generation of
# the drawn pairs only (the default since 2026-12-04).
step gpu_tests_meter env TRL_TMS_TEST_ON_GPU=1 timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_retention.py tests/test_rehearsal.py \
  tests/test_trainer.py::test_generating_given_pairs_samples_those_only_and_reads_them_back \
  tests/test_trainer.py::test_by_default_only_the_trajectories_the_student_draws_are_sampled
step gpu_tests_online env TRL_TMS_TEST_ON_GPU=1 timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_online.py
step speed_tiny timeout 150 python3 benchmarks/speed.py --model tiny --output "$out/speed_tiny_cuda.json"
if [ -d "$BUNDLE" ]; then  # the four training runs on SmolLM2's architecture: about 6 minutes, when named
  step speed_smollm2_random python3 benchmarks/speed.py --model "$BUNDLE" --output "$out/speed_smollm2_random_cuda.json"
fi
echo "== failed steps: $failed"
exit "$failed"
