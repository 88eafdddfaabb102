"""The stream bridge's micro-batch commit into a lake on S3-compatible object storage (a real SeaweedFS
on loopback): rows land, a redelivered batch after a restart adds nothing, compaction runs there."""

from __future__ import annotations

import json

import pytest

import cmapss_names as CM
from object_store import requires_weed
from twinflow import lake as lk
from twinflow.tasks.bridge.buffer import Message
from twinflow.tasks.bridge.commit import Committer
from twinflow.tasks.bridge.decode import decode_json
from twinflow.tasks.ingest.quarantine import read_quarantine

pytestmark = [pytest.mark.integration, requires_weed]
pytest.importorskip("s3fs")


def _msg(payload: bytes, acks: list) -> Message:
    return Message(source="mqtt://test/t", raw=payload, rows=decode_json(payload), error=None,
                   ack=lambda: acks.append(payload))


def _row(asset: str, cycle: int, value: float = 642.0) -> bytes:
    return json.dumps({"asset_id": asset, "cycle": cycle, CM.SENSORS[1]: value, CM.SENSORS[2]: 1590.0}).encode()


def test_the_bridge_commits_to_an_s3_lake_and_a_redelivery_adds_nothing(s3, tmp_path):
    so, root = s3.options(), s3.url("stream-lake")

    def committer() -> Committer:
        return Committer(root, str(tmp_path / "q"), "stream", "b1", "twinflow-bridge-b1", storage_options=so)

    acks: list = []
    first = committer().commit([_msg(_row("u1", i), acks) for i in range(1, 6)] + [_msg(_row("u1", 7, 1e6), acks)])
    assert (first.seq, first.rows_written, first.rows_quarantined) == (1, 5, 1)
    # A restarted bridge whose acks were lost gets cycles 4, 5 again along with new ones.
    again = committer()
    assert again.seq == 2  # from the S3 table's application transaction
    res = again.commit([_msg(_row("u1", i), acks) for i in (4, 5, 6)] + [_msg(_row("u2", 1), acks)])
    assert (res.rows_written, res.redelivered) == (2, 2)
    assert len(acks) == 10  # every message acknowledged: in the lake or in the quarantine
    assert lk.transaction_version(root, "stream", app_id="twinflow-bridge-b1", storage_options=so) == 2
    assert lk.table_contract(root, "stream", so) is not None
    out = again.compact()
    assert out.get("numFilesRemoved", 0) >= 2
    table = lk.read_lake(lk.snapshot(root, "stream", so), columns=["asset_id", "cycle"], storage_options=so)
    keys = sorted(zip(table.column("asset_id").to_pylist(), table.column("cycle").to_pylist()))
    assert keys == [("u1", i) for i in range(1, 7)] + [("u2", 1)]
    assert read_quarantine(str(tmp_path / "q"), "stream").num_rows == 1
