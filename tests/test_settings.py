"""Settings: environment prefix, nested sections, unknown keys, no side effects."""

from __future__ import annotations

import os

import pytest

from twinflow.errors import ConfigError
from twinflow.settings import check_environment, get_settings


def test_defaults_live_under_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TWINFLOW_HOME", str(tmp_path / "h"))
    s = get_settings()
    assert s.home == (tmp_path / "h").resolve()
    assert s.lake_path == str(s.home / "lake")
    assert s.mlflow_tracking_uri == f"sqlite:///{s.home / 'mlflow.db'}"
    assert s.mlflow_artifact_location.startswith("file://") and s.mlflow_artifact_location.endswith("mlartifacts")
    assert not s.home.exists(), "building settings must not create directories"


def test_nested_env_and_overrides(monkeypatch):
    monkeypatch.setenv("TWINFLOW_DASK__MODE", "address")
    monkeypatch.setenv("TWINFLOW_DASK__ADDRESS", "tcp://127.0.0.1:1")
    monkeypatch.setenv("TWINFLOW_MLFLOW__EXPERIMENT", "plant-7")
    s = get_settings(lake={"lake": "s3://bucket/lake"})
    assert s.dask.mode == "address" and s.dask.address == "tcp://127.0.0.1:1"
    assert s.mlflow.experiment == "plant-7"
    assert s.lake_path == "s3://bucket/lake"
    # An object-store lake quarantines on its own store unless told otherwise; a local lake at home.
    assert s.quarantine_path == "s3://bucket/lake/_quarantine"
    assert get_settings(lake={"lake": "s3://bucket/lake", "quarantine": "/q"}).quarantine_path == "/q"
    assert get_settings(lake={"lake": "/data/lake"}).quarantine_path == str(s.home / "quarantine")


def test_unknown_env_key_is_named_with_suggestion(monkeypatch):
    monkeypatch.setenv("TWINFLOW_DASK__WORKERS", "3")
    with pytest.raises(ConfigError, match="TWINFLOW_DASK__WORKERS.*TWINFLOW_DASK__N_WORKERS"):
        get_settings()


def test_unknown_override_and_bad_value_are_one_line_errors():
    with pytest.raises(ConfigError, match="dask.bogus"):
        get_settings(dask={"bogus": 1})
    with pytest.raises(ConfigError, match="dask.mode"):
        get_settings(dask={"mode": "gpu-please"})


def test_secret_is_masked(monkeypatch):
    monkeypatch.setenv("TWINFLOW_MLFLOW__PASSWORD", "hunter2")
    s = get_settings()
    assert "hunter2" not in repr(s) and "hunter2" not in s.model_dump_json()
    assert s.mlflow.password.get_secret_value() == "hunter2"


def test_check_environment_accepts_known_keys():
    check_environment({"TWINFLOW_HOME": "x", "TWINFLOW_DASK__MODE": "local", "OTHER": "1"})


def test_importing_modules_has_no_side_effects(tmp_path):
    """Importing every twinflow module creates no files and sets no tracking URI (fresh process)."""
    import subprocess
    import sys

    code = (
        "import importlib, pkgutil, mlflow, twinflow\n"
        "before = mlflow.get_tracking_uri()\n"
        "names = ['twinflow.settings', 'twinflow.runtime', 'twinflow.tracking', 'twinflow.cli']\n"
        "for sub in ['flows', 'tasks', 'blocks', 'deployments']:\n"
        "    pkg = importlib.import_module('twinflow.' + sub)\n"
        "    names += [m.name for m in pkgutil.iter_modules(pkg.__path__, pkg.__name__ + '.')]\n"
        "for n in names:\n"
        "    importlib.import_module(n)\n"
        "assert mlflow.get_tracking_uri() == before, mlflow.get_tracking_uri()\n"
        "print(len(names))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert int(out.stdout.strip()) >= 4
    assert list(tmp_path.iterdir()) == [], list(tmp_path.iterdir())
