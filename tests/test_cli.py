"""The command line, run as a user runs it: a real ``twinflow`` process."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from twinflow.locks import exclusive


def _twinflow(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "twinflow.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


@pytest.mark.parametrize("command", [[], ["demo"], ["run"], ["server"], ["doctor"]])
def test_every_command_has_help(command):
    out = _twinflow(*command, "--help")
    assert out.returncode == 0, out.stderr
    assert "Usage" in out.stdout


def test_doctor_reports_versions_mode_and_urls():
    out = _twinflow("doctor", env={"CUDA_VISIBLE_DEVICES": ""})
    assert out.returncode == 0, out.stderr
    for needle in ("prefect", "distributed", "mlflow", "cluster mode", "local (no GPU found)", "MLflow tracking"):
        assert needle in out.stdout


def test_unknown_setting_is_one_line_without_traceback():
    out = _twinflow("doctor", env={"TWINFLOW_DASK__MOOD": "local"})
    assert out.returncode == 2
    assert "unknown setting TWINFLOW_DASK__MOOD" in out.stderr
    assert "Traceback" not in out.stderr + out.stdout
    debug = _twinflow("--debug", "doctor", env={"TWINFLOW_DASK__MOOD": "local"})
    assert "Traceback" in debug.stdout + debug.stderr


def test_second_demo_on_the_same_home_is_refused(tmp_path):
    home = tmp_path / "home"
    with exclusive(home / "demo.lock", "twinflow demo"):
        out = _twinflow("--home", str(home), "demo")
    assert out.returncode == 1
    assert f"another twinflow demo is running (pid {os.getpid()})" in out.stderr.replace("\n", " ")
    assert "Traceback" not in out.stderr


def test_unknown_stage_and_bad_param_are_clear(tmp_path):
    out = _twinflow("--home", str(tmp_path), "run", "nonsense", env={"TWINFLOW_DASK__MODE": "local"})
    # The stage name is checked before any server or cluster starts.
    assert out.returncode == 2 and "unknown stage 'nonsense'" in out.stderr
    out = _twinflow("--home", str(tmp_path), "run", "ingest", "--param", "novalue")
    assert out.returncode == 2 and "--param expects key=value" in out.stderr
