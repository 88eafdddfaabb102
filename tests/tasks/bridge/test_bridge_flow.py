"""The Prefect-served bridge (``twinflow.flows.stream``): the flow against a real mosquitto and Prefect server.

Here (not in tests/flows/) because it needs this folder's mosquitto fixture.
"""

from __future__ import annotations

import json
import threading
import time

import pytest

from twinflow import lake as lk
from twinflow.tasks.bridge.simulate import cmapss_rows, mqtt_messages, publish_mqtt


@pytest.mark.integration
def test_stream_bridge_flow_completes_and_fills_the_lake(prefect_api, mosquitto, tmp_path):
    from prefect.client.orchestration import get_client

    from twinflow.flows.stream import bridge_deployment, stream_bridge_flow

    host, port = mosquitto
    lake, quar = str(tmp_path / "lake"), str(tmp_path / "q")
    config = tmp_path / "bridge.json"
    config.write_text(json.dumps({"bridge_id": "flow", "lake": lake, "quarantine": quar, "batch_rows": 50,
                                  "flush_interval_s": 0.2, "ready_min_cycles": 5, "ready_min_assets": 2,
                                  "mqtt": {"host": host, "port": port, "topics": ["twinflow/telemetry/#"]}}))
    rows = cmapss_rows(units=2, max_cycles=25)

    def publisher():
        deadline = time.monotonic() + 60
        while not lk.meta_path(lake, "bridge-flow.lock").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(1.5)  # subscribed
        publish_mqtt(list(mqtt_messages(rows)), host=host, port=port)

    th = threading.Thread(target=publisher)
    th.start()
    state = stream_bridge_flow(str(config), max_seconds=12.0, return_state=True)
    th.join(60)
    assert state.is_completed(), state
    out = state.result()
    keys = lk.read_lake(lk.snapshot(lake, "stream"), columns=["asset_id", "cycle"]).to_pylist()
    assert sorted((k["asset_id"], k["cycle"]) for k in keys) == sorted((r["asset_id"], r["cycle"]) for r in rows)
    assert out["rows_written"] == len(rows) and out["version"] == lk.version(lake, "stream")
    assert out["data_ready_events"] >= 1
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(state.state_details.flow_run_id)
        assert run.state.type.value == "COMPLETED" and run.parameters["config_path"] == str(config)

    # The deployment `twinflow stream serve` serves: named by the bridge, the config's absolute path.
    dep = bridge_deployment(config)
    assert (dep.name, dep.parameters["config_path"]) == ("flow", str(config.resolve()))
    assert dep.entrypoint.endswith("twinflow.flows.stream.stream_bridge_flow")
