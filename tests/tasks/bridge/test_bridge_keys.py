"""Dedupe lookups read only the files that can hold a batch's keys; compaction is bounded by files too."""

from __future__ import annotations

import json

import pyarrow as pa

from twinflow import lake as lk
from twinflow.tasks.bridge.buffer import Message
from twinflow.tasks.bridge.commit import Committer, existing_keys
from twinflow.tasks.bridge.decode import decode_json


def _batch(asset_cycles: list[tuple[str, int]]) -> list[Message]:
    out = []
    for a, c in asset_cycles:
        raw = json.dumps({"asset_id": a, "cycle": c, "s2": 642.0, "s3": 1590.0}).encode()
        out.append(Message(source="mqtt://test/t", raw=raw, rows=decode_json(raw), error=None, ack=None))
    return out


def _keys(pairs: list[tuple[str, int]]) -> pa.Table:
    return pa.table({"asset_id": [a for a, _ in pairs], "cycle": pa.array([c for _, c in pairs], pa.int64())})


def test_files_for_keys_selects_by_asset_and_cycle_range_and_misses_nothing(tmp_path):
    lake = str(tmp_path / "lake")
    c = Committer(lake, str(tmp_path / "q"), "stream", "b1", "app-b1")
    for start in (1, 11, 21):  # three commits: one file per asset each, cycles 1-10, 11-20, 21-30
        c.commit(_batch([(a, cyc) for a in ("u1", "u2") for cyc in range(start, start + 10)]))
    assert len(lk.files_for_keys(lake, "stream", _keys([("u1", 1), ("u2", 30)]))) == 2
    one = lk.files_for_keys(lake, "stream", _keys([("u1", 15)]))
    assert len(one) == 1 and "u1" in one[0]
    assert lk.files_for_keys(lake, "stream", _keys([("u1", 31), ("u3", 5)])) == []
    assert existing_keys(lake, "stream", _keys([("u1", 15), ("u1", 31), ("u2", 21)])) == {("u1", 15), ("u2", 21)}
    # After compaction (files now span cycles 1-30) the same keys are still found.
    lk.optimize(lake, "stream")
    assert existing_keys(lake, "stream", _keys([("u1", 15), ("u1", 31), ("u2", 21)])) == {("u1", 15), ("u2", 21)}
    # A redelivered batch writes nothing new.
    again = c.commit(_batch([("u1", 5), ("u2", 25), ("u2", 31)]))
    assert (again.rows_written, again.redelivered) == (1, 2)


def test_compaction_runs_once_enough_files_were_added(tmp_path):
    lake = str(tmp_path / "lake")
    c = Committer(lake, str(tmp_path / "q"), "stream", "b1", "app-b1", compact_every=0, compact_files=6)
    for start in (1, 3):  # 2 commits x 3 assets = 6 files: the bound is reached
        c.commit(_batch([(a, cyc) for a in ("u1", "u2", "u3") for cyc in (start, start + 1)]))
    ops = [h.get("operation") for h in lk.history(lake, "stream")]
    assert ops.count("OPTIMIZE") == 1, ops
    assert c.files_since_compact == 0
    assert sum(len(v) for v in lk.list_files(lk.snapshot(lake, "stream")).values()) == 3  # one per asset
