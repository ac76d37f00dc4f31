"""benchmarks/gpu_check.sh --cpu: the prepared GPU check runs end to end on CPU, so it can not rot while no GPU
is at hand: preftune installed from this checkout with --no-deps, the device tests (one of them here; CI runs
tests/test_gpu.py whole), the workload, preftune's benchmark arms, the JSON and the table. TRL is not
installed here (a benchmark-only extra), so its arm is left out; on the GPU it comes from carried wheels."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from .conftest import REPO


@pytest.mark.slow  # a benchmark run, ~45 s
def test_gpu_check_dry_run_on_cpu(tmp_path):
    out = tmp_path / "out"
    # a clean checkout's view: no wheels carried (those in .whl/ are built for the GPU machine's Python)
    env = dict(os.environ, PREFTUNE_SITE=str(tmp_path / "site"), PREFTUNE_WHEELS=str(tmp_path / "no_wheels"))
    env.pop("PYTHONPATH", None)  # the installed copy must be the one that runs
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), str(out), "--cpu", "--arms",
                           "preftune", "preftune_precomp", "--pytest-args", "-k bf16"],
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"preftune installed at {tmp_path / 'site'}" in proc.stdout
    report = json.loads((out / "gpu_check.json").read_text())
    tests = report["device_tests"]
    assert tests["returncode"] == 0 and tests["counts"].get("passed", 0) >= 1 and "failed" not in tests["counts"]
    for arm in ("preftune", "preftune_precomp"):
        r = report["arms"][arm]
        assert "error" not in r, r.get("stderr_tail")
        assert r["tokens_per_s"] > 0 and r["peak_gb"] > 0 and 0 < r["mfu_measured"] < 1
        assert len(r["step_s"]) == 1
    text = (out / "gpu_check.txt").read_text()
    assert "preftune_precomp" in text and "tokens/s" in text
