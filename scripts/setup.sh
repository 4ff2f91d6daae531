#!/usr/bin/env bash
# Idempotent set-up of a fresh machine: .venv with the pinned CPU build of torch, the pinned
# runtime and test requirements (requirements-dev.txt, which includes requirements.txt) and the
# project installed editable. Re-runs only when one of the files it installs from changes.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
stamp=.venv/.shardline-setup
# every file the installs below read: a change to any of them re-runs the set-up
inputs=(requirements.txt requirements-dev.txt pyproject.toml)
want=$(cat "${inputs[@]}" | sha256sum | cut -d' ' -f1)
prebuild() {
  # the CPU decode kernels (services/shardline/backends/cpu_kernels/csrc): built once per source version, so
  # the first `shardline up` does not wait for the compiler (a no-op on CPUs they don't fit)
  .venv/bin/python -c "from shardline.backends.cpu_kernels import build as cpu_kernels; cpu_kernels.load()"
}
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  prebuild
  exit 0
fi
echo "setup: creating .venv and installing requirements (first run only)" >&2
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch first, pinned, so nothing later pulls a CUDA build.
.venv/bin/python -m pip install -q "$(grep '^torch==' requirements.txt)"
.venv/bin/python -m pip install -q -r requirements-dev.txt
.venv/bin/python -m pip install -q --no-deps -e .
if ! command -v redis-server >/dev/null 2>&1; then
  echo "setup: installing redis-server" >&2
  (apt-get install -y -q redis-server || (apt-get update -q && apt-get install -y -q redis-server)) >/dev/null
fi
echo "setup: building the CPU kernels" >&2
prebuild
echo "$want" > "$stamp"
echo "setup: done" >&2
