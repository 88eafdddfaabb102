"""RUL labels from life segments: failure-ended lives only; censored and running lives carry none."""

from __future__ import annotations

import numpy as np
import pandas as pd

from twinflow.contract import load_contract
from twinflow.tasks.features.labels import lives_frame, segment_labels, segment_targets
from twinflow.tasks.ingest.events import build_segments, parse_events


def us(ts: str) -> int:
    return int(pd.Timestamp(ts, tz="UTC").value // 1000)


def test_labels_follow_each_rows_own_life_in_hours():
    pumps = load_contract("pumps")
    extents = {"P1": (us("2026-01-01 00:00"), us("2026-01-01 09:00")), "P2": (us("2026-01-01"), us("2026-01-01 05:00"))}
    import pyarrow as pa

    log = pa.table({"machine": ["P1", "P1"], "ts": ["2026-01-01 03:00", "2026-01-01 06:00"],
                    "event": ["failure_seal", "replacement"]})
    events, _ = parse_events(log, pumps, "events.csv", extents)
    lives = lives_frame(build_segments(extents, events, pumps))
    times = pd.to_datetime(["2026-01-01 01:00", "2026-01-01 03:00", "2026-01-01 04:00", "2026-01-01 08:00",
                            "2026-01-01 02:00"], utc=True)
    keys = pd.DataFrame({"asset_id": ["P1", "P1", "P1", "P1", "P2"], "timestamp": times})
    rul = segment_labels(keys, lives, pumps.clock)
    # P1 fails at 03:00 (labels 2 h, 0 h), is then replaced at 06:00 (censored: no label), then runs on;
    # P2 never failed: no label at all. Nothing is labelled as if the last reading were a failure.
    assert rul[:2].tolist() == [2.0, 0.0]
    assert np.isnan(rul[2:]).all()
    capped = segment_labels(keys, lives, pumps.clock, rul_cap=1.5)
    assert capped[0] == 1.5
    # The lower bound is known in every life: P1's censored life ends at the replacement (06:00), its
    # running life and P2's at their last readings (09:00, 05:00); it equals the label where P1 failed.
    rul, lower = segment_targets(keys, lives, pumps.clock)
    assert np.array_equal(rul, segment_labels(keys, lives, pumps.clock), equal_nan=True)
    assert lower.tolist() == [2.0, 0.0, 2.0, 1.0, 3.0]


def test_run_to_failure_cycles_keep_the_classic_label():
    cmapss = load_contract("cmapss")
    lives = lives_frame(build_segments({"1": (1, 5)}, None, cmapss, {"1": "failure"}))
    keys = pd.DataFrame({"asset_id": ["1"] * 5, "cycle": np.arange(1, 6, dtype=np.int32)})
    assert segment_labels(keys, lives, cmapss.clock).tolist() == [4, 3, 2, 1, 0]
