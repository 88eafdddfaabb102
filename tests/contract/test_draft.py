"""`twinflow contract init`: a contract drafted from sample files, checked against the declared ones."""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from twinflow.contract import FleetContract, load_contract
from twinflow.contract.draft import draft_contract, draft_yaml, sanitise_header
from twinflow.errors import ConfigError
from twinflow.fleets.pumps import PLANT_HEADERS, PumpFleetParams, generate_pumps, write_pumps

DATA = Path(__file__).resolve().parents[2] / "twinflow" / "data"
PUMPS = load_contract("pumps")
CMAPSS = load_contract("cmapss")


@pytest.fixture(scope="module")
def pump_landing(tmp_path_factory):
    d = tmp_path_factory.mktemp("pumps")
    fleet = generate_pumps(PumpFleetParams(n_pumps=8, days=14, seed=3))
    write_pumps(fleet, d)
    return d, fleet


def test_sanitised_headers_and_unit_hints():
    assert sanitise_header("casing_temp [degC]") == ("casing_temp_c", "degC")
    assert sanitise_header("\ufeff Casing Temp [°C] ") == ("casing_temp_c", "degC")
    assert sanitise_header("speed (rpm)") == ("speed_rpm", "rpm")
    assert sanitise_header("flow [m3/h]") == ("flow_m3h", "m3/h")
    assert sanitise_header("vibration [mm/s]") == ("vibration_mm_s", "mm/s")
    assert sanitise_header("Motor Current [A]") == ("motor_current_a", "A")
    assert sanitise_header("inlet_temp_c") == ("inlet_temp_c", "degC")
    assert sanitise_header("discharge_pressure_bar") == ("discharge_pressure_bar", "bar")
    assert sanitise_header("Valve Open_pct") == ("valve_open_pct", "%")
    assert sanitise_header("vibration_mm_s") == ("vibration_mm_s", "mm/s")
    assert sanitise_header("1st stage [weird units]") == ("c_1st_stage_weird_units", "weird units")
    assert sanitise_header("Flow") == ("flow", None)


def test_draft_of_the_generated_pumps_matches_their_contract(pump_landing, tmp_path):
    landing, fleet = pump_landing
    draft = draft_contract([landing])
    c = draft.contract
    assert c.name == "pumps"
    assert c.asset.column == PUMPS.asset.column
    assert (c.clock.kind, c.clock.column, c.clock.interval, c.clock.unit) == (
        PUMPS.clock.kind, PUMPS.clock.column, PUMPS.clock.interval, PUMPS.clock.unit)
    assert c.clock.tolerance_s >= 90 and c.clock.tolerance_s <= c.clock.interval_s / 2
    assert c.channel_names == PUMPS.channel_names
    assert [(ch.unit, ch.kind) for ch in c.channels] == [(ch.unit, ch.kind) for ch in PUMPS.channels]
    # Every plant header maps onto the same channel under the draft as under the declared contract.
    for name, header in PLANT_HEADERS.items():
        assert c.canonical_name(header) == PUMPS.canonical_name(header) == name
    assert {-999.0, -9999.0} <= set(c.sentinels)
    assert c.stuck_window == PUMPS.stuck_window
    # Ranges hold every clean reading of the samples.
    r = fleet.readings.to_pandas()
    clean = r[r["fault"] == 0]
    for ch in c.channels:
        assert clean[ch.name].between(ch.low, ch.high).all(), ch.name
    # Routing: the daily files are one dataset, the maintenance log is events, the rest is not ingested.
    rule = c.rule_for("pumps_2027-05-01.csv.gz")
    assert rule.kind == "telemetry" and rule.dataset_for("pumps_2027-05-01") == "pumps"
    assert c.rule_for("events.csv").kind == "events"
    assert c.rule_for("ground_truth.json") is None
    seen = set(fleet.events["event"].to_pylist())
    assert set(c.events.failure) == seen & set(PUMPS.events.failure) == {"failure_bearing", "failure_seal"}
    assert set(c.events.renewal) == seen & set(PUMPS.events.renewal)
    assert set(c.events.neutral) == seen & set(PUMPS.events.neutral)
    spec = ("asset", "time", "type", "work_order", "text", "mode")
    assert [getattr(c.events, k) for k in spec] == [getattr(PUMPS.events, k) for k in spec]
    # The YAML says it is a draft, and loads back to the same contract.
    text = draft_yaml(draft)
    assert text.startswith("# DRAFT") and "REVIEW" in text
    (tmp_path / "fleet.yaml").write_text(text)
    assert load_contract(tmp_path / "fleet.yaml") == c


