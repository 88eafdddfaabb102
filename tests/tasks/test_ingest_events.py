"""Event logs through the contract, and life segments: every log row is accepted or quarantined with a
reason, and histories split at renewals into failure / censored / running lives in the clock's unit."""

from __future__ import annotations

import pandas as pd
import pyarrow as pa
import pytest

from twinflow.contract import load_contract
from twinflow.errors import ConfigError
from twinflow.tasks.ingest.events import build_segments, parse_events


def us(ts: str) -> int:
    return int(pd.Timestamp(ts, tz="UTC").value // 1000)


@pytest.fixture
def pumps():
    return load_contract("pumps")


def log(rows):
    return pa.table({k: [r[i] for r in rows] for i, k in enumerate(["machine", "ts", "event", "work_order", "text"])})


EXTENTS = {"P1": (us("2026-01-01"), us("2026-03-01")), "P2": (us("2026-01-01"), us("2026-02-01"))}


def test_bad_event_rows_are_quarantined_with_reasons_and_nothing_is_lost(pumps):
    raw = log([
        ["P1", "2026-01-10 08:00", "failure_bearing", "WO-1", "bearing seized"],
        ["P1", "2026-01-10 08:00", "failure_bearing", "WO-1", "same row twice"],
        ["P1", "2026-01-20T00:00:00Z", "replacement", "WO-2", ""],
        ["P1", "2026-01-21", "oil_change", "WO-3", ""],        # not in the vocabulary
        ["P9", "2026-01-21", "inspection", "WO-4", ""],        # no telemetry of P9
        ["P2", "not a time", "inspection", "WO-5", ""],
        ["P2", "2027-01-01", "failure_seal", "WO-6", ""],      # after P2's telemetry
        ["", "2026-01-05", "inspection", "WO-7", ""],
        ["P2", "2026-01-15", "lubrication", None, None],
    ])
    events, quarantined = parse_events(raw, pumps, "events.csv", EXTENTS)
    assert events.num_rows + quarantined.num_rows == raw.num_rows
    reasons = dict(zip(quarantined.column("record").to_pylist(), quarantined.column("reason").to_pylist()))
    assert reasons[1] == "duplicate event"
    assert reasons[3].startswith("unknown event type 'oil_change'")
    assert reasons[4] == "unknown asset 'P9': no telemetry of it"
    assert reasons[5].startswith("unparseable event time")
    assert reasons[6] == "event time outside the asset's telemetry"
    assert reasons[7] == "missing asset id"
    assert events.column("meaning").to_pylist() == ["failure", "renewal", "neutral"]
    assert events.column("failure_mode").to_pylist() == ["failure_bearing", None, None]
    # Naive times are the contract's timezone (UTC here), stored as UTC.
    assert events.column("timestamp")[0].as_py() == pd.Timestamp("2026-01-10 08:00", tz="UTC")
    assert "P9" in quarantined.column("raw")[quarantined.column("record").to_pylist().index(4)].as_py()


def test_a_log_without_a_declared_column_or_a_contract_without_events_is_a_clear_error(pumps):
    with pytest.raises(ConfigError, match="lacks the event type column 'event'"):
        parse_events(pa.table({"machine": ["P1"], "ts": ["2026-01-02"]}), pumps, "e.csv")
    with pytest.raises(ConfigError, match="declares no event log"):
        parse_events(pa.table({"x": [1]}), load_contract("cmapss"), "e.csv")


def test_segments_split_at_failures_and_renewals_in_hours(pumps):
    raw = log([["P1", "2026-01-11", "failure_bearing", "WO-1", ""],
               ["P1", "2026-01-21", "replacement", "WO-2", ""],
               ["P1", "2026-01-25", "inspection", "WO-3", ""]])
    events, _ = parse_events(raw, pumps, "events.csv", EXTENTS)
    seg = build_segments(EXTENTS, events, pumps).to_pylist()
    p1 = [s for s in seg if s["asset_id"] == "P1"]
    assert [s["end_reason"] for s in p1] == ["failure", "censored", "running"]
    assert [s["duration"] for s in p1] == [240.0, 240.0, (10 + 29) * 24.0]  # hours, neutral events ignored
    assert p1[0]["failure_mode"] == "failure_bearing"
    p2 = [s for s in seg if s["asset_id"] == "P2"]  # no events: one running life
    assert [(s["end_reason"], s["duration"]) for s in p2] == [("running", 31 * 24.0)]


def test_run_to_failure_records_end_in_failure_and_count_cycles_like_cmapss():
    cmapss = load_contract("cmapss")
    seg = build_segments({"1": (1, 192), "2": (1, 31)}, None, cmapss, {"1": "failure"}).to_pylist()
    assert [(s["asset_id"], s["end_reason"], s["duration"]) for s in seg] == [("1", "failure", 192.0),
                                                                            ("2", "running", 31.0)]


def test_rows_in_lives_assigns_each_row_its_own_life_or_none(pumps):
    from twinflow.tasks.ingest.events import rows_in_lives

    events, _ = parse_events(log([["P1", "2026-01-10", "failure_seal", "", ""],
                                  ["P1", "2026-02-01", "replacement", "", ""]]), pumps, "events.csv", EXTENTS)
    segments = build_segments(EXTENTS, events, pumps)
    # Out of order on purpose: the result is aligned with the input rows, not sorted.
    keys = pd.DataFrame({"asset_id": ["P1", "P2", "P1", "P1", "P1", "P3"],
                         "timestamp": pd.to_datetime(["2026-01-20", "2026-01-05", "2026-01-10", "2026-01-02",
                                                      "2026-02-15", "2026-01-05"], utc=True)})
    where = rows_in_lives(keys, segments, pumps.clock)
    assert where["segment"].tolist() == [1, 0, 0, 0, 2, -1]
    assert where["end_reason"].tolist() == ["censored", "running", "failure", "failure", "running", None]
    assert where["end"].iloc[2] == us("2026-01-10") and where["t"].iloc[3] == us("2026-01-02")
    # A row after a life's end and before the next life's start belongs to no life.
    cmapss = load_contract("cmapss")
    lives = pd.DataFrame({"asset_id": ["7", "7"], "segment": [0, 1], "start": [1, 8], "end": [5, 10],
                          "end_reason": ["failure", "running"]})
    gap = pd.DataFrame({"asset_id": ["7"] * 4, cmapss.key: [5, 6, 8, 11]})
    assert rows_in_lives(gap, lives, cmapss.clock)["segment"].tolist() == [0, -1, 1, -1]
    # The same assignment from the lives frame the features ship to their jobs.
    from twinflow.tasks.features.labels import lives_frame

    assert rows_in_lives(keys, lives_frame(segments), pumps.clock)["segment"].tolist() == [1, 0, 0, 0, 2, -1]


@pytest.mark.parametrize("key_limit", [None, 0])  # 0: the per-asset search, for (asset, time) keys past int64
def test_rows_in_lives_matches_a_row_by_row_reference(pumps, monkeypatch, key_limit):
    import numpy as np

    from twinflow.tasks.ingest import events

    if key_limit is not None:
        monkeypatch.setattr(events, "_KEY_LIMIT", key_limit)
    rng = np.random.default_rng(4)
    hour = 3_600_000_000
    t0 = us("2026-01-01")
    lives, keys = [], []
    for a in range(25):
        cuts = np.sort(rng.choice(np.arange(1, 400), size=2 * int(rng.integers(0, 5)), replace=False))
        lives += [(f"P{a}", k // 2, t0 + int(cuts[k]) * hour, t0 + int(cuts[k + 1]) * hour,
                   ("failure", "censored", "running")[k % 3]) for k in range(0, len(cuts), 2)]
        keys += [(f"P{a}", t0 + int(h) * hour) for h in rng.choice(np.arange(0, 420), size=60, replace=False)]
    keys += [("P99", t0), (None, t0 + hour)]  # an asset without lives, a row without an asset
    lives = pd.DataFrame(lives, columns=["asset_id", "segment", "start", "end", "end_reason"])
    keys = pd.DataFrame(keys, columns=["asset_id", "t"]).sample(frac=1, random_state=1).reset_index(drop=True)
    keys["timestamp"] = pd.to_datetime(keys.t, unit="us", utc=True)

    def reference(asset, t):
        mine = lives[(lives.asset_id == asset) & (lives.start <= t)]
        if mine.empty:
            return -1, None
        life = mine.loc[mine.start.idxmax()]
        return (int(life.segment), life.end_reason) if t <= life.end else (-1, None)

    where = events.rows_in_lives(keys[["asset_id", "timestamp"]], lives, pumps.clock)
    expected = [reference(a, t) for a, t in zip(keys.asset_id, keys.t)]
    assert where["segment"].tolist() == [e[0] for e in expected]
    assert where["end_reason"].tolist() == [e[1] for e in expected]
    # Keys as the features stage reads them: Arrow-backed columns from several record batches.
    table = pa.Table.from_pandas(keys[["asset_id", "timestamp"]], preserve_index=False)
    chunked = pa.concat_tables([table.slice(0, 500), table.slice(500)])
    arrow_keys = chunked.to_pandas(types_mapper=pd.ArrowDtype)
    assert events.rows_in_lives(arrow_keys, lives, pumps.clock)["segment"].tolist() == [e[0] for e in expected]
    assert (where["segment"] >= 0).sum() > 100 and (where["segment"] < 0).sum() > 100  # both cases occur
