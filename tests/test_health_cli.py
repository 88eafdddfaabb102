"""``twinflow health`` and ``twinflow run health`` as a user runs them (real processes, no servers needed here)."""

from __future__ import annotations

import os
import subprocess
import sys

import pyarrow as pa

from health_fixtures import pumps_frame
from twinflow.contract.store import load_contract
from twinflow.flows.health import FLEET_HEALTH
from twinflow.settings import get_settings
from twinflow.tasks.health import HealthParams
from twinflow.tasks.health.score import score_fleet


def _twinflow(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "twinflow.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "COLUMNS": "200"})


def test_health_help_and_errors_are_one_line():
    out = _twinflow("health", "--help")
    assert out.returncode == 0 and "--latest" in out.stdout
    out = _twinflow("health", "--latest", "-d", "nowhere")
    assert out.returncode == 2 and "has no health scores yet" in out.stderr and "Traceback" not in out.stderr
    # Parameters are validated before any server starts.
    out = _twinflow("run", "health", "--param", "alert_horizon=-5")
    assert out.returncode == 2 and "--param alert_horizon" in out.stderr


def test_health_latest_prints_the_stored_ranking(tmp_path):
    df, _ = pumps_frame(n=8)
    table = score_fleet(df, load_contract("pumps"), HealthParams(max_staleness="6h"), None).table
    table.insert(0, "dataset", "pumps")
    table.insert(1, "run_key", "pumps@v0:no-model")
    from twinflow import lake

    lake.write_results(get_settings().lake_path, FLEET_HEALTH, pa.Table.from_pandas(table, preserve_index=False),
                       key_column="run_key", key="pumps@v0:no-model")
    out = _twinflow("health", "--latest", "-d", "pumps")
    assert out.returncode == 0, out.stderr
    assert "fleet health of pumps" in out.stdout and "p-00" in out.stdout and "no recent data" in out.stdout
    top = table.sort_values("risk_rank").asset_id.iloc[0]
    assert out.stdout.index(top) < out.stdout.index("p-00")


def test_health_without_a_dataset_scores_the_lakes_only_fleet_or_names_the_candidates(tmp_path):
    from twinflow import lake

    lake_path = get_settings().lake_path
    out = _twinflow("health", "--latest")
    assert out.returncode == 2 and "holds no fleet yet" in out.stderr and "Traceback" not in out.stderr
    df, _ = pumps_frame(n=4)
    contract = load_contract("pumps")
    lake.write_lake_table(pa.Table.from_pandas(df, preserve_index=False), lake_path, "pumps", "b1", contract=contract)
    table = score_fleet(df, contract, HealthParams(), None).table
    table.insert(0, "dataset", "pumps")
    table.insert(1, "run_key", "pumps@v0:no-model")
    lake.write_results(lake_path, FLEET_HEALTH, pa.Table.from_pandas(table, preserve_index=False),
                       key_column="run_key", key="pumps@v0:no-model")
    out = _twinflow("health", "--latest")
    assert out.returncode == 0, out.stderr
    assert "fleet health of pumps" in out.stdout
    lake.write_lake_table(pa.Table.from_pandas(df, preserve_index=False), lake_path, "compressors", "b1",
                          contract=contract)
    out = _twinflow("health", "--latest")
    assert out.returncode == 2 and "the lake holds compressors, pumps" in out.stderr and "Traceback" not in out.stderr
