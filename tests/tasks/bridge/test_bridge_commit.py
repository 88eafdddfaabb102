"""Micro-batch commit: contract checks and quarantine with raw bytes, redelivery dedupe, sequence on restart."""

from __future__ import annotations

import base64
import json

from twinflow import lake as lk
from twinflow.tasks.bridge.buffer import Message
from twinflow.tasks.bridge.commit import Committer
from twinflow.tasks.bridge.decode import DecodeError, decode_json
from twinflow.tasks.ingest.quarantine import read_quarantine


def _msg(payload: bytes, acks: list) -> Message:
    try:
        rows, err = decode_json(payload), None
    except DecodeError as exc:
        rows, err = [], str(exc)
    return Message(source="mqtt://test/t", raw=payload, rows=rows, error=err, ack=lambda: acks.append(payload))


def _row(asset: str, cycle: int, s2: float = 642.0) -> bytes:
    return json.dumps({"asset_id": asset, "cycle": cycle, "s2": s2, "s3": 1590.0}).encode()


def _committer(tmp_path) -> Committer:
    return Committer(str(tmp_path / "lake"), str(tmp_path / "q"), "stream", "b1", "twinflow-bridge-b1")


def _keys(tmp_path) -> list[tuple[str, int]]:
    t = lk.read_lake(lk.snapshot(str(tmp_path / "lake"), "stream"), columns=["asset_id", "cycle"])
    return list(zip(t.column("asset_id").to_pylist(), t.column("cycle").to_pylist()))


def test_bad_payloads_are_quarantined_with_reason_and_raw_bytes(tmp_path):
    acks: list = []
    bad_json = b"\xff{not json"
    out_of_range = _row("u1", 2, s2=9999.0)
    msgs = [_msg(_row("u1", 1), acks), _msg(bad_json, acks), _msg(out_of_range, acks),
            _msg(b'{"asset_id": "u1"}', acks)]
    res = _committer(tmp_path).commit(msgs)
    assert (res.rows_written, res.rows_quarantined) == (1, 3)
    assert len(acks) == 4  # every message is accounted for: in the lake or in the quarantine
    q = read_quarantine(str(tmp_path / "q"), "stream").to_pylist()
    by_raw = {base64.b64decode(r["raw"].removeprefix("base64:")): r["reason"] for r in q}
    assert by_raw[bad_json].startswith("invalid JSON")
    assert "s2=9999 outside valid range" in by_raw[out_of_range]
    assert by_raw[b'{"asset_id": "u1"}'] == "missing cycle"
    assert _keys(tmp_path) == [("u1", 1)]


def test_redelivered_rows_are_dropped_and_sequence_survives_restart(tmp_path):
    acks: list = []
    c = _committer(tmp_path)
    first = c.commit([_msg(_row("u1", i), acks) for i in range(1, 6)])
    assert (first.seq, first.rows_written) == (1, 5)
    # A restart whose acks were lost: the broker sends cycles 4, 5 again (twice, even) with new ones.
    c2 = _committer(tmp_path)
    assert c2.seq == 2  # continues from the table's application transaction
    again = c2.commit([_msg(_row("u1", i), acks) for i in (4, 5, 5, 6, 7)] + [_msg(_row("u2", 1), acks)])
    assert (again.rows_written, again.redelivered, again.rows_quarantined) == (3, 3, 0)
    assert lk.transaction_version(str(tmp_path / "lake"), "stream", app_id="twinflow-bridge-b1") == 2
    assert sorted(_keys(tmp_path)) == [("u1", i) for i in range(1, 8)] + [("u2", 1)]


def test_conflicting_duplicate_in_one_batch_is_quarantined(tmp_path):
    acks: list = []
    res = _committer(tmp_path).commit([_msg(_row("u1", 1, 642.0), acks), _msg(_row("u1", 1, 643.0), acks)])
    assert (res.rows_written, res.rows_quarantined) == (1, 1)
    q = read_quarantine(str(tmp_path / "q"), "stream").to_pylist()
    assert q[0]["reason"].startswith("duplicate key") and b"643.0" in base64.b64decode(q[0]["raw"][7:])



def _recent_answers_as_the_files(tmp_path, rows: int) -> None:
    snap = lk.snapshot(str(tmp_path / "lake"), "stream")
    cols = ["asset_id", "cycle", "s2", "s3"]
    got, got_ext = lk.read_recent_table(snap, rows, cols)  # raises RecentUnavailable when stale
    want, want_ext = lk.read_recent(snap, rows, cols)
    assert got.equals(want), (got.to_pandas(), want.to_pandas())
    assert got_ext.equals(want_ext)


def test_each_commit_and_compaction_keeps_the_recent_rows_table_current(tmp_path):
    acks: list = []
    root = str(tmp_path / "lake")
    c = Committer(root, str(tmp_path / "q"), "stream", "b1", "twinflow-bridge-b1", recent_rows=4)
    c.commit([_msg(_row("u1", i, 630.0 + i), acks) for i in range(10, 13)])  # builds it: no table yet
    _recent_answers_as_the_files(tmp_path, 4)
    c.commit([_msg(_row("u1", i, 630.0 + i), acks) for i in (13, 14, 15)] + [_msg(_row("u2", 9), acks)])
    # A later batch whose rows are older than u1's tail: merged by time, still nothing read from files.
    c.commit([_msg(_row("u1", i), acks) for i in (1, 2)] + [_msg(_row("u2", 10), acks)])
    last = lk.history(root, lk.derived_name("stream", lk.RECENT), limit=1)[0]
    assert (last["twinflow.recent_assets_read"], last["twinflow.recent_assets_from_tails"]) == ("0", "2")
    assert last["twinflow.telemetry_version"] == str(lk.version(root, "stream"))
    _recent_answers_as_the_files(tmp_path, 4)
    recent, ext = lk.read_recent_table(lk.snapshot(root, "stream"), 4, ["asset_id", "cycle"])
    assert recent.column("cycle").to_pylist() == [12, 13, 14, 15, 9, 10]
    assert ext.column("readings").to_pylist() == [8, 2]

    # Compaction rewrites files, not rows: the table is re-tagged, not called stale.
    before = lk.version(root, "stream")
    c.compact()
    assert lk.version(root, "stream") > before
    assert lk.history(root, "stream", limit=1)[0]["operation"] == "OPTIMIZE"
    _recent_answers_as_the_files(tmp_path, 4)
    c.commit([_msg(_row("u2", 11), acks)])  # and the next commit merges onto the re-tagged table
    last = lk.history(root, lk.derived_name("stream", lk.RECENT), limit=1)[0]
    assert (last["twinflow.recent_assets_read"], last["twinflow.recent_assets_from_tails"]) == ("0", "1")
    _recent_answers_as_the_files(tmp_path, 4)


def test_a_bridge_without_a_window_keeps_the_recent_tables_own(tmp_path):
    acks: list = []
    root = str(tmp_path / "lake")
    c = _committer(tmp_path)
    c.commit([_msg(_row("u1", i), acks) for i in range(1, 9)])
    recent = lk.derived_name("stream", lk.RECENT)
    assert lk.history(root, recent, limit=1)[0]["twinflow.recent_rows"] == "131"  # health's default
    lk.refresh_recent(root, "stream", 6)  # an ingest with the pipeline's own window
    c2 = _committer(tmp_path)
    c2.commit([_msg(_row("u1", i), acks) for i in range(9, 12)])
    last = lk.history(root, recent, limit=1)[0]
    assert (last["twinflow.recent_rows"], last["twinflow.recent_assets_read"]) == ("6", "0")
    _recent_answers_as_the_files(tmp_path, 6)