MESSY = (
    "\ufeffMachine ID; Time Stamp ;Casing Temp [degC];casing temp;CASING TEMP;Flow (m3/h);Motor_Current_A;"
    "Status;Valve SP;Ambient\n"
)


def _messy_rows(n_assets: int = 3, n: int = 200) -> str:
    rng = np.random.default_rng(0)
    out = []
    for a in range(n_assets):
        t0 = pd.Timestamp("2025-03-01T00:00:00+01:00")
        for k in range(n):
            t = t0 + pd.Timedelta(minutes=k)
            valve = 40 if k < n // 2 else 60
            out.append(";".join([f"PMP {a + 1:02d}", t.isoformat(), f"{50 + rng.normal():.2f}",
                                 f"{51 + rng.normal():.2f}", f"{52 + rng.normal():.2f}", f"{120 + 5 * rng.normal():.1f}",
                                 f"{80 + rng.normal():.1f}", "RUN" if k % 7 else "ALARM", str(valve), "21.5"]))
    return "\n".join(out) + "\n"


def test_draft_from_messy_headers(tmp_path):
    (tmp_path / "plant_export.csv.gz").write_bytes(gzip.compress((MESSY + _messy_rows()).encode()))
    draft = draft_contract([tmp_path / "plant_export.csv.gz"])
    c = draft.contract
    assert isinstance(c, FleetContract)
    assert c.asset.column == "Machine ID" and c.clock.kind == "timestamp" and c.clock.column == "Time Stamp"
    assert c.clock.interval == "1min"
    assert "UTC offsets" in " ".join(draft.notes)
    names = c.channel_names
    assert names == ["casing_temp_c", "casing_temp", "casing_temp_2", "flow_m3h", "motor_current_a", "valve_sp",
                     "ambient"]
    units = {ch.name: ch.unit for ch in c.channels}
    assert units["casing_temp_c"] == "degC" and units["flow_m3h"] == "m3/h" and units["motor_current_a"] == "A"
    # The original headers are aliases; the two that differ only in case cannot both be.
    assert c.canonical_name("Casing Temp [degC]") == "casing_temp_c"
    assert c.canonical_name("Flow (m3/h)") == "flow_m3h"
    assert c.canonical_name("casing temp") == "casing_temp"
    assert any("already claimed" in n for n in draft.notes)
    assert "status" not in names and any("'Status' is not numeric" in n for n in draft.notes)
    kinds = {ch.name: ch.kind for ch in c.channels}
    assert kinds["valve_sp"] == "setting" and kinds["flow_m3h"] == "sensor"
    amb = c.channel("ambient")
    assert not amb.stuck_check and "constant" in amb.description and amb.low <= 21.5 <= amb.high
    rule = c.rule_for("plant_export.csv.gz")
    assert rule and rule.kind == "telemetry"


def test_asset_and_clock_can_be_named_when_the_guess_is_wrong(tmp_path):
    (tmp_path / "x.csv").write_text(MESSY + _messy_rows())
    c = draft_contract([tmp_path / "x.csv"], asset="Status", time="Time Stamp").contract
    assert c.asset.column == "Status"
    with pytest.raises(ConfigError, match="no column 'nope'"):
        draft_contract([tmp_path / "x.csv"], asset="nope")


def _cmapss_csv(path: Path) -> pd.DataFrame:
    with gzip.open(DATA / "train_FD001.txt.gz", "rt") as fh:
        rows = [line.split() for line in fh if line.strip()]
    cols = ["unit", "cycle", *CMAPSS.channel_names]
    df = pd.DataFrame(rows, columns=cols)
    df.to_csv(path, index=False)
    return df.astype(float)


def test_draft_of_the_cmapss_csv(tmp_path):
    df = _cmapss_csv(tmp_path / "train_FD001.csv")
    c = draft_contract([tmp_path / "train_FD001.csv"]).contract
    assert c.asset.column == "unit" and c.clock.kind == "cycle" and c.clock.column == "cycle"
    assert c.channel_names == CMAPSS.channel_names
    constant = {ch.name for ch in c.channels if not ch.stuck_check and ch.kind == "sensor"}
    assert {"s1", "s5", "s10", "s16", "s18", "s19"} <= constant
    for ch in c.channels:
        assert df[ch.name].between(ch.low, ch.high).all(), ch.name
    assert c.rule_for("train_FD001.csv").dataset_for("train_fd001") == "train_fd001"


