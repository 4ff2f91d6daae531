#!/usr/bin/env bash
# Wheels of what the device machine's image lacks (or holds at other versions) for the stack,
# at this virtualenv's versions, for its python3 (3.12, manylinux x86_64), into .whl/ (ignored):
#   bash benchmarks/gpu_wheels.sh        # here, before the device run; then carry .whl
set -euo pipefail
cd "$(dirname "$0")/.."
names="grpcio grpcio-health-checking grpcio-reflection protobuf googleapis-common-protos
  opentelemetry-api opentelemetry-sdk opentelemetry-exporter-otlp-proto-grpc
  opentelemetry-exporter-otlp-proto-common opentelemetry-proto opentelemetry-semantic-conventions
  redis fastapi starlette uvicorn pydantic pydantic-core annotated-types annotated-doc
  typing-inspection typing-extensions anyio sniffio click h11"
rm -rf .whl && mkdir -p .whl
for n in $names; do
  v=$(.venv/bin/python -c "import importlib.metadata as m; print(m.version('$n'))")
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any \
    -d .whl "$n==$v"
done
du -sh .whl
