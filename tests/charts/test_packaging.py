"""The Dockerfile, .dockerignore and Tiltfile agree with each other and with the chart (static
checks: there is no Docker engine or cluster in the test environment)."""
from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = (ROOT / "Dockerfile").read_text()
TILTFILE = (ROOT / "Tiltfile").read_text()


def stages() -> dict[str, str]:
    """Dockerfile stage name -> its instructions."""
    parts = re.split(r"^FROM\s+", DOCKERFILE, flags=re.M)[1:]
    return {re.match(r"\S+\s+AS\s+(\S+)", p).group(1): p for p in parts}


def test_dockerfile_one_image_non_root_cpu_by_default():
    assert re.search(r"^ARG BASE=python:3\.11-slim$", DOCKERFILE, flags=re.M)
    assert re.search(r"^ARG TORCH_INDEX=https://download\.pytorch\.org/whl/cpu$", DOCKERFILE, flags=re.M)
    s = stages()
    assert list(s)[-1] == "runtime", "the default target is the runtime image"
    assert set(s) == {"build", "runtime-base", "dev", "runtime"}
    build = s["build"]
    # torch from TORCH_INDEX first, at the requirements.txt pin, then requirements, then the project
    order = [build.index('--index-url "${TORCH_INDEX}"'), build.index("pip install -r requirements.txt"),
             build.index("pip install --no-deps .")]
    assert order == sorted(order)
    base = s["runtime-base"]
    assert 'ENTRYPOINT ["shardline"]' in base
    assert "SHARDLINE_CACHE=/cache" in base and "HOME=/home/shardline" in base
    users = re.findall(r"^USER\s+(\S+)$", DOCKERFILE, flags=re.M)
    assert users[-1] == "10001:10001" and "USER 10001:10001" in s["dev"]
    chart = yaml.safe_load((ROOT / "charts/shardline/values.yaml").read_text())
    assert chart["securityContext"]["runAsUser"] == 10001
    assert chart["cache"]["mountPath"] == "/cache"


def test_dockerignore_keeps_the_context_small():
    lines = [l for l in (ROOT / ".dockerignore").read_text().splitlines() if l and not l.startswith("#")]
    assert lines[0] == "*", "allow-list: everything is excluded unless re-included"
    included = {l[1:].rstrip("/") for l in lines if l.startswith("!")}
    assert included == {"requirements.txt", "pyproject.toml", "README.md", "services"}
    assert "**/__pycache__" in lines


def test_tiltfile(helm):
    ast.parse(TILTFILE)                         # Starlark is a Python subset
    assert "target='dev'" in TILTFILE
    assert "sync('services', '/app/services')" in TILTFILE
    assert "ENV PYTHONPATH=/app/services" in stages()["dev"]
    assert "values=['charts/shardline/values-dev.yaml']" in TILTFILE
    assert (ROOT / "charts/shardline/values-dev.yaml").is_file()
    # the resources it names are the workloads the chart renders for its release
    release = re.search(r"^RELEASE = '([^']+)'", TILTFILE, flags=re.M).group(1)
    out = subprocess.run([helm, "template", release, str(ROOT / "charts/shardline"),
                          "-f", str(ROOT / "charts/shardline/values-dev.yaml")],
                         capture_output=True, text=True, check=True).stdout
    workloads = {d["metadata"]["name"] for d in yaml.safe_load_all(out)
                 if d and d["kind"] in ("Deployment", "StatefulSet")}
    named = set(re.findall(r"k8s_resource\(\s*'([^']+)'", TILTFILE))
    assert named == workloads
    assert "port_forwards=['50051:50051']" in TILTFILE
    image = yaml.safe_load((ROOT / "charts/shardline/values-dev.yaml").read_text())["image"]["repository"]
    assert re.search(rf"docker_build_with_restart\(\s*'{image}'", TILTFILE)
