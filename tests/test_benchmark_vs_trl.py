"""The TRL comparison runs from a clone: preftune's arms (TRL is a benchmark-only extra, so its arms are left
out here) go through the script's whole path, workload to table, on the small model."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from .conftest import REPO


@pytest.mark.slow  # a benchmark run: the 6M model built, warmed up and timed in a subprocess (~1.5 min)
def test_vs_trl_runs_preftunes_arms_end_to_end(tmp_path):
    out = tmp_path / "result.json"
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "vs_trl.py"), "--sizes", "6M", "--repeats",
                           "1", "--warmup", "1", "--steps", "1", "--arms", "preftune", "preftune_precomp",
                           "--json", str(out)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())["6M"]
    for arm in ("preftune", "preftune_precomp"):
        assert result[arm]["steps"] == 1 and result[arm]["tokens_per_s"] > 0
        assert 0 < result[arm]["peak_rss_gb"] < 8
        assert result[arm]["padding_share"] < 0.5  # prefix-shared rows: only the row-length padding is left
    assert "preftune_precomp" in proc.stdout and "tokens/s" in proc.stdout
