"""Lake upkeep: vacuum removes unreferenced files but keeps the champion's training snapshot readable."""

from __future__ import annotations

import pyarrow as pa

from twinflow import lake
from twinflow.refs import LakeSnapshot


def _three_versions(root: str) -> None:
    for i in range(3):  # each write replaces the batch: v0's and v1's files become unreferenced
        lake.write_lake_table(pa.table({"asset_id": ["1"], "cycle": [i + 1]}), root, "d", "b1")


def _champion_trained_on(settings, dataset: str, version: int, tmp_path) -> None:
    import mlflow
    from mlflow.tracking import MlflowClient

    from twinflow.deployments.upkeep import DATASET_TAG, VERSION_TAG
    from twinflow.tracking import configure_mlflow

    configure_mlflow(settings)
    with mlflow.start_run() as run:
        mlflow.set_tags({DATASET_TAG: dataset, VERSION_TAG: str(version)})
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
    _champion_trained_on(settings, "d", 1, tmp_path)
    dry = upkeep(UpkeepParams(optimize=False, retention_hours=0, dry_run=True))
    assert dry.pinned == {"d": [1]} and dry.vacuumed == {"d": 1}
    report = upkeep(UpkeepParams(optimize=False, retention_hours=0))
    assert report.vacuumed == {"d": 1}
    pinned = LakeSnapshot(lake_path=root, dataset="d", batch_id="v1", version=1)
    assert lake.read_lake(pinned).column("cycle").to_pylist() == [2]
    assert lake.read_lake(lake.snapshot(root, "d")).column("cycle").to_pylist() == [3]
    # Without the pin, the champion's snapshot goes too.
    assert upkeep(UpkeepParams(optimize=False, retention_hours=0, protect_champion=False)).vacuumed == {"d": 1}
