"""``twinflow stream run`` on a lake on S3-compatible object storage (a real SeaweedFS and a real mosquitto
on loopback): the bridge's lock is a lease in the lake, so a second bridge with the same id on the same
lake is refused wherever it runs; its status and ready counts are objects there that any host reads."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from object_store import requires_weed
from service_procs import wait_for
from twinflow import lake as lk
from twinflow.tasks.bridge.events import read_status
from twinflow.tasks.bridge.simulate import cmapss_rows, mqtt_messages, publish_mqtt

pytestmark = [pytest.mark.integration, requires_weed]
pytest.importorskip("s3fs")


def test_a_second_bridge_on_the_same_s3_lake_is_refused_and_status_is_read_from_the_lake(s3, mosquitto, tmp_path):
    host, port = mosquitto
    so, root = s3.options(), s3.url("bridge-lake")
    config = tmp_path / "bridge.json"
    config.write_text(json.dumps({"bridge_id": "b1", "dataset": "stream", "batch_rows": 20, "flush_interval_s": 0.2,
                                  "heartbeat_s": 1.0, "ready_min_cycles": 5, "ready_min_assets": 1,
                                  "mqtt": {"host": host, "port": port, "topics": ["twinflow/telemetry/#"]}}))
    # Configured the way an operator configures each host: the lake and its keys in the environment.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TWINFLOW_", "PREFECT_API_URL"))}
    env.update({"TWINFLOW_HOME": str(tmp_path / "home"), "TWINFLOW_LAKE__LAKE": root,
                "TWINFLOW_LAKE__STORAGE_OPTIONS": json.dumps(so), "COLUMNS": "400"})

    def twinflow(*args: str, **kw) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "twinflow.cli", "stream", *args, "--config", str(config)],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)

    first = twinflow("run", "--max-seconds", "120")
    try:
        status = wait_for(lambda: read_status(root, "b1", so), 60, every=0.3)
        assert status and status["state"] == "running" and status["pid"] == first.pid, status
        time.sleep(1.0)  # subscribed (right after the first heartbeat)
        rows = cmapss_rows(units=2, max_cycles=10)
        assert publish_mqtt(list(mqtt_messages(rows)), host=host, port=port, rate=200) == len(rows)
        assert wait_for(lambda: lk.version(root, "stream", so) is not None and lk.read_lake(
            lk.snapshot(root, "stream", so), columns=["asset_id"], storage_options=so).num_rows == len(rows),
            60, every=0.3)

        # The same bridge id again, as on another host: refused at once, in one line naming the lease.
        second = twinflow("run", "--max-seconds", "30")
        _, err = second.communicate(timeout=120)
        err = " ".join(err.split())
        assert second.returncode != 0, err
        assert "stream bridge 'b1' on the lake" in err and "_bridge-b1.lock is held by" in err, err
        assert f":{first.pid}" in err and "Traceback" not in err, err

        # Any host reads the running bridge's status from the lake.
        out = twinflow("status")
        got, err = out.communicate(timeout=120)
        assert out.returncode == 0, err
        status = json.loads(got)
        assert status["state"] == "running" and status["pid"] == first.pid
        assert status["rows_written"] == len(rows) and status["last_commit"]["version"] is not None
    finally:
        if first.poll() is None:
            first.send_signal(signal.SIGTERM)
        _, err = first.communicate(timeout=120)
    assert first.returncode == 0, err
    assert read_status(root, "b1", so)["state"] == "stopped"
    # The ready counts are in the lake too (5 new cycles per asset make an event, then counting restarts).
    ready = json.loads(lk.read_meta_object(root, "bridge-b1-ready.json", so))
    assert ready["dataset"] == "stream" and ready["version"] == lk.version(root, "stream", so)
    # Nothing of the bridge's bookkeeping is on the local disk.
    assert not (tmp_path / "home" / "lake").exists()
    # A stopped bridge released its lease: the next one starts at once.
    third = twinflow("run", "--max-seconds", "1")
    _, err = third.communicate(timeout=120)
    assert third.returncode == 0, err
