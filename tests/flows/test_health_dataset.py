"""Which dataset health scores when none is named: the lake's only fleet, else a clear error."""

from __future__ import annotations

import pyarrow as pa
import pytest

from twinflow import lake
from twinflow.contract import load_contract
from twinflow.errors import ConfigError
from twinflow.flows.health import _snapshot, running_fleets
from twinflow.settings import get_settings
from twinflow.tasks.health import HealthParams


def _fleet(lake_path: str, dataset: str) -> None:
    contract = load_contract("pumps")
    t = pa.table({"asset_id": ["P1", "P1"], "timestamp": pa.array([0, 600_000_000], pa.timestamp("us", tz="UTC"))})
    lake.write_lake_table(t, lake_path, dataset, "b1", contract=contract)


def test_the_lakes_only_fleet_is_scored_and_several_fleets_need_a_name(tmp_path):
    settings = get_settings(home=tmp_path / "home")
    with pytest.raises(ConfigError, match="holds no fleet yet"):
        _snapshot(settings, HealthParams())
    _fleet(settings.lake_path, "pumps")
    # A derived table beside it (no contract) is not a fleet.
    lake.write_table(settings.lake_path, lake.derived_name("pumps", "events"), pa.table({"asset_id": ["P1"]}))
    assert running_fleets(settings.lake_path) == ["pumps"]
    assert _snapshot(settings, HealthParams()).dataset == "pumps"
    _fleet(settings.lake_path, "compressors")
    with pytest.raises(ConfigError, match=r"set params.dataset .* \(the lake holds compressors, pumps\)"):
        _snapshot(settings, HealthParams())
    assert _snapshot(settings, HealthParams(dataset="compressors")).dataset == "compressors"
