"""Blocks against the real Prefect server: save → load → run, secrets masked everywhere."""

from __future__ import annotations

import json
import os

import httpx
import pytest
from pydantic import SecretStr

from twinflow.blocks import (
    DaskClusterBlock,
    LakeBlock,
    MlflowTrackingBlock,
    TwinflowConfigBlock,
    register_block_types,
    settings_from_block,
    settings_from_blocks,
)
from twinflow.errors import ConfigError, ServiceUnavailable

PASSWORD = "pw-5f1c2e-never-log-me"
LAKE_SECRET = "sk-9a7d4b-never-log-me"


@pytest.fixture
def saved_config(prefect_api, tmp_path, dask_scheduler_address):
    """A twinflow-config block (with secrets) pointing at the session cluster and a tmp lake."""
    register_block_types()
    suffix = os.urandom(3).hex()
    DaskClusterBlock(mode="address", address=dask_scheduler_address, connect_timeout=20).save(f"cluster-{suffix}")
    MlflowTrackingBlock(tracking_uri=f"sqlite:///{tmp_path / 'blocks-mlflow.db'}", experiment="blocks-test",
                        username="operator", password=SecretStr(PASSWORD)).save(f"tracking-{suffix}")
    LakeBlock(landing=str(tmp_path / "landing"), lake=str(tmp_path / "lake"),
              storage_options={"auto_mkdir": "true"},
              secret_options={"secret": LAKE_SECRET}).save(f"lake-{suffix}")
    TwinflowConfigBlock(home=str(tmp_path / "block-home"),
                        dask=DaskClusterBlock.load(f"cluster-{suffix}"),
                        mlflow=MlflowTrackingBlock.load(f"tracking-{suffix}"),
                        lake=LakeBlock.load(f"lake-{suffix}")).save(f"plant-{suffix}")
    return f"plant-{suffix}", suffix


def test_blocks_round_trip_into_settings(saved_config, tmp_path, dask_scheduler_address):
    name, suffix = saved_config
    settings = settings_from_block(name)

    assert settings.home == (tmp_path / "block-home").resolve()
    assert settings.dask.mode == "address" and settings.dask.address == dask_scheduler_address
    assert settings.dask.connect_timeout == 20
    assert settings.mlflow.experiment == "blocks-test" and settings.mlflow.username == "operator"
    assert settings.mlflow.password.get_secret_value() == PASSWORD
    assert settings.lake_path == str(tmp_path / "lake")
    assert settings.lake.fsspec_options() == {"auto_mkdir": "true", "secret": LAKE_SECRET}
    # Masked wherever settings are printed or flattened into params.
    from twinflow.tracking import flatten_params

    for text in (repr(settings), str(settings), json.dumps(flatten_params(settings))):
        assert PASSWORD not in text and LAKE_SECRET not in text

    # Single blocks override the config's section.
    DaskClusterBlock(mode="local", n_workers=3).save(f"local-{suffix}")
    other = settings_from_blocks(config=name, dask=f"local-{suffix}")
    assert other.dask.mode == "local" and other.dask.n_workers == 3
    assert other.mlflow.experiment == "blocks-test"


def test_secrets_are_masked_in_the_prefect_api(saved_config, prefect_api):
    docs = httpx.post(f"{prefect_api}/block_documents/filter", json={"include_secrets": False}, timeout=10).json()
    ours = [d for d in docs if d["name"].endswith(saved_config[1])]
    assert len(ours) >= 4
    text = json.dumps(ours)
    assert PASSWORD not in text and LAKE_SECRET not in text
    tracking = next(d for d in ours if d["name"].startswith("tracking-"))
    assert tracking["data"]["password"].startswith("***")


def test_flow_runs_with_block_settings_and_no_secret_leaks(saved_config, prefect_api, monkeypatch):
    """Run a flow on a runtime built from the blocks; secrets reach no log, param or MLflow record."""
    import mlflow

    from twinflow import runtime
    from twinflow.deployments.healthcheck import HealthcheckParams, healthcheck

    # configure_mlflow exports credentials for MLflow's client; keep them out of later tests.
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    settings = settings_from_block(saved_config[0])
    with runtime.start(settings) as rt:
        assert rt.cluster.mode == "address"
        report = healthcheck(HealthcheckParams(partitions=2))
    assert report.lake_probe.startswith(settings.lake_path)
    assert report.rows > 0

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    with get_client(sync_client=True) as client:
        fr = client.read_flow_run(report.prefect_flow_run_id)
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[fr.id])))
    assert fr.state.is_completed()
    prefect_text = json.dumps(fr.parameters) + "\n".join(log.message for log in logs)
    assert PASSWORD not in prefect_text and LAKE_SECRET not in prefect_text

    client = mlflow.MlflowClient(tracking_uri=settings.mlflow_tracking_uri)
    run = client.get_run(report.mlflow_run_id)
    assert run.info.status == "FINISHED"
    mlflow_text = json.dumps({"params": run.data.params, "tags": run.data.tags})
    assert PASSWORD not in mlflow_text and LAKE_SECRET not in mlflow_text


def test_unknown_block_name_is_a_clear_error(prefect_api):
    slugs = register_block_types()
    # every block a config can name, the stream bridge's broker credentials included (issue 25)
    assert "twinflow-broker-credentials" in slugs
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        assert client.read_block_type_by_slug("twinflow-broker-credentials").slug == "twinflow-broker-credentials"
    with pytest.raises(ConfigError, match="unknown twinflow-config block 'no-such-plant'"):
        settings_from_block("no-such-plant")
    with pytest.raises(ConfigError, match="unknown twinflow-lake block"):
        settings_from_blocks(lake="no-such-lake")


def test_prefect_server_down_is_a_clear_error(monkeypatch):
    import socket

    from prefect.settings import PREFECT_API_URL, temporary_settings

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/api"  # nothing listens there once the socket is closed
    monkeypatch.setenv("PREFECT_API_URL", url)
    with temporary_settings(updates={PREFECT_API_URL: url}):
        with pytest.raises(ServiceUnavailable, match="does not answer"):
            settings_from_block("anything")
        with pytest.raises(ServiceUnavailable):
            register_block_types()


@pytest.mark.parametrize("block, section", [(DaskClusterBlock, "dask"), (MlflowTrackingBlock, "mlflow"),
                                            (LakeBlock, "lake")])
def test_block_fields_are_settings_fields_with_the_same_defaults(block, section):
    # A block maps onto its Settings section by field name: a renamed or new setting must not be
    # silently dropped (or a block field silently ignored).
    from twinflow.settings import Settings

    fields = Settings.model_fields[section].annotation.model_fields
    assert set(block.model_fields) <= set(fields)
    assert set(block().settings_section()) == set(block.model_fields)
    defaults = Settings.model_validate({section: block().settings_section()})
    assert getattr(defaults, section) == getattr(Settings(), section)
