"""The ingest flow on a real Prefect server and Dask cluster (the session fixtures), nothing mocked."""

from __future__ import annotations

import contextvars
import gzip
import threading
from pathlib import Path

import pytest

from twinflow import contracts as C
from twinflow.data import cmapss_dir, cmapss_path
from twinflow.errors import ConfigError
from twinflow.flows.ingest import IngestParams, ingest
from twinflow.tasks.ingest import read_lake, read_quarantine
import cmapss_names as CM

pytestmark = pytest.mark.integration

TRAIN_LINES = [line for line in gzip.decompress(cmapss_path("train_FD001.txt.gz").read_bytes()).decode()
               .splitlines() if line.strip()]


def _artifact_rows(flow_run_id, key: str) -> list[dict]:
    import json

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=[key]), flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    assert arts, f"no artifact {key} for flow run {flow_run_id}"
    data = arts[0].data
    return json.loads(data) if isinstance(data, str) else data


def test_bundled_fd001_lands_complete_and_a_rerun_adds_nothing(runtime):
    state = ingest(IngestParams(landing=str(cmapss_dir())), return_state=True)
    result = state.result()
    assert set(result.snapshots) == {"train_fd001", "test_fd001"}  # RUL_FD001 is a label file: excluded
    train = result.snapshots["train_fd001"]
    assert train.rows == 20631 and result.rows_quarantined == 0
    lake = read_lake(train)
    assert lake.num_rows == 20631 and len(set(lake.column(C.ASSET).to_pylist())) == 100
    assert lake.schema.equals(CM.telemetry_schema())
    assert result.snapshots["test_fd001"].rows == 13096
    assert read_quarantine(runtime.settings.quarantine_path).num_rows == 0
    assert all(b.conserved for b in result.batches)
    import polars as pl  # a reader of Delta tables that is not twinflow's

    assert pl.read_delta(train.dataset_path, version=train.version).height == 20631

    rows = _artifact_rows(state.state_details.flow_run_id, "ingest-batch-0")
    assert {r["status"] for r in rows} == {"ingested"} and sum(r["rows_written"] for r in rows) == 33727

    again = ingest(IngestParams(landing=str(cmapss_dir())))
    assert again.unchanged == 2 and again.batches == [] and again.rows_read == 0
    assert again.snapshots["train_fd001"].digest == train.digest
    assert again.snapshots["train_fd001"].batch_id == train.batch_id
    assert read_lake(again.snapshots["train_fd001"]).num_rows == 20631


def test_planted_faults_quarantine_exactly_the_planted_rows(runtime, tmp_path):
    lines = list(TRAIN_LINES)
    keys = {i: (lines[i].split()[0], int(lines[i].split()[1])) for i in (100, 300, 2000)}
    for i, col, value in [(100, 7, "abc"), (2000, 11, "-5000"), (5000, 1, "x")]:
        f = lines[i].split()
        f[col] = value
        lines[i] = " ".join(f)
    cut = " ".join(lines[9000].split()[:12])
    lines[9000] = cut
    lines.insert(302, lines[300])  # a duplicate row, in the same file as the original
    landing = tmp_path / "landing"
    landing.mkdir()
    half = len(lines) // 2
    (landing / "fleet_a.txt").write_text("\n".join(lines[:half]) + "\n")
    (landing / "fleet_b.txt").write_text("\n".join(lines[half:]) + "\n")
    (landing / "garbage.txt").write_bytes(b"1 1 \xff\xfe\n2 2 \xfa\n3 3 \xfb\n")

    # garbage.txt has no usable row: by default that fails the run (see the all-quarantined test); here
    # the documented switch only warns, so the rest of the accounting can be checked.
    result = ingest(IngestParams(landing=str(landing), dataset="planted", files_per_batch=1,
                                 fail_on_all_quarantined=False))
    assert len(result.warnings) == 1 and "garbage.txt" in result.warnings[0] and "UTF-8" in result.warnings[0]
    assert len(result.batches) == 3 and all(b.conserved for b in result.batches)
    assert result.rows_read == len(lines) + 3
    by_name = {Path(o.source).name: o for o in result.files}
    assert by_name["garbage.txt"].status == "quarantined" and "UTF-8" in by_name["garbage.txt"].reason
    assert result.rows_quarantined == 5 + 3

    quarantine = read_quarantine(runtime.settings.quarantine_path, "planted")
    assert quarantine.num_rows == 5  # the four planted rows and the duplicate, nothing else
    reasons = sorted(quarantine.column("reason").to_pylist())
    assert reasons[0].startswith("duplicate key")
    assert "expected 26 fields, got 12 (truncated line?)" in reasons
    assert "non-numeric value in cycle: 'x'" in reasons and "non-numeric value in s3: 'abc'" in reasons
    assert any(r.startswith("s7=-5000 outside valid range") for r in reasons)
    qkeys = set(zip(quarantine.column(C.ASSET).to_pylist(), quarantine.column(C.TIME).to_pylist()))
    assert set(keys.values()) <= qkeys
    assert cut in quarantine.column("raw").to_pylist()

    lake = read_lake(result.snapshots["planted"])
    assert lake.num_rows == result.rows_written == 20631 - 4
    lake_keys = list(zip(lake.column(C.ASSET).to_pylist(), lake.column(C.TIME).to_pylist()))
    assert len(set(lake_keys)) == len(lake_keys)
    assert keys[300] in set(lake_keys) and keys[100] not in set(lake_keys)


