#!/usr/bin/env bash
# The whole device run of the GPU engine (issue 13), on a lent GPU machine:
#   bash benchmarks/gpu_check.sh          # $OUT: where results go (the device tool sets it)
# Before it, here: bash benchmarks/gpu_wheels.sh, then run it with carry [".whl"]. It fits in
# about 8 minutes: every phase of benchmarks/gpu_check.py, its table printed last.
set -uo pipefail
out=${OUT:-${1:?usage: gpu_check.sh OUT_DIR}}
mkdir -p "$out"
export PYTHONPATH=$PWD/services PYTHONUNBUFFERED=1
if ls .whl/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PYTHONPATH
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
timeout 540 python3 benchmarks/gpu_check.py --out "$out" 2> "$out/gpu_check.log"
rc=$?
grep -v "it/s\]" "$out/gpu_check.log" | tail -n 15
exit $rc
