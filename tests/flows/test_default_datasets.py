"""Which dataset a stage reads when its parameters name none: decided by the lake and the landing's
contract, never by the bundled example's names."""

from __future__ import annotations

import json

import pytest

from twinflow.contract import load_contract
from twinflow.errors import ConfigError
from twinflow.flows.pipeline import PipelineParams, demo_params, training_dataset
from twinflow.flows.stages import _only_feature_set, stage_params
from twinflow.refs import FileRef, LakeSnapshot
from twinflow.settings import get_settings
from twinflow.tasks.ingest import IngestResult


def _snap(dataset: str, files: list[str], contract: str, segments: int | None = None) -> LakeSnapshot:
    return LakeSnapshot(lake_path="/lake", dataset=dataset, batch_id="b",
                        files=[FileRef(path=f"/landing/{f}", sha256=f) for f in files],
                        contract=load_contract(contract), segments=segments)


def test_the_pipeline_trains_on_the_landings_run_to_failure_dataset():
    # C-MAPSS: the training files' contract rule says their lives end in failure; the test files' not.
    cmapss = IngestResult(batch_id="b", snapshots={
        "test_fd001": _snap("test_fd001", ["test_FD001.txt.gz"], "cmapss"),
        "train_fd001": _snap("train_fd001", ["train_FD001.txt.gz"], "cmapss")})
    assert training_dataset(cmapss) == "train_fd001"
    # A plant's landing feeding one dataset: that one.
    pumps = IngestResult(batch_id="b", snapshots={"pumps": _snap("pumps", ["pumps_2026-01-01.csv"], "pumps")})
    assert training_dataset(pumps) == "pumps"
    # Two fleets, one with an event log (life segments): the one whose lives are recorded.
    two = IngestResult(batch_id="b", snapshots={
        "compressors": _snap("compressors", ["pumps_a.csv"], "pumps"),
        "pumps": _snap("pumps", ["pumps_b.csv"], "pumps", segments=3)})
    assert training_dataset(two) == "pumps"


def test_an_ambiguous_or_empty_landing_asks_for_train_dataset_by_name():
    two = IngestResult(batch_id="b", snapshots={
        "compressors": _snap("compressors", ["pumps_a.csv"], "pumps"),
        "pumps": _snap("pumps", ["pumps_b.csv"], "pumps")})
    with pytest.raises(ConfigError, match=r"set train_dataset \(the landing feeds compressors, pumps\)"):
        training_dataset(two)
    with pytest.raises(ConfigError, match="fed no dataset"):
        training_dataset(IngestResult(batch_id="b"))


def test_no_default_names_the_bundled_example(tmp_path):
    params = PipelineParams(ingest={"landing": str(tmp_path)})
    assert params.train_dataset is None and params.test_dataset is None
    settings = get_settings(home=tmp_path / "home")
    cmapss = demo_params(settings)
    assert (cmapss.train_dataset, cmapss.test_dataset) == ("train_fd001", "test_fd001")
    assert stage_params("features", {}, settings).dataset is None
    assert stage_params("train", {"dataset": "pumps"}, settings).dataset == "pumps"


def test_train_without_a_dataset_reads_the_only_feature_set(tmp_path):
    settings = get_settings(home=tmp_path / "home")
    with pytest.raises(ConfigError, match="no feature set yet"):
        _only_feature_set(settings)
    for name in ("pumps", "compressors"):
        d = tmp_path / "home" / "features" / name / "abc123"
        d.mkdir(parents=True)
        if name == "pumps":
            (d / "_manifest.json").write_text(json.dumps({"ref": {}}))
    # A folder without a finished manifest (a features run that crashed) is not a feature set.
    assert settings.features_path == str(tmp_path / "home" / "features")
    assert _only_feature_set(settings) == "pumps"
    (tmp_path / "home" / "features" / "compressors" / "abc123" / "_manifest.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"feature sets: compressors, pumps"):
        _only_feature_set(settings)
