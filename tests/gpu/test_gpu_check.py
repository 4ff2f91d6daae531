"""benchmarks/gpu_check.py, the device run's one script, dry-run on the CPU with tiny shapes:
every phase runs (the stack's workers on the GPU engine, eagerly), writes its JSON, and the
summary table comes last; so the script cannot rot between device sessions."""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_gpu_check_dry_run(tmp_path):
    env = dict(os.environ, GPU_CHECK_DEVICE="cpu", GPU_CHECK_WORK=str(tmp_path / "work"))
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks/gpu_check.py"), "--out",
                        str(tmp_path / "out")], env=env, capture_output=True, text=True,
                       timeout=500)
    assert p.returncode == 0, p.stdout + p.stderr[-5000:]
    res = json.loads((tmp_path / "out/gpu_check.json").read_text())
    assert res["greedy"]["equal"] == [True, True, True]
    assert res["peer"]["b1_decode_tok_s"] > 0 and res["hf_cb"]["output_tokens"] == 4 * 4
    for phase in ("stack_bf16", "stack_int4"):
        assert res[phase]["b1"]["output_tokens"] == 2 * 16
    for phase in ("stack_bf16", "stack_pp2"):
        assert res[phase]["mixed"]["output_tokens"] == 4 * 4
    assert all("module_us" in v for v in res["linear"].values())
    table = p.stdout.strip().splitlines()
    assert table[1].split()[:3] == ["metric", "Shardline", "peer"]
    assert len(table) == 2 + len(res["summary"])
