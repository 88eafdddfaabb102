"""Lake upkeep: vacuum removes unreferenced files but keeps what the champion was trained on and what the
latest health run of each fleet read and wrote readable."""

from __future__ import annotations

import pyarrow as pa

from twinflow import lake
from twinflow.refs import LakeSnapshot


def _three_versions(root: str) -> None:
    for i in range(3):  # each write replaces the batch: v0's and v1's files become unreferenced
        lake.write_lake_table(pa.table({"asset_id": ["1"], "cycle": [i + 1]}), root, "d", "b1")


def _champion_trained_on(settings, dataset: str, version: int, tmp_path, segments: int | None = None) -> None:
    import mlflow
    from mlflow.tracking import MlflowClient

    from twinflow.deployments.upkeep import DATASET_TAG, SEGMENTS_TAG, VERSION_TAG
    from twinflow.tracking import configure_mlflow

    configure_mlflow(settings)
    with mlflow.start_run() as run:
        mlflow.set_tags({DATASET_TAG: dataset, VERSION_TAG: str(version)})
        if segments is not None:
            mlflow.set_tag(SEGMENTS_TAG, str(segments))
    client = MlflowClient()
    name = settings.mlflow.registered_model
    client.create_registered_model(name)
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    mv = client.create_model_version(name, source=str(model_dir), run_id=run.info.run_id)
    client.set_registered_model_alias(name, "champion", mv.version)


def test_upkeep_keeps_the_champions_snapshot_and_vacuums_the_rest(prefect_api, tmp_path):
    from twinflow.deployments.upkeep import UpkeepParams, upkeep
    from twinflow.settings import get_settings

    settings = get_settings()
    root = settings.lake_path
    _three_versions(root)
    for i in range(3):  # the life segments its labels came from, rewritten twice since
        lake.write_table(root, "d__segments", pa.table({"asset_id": ["1"], "end": [i]}), overwrite=True)
    _champion_trained_on(settings, "d", 1, tmp_path, segments=0)
    dry = upkeep(UpkeepParams(optimize=False, retention_hours=0, dry_run=True))
    assert dry.pinned == {"d": [1], "d__segments": [0]} and dry.vacuumed == {"d": 1, "d__segments": 1}
    assert lake.read_table(root, "d__segments", version=0).column("end").to_pylist() == [0]
    report = upkeep(UpkeepParams(optimize=False, retention_hours=0))
    assert report.vacuumed == {"d": 1, "d__segments": 1}
    assert lake.read_table(root, "d__segments", version=0).column("end").to_pylist() == [0]
    pinned = LakeSnapshot(lake_path=root, dataset="d", batch_id="v1", version=1)
    assert lake.read_lake(pinned).column("cycle").to_pylist() == [2]
    assert lake.read_lake(lake.snapshot(root, "d")).column("cycle").to_pylist() == [3]
    # Without the pin, the champion's snapshot goes too.
    assert upkeep(UpkeepParams(optimize=False, retention_hours=0, protect_champion=False)).vacuumed == \
        {"d": 1, "d__segments": 1}


def _pumps_at_three_versions(root: str):
    """The pump fleet's telemetry at versions 0-2 (each rewrite of the batch leaves the previous version's
    files unreferenced), with its life segments and recent rows rebuilt after each, as ingest does."""
    import pandas as pd

    from health_fixtures import pumps_frame
    from twinflow.contract import load_contract
    from twinflow.tasks.ingest.events import rebuild_segments

    contract = load_contract("pumps")
    df, _ = pumps_frame(n=4)
    start = df.timestamp.min()
    for days in (1, 2, 3):
        part = df[df.timestamp < start + pd.Timedelta(days=days)]
        lake.write_lake_table(pa.Table.from_pandas(part, preserve_index=False), root, "pumps", "b1",
                              contract=contract)
        rebuild_segments(root, "pumps", contract)
        lake.refresh_recent(root, "pumps", 20)
    return df


def test_upkeep_keeps_what_the_latest_health_run_read_and_wrote(runtime):
    import pytest

    from twinflow.deployments.upkeep import UpkeepParams, health_pins, upkeep
    from twinflow.flows.health import FLEET_HEALTH, health
    from twinflow.tasks.health import HealthParams

    settings = runtime.settings
    root = settings.lake_path
    _pumps_at_three_versions(root)
    v1 = LakeSnapshot(lake_path=root, dataset="pumps", batch_id="v1", version=1)
    rows_v1 = lake.read_lake(v1).num_rows
    # The running fleet scored at an older snapshot (v1; the telemetry moved on to v2), twice: the
    # re-run replaces the first run's rows, leaving a file no current version references.
    params = HealthParams(dataset="pumps", version=1, use_champion=False, max_staleness="6h")
    health(params)
    scored = health(params)
    # A later run of another fleet, written before health recorded what it read (only its rows say).
    lake.write_results(root, FLEET_HEALTH, pa.table({"dataset": ["other"], "dataset_version": [4],
                                                     "run_key": ["other@v4:no-model"]}),
                       key_column="run_key", key="other@v4:no-model", metadata={"twinflow.dataset": "other"})

    fleet_health = lake.result_table(FLEET_HEALTH)
    pins = health_pins(settings)
    # Health read the segments' latest version (v2): a snapshot that names none reads the latest.
    assert pins == {fleet_health: {scored.table_version, scored.table_version + 1}, "pumps": {1},
                    "pumps__segments": {2}, "pumps__recent": {1}, "other": {4}}
    dry = upkeep(UpkeepParams(optimize=False, retention_hours=0, dry_run=True))
    assert dry.pinned == {k: sorted(v) for k, v in pins.items()}
    loose = upkeep(UpkeepParams(optimize=False, retention_hours=0, dry_run=True, protect_health=False))
    assert set(dry.vacuumed) == {"pumps", "pumps__segments", "pumps__recent", fleet_health}
    for table in ("pumps", "pumps__recent"):  # v1's files are spared, v0's go
        assert 0 < dry.vacuumed[table] < loose.vacuumed[table], (dry.vacuumed, loose.vacuumed)

    report = upkeep(UpkeepParams(retention_hours=0))  # optimize first: new versions, the same pins
    assert report.pinned == dry.pinned and report.optimized[fleet_health]["numFilesRemoved"] == 2
    # The recent rows are not compacted: their newest version still says which telemetry it was built from.
    assert report.optimized["pumps__recent"] == {}
    assert lake.history(root, "pumps__recent", limit=1)[0]["twinflow.telemetry_version"] == "2"
    # What the health run read and wrote is still there to time-travel to ...
    assert lake.read_lake(v1).num_rows == rows_v1
    assert lake.read_recent_table(v1, 20, ["asset_id", "timestamp", "vibration_mm_s"])[0].num_rows > 0
    assert lake.read_table(root, "pumps__segments", version=2).num_rows > 0
    stored = lake.read_results(root, FLEET_HEALTH, version=scored.table_version)
    assert set(stored.column("run_key").to_pylist()) == {scored.run_key}
    # ... and scoring that snapshot again gives the same answer.
    again = health(params)
    assert (again.assets, again.bands) == (scored.assets, scored.bands)

    # Without the health pins, the scored snapshot's files and the run's fleet_health version go.
    upkeep(UpkeepParams(optimize=False, retention_hours=0, protect_health=False))
    with pytest.raises(Exception):
        lake.read_lake(v1).num_rows
    with pytest.raises(Exception):
        lake.read_results(root, FLEET_HEALTH, version=scored.table_version)
