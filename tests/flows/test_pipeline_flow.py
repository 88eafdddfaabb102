"""The parent flow end to end on the bundled FD001 data, against real Prefect, Dask and MLflow."""

from __future__ import annotations

import mlflow
import pytest

from twinflow.flows.pipeline import PipelineParams, demo_params, pipeline
from twinflow.tasks.features import FeatureParams
from twinflow.tasks.twin import TwinParams
from twinflow.tracking import PREFECT_RUN_TAG, STAGE_TAG


def _subflow_upstreams(flow_run_id: str) -> dict[str, set[str]]:
    """Per stage (subflow name): the flow-run ids its tracking task run lists as inputs in Prefect."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    out: dict[str, set[str]] = {}
    with get_client(sync_client=True) as client:
        subs = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[flow_run_id])))
        for fr in subs:
            task = client.read_task_run(fr.parent_task_run_id)
            ids = {str(i.id) for inputs in task.task_inputs.values() for i in inputs}
            out.setdefault(client.read_flow(fr.flow_id).name, set()).update(ids)
    return out


def _artifact_keys(flow_run_id: str) -> set[str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(
            any_=[flow_run_id])))
    return {a.key for a in arts}


def _small(settings, **update) -> PipelineParams:
    params = demo_params(settings)
    return params.model_copy(update={
        "features": FeatureParams(windows=[10], ewm_spans=[10], channels=["s2", "s3", "s4", "s7", "s11", "s12"]),
        "train": params.train.model_copy(update={"n_trials": 2, "max_iter": 40}),
        "simulate": TwinParams(n_scenarios=10, n_assets=10, horizon=400, batch_scenarios=10,
                               intervals=[100, 150], thresholds=[20.0, 40.0], fan_units=40),
        **update,
    })


@pytest.mark.integration
def test_pipeline_runs_every_stage_and_reruns_incrementally(runtime):
    settings = runtime.settings
    first = pipeline(_small(settings))
    assert set(first.summaries()) == {"ingest", "features", "features (test)", "train", "health", "simulate"}
    assert first.health.assets == 100 and first.health.dataset == "test_fd001"
    ing = first.ingest
    assert ing.rows_read == 20_631 + 13_096
    assert ing.rows_read == ing.rows_written + ing.rows_quarantined
    assert {"train_fd001", "test_fd001"} <= set(ing.snapshots)
    assert first.features.rows == ing.snapshots["train_fd001"].rows
    assert first.train.version == "1" and "champion" in first.train.aliases
    assert first.simulate.recommended_policy

    client = mlflow.MlflowClient()
    parent = client.get_run(first.mlflow_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags.get(PREFECT_RUN_TAG)
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{first.mlflow_run_id}'")
    assert {r.data.tags.get(STAGE_TAG) for r in children} >= {"train", "simulate"}
    stage_runs = {r.data.tags[STAGE_TAG] + r.info.run_name: r for r in children}
    # Each stage run points at its own Prefect flow run, not the pipeline's.
    prefect_ids = [r.data.tags[PREFECT_RUN_TAG] for r in children]
    assert len(set(prefect_ids)) == len(children) and parent.data.tags[PREFECT_RUN_TAG] not in prefect_ids
    # The Prefect run graph links the stages: each subflow's tracking task names its upstream flow run.
    upstream = _subflow_upstreams(parent.data.tags[PREFECT_RUN_TAG])
    by_stage = {r.data.tags[STAGE_TAG]: r.data.tags[PREFECT_RUN_TAG] for r in children}
    assert by_stage["ingest"] in upstream["features"]
    assert by_stage["features"] in upstream["train"] or by_stage["ingest"] in upstream["train"]
    assert by_stage["train"] in upstream["simulate"]
    # The pipeline run decides at a glance and lists its datasets; simulate names its snapshot and version.
    desc = parent.data.tags["mlflow.note.content"]
    assert desc.startswith("**PROMOTED**") and "Rule: No champion yet" in desc and "EUR" in desc, desc
    assert f"/runs/{first.train.run_id}" in desc and parent.data.tags["prefect.flow_run_url"] in desc
    assert {d.dataset.name for d in parent.inputs.dataset_inputs} >= {"lake/train_fd001", "features/train_fd001"}
    digest = {d.dataset.digest for d in parent.inputs.dataset_inputs if d.dataset.name == "features/train_fd001"}
    assert digest == {first.features.params_digest}
    trained = client.get_run(first.train.run_id).data.tags  # what the lake upkeep pins for the champion
    assert trained["twinflow.lake.dataset"] == "train_fd001"
    assert trained["twinflow.lake.version"] == str(first.features.snapshot.version)
    # The training snapshot names its life segments: run-to-failure files end in failures; upkeep pins them too.
    assert first.features.snapshot.segments is not None
    assert trained["twinflow.lake.segments"] == str(first.features.snapshot.segments)
    sim = client.get_run(first.simulate.run_id)
    assert [d.dataset.name for d in sim.inputs.dataset_inputs] == ["lake/train_fd001"]
    assert sim.data.tags["twinflow.model_uri"] == "models:/twinflow-rul/1" or \
        sim.data.tags["twinflow.model_uri"].endswith("/1")
    assert stage_runs and "pipeline-promotion" in _artifact_keys(parent.data.tags[PREFECT_RUN_TAG])

    # Second run: nothing new in the landing folder, features cached, a challenger trained.
    second = pipeline(_small(settings, stages=["ingest", "features", "train"]))
    assert second.ingest.rows_read == 0 and second.ingest.unchanged == 2
    assert second.ingest.snapshots["train_fd001"].rows == ing.snapshots["train_fd001"].rows
    assert second.features.path == first.features.path
    assert second.train.version == "2"


def test_stages_must_be_a_prefix(tmp_path):
    with pytest.raises(ValueError, match="prefix"):
        PipelineParams(ingest={"landing": str(tmp_path)}, stages=["ingest", "train"])


def test_a_dataset_no_landing_file_feeds_is_read_from_the_lake_at_the_pinned_version(tmp_path):
    """What retrain-on-new-data runs on: the stream bridge's dataset, at the version its event names."""
    import json

    from twinflow import lake as lk
    from twinflow.errors import ConfigError
    from twinflow.flows.pipeline import resolve_snapshot
    from twinflow.tasks.bridge.buffer import Message
    from twinflow.tasks.bridge.commit import Committer
    from twinflow.tasks.ingest import IngestResult

    lake = str(tmp_path / "lake")
    committer = Committer(lake, str(tmp_path / "q"), "stream", "b1", "twinflow-bridge-b1")
    for first in (1, 3):
        rows = [{"asset_id": "u1", "cycle": c, "s2": 642.0} for c in (first, first + 1)]
        committer.commit([Message(source="t", raw=json.dumps(r).encode(), rows=[r]) for r in rows])
    nothing_ingested = IngestResult(batch_id="b")
    latest = resolve_snapshot(nothing_ingested, "stream", lake)
    assert latest.version == 1 and lk.read_lake(latest, columns=["cycle"]).num_rows == 4
    pinned = resolve_snapshot(nothing_ingested, "stream", lake, version=0)
    assert pinned.version == 0 and sorted(lk.read_lake(pinned, columns=["cycle"]).column("cycle").to_pylist()) == [1, 2]
    assert pinned.digest != latest.digest
    with pytest.raises(ConfigError, match="no table version 7"):
        resolve_snapshot(nothing_ingested, "stream", lake, version=7)
    with pytest.raises(ConfigError, match="not in the lake after ingest"):
        resolve_snapshot(nothing_ingested, "elsewhere", lake)
    with pytest.raises(ValueError):
        PipelineParams(ingest={"landing": str(tmp_path)}, train_version=-1)


def test_the_pipeline_keeps_as_many_recent_rows_as_its_own_features_need(tmp_path):
    from twinflow.flows.pipeline import _with_recent_rows
    from twinflow.settings import get_settings

    settings = get_settings(home=tmp_path / "home")
    pumps = demo_params(settings, fleet="pumps")
    # Row windows up to 36 and an EWM of span 36 over 10-minute readings: 36 + 10 * 36 + 1.
    assert _with_recent_rows(pumps).recent_rows == 397
    assert _with_recent_rows(pumps.model_copy(update={"ingest": pumps.ingest.model_copy(
        update={"recent_rows": 50})})).recent_rows == 50
