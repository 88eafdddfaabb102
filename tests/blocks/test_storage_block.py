"""The object-store credentials block on a real Prefect API: saved, named by the settings, never shown,
and its options accepted by a real S3 store."""

from __future__ import annotations

import logging
import os

import pytest

from twinflow.blocks import S3CredentialsBlock, register_block_types
from twinflow.errors import ConfigError
from twinflow.settings import Settings

SECRET = "s3-secret-never-shown-5517"


def test_the_block_gives_delta_rs_keys_and_masks_its_secrets(caplog):
    block = S3CredentialsBlock(access_key_id="AKIA-test", secret_access_key=SECRET,
                               endpoint_url="http://127.0.0.1:8333", allow_http=True)
    assert block.storage_options() == {
        "AWS_ACCESS_KEY_ID": "AKIA-test", "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": "http://127.0.0.1:8333", "AWS_ALLOW_HTTP": "true"}
    with caplog.at_level(logging.DEBUG):
        logging.getLogger("twinflow.test").info("block: %s %r", block, block)
    assert SECRET not in repr(block) and SECRET not in str(block) and SECRET not in caplog.text
    assert SECRET not in block.model_dump_json()


def test_a_saved_block_is_the_lakes_storage_options(prefect_api, monkeypatch):
    assert "twinflow-s3-credentials" in register_block_types()
    name = f"lake-store-{os.urandom(3).hex()}"
    S3CredentialsBlock(access_key_id="AKIA-test", secret_access_key=SECRET, endpoint_url="http://127.0.0.1:8333",
                       allow_http=True).save(name)
    # What the server hands back to anyone who reads the block document is masked.
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        doc = client.read_block_document_by_name(name, "twinflow-s3-credentials", include_secrets=False)
    assert SECRET not in str(doc.data)

    monkeypatch.setenv("TWINFLOW_LAKE__CREDENTIALS", f"block:{name}")
    monkeypatch.setenv("TWINFLOW_LAKE__STORAGE_OPTIONS", '{"AWS_REGION": "eu-west-1"}')
    settings = Settings()
    options = settings.lake.fsspec_options()
    assert options["AWS_SECRET_ACCESS_KEY"] == SECRET and options["AWS_ENDPOINT_URL"] == "http://127.0.0.1:8333"
    assert options["AWS_REGION"] == "eu-west-1"  # options given in the settings win over the block's
    assert SECRET not in repr(settings) and SECRET not in settings.model_dump_json()

    monkeypatch.setenv("TWINFLOW_LAKE__CREDENTIALS", f"block:nope-{name}")
    with pytest.raises(ConfigError, match=rf"unknown twinflow-s3-credentials block 'nope-{name}'"):
        Settings().lake.fsspec_options()


@pytest.mark.skipif(__import__("object_store").weed_binary() is None, reason="weed not installed")
def test_a_block_reaches_a_real_s3_lake(prefect_api, tmp_path):
    import pyarrow as pa

    from object_store import ACCESS_KEY, SECRET_KEY, start_seaweedfs
    from twinflow import lake
    from twinflow.contract import load_contract

    store = start_seaweedfs(tmp_path / "seaweedfs")
    try:
        name = f"seaweed-{os.urandom(3).hex()}"
        S3CredentialsBlock(access_key_id=ACCESS_KEY, secret_access_key=SECRET_KEY, endpoint_url=store.endpoint,
                           allow_http=True).save(name)
        so = Settings.model_validate({"lake": {"credentials": f"block:{name}"}}).lake.fsspec_options()
        rows = pa.table({"asset_id": ["1", "1"], "cycle": pa.array([1, 2], pa.int32())})
        snap = lake.write_lake_table(rows, store.url("lake"), "blocked", "b1", storage_options=so,
                                     contract=load_contract("cmapss"))
        assert lake.read_lake(snap, storage_options=so).num_rows == 2
    finally:
        store.stop()