def test_draft_of_headerless_cmapss_text(tmp_path):
    c = draft_contract([DATA / "train_FD001.txt.gz"]).contract
    rule = c.rule_for("train_FD001.txt.gz")
    assert rule.format == "text" and rule.columns[:2] == ["asset_id", "cycle"] and len(rule.columns) == 26
    assert c.clock.kind == "cycle" and len(c.channels) == 24


def test_parquet_samples(tmp_path, pump_landing):
    landing, _ = pump_landing
    df = pd.read_csv(landing / "pumps_2026-01-03.csv")  # noqa: PD901
    df["ts"] = pd.to_datetime(df["ts"])
    df.to_parquet(tmp_path / "pumps_2026-01-03.parquet")
    c = draft_contract([tmp_path / "pumps_2026-01-03.parquet"]).contract
    assert c.clock.kind == "timestamp" and c.clock.interval == "10min" and c.channel_names == PUMPS.channel_names
    assert c.rule_for("pumps_2026-01-09.parquet").dataset_for("x") == "pumps"


def test_unusable_samples_are_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        draft_contract([tmp_path / "missing.csv"])
    (tmp_path / "events.csv").write_text("machine,ts,event\nP-1,2026-01-01 00:00:00,inspection\n")
    (tmp_path / "t.csv").write_text("machine,ts,x\n" + "".join(
        f"P-1,2026-01-01 00:{k:02d}:00,{k % 7}.5\n" for k in range(30)))
    routine = draft_contract([tmp_path / "t.csv", tmp_path / "events.csv"])
    assert routine.contract.events is None  # no failure type among the events: declared by hand
    assert routine.contract.rule_for("events.csv").kind == "events"
    assert any("reads as a failure" in n for n in routine.notes)
    with pytest.raises(ConfigError, match="looks like telemetry"):
        draft_contract([tmp_path / "events.csv"])
    rows = "".join(f"{'xy'[k % 2]},{1 + k / 7:.3f},{2 - k / 9:.3f}\n" for k in range(40))
    (tmp_path / "noclock.csv").write_text("machine,a,b\n" + rows)
    with pytest.raises(ConfigError, match="found no clock"):
        draft_contract([tmp_path / "noclock.csv"])


def _twinflow(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "twinflow.cli", *args], capture_output=True, text=True,
                          timeout=120, env=dict(os.environ))


def test_contract_init_command(pump_landing, tmp_path):
    landing, _ = pump_landing
    out = _twinflow("contract", "init", str(landing), "-o", str(tmp_path / "fleet.yaml"))
    assert out.returncode == 0, out.stderr
    assert "asset column: 'machine'" in out.stdout
    assert load_contract(tmp_path / "fleet.yaml").channel_names == PUMPS.channel_names
    again = _twinflow("contract", "init", str(landing), "-o", str(tmp_path / "fleet.yaml"))
    assert again.returncode == 2 and "--force" in again.stderr
    assert _twinflow("contract", "init", str(landing), "-o", str(tmp_path / "fleet.yaml"), "--force").returncode == 0
    bad = _twinflow("contract", "init", str(tmp_path / "nothing.csv"), "-o", str(tmp_path / "x.yaml"))
    assert bad.returncode == 2 and "does not exist" in " ".join(bad.stderr.split()) and not (tmp_path / "x.yaml").exists()


def test_many_files_are_read_as_an_even_spread(pump_landing):
    landing, _ = pump_landing
    draft = draft_contract([landing], max_files=3)
    assert any("read 3 of 14 data files" in n for n in draft.notes)
    assert draft.contract.channel_names == PUMPS.channel_names
    assert draft.contract.rule_for("events.csv").kind == "events"
    assert all(draft.contract.rule_for(p.name).kind == "telemetry" for p in landing.glob("pumps_*.csv"))


def test_repeated_headers_stay_separate_channels(tmp_path):
    rows = "".join(f"A,{k},{20 + k % 3},{30 + k % 5}\n" for k in range(1, 60))
    (tmp_path / "rep.csv").write_text("unit,cycle,temp,temp\n" + rows)
    draft = draft_contract([tmp_path / "rep.csv"])
    assert draft.contract.channel_names == ["temp", "temp_2"]
    assert draft.contract.channel("temp_2").range[1] >= 34  # the second column's values, not the first's
    assert any("'temp' repeats 'temp'" in n for n in draft.notes)


