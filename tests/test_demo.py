"""`twinflow demo` exactly as the README runs it, twice, on the embedded defaults (slow)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.timeout(1800)  # two full demo runs; minutes each on a 2-core machine
def test_demo_runs_end_to_end_twice(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI")}
    env.update({"TWINFLOW_HOME": str(tmp_path / "home"), "CUDA_VISIBLE_DEVICES": ""})
    for attempt in (1, 2):
        out = subprocess.run([sys.executable, "-m", "twinflow.cli", "demo"], capture_output=True, text=True,
                             env=env, cwd=tmp_path, timeout=1800)
        assert out.returncode == 0, f"run {attempt}: {out.stderr[-3000:]}"
        for stage in ("ingest", "features", "train", "simulate", "recommended policy"):
            assert stage in out.stdout, (attempt, stage)
        assert "twinflow server" in out.stdout
    # The second run read nothing new and trained a challenger (version 2).
    assert "0 rows read" in out.stdout and "v2" in out.stdout
    # The demo's own Prefect server was stopped when it ended.
    assert not (tmp_path / "home" / "prefect" / "server.json").exists()
