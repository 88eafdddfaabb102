"""Ingest driven by the fleet contract: a pump fleet's timestamped CSV exports, file routing, contract
changes that re-validate only what they affect, a table of another contract refused, and the dry run
(``twinflow contract check``)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest

from twinflow import contracts as C
from twinflow import lake as lk
from twinflow.contract import dump_contract, load_contract
from twinflow.errors import ConfigError
from twinflow.tasks.ingest import IngestParams, Ledger, read_lake, read_quarantine, run_local
from twinflow.tasks.ingest.run import all_quarantined, ingest_sequence, process_files

HEADER = ('ts,machine,speed [rpm],load [%],inlet_temp_c,outlet_temp_c,"casing_temp [degC]",bearing_temp [degC],'
          "discharge_pressure_bar,flow [m3/h],vibration [mm/s],motor_current [A]")
VALUES = "2950,80,20.1,25.2,40.0,50.1,12.3,210,2.1,120"


def _row(ts: str, machine: str, pressure: str = "12.3", values: str = VALUES) -> str:
    v = values.split(",")
    v[6] = pressure
    return ",".join([ts, machine, *v])


def _write(path: Path, rows: list[str], header: str = HEADER) -> Path:
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


def _sequence(params: IngestParams, root: Path, batch: str):
    """The ingest sequence in this process (as run_local), returning the whole run (skipped files too)."""
    quarantine = root / "q"

    def sequential(batches, staging):
        out = []
        for b in batches:
            out.extend(process_files(b, params, staging, quarantine, batch, {}))
        return out, []

    return ingest_sequence(params, str(root / "lake"), str(quarantine), batch, sequential)


@pytest.fixture
def berlin(tmp_path) -> Path:
    """The bundled pumps contract with its naive timestamps in Berlin time (UTC+1 in January)."""
    pumps = load_contract("pumps")
    path = tmp_path / "berlin.yaml"
    dump_contract(pumps.model_copy(update={"clock": pumps.clock.model_copy(update={"timezone": "Europe/Berlin"})}),
                  path)
    return path


def test_a_pump_fleet_of_timestamped_csv_exports_lands_in_the_lake(tmp_path, berlin):
    landing = tmp_path / "landing"
    landing.mkdir()
    _write(landing / "pumps_2026-01-01.csv", [
        _row("2026-01-01T00:00:00Z", "P-101"),
        _row("2026-01-01T00:10:00Z", "P-101"),
        _row("2026-01-01T00:10:00Z", "P-101"),              # duplicate key
        _row("2026-01-01T00:40:00Z", "P-101"),              # a 30-minute gap: not filled
        _row("2026-01-01T00:30:00Z", "P-101"),              # out of order: kept, flagged
        _row("2026-01-01T00:50:00Z", "P-101", "83.4"),      # out of range
        _row("2026-01-01 02:00:00", "P-102"),               # no offset: Berlin time
        _row("2026-01-01T01:10:00+00:00", "P-102"),
        _row("not a time", "P-102"),                        # unparseable
    ])
    (landing / "events.csv").write_text("ts,machine,event\n2026-01-01T00:20:00Z,P-101,inspection\n")
    (landing / "notes.txt").write_text("shift handover: P-101 noisy\n")

    run = _sequence(IngestParams(landing=str(landing), contract=str(berlin)), tmp_path, "b1")
    (o,) = run.outcomes
    assert o.dataset == "pumps" and o.status == "ingested" and o.conserved
    assert (o.rows_read, o.rows_written, o.rows_quarantined) == (9, 6, 3)
    # The event log and the stray note are skipped with why, never parsed as telemetry.
    skipped = {Path(p).name: why for p, why in run.skipped.items()}
    assert set(skipped) == {"events.csv", "notes.txt"}
    assert "events file" in skipped["events.csv"] and "not telemetry" in skipped["events.csv"]
    assert "no datasets rule" in skipped["notes.txt"] and "'pumps'" in skipped["notes.txt"]

    snap = run.snapshots["pumps"]
    assert snap.contract is not None and snap.contract.name == "pumps"
    assert snap.contract.clock.timezone == "Europe/Berlin"
    lake = read_lake(snap)
    assert "cycle" not in lake.column_names and lake.schema.field("timestamp").type == pa.timestamp("us", tz="UTC")
    times = {(a, t.strftime("%H:%M")) for a, t in zip(lake.column("asset_id").to_pylist(),
                                                       lake.column("timestamp").to_pylist())}
    assert times == {("P-101", "00:00"), ("P-101", "00:10"), ("P-101", "00:30"), ("P-101", "00:40"),
                     ("P-102", "01:00"), ("P-102", "01:10")}  # 02:00 Berlin = 01:00 UTC; no filled gap
    assert lake.column("casing_temp_c").to_pylist()[0] == 40.0  # "casing_temp [degC]" found its channel
    q = dict(zip(lake.column("timestamp").to_pylist(), lake.column("quality").to_pylist()))
    flagged = [t.strftime("%H:%M") for t, v in q.items() if v & C.Quality.OUT_OF_ORDER]
    assert flagged == ["00:30"]

    reasons = sorted(read_quarantine(str(tmp_path / "q"), "pumps").column("reason").to_pylist())
    assert reasons == [
        "discharge_pressure_bar=83.4 outside valid range [0, 40] bar",
        "duplicate key (asset_id=P-101, timestamp=2026-01-01T00:10:00Z): first seen at record 1",
        "unparseable timestamp: 'not a time'",
    ]
    # A re-run reads nothing again.
    again = _sequence(IngestParams(landing=str(landing), contract=str(berlin)), tmp_path, "b2")
    assert again.outcomes == [] and again.unchanged == 1


def test_clock_rules_quarantine_out_of_order_rows_and_keep_the_last_duplicate(tmp_path):
    pumps = load_contract("pumps")
    strict = pumps.model_copy(update={"clock": pumps.clock.model_copy(update={"out_of_order": "quarantine",
                                                                              "duplicates": "keep_last"})})
    path = tmp_path / "strict.yaml"
    dump_contract(strict, path)
    landing = tmp_path / "landing"
    landing.mkdir()
    _write(landing / "pumps_a.csv", [
        _row("2026-01-01T00:00:00Z", "P-1"),
        _row("2026-01-01T00:20:00Z", "P-1", "10"),
        _row("2026-01-01T00:20:00Z", "P-1", "11"),  # the last of the key wins
        _row("2026-01-01T00:10:00Z", "P-1"),        # went back: quarantined
    ])
    (o,) = run_local(IngestParams(landing=str(landing), contract=str(path)), str(tmp_path / "lake"),
                     str(tmp_path / "q"), "b1")
    assert (o.rows_read, o.rows_written, o.rows_quarantined) == (4, 2, 2)
    lake = read_lake(lk.latest_snapshot(str(tmp_path / "lake"), "pumps"))
    assert lake.column("discharge_pressure_bar").to_pylist() == [12.3, 11.0]
    reasons = sorted(read_quarantine(str(tmp_path / "q"), "pumps").column("reason").to_pylist())
    assert reasons[0] == "duplicate key (asset_id=P-1, timestamp=2026-01-01T00:20:00Z): superseded by record 2"
    assert reasons[1] == ("out of order: timestamp=2026-01-01T00:10:00Z after 2026-01-01T00:20:00Z of the "
                          "same asset in this file")


def test_a_changed_range_re_validates_only_the_files_carrying_that_channel(tmp_path):
    pumps = load_contract("pumps")
    landing = tmp_path / "landing"
    landing.mkdir()
    # A plant whose exports carry channel subsets: one file per sensor group.
    _write(landing / "pumps_vib.csv", ["2026-01-01T00:00:00Z,P-1,2.5", "2026-01-01T00:10:00Z,P-1,45"],
           header="ts,machine,vibration [mm/s]")
    _write(landing / "pumps_temp.csv", ["2026-01-01T00:00:00Z,P-2,50", "2026-01-01T00:10:00Z,P-2,51"],
           header="ts,machine,bearing_temp [degC]")
    v1 = tmp_path / "v1.yaml"
    dump_contract(pumps, v1)
    params = dict(landing=str(landing), allow_missing_channels=True)
    first = run_local(IngestParams(**params, contract=str(v1)), str(tmp_path / "lake"), str(tmp_path / "q"), "b1")
    assert sorted((Path(o.source).name, o.rows_written) for o in first) == [("pumps_temp.csv", 2),
                                                                            ("pumps_vib.csv", 2)]
    assert all("missing channels stored as null" in o.notes[0] for o in first)

    narrow = [c.model_copy(update={"range": (0.0, 40.0)}) if c.name == "vibration_mm_s" else c
              for c in pumps.channels]
    v2 = tmp_path / "v2.yaml"
    dump_contract(pumps.model_copy(update={"version": 2, "channels": narrow}), v2)
    second = run_local(IngestParams(**params, contract=str(v2)), str(tmp_path / "lake"), str(tmp_path / "q"), "b2")
    assert [Path(o.source).name for o in second] == ["pumps_vib.csv"]  # the temperature file is not read
    (o,) = second
    assert (o.rows_written, o.rows_quarantined) == (1, 1)
    assert read_quarantine(str(tmp_path / "q"), "pumps").column("reason").to_pylist() == [
        "vibration_mm_s=45 outside valid range [0, 40] mm/s"]
    assert read_lake(lk.latest_snapshot(str(tmp_path / "lake"), "pumps")).num_rows == 3


def test_a_dataset_of_another_contract_is_refused_before_anything_is_written(tmp_path):
    landing = tmp_path / "landing"
    landing.mkdir()
    _write(landing / "pumps_a.csv", [_row("2026-01-01T00:00:00Z", "P-1")])
    lake_path, q = str(tmp_path / "lake"), str(tmp_path / "q")
    run_local(IngestParams(landing=str(landing), contract="pumps", dataset="fleet"), lake_path, q, "b1")
    version = lk.version(lake_path, "fleet")

    other = tmp_path / "cmapss"
    other.mkdir()
    (other / "train.txt").write_text("1 1 0 0 100 " + " ".join(["500"] * 21) + "\n")
    with pytest.raises(ConfigError, match="holds data of fleet contract 'pumps'"):
        run_local(IngestParams(landing=str(other), contract="cmapss", dataset="fleet"), lake_path, q, "b2")
    assert lk.version(lake_path, "fleet") == version
    assert lk.table_contract(lake_path, "fleet").name == "pumps"
    ledger = Ledger(Path(lake_path))
    try:
        assert [Path(s).name for s in ledger.files()] == ["pumps_a.csv"]  # nothing recorded: nothing lost
    finally:
        ledger.close()
    assert not (Path(q) / "rows" / "dataset=fleet").exists() or \
        read_quarantine(q, "fleet").num_rows == 0


def test_an_event_log_is_never_telemetry_even_when_include_names_it(tmp_path):
    landing = tmp_path / "landing"
    landing.mkdir()
    _write(landing / "events_2026.csv", [_row("2026-01-01T00:00:00Z", "P-1")])  # looks like telemetry
    run = _sequence(IngestParams(landing=str(landing), contract="pumps", include=["*.csv"]), tmp_path, "b1")
    assert run.outcomes == [] and "events file" in next(iter(run.skipped.values()))


def test_all_quarantined_names_the_files_and_top_reasons(tmp_path):
    landing = tmp_path / "landing"
    landing.mkdir()
    _write(landing / "pumps_bad.csv", [_row(f"2026-01-01T00:{m}0:00Z", "P-1", "99") for m in range(5)])
    _write(landing / "pumps_good.csv", [_row("2026-01-01T00:00:00Z", "P-2")])
    outcomes = run_local(IngestParams(landing=str(landing), contract="pumps"), str(tmp_path / "lake"),
                         str(tmp_path / "q"), "b1")
    assert all(o.conserved for o in outcomes)
    (problem,) = all_quarantined(outcomes)
    assert "pumps_bad.csv" in problem and "discharge_pressure_bar outside valid range [0, 40] bar x5" in problem
    only_bad = [o for o in outcomes if "bad" in o.source]
    run_level = all_quarantined(only_bad)
    assert run_level[0].startswith("the run wrote nothing: all 5 rows of 1 file(s) (pumps_bad.csv) were quarantined")
    assert all_quarantined([o for o in outcomes if "good" in o.source]) == []


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "twinflow.cli", *args], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "COLUMNS": "200"})


def test_contract_check_counts_per_file_and_per_reason_without_writing(tmp_path):
    landing = tmp_path / "landing"
    landing.mkdir()
    _write(landing / "pumps_a.csv", [_row("2026-01-01T00:00:00Z", "P-1"), _row("2026-01-01T00:10:00Z", "P-1", "83.4"),
                                     _row("2026-01-01T00:10:00Z", "P-1", "83.4"), _row("bad", "P-1")])
    (landing / "events.csv").write_text("ts,machine,event\n")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    out = _cli("contract", "check", "pumps", str(landing))
    assert out.returncode == 0, out.stderr
    assert "pumps_a.csv" in out.stdout and "events.csv" in out.stdout and "skipped" in out.stdout
    assert "discharge_pressure_bar outside valid range [0, 40] bar" in out.stdout
    assert "4 rows: 1 would reach the lake, 3 would be quarantined" in out.stdout
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing written

    _write(landing / "pumps_b.csv", [_row("2026-01-01T00:00:00Z", "P-2", "99")])
    bad = _cli("contract", "check", "pumps", str(landing / "pumps_b.csv"))
    assert bad.returncode == 1 and "1 file(s) would keep no row: pumps_b.csv" in bad.stderr
    # The C-MAPSS contract finds none of these headers' clock: every row of the file is unusable.
    wrong = _cli("contract", "check", "cmapss", str(landing / "pumps_a.csv"))
    assert wrong.returncode == 1 and "missing required column" in wrong.stdout and "would keep no row" in wrong.stderr


def test_run_ingest_refuses_a_missing_contract_before_anything_starts(tmp_path):
    out = _cli("--home", str(tmp_path / "home"), "run", "ingest", "--landing", str(tmp_path), "--contract",
               str(tmp_path / "nope.yaml"))
    assert out.returncode == 2 and "--param contract" in out.stderr and "does not exist" in out.stderr
    assert not (tmp_path / "home" / "prefect").exists()
    with pytest.raises(ValueError, match="no bundled contract"):
        IngestParams(landing="x", contract="turbines")
