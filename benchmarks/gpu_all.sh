#!/usr/bin/env bash
# Every GPU check and benchmark in one run on a lent device machine (see docs/benchmarks.md).
# Needs: .whl/ (grpcio, protobuf, opentelemetry, redis wheels for the device's Python) and
# .gpu/smol (the default model's tokenizer files), carried with the working tree.
#   bash benchmarks/gpu_all.sh OUT_DIR
set -uo pipefail
out=${1:?OUT_DIR}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD/services PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/gpu.txt"
python3 -c "import torch, transformers; print(torch.__version__, transformers.__version__)" | tee -a "$out/gpu.txt"
step() { echo "== $*"; timeout "$1" "${@:2}" 2>&1 | grep -v "it/s\]" | tail -40; }
step 200 python3 benchmarks/gpu_check.py .gpu/smol "$out/gpu_check.json" > "$out/gpu_check.txt"
step 150 python3 benchmarks/weights.py --device cuda --shape llama-1b \
  --variants fused,int8,int8-triton,int4,2:4-magnitude --batches 1,16 --steps 20 --no-ppl \
  > "$out/weights_1b.txt"
step 150 python3 benchmarks/weights.py --device cuda --shape llama-8b --variants fused,int4 \
  --batches 1 --steps 15 --no-ppl > "$out/weights_8b.txt"
tail -n 30 "$out"/*.txt
