# syntax=docker/dockerfile:1
# One image for every Shardline service: the entrypoint is `shardline`, the Helm chart passes
# `tokenizer|scheduler|worker ...` as arguments.
#
#   CPU (default)  docker build -t shardline .
#   CUDA           docker build -t shardline-cuda \
#                    --build-arg BASE=nvidia/cuda:12.4.1-runtime-ubuntu22.04 \
#                    --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu124 .
#                  (pick the CUDA index that carries the torch version pinned in requirements.txt)
#   Development    docker build --target dev -t shardline-dev .   (what the Tiltfile builds)
#
# The image runs as the non-root user shardline (10001) and writes only to $HOME, /tmp and
# $SHARDLINE_CACHE (/cache): the chart mounts volumes there and keeps the root filesystem read-only.
ARG BASE=python:3.11-slim

# ---- build: a virtualenv in /opt/venv with torch, the pinned requirements and the project -------
FROM ${BASE} AS build
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# CUDA bases come without Python: use the distribution's (Ubuntu 22.04: 3.10, which the project
# supports); its version follows the base image, so it is not pinned here.
# hadolint ignore=DL3008
RUN if ! python3 -c 'import ensurepip, venv' 2>/dev/null; then \
      apt-get update \
      && apt-get install -y --no-install-recommends python3 python3-venv \
      && rm -rf /var/lib/apt/lists/*; \
    fi \
    && python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# requirements.txt: the pinned runtime dependencies only; the test tools (requirements-dev.txt)
# never enter the image (.dockerignore keeps that file out of the context).
COPY requirements.txt ./
# torch first, from TORCH_INDEX, at the version requirements.txt pins (a CPU or CUDA build); the
# rest of requirements.txt then finds its torch pin satisfied (2.13.0+cpu matches torch==2.13.0).
RUN pip install --index-url "${TORCH_INDEX}" "$(grep '^torch==' requirements.txt)" \
    && pip install -r requirements.txt
COPY pyproject.toml README.md ./
COPY services ./services
# pip check: requirements.txt covers every dependency pyproject.toml declares
RUN pip install --no-deps . \
    && pip check \
    && shardline --help >/dev/null

# ---- runtime base: the virtualenv, a non-root user, writable paths --------------------------------
FROM ${BASE} AS runtime-base
ENV DEBIAN_FRONTEND=noninteractive
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# hadolint ignore=DL3008
# g++: the CPU decode kernels compile on a worker's first start, into $SHARDLINE_CACHE
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ \
    && if ! command -v python3 >/dev/null 2>&1; then \
      apt-get install -y --no-install-recommends python3 python3-dev; \
    fi \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 shardline \
    && useradd --system --uid 10001 --gid 10001 --home-dir /home/shardline --create-home \
         --shell /usr/sbin/nologin shardline \
    && mkdir -p /cache \
    && chown shardline:shardline /cache
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    HOME=/home/shardline \
    SHARDLINE_CACHE=/cache \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /home/shardline
USER 10001:10001
# scheduler, tokenizer, worker gRPC; Prometheus metrics
EXPOSE 50051 50052 50061 9090
ENTRYPOINT ["shardline"]
CMD ["--help"]

# ---- dev: the source tree at /app/services, first on the path, owned by the runtime user so that
# Tilt's live_update can sync edits into running pods ---------------------------------------------
FROM runtime-base AS dev
USER 0:0
RUN install -d -o 10001 -g 10001 /app
COPY --chown=10001:10001 services /app/services
ENV PYTHONPATH=/app/services
USER 10001:10001

# ---- runtime (the default target) ---------------------------------------------------------------
FROM runtime-base AS runtime
