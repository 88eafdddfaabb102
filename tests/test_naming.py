"""Task-run names from parameters (twinflow.naming): pure parts here, real task runs in tests/flows."""

from __future__ import annotations

from twinflow.naming import dataset_of_parts, model_version_of, task_name


def test_dataset_of_lake_partitions():
    parts = [[], ["/h/lake/train_fd001/asset_id=7/part-0.parquet", "/h/lake/train_fd001/asset_id=8/part-1.parquet"]]
    assert dataset_of_parts(parts) == "train_fd001"
    assert dataset_of_parts([["/somewhere/else.parquet"]]) is None
    assert dataset_of_parts([]) is None


def test_model_versions_and_aliases():
    assert model_version_of("models:/twinflow-rul/3") == "v3"
    assert model_version_of("models:/twinflow-rul@champion") == "champion"
    assert model_version_of("runs:/abc/model") is None


def test_a_name_that_cannot_be_described_falls_back_to_the_task_name():
    assert task_name("t", lambda p: p["missing"].attr)() == "t"  # outside a task run: no parameters
    assert task_name("t")() == "t"