def test_missing_landing_path_fails_with_a_one_line_config_error(runtime, tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        ingest(IngestParams(landing=str(tmp_path / "missing")))


def test_two_ingest_runs_at_once_never_duplicate_rows(runtime, tmp_path):
    landing = tmp_path / "landing"
    landing.mkdir()
    for k in range(4):
        (landing / f"part{k}.txt").write_text("\n".join(TRAIN_LINES[k * 500:(k + 1) * 500]) + "\n")
    results, errors = [], []

    def run() -> None:
        try:
            results.append(ingest(IngestParams(landing=str(landing), dataset="race", files_per_batch=2)))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    # Each thread runs in a copy of this context, which holds the Prefect settings (API URL).
    threads = [threading.Thread(target=contextvars.copy_context().run, args=(run,)) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert sorted(r.rows_written for r in results) == [0, 2000]
    lake = read_lake(results[0].snapshots["race"])
    keys = list(zip(lake.column(C.ASSET).to_pylist(), lake.column(C.TIME).to_pylist()))
    assert len(keys) == 2000 == len(set(keys))


PUMP_HEADER = ('ts,machine,speed [rpm],load [%],inlet_temp_c,outlet_temp_c,"casing_temp [degC]",'
               "bearing_temp [degC],discharge_pressure_bar,flow [m3/h],vibration [mm/s],motor_current [A]")


def _pump_rows(machine: str, n: int, pressure: float) -> str:
    rows = [f"2026-01-01T{m // 6:02d}:{m % 6}0:00Z,{machine},2950,80,20,25,40,50,{pressure},210,2.1,120"
            for m in range(n)]
    return "\n".join([PUMP_HEADER, *rows]) + "\n"


def test_a_pump_fleet_ingests_by_its_contract_and_an_all_quarantined_run_fails(runtime, tmp_path):
    from twinflow.tasks.ingest.run import NothingWritten

    landing = tmp_path / "landing"
    landing.mkdir()
    (landing / "pumps_2026-01-01.csv").write_text(_pump_rows("P-1", 12, 12.5))
    (landing / "events.csv").write_text("ts,machine,event\n2026-01-01T00:20:00Z,P-1,inspection\n")
    result = ingest(IngestParams(landing=str(landing), contract="pumps"))
    assert [o.dataset for o in result.files] == ["pumps"] and result.rows_written == 12
    assert [Path(p).name for p in result.skipped] == ["events.csv"]
    snap = result.snapshots["pumps"]
    assert snap.contract is not None and snap.contract.name == "pumps"
    assert read_lake(snap).column("timestamp").null_count == 0
    # The skipped event log is read as events, not telemetry: one neutral event, one running life.
    assert [(e.dataset, e.rows_accepted, e.rows_quarantined) for e in result.events] == [("pumps", 1, 0)]
    assert snap.segments is not None

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "pumps_2026-01-02.csv").write_text(_pump_rows("P-2", 6, 83.4))
    with pytest.raises(NothingWritten, match=r"the run wrote nothing: all 6 rows of 1 file\(s\) \(pumps_2026-01-02.csv\) "
                                             r"were quarantined; top reasons: discharge_pressure_bar outside valid "
                                             r"range \[0, 40\] bar x6"):
        ingest(IngestParams(landing=str(bad), contract="pumps", dataset="bad"))
    # Committed before failing: the quarantine holds every row with its reason, and a re-run has nothing new.
    assert read_quarantine(runtime.settings.quarantine_path, "bad").num_rows == 6
    warned = ingest(IngestParams(landing=str(bad), contract="pumps", dataset="bad", fail_on_all_quarantined=False))
    assert warned.unchanged == 1 and warned.warnings == []
    (bad / "pumps_2026-01-03.csv").write_text(_pump_rows("P-3", 3, 99.0))
    warned = ingest(IngestParams(landing=str(bad), contract="pumps", dataset="bad", fail_on_all_quarantined=False))
    assert warned.rows_written == 0 and warned.warnings[0].startswith("the run wrote nothing: all 3 rows")


def test_an_event_log_splits_lives_quarantines_bad_events_and_a_rerun_adds_nothing(runtime, tmp_path):
    """Telemetry + a maintenance log (no truth file): lives end in failure, renewal or still running."""
    from twinflow import lake

    landing = tmp_path / "landing"
    landing.mkdir()
    (landing / "pumps_2026-01-01.csv").write_text(
        _pump_rows("P-1", 18, 12.5) + _pump_rows("P-2", 12, 12.5).split("\n", 1)[1])
    (landing / "events.csv").write_text("\n".join([
        "ts,machine,event,work_order,text",
        "2026-01-01T01:00:00Z,P-1,failure_bearing,WO-1,seized",
        "2026-01-01T02:00:00Z,P-1,replacement,WO-2,",
        "2026-01-01T01:00:00Z,P-2,oil_change,WO-3,",       # not in the vocabulary
        "2026-01-01T01:00:00Z,P-9,inspection,WO-4,",       # no telemetry
        "2026-01-01T01:30:00Z,P-2,inspection,WO-5,",
    ]) + "\n")
    first = ingest(IngestParams(landing=str(landing), contract="pumps"))
    (log,) = first.events
    assert (log.rows_read, log.rows_accepted, log.rows_quarantined) == (5, 3, 2)
    root = runtime.settings.lake_path
    segments = lake.read_table(root, "pumps__segments", version=first.snapshots["pumps"].segments)
    lives = sorted((r["asset_id"], r["segment"], r["end_reason"], r["duration"]) for r in segments.to_pylist())
    # P-1: 00:00..01:00 failed (1 h), then 01:00..02:00 replaced (1 h), then running to 02:50.
    assert lives == [("P-1", 0, "failure", 1.0), ("P-1", 1, "censored", 1.0), ("P-1", 2, "running", 50 / 60),
                     ("P-2", 0, "running", 110 / 60)]
    quarantined = read_quarantine(runtime.settings.quarantine_path, "pumps__events")
    assert sorted(quarantined.column("reason").to_pylist()) == [
        "unknown asset 'P-9': no telemetry of it",
        "unknown event type 'oil_change' (the contract declares failure_bearing, failure_seal, replacement, "
        "overhaul, inspection, lubrication)"]
    again = ingest(IngestParams(landing=str(landing), contract="pumps"))
    assert again.unchanged == 1 and again.events[0].rows_accepted == 3
    assert lake.read_table(root, "pumps__events").num_rows == 3
    assert read_quarantine(runtime.settings.quarantine_path, "pumps__events").num_rows == 2
    assert again.snapshots["pumps"].segments == first.snapshots["pumps"].segments  # nothing changed