def test_the_draft_ingests_its_own_samples(pump_landing):
    """The onboarding loop: init on a plant's files, then ingest's dry run with the draft keeps every clean
    reading; only faulty rows (spikes) may be quarantined."""
    from twinflow.tasks.ingest.check import check_files

    landing, fleet = pump_landing
    drafted = draft_contract([landing]).contract
    checks = [c for c in check_files([landing], drafted) if c.kind == "telemetry"]
    assert len(checks) == 14 and not any(c.file_error for c in checks)
    clean = int((fleet.readings["fault"].to_numpy() == 0).sum())
    faulty = fleet.readings.num_rows - clean
    assert sum(c.rows_read for c in checks) == fleet.readings.num_rows
    assert sum(c.rows_ok for c in checks) >= clean
    assert 0 < sum(c.rows_quarantined for c in checks) <= faulty


CMMS = (
    "Equipment,Reported At,Activity,WO Number,Remarks,Failure Cause\n"
    "P-101,2026-01-03 10:00,Seal failure,WO-1,leaking seal,seal\n"
    "P-102,2026-01-04 08:30,Bearing breakdown,WO-2,noisy bearing,bearing\n"
    "P-101,2026-01-05 12:00,Pump replaced,WO-3,new unit,\n"
    "P-103,2026-01-05 13:00,Lubrication,WO-4,grease,\n"
    "P-102,2026-01-06 09:00,Vendor visit,WO-5,,\n"
)


def test_contract_init_drafts_the_events_section_from_a_named_log(pump_landing, tmp_path):
    """``--events`` names the log whatever its file name: its columns are found, every distinct event
    type gets a proposed meaning with a reason in the draft's header, and the log is routed to the
    telemetry dataset whose assets it describes."""
    landing, _ = pump_landing
    (tmp_path / "cmms_export_2026.csv").write_text(CMMS)
    telemetry = sorted(str(p) for p in landing.glob("pumps_*.csv*"))
    out = _twinflow("contract", "init", *telemetry, "--events", str(tmp_path / "cmms_export_2026.csv"),
                    "-o", str(tmp_path / "fleet.yaml"))
    assert out.returncode == 0, out.stderr
    c = load_contract(tmp_path / "fleet.yaml")
    e = c.events
    assert (e.asset, e.time, e.type, e.work_order, e.text, e.mode) == (
        "Equipment", "Reported At", "Activity", "WO Number", "Remarks", "Failure Cause")
    assert (e.failure, e.renewal) == (["Bearing breakdown", "Seal failure"], ["Pump replaced"])
    assert e.neutral == ["Lubrication", "Vendor visit"]
    rule = c.rule_for("cmms_export_2026.csv")
    assert rule.kind == "events" and rule.dataset_for("cmms_export_2026") == "pumps"
    text = (tmp_path / "fleet.yaml").read_text()
    header = text[: text.index("\nname:")]
    assert "'Seal failure' (1 in the sample): failure" in header
    assert "'Vendor visit' (1 in the sample): neutral (not recognised: CHECK whether it ends a life)" in header
    # The drafted section reads the log it came from: every row accepted.
    import pyarrow.csv as pacsv

    from twinflow.tasks.ingest.events import parse_events

    events, bad = parse_events(pacsv.read_csv(tmp_path / "cmms_export_2026.csv"), c, "cmms_export_2026.csv")
    assert events.num_rows == 5 and bad.num_rows == 0
    assert events.column("failure_mode").to_pylist()[:2] == ["seal", "bearing"]


def test_a_named_log_that_cannot_be_drafted_is_a_clear_error(pump_landing, tmp_path):
    landing, _ = pump_landing
    telemetry = sorted(landing.glob("pumps_*.csv*"))[:2]
    (tmp_path / "log.csv").write_text("Equipment,Reported At,Remarks\nP-101,2026-01-03 10:00,seal\n")
    with pytest.raises(ConfigError, match=r"log.csv: could not tell its asset/time/event-type columns"):
        draft_contract(telemetry, events=[tmp_path / "log.csv"])
    (tmp_path / "log.csv").write_text("Equipment,Reported At,Activity\nP-101,2026-01-03 10:00,Inspection\n")
    with pytest.raises(ConfigError, match="none of its event types"):
        draft_contract(telemetry, events=[tmp_path / "log.csv"])
    (tmp_path / "log.csv").write_text("Equipment,Time,Activity\nP-101,morning,failure\n")
    with pytest.raises(ConfigError, match="holds no timestamps"):
        draft_contract(telemetry, events=[tmp_path / "log.csv"])
