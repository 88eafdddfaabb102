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


class _CountingProxy:
    """A reverse proxy in front of the real Prefect server that records every request it forwards."""

    def __init__(self, api_url: str):
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        import httpx

        origin = api_url.split("/api", 1)[0]
        self.requests: list[str] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _forward(self):
                n = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(n) if n else None
                outer.requests.append(f"{self.command} {self.path}")
                skip = {"host", "content-length", "connection", "accept-encoding"}
                r = httpx.request(self.command, origin + self.path, content=body, timeout=30,
                                  headers={k: v for k, v in self.headers.items() if k.lower() not in skip})
                self.send_response(r.status_code)
                for k, v in r.headers.items():
                    if k.lower() not in ("content-length", "transfer-encoding", "connection", "content-encoding"):
                        self.send_header(k, v)
                self.send_header("content-length", str(len(r.content)))
                self.end_headers()
                self.wfile.write(r.content)

            do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = _forward

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/api"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def test_the_blocks_options_are_read_once_per_process_until_the_block_is_saved_again(prefect_api, monkeypatch):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from twinflow.blocks.storage import forget_cached_options

    proxy = _CountingProxy(prefect_api)
    name = f"cached-{os.urandom(3).hex()}"
    monkeypatch.setenv("PREFECT_API_URL", proxy.url)
    monkeypatch.setenv("TWINFLOW_LAKE__CREDENTIALS", f"block:{name}")
    try:
        with temporary_settings(updates={PREFECT_API_URL: proxy.url}):
            register_block_types()
            S3CredentialsBlock(access_key_id="AKIA-one", secret_access_key=SECRET).save(name)
            forget_cached_options()
            before = len(proxy.requests)
            assert Settings().lake.fsspec_options()["AWS_ACCESS_KEY_ID"] == "AKIA-one"
            first = proxy.requests[before:]
            assert any(name in r for r in first), first  # the first call reads the block from the API
            for _ in range(3):  # every later call (settings built again each time) is answered here
                options = Settings().lake.fsspec_options()
            assert proxy.requests[before + len(first):] == []
            options["AWS_ACCESS_KEY_ID"] = "changed by a caller"
            assert Settings().lake.fsspec_options()["AWS_ACCESS_KEY_ID"] == "AKIA-one"
            # Saving the block from this process forgets the cached copy: the next call reads the new keys.
            S3CredentialsBlock(access_key_id="AKIA-two", secret_access_key=SECRET).save(name, overwrite=True)
            after_save = len(proxy.requests)
            assert Settings().lake.fsspec_options()["AWS_ACCESS_KEY_ID"] == "AKIA-two"
            assert any(name in r for r in proxy.requests[after_save:])
            # An unknown block is not remembered as anything: each call asks again and fails clearly.
            monkeypatch.setenv("TWINFLOW_LAKE__CREDENTIALS", f"block:nope-{name}")
            for _ in range(2):
                with pytest.raises(ConfigError, match="unknown twinflow-s3-credentials block"):
                    Settings().lake.fsspec_options()
    finally:
        proxy.close()
        forget_cached_options()
