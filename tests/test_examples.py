"""Every example script runs, as a user would run it (a separate process)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _run(script: str, tmp_path: Path, *args: str, prefect_url: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "TWINFLOW_HOME": str(tmp_path / "home"), "CUDA_VISIBLE_DEVICES": "",
           "TWINFLOW_DASK__N_WORKERS": "2", "TWINFLOW_DASK__THREADS_PER_WORKER": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    if prefect_url:
        env["PREFECT_API_URL"] = prefect_url
    return subprocess.run([sys.executable, str(EXAMPLES / script), *args], capture_output=True, text=True,
                          timeout=900, env=env, cwd=tmp_path)


def test_every_example_has_a_narrative_header_and_main_guard():
    for path in EXAMPLES.glob("*.py"):
        text = path.read_text()
        assert text.startswith('"""'), path
        assert 'if __name__ == "__main__":' in text, path


@pytest.mark.integration
def test_custom_flow_example(tmp_path, prefect_server):
    out = _run("custom_flow.py", tmp_path, prefect_url=prefect_server.url)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "fastest-degrading assets" in out.stdout
    assert out.stdout.count("  asset ") == 5


@pytest.mark.integration
def test_existing_scheduler_example(tmp_path, prefect_server):
    out = _run("existing_scheduler.py", tmp_path, prefect_url=prefect_server.url)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "connected to tcp://127.0.0.1:" in out.stdout and "(2 workers, mode address)" in out.stdout
    assert "features:" in out.stdout


@pytest.mark.integration
def test_gpu_path_example_falls_back_to_cpu_and_says_so(tmp_path, prefect_server):
    out = _run("gpu_path.py", tmp_path, prefect_url=prefect_server.url)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "cluster mode: local (no GPU found)" in out.stdout
    assert "recommended policy:" in out.stdout
