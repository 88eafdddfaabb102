"""Ingest stage, pure functions and local I/O: parsing, the data contract, quarantine, ledger.

Every bad input of the issue has a test here; each asserts a clear reason and conservation
(rows read = rows written to the lake + rows quarantined).
"""

from __future__ import annotations

import gzip
import json
import os
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st

import cmapss_names as CM
from ingest_faults import plant_faults
from twinflow import contracts as C
from twinflow.data import cmapss_path
from twinflow.errors import AlreadyRunning, ConfigError
from twinflow.lake import list_files
from twinflow.tasks.ingest import (
    IngestParams,
    Ledger,
    dataset_name,
    detect_format,
    lake_lock,
    latest_snapshot,
    list_landing,
    parse_bytes,
    process_file,
    read_lake,
    read_quarantine,
    run_local,
    validate_table,
    write_lake_table,
)

TRAIN = gzip.decompress(cmapss_path("train_FD001.txt.gz").read_bytes()).decode()
TRAIN_LINES = [line for line in TRAIN.splitlines() if line.strip()]


def _lines(n: int = 60) -> list[str]:
    """The first ``n`` rows of FD001 train (unit 1), as text lines."""
    return list(TRAIN_LINES[:n])


def _write(folder: Path, name: str, content: str | bytes) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return path


class Home:
    """A landing folder, lake and quarantine under tmp_path, ingested with :func:`run_local`."""

    def __init__(self, root: Path):
        self.landing = root / "landing"
        self.landing.mkdir(parents=True)
        self.lake = root / "lake"
        self.quarantine = root / "quarantine"
        self.runs = 0

    def ingest(self, **kw):
        self.runs += 1
        params = IngestParams(landing=str(self.landing), **kw)
        return run_local(params, str(self.lake), str(self.quarantine), f"b{self.runs}")

    def lake_rows(self, dataset: str) -> pa.Table:
        snap = latest_snapshot(str(self.lake), dataset)
        return CM.telemetry_schema().empty_table() if snap is None else read_lake(snap)

    def quarantined(self, dataset: str | None = None) -> pa.Table:
        return read_quarantine(str(self.quarantine), dataset)


@pytest.fixture
def home(tmp_path) -> Home:
    return Home(tmp_path)


def _assert_conserved(outcomes) -> None:
    for o in outcomes:
        assert o.rows_read == o.rows_written + o.rows_quarantined, o


def _keys_unique(table: pa.Table) -> bool:
    keys = list(zip(table.column(C.ASSET).to_pylist(), table.column(C.TIME).to_pylist()))
    return len(keys) == len(set(keys))


# --- naming, formats --------------------------------------------------------------------------


@pytest.mark.parametrize("name, expected", [
    ("train_FD001.txt.gz", "train_fd001"), ("/a/b/Plant A 2024.csv", "plant_a_2024"),
    ("edge.parquet", "edge"), ("x.PQ", "x"),
])
def test_dataset_name_is_the_lower_cased_stem(name, expected):
    assert dataset_name(name) == expected


def test_format_detection_by_suffix_then_content():
    # Header-less whitespace text (C-MAPSS's shape) is "text"; its columns come from the contract.
    assert detect_format("a.txt.gz", b"1 1 0.1") == "text"
    assert detect_format("a.txt", b"1 1", declared="cmapss") == "text"  # the older name of "text"
    assert detect_format("a.csv", b"unit,cycle") == "csv"
    assert detect_format("blob", b"PAR1....") == "parquet"
    assert detect_format("blob", b"unit,cycle") == "csv"
    assert detect_format("a.txt", b"x", declared="csv") == "csv"


def test_params_are_validated_before_any_work():
    with pytest.raises(ValueError, match="dataset"):
        IngestParams(landing="x", dataset="Bad Name")
    with pytest.raises(ValueError, match="files_per_batch"):
        IngestParams(landing="x", files_per_batch=0)
    with pytest.raises(ValueError, match="unknown column"):
        IngestParams(landing="x", columns=["unit", "cycle", "bogus"])


# --- the real data -------------------------------------------------------------------------------


def test_fd001_train_parses_into_the_contract_without_rejects():
    parsed = parse_bytes(cmapss_path("train_FD001.txt.gz").read_bytes(), "train_FD001.txt.gz")
    assert parsed.file_error is None and not parsed.bad_rows
    lake, quarantine, flagged = validate_table(parsed.table, parsed.reasons, "train", "b")
    assert parsed.rows_read == len(TRAIN_LINES) == lake.num_rows
    assert quarantine.num_rows == 0
    assert lake.schema.equals(CM.telemetry_schema())
    assert len(set(lake.column(C.ASSET).to_pylist())) == 100
    # FD001's constant setpoints (s1, s5, s10, s16, s18, s19) are by design, not stuck sensors.
    assert flagged["stuck"] == 0 and flagged["missing"] == 0
    first = TRAIN_LINES[0].split()
    assert lake.column("s2")[0].as_py() == float(first[6])


def test_contract_declares_units_and_ranges_that_admit_fd001():
    raw = np.array([line.split() for line in TRAIN_LINES], dtype=float)
    for j, ch in enumerate(CM.CHANNELS):
        lo, hi = CM.valid_range(ch)
        assert lo <= raw[:, 2 + j].min() and raw[:, 2 + j].max() <= hi, ch
        assert CM.unit(ch)


# --- bad input: whole files ---------------------------------------------------------------------


@pytest.mark.parametrize("name, content, reason", [
    ("empty.txt", b"", "empty file"),
    ("blank.txt", b"\n\n  \n", "empty file"),
    ("header_only.csv", b"unit,cycle,s1\n", "header only"),
    ("semicolons.csv", b"unit;cycle;s1\n1;2;3\n", "wrong delimiter"),
    ("commas.txt", b"1,1,0.1\n1,2,0.2\n", "wrong delimiter"),
    ("latin1.txt", ("1 1 " + " ".join(["5"] * 23) + " \xe9\n").encode("latin-1"), "UTF-8"),
    ("broken.txt.gz", gzip.compress(TRAIN[:5000].encode())[:-30], "gzip"),
    ("broken.parquet", b"PAR1 not really parquet", "Parquet"),
])
def test_unparseable_files_go_to_the_quarantine_folder_with_a_reason(home, name, content, reason):
    _write(home.landing, name, content)
    (o,) = home.ingest()
    assert o.status == "quarantined" and reason in o.reason
    _assert_conserved([o])
    folder = home.quarantine / "files" / o.file_id
    assert (folder / name).read_bytes() == content
    assert reason in (folder / "reason.txt").read_text()
    assert not (home.lake / f"dataset={o.dataset}").exists()


def test_missing_columns_quarantine_the_file_unless_allowed(home):
    header = "unit,cycle,op1,op2,op3," + ",".join(f"s{i}" for i in range(1, 21))  # no s21
    rows = [",".join(line.split()[:25]) for line in _lines(10)]
    _write(home.landing, "nos21.csv", "\n".join([header, *rows]) + "\n")
    (o,) = home.ingest()
    assert o.status == "quarantined" and "s21" in o.reason and o.rows_quarantined == 10
    os.utime(home.landing / "nos21.csv", ns=(time.time_ns(), time.time_ns() + 10**9))
    assert (home.quarantine / "files" / o.file_id / "reason.txt").exists()
    (o,) = home.ingest(allow_missing_channels=True)
    assert o.status == "ingested" and o.rows_written == 10
    assert not (home.quarantine / "files" / o.file_id).exists()  # the file is no longer quarantined
    assert any("s21" in n for n in o.notes)
    assert home.lake_rows("nos21").column("s21").null_count == 10


def test_extra_columns_are_ignored_and_reported(home):
    header = "unit,cycle,op1,op2,op3," + ",".join(f"s{i}" for i in range(1, 22)) + ",operator"
    rows = [",".join(line.split()) + ",alice" for line in _lines(10)]
    _write(home.landing, "extra.csv", "\n".join([header, *rows]) + "\n")
    (o,) = home.ingest()
    assert o.status == "ingested" and o.rows_written == 10
    assert any("operator" in n for n in o.notes)


def test_missing_landing_path_is_a_one_line_config_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        list_landing(str(tmp_path / "nope"))


# --- bad input: rows ----------------------------------------------------------------------------


def test_truncated_last_line_quarantines_only_that_row(home):
    lines = _lines(30)
    lines[-1] = " ".join(lines[-1].split()[:9])
    _write(home.landing, "trunc.txt", "\n".join(lines))
    (o,) = home.ingest()
    assert (o.rows_read, o.rows_written, o.rows_quarantined) == (30, 29, 1)
    q = home.quarantined("trunc")
    assert "truncated" in q.column("reason")[0].as_py()
    assert q.column("raw")[0].as_py() == lines[-1]


def test_strings_in_numeric_columns_are_quarantined_with_the_column_named(home):
    lines = _lines(20)
    f = lines[4].split()
    f[7] = "n/a?"
    lines[4] = " ".join(f)
    f = lines[9].split()
    f[1] = "seven"
    lines[9] = " ".join(f)
    _write(home.landing, "strings.txt", "\n".join(lines) + "\n")
    (o,) = home.ingest()
    _assert_conserved([o])
    assert o.rows_quarantined == 2
    reasons = sorted(home.quarantined().column("reason").to_pylist())
    assert "non-numeric value in cycle: 'seven'" in reasons
    assert "non-numeric value in s3: 'n/a?'" in reasons


def test_duplicate_rows_keep_the_first_and_quarantine_the_rest(home):
    lines = _lines(20)
    lines.insert(10, lines[3])
    lines.append(lines[5])
    _write(home.landing, "dups.txt", "\n".join(lines) + "\n")
    (o,) = home.ingest()
    assert (o.rows_read, o.rows_written, o.rows_quarantined) == (22, 20, 2)
    assert all("duplicate key" in r for r in home.quarantined().column("reason").to_pylist())
    assert _keys_unique(home.lake_rows("dups"))


def test_out_of_order_rows_are_kept_sorted_and_flagged(home):
    lines = _lines(20)
    lines[5], lines[12] = lines[12], lines[5]
    _write(home.landing, "ooo.txt", "\n".join(lines) + "\n")
    (o,) = home.ingest()
    assert o.rows_written == 20 and o.rows_quarantined == 0
    lake = home.lake_rows("ooo")
    cycles = lake.column(C.TIME).to_pylist()
    assert cycles == sorted(cycles)
    flagged = [c for c, q in zip(cycles, lake.column("quality").to_pylist()) if q & C.Quality.OUT_OF_ORDER]
    assert flagged and set(flagged) <= set(range(6, 14))


def test_out_of_range_values_are_quarantined_and_sentinels_nans_flagged(home):
    lines = [line.split() for line in _lines(30)]
    lines[2][5] = "9518.67"  # s1 far outside its range
    lines[4][6] = "-999"  # sentinel in s2
    lines[6][7] = "NaN"  # missing s3
    lines[8][8] = "inf"
    _write(home.landing, "ranges.txt", "\n".join(" ".join(f) for f in lines) + "\n")
    (o,) = home.ingest()
    _assert_conserved([o])
    assert o.rows_quarantined == 2
    reasons = home.quarantined().column("reason").to_pylist()
    assert any(r.startswith("s1=9518.67 outside valid range") for r in reasons)
    assert any(r.startswith("s4=inf outside") for r in reasons)
    lake = home.lake_rows("ranges")
    q = dict(zip(lake.column(C.TIME).to_pylist(), lake.column("quality").to_pylist()))
    assert q[5] == C.Quality.SENTINEL | C.Quality.MISSING and q[7] == C.Quality.MISSING
    s2 = dict(zip(lake.column(C.TIME).to_pylist(), lake.column("s2").to_pylist()))
    assert s2[5] is None and s2[4] is not None


def test_stuck_sensor_is_flagged_not_dropped(home):
    lines = [line.split() for line in _lines(80)]
    for f in lines[30:55]:
        f[7] = "1590.00"  # s3 frozen for 25 cycles (window 20)
    _write(home.landing, "stuck.txt", "\n".join(" ".join(f) for f in lines) + "\n")
    (o,) = home.ingest()
    assert o.rows_written == 80 and o.flagged.get("stuck") == 25
    lake = home.lake_rows("stuck")
    stuck = [c for c, q in zip(lake.column(C.TIME).to_pylist(), lake.column("quality").to_pylist())
             if q & C.Quality.STUCK]
    assert stuck == list(range(31, 56))


@pytest.mark.parametrize("rejects", [0, 1])
def test_rows_in_file_order_validate_like_the_same_rows_shuffled(rejects):
    """Validation of a file already in (asset, time) order skips its sorts and, when it keeps every row,
    its copies: the lake rows, nulls, flags and reasons must be those of the same rows in any order (bar
    the out-of-order flag)."""
    lines = [line.split() for line in TRAIN_LINES[:400]]  # units 1 and 2
    if rejects:
        lines[2][5] = "9518.67"  # s1 far outside its range: quarantined
    lines[4][6] = "-999"  # sentinel in s2: null, flagged
    lines[6][7] = "NaN"  # missing s3: null, flagged
    lines[8][8] = ""  # missing s4 (a null cell, not NaN)
    for f in lines[230:260]:
        f[7] = "1590.00"  # s3 stuck in unit 2
    text = "\n".join(",".join(f) for f in lines) + "\n"
    parsed = parse_bytes(text.encode(), "x.csv", "csv", CM.CMAPSS_COLUMNS, contract=CM.CMAPSS)
    assert not parsed.reasons and not parsed.bad_rows
    table = parsed.table
    perm = np.random.default_rng(0).permutation(table.num_rows)
    shuffled = table.take(pa.array(perm)).set_column(
        table.schema.get_field_index("record"), "record", pa.array(np.arange(table.num_rows, dtype=np.int64)))
    runs = [validate_table(t, None, "x.csv", "b", contract=CM.CMAPSS) for t in (table, shuffled)]
    (lake, quar, flagged), (lake2, quar2, flagged2) = runs
    assert lake.num_rows == lake2.num_rows == 400 - rejects and quar.num_rows == quar2.num_rows == rejects
    assert lake.schema == lake2.schema
    for name in lake.column_names:
        a, b = lake.column(name).to_pylist(), lake2.column(name).to_pylist()
        if name == "quality":
            b = [q & ~C.Quality.OUT_OF_ORDER for q in b]
        assert a == b, name
    assert lake.column("s2").null_count == lake.column("s3").null_count == lake.column("s4").null_count == 1
    assert flagged["sentinel"] == 1 and flagged["missing"] == 3 and flagged["stuck"] == 30
    assert flagged2["out_of_order"] > 0 and flagged["out_of_order"] == 0
    assert {k: v for k, v in flagged2.items() if k != "out_of_order"} == \
        {k: v for k, v in flagged.items() if k != "out_of_order"}
    assert quar.column("reason").to_pylist() == quar2.column("reason").to_pylist()


@pytest.mark.parametrize("bad_lines", [0, 2])
def test_a_large_csv_parses_alike_in_small_and_whole_file_blocks(monkeypatch, bad_lines):
    """Files above 1 MiB are read first in small (parallel) blocks; the result must be the whole-file
    read's, and a file with rows of another field count is read whole, its bad rows in file order."""
    from twinflow.tasks.ingest import parse as P

    header = ",".join(CM.CMAPSS_COLUMNS)
    rows = [",".join(line.split()) for line in TRAIN_LINES] * 2
    if bad_lines:
        rows[3000] = "1,2,3"
        rows[-10] = "4,5"
    data = ("\n".join([header, *rows]) + "\n").encode()
    assert len(data) > 2 * P.FAST_BLOCK_BYTES
    fast = parse_bytes(data, "big.csv", "csv", contract=CM.CMAPSS)
    monkeypatch.setattr(P, "FAST_BLOCK_BYTES", 1 << 40)
    whole = parse_bytes(data, "big.csv", "csv", contract=CM.CMAPSS)
    assert fast.file_error is None and fast.rows_read == whole.rows_read == len(rows)
    assert fast.table.equals(whole.table) and fast.reasons == whole.reasons
    assert fast.bad_rows == whole.bad_rows and [t for _, t in fast.bad_rows] == (["1,2,3", "4,5"] if bad_lines else [])


def test_csv_with_aliases_and_header_less_csv_with_configured_columns(home):
    header = "engine,time_cycles,setting_1,setting_2,setting_3," + ",".join(f"sensor_{i}" for i in range(1, 22))
    _write(home.landing, "hdr.csv", "\n".join([header, *[",".join(l.split()) for l in _lines(5)]]) + "\n")
    (o,) = home.ingest()
    assert o.status == "ingested" and o.rows_written == 5
    other = home.landing.parent / "landing2"
    _write(other, "nohdr.csv", "\n".join(";".join(l.split()) for l in _lines(5)) + "\n")
    params = IngestParams(landing=str(other), format="csv", delimiter=";", columns=list(CM.CMAPSS_COLUMNS))
    (o,) = run_local(params, str(home.lake), str(home.quarantine), "b9")
    assert o.status == "ingested" and o.rows_written == 5


def test_parquet_sources_are_validated_like_text(home):
    lines = [line.split() for line in _lines(10)]
    cols = {name: [float(f[j]) for f in lines] for j, name in enumerate(CM.CMAPSS_COLUMNS)}
    cols["unit"] = [str(int(v)) for v in cols["unit"]]
    cols[C.TIME] = [int(v) for v in cols[C.TIME]]
    cols["s7"][3] = -5.0  # out of range
    home.landing.mkdir(exist_ok=True)
    pq.write_table(pa.table(cols), home.landing / "edge.parquet")
    (o,) = home.ingest()
    assert (o.format, o.rows_read, o.rows_written, o.rows_quarantined) == ("parquet", 10, 9, 1)


# --- incremental, idempotent, concurrent -------------------------------------------------------


def test_rerun_reads_nothing_and_duplicate_content_adds_nothing(home):
    _write(home.landing, "a.txt", "\n".join(_lines(40)) + "\n")
    (o,) = home.ingest()
    assert o.rows_written == 40
    assert home.ingest() == []  # size and mtime unchanged: not even read
    _write(home.landing, "copy_of_a.txt", "\n".join(_lines(40)) + "\n")
    outcomes = home.ingest(dataset="a")
    assert [o.status for o in outcomes] == ["duplicate"]
    assert home.lake_rows("a").num_rows == 40


@pytest.mark.parametrize("twin_first", [True, False])
def test_a_duplicate_is_read_again_when_its_twin_changes(home, twin_first):
    names = ("a.txt", "b.txt") if twin_first else ("b.txt", "a.txt")  # the twin sorts first, or second
    _write(home.landing, names[0], "\n".join(_lines(40)) + "\n")
    home.ingest(dataset="d")
    _write(home.landing, names[1], "\n".join(_lines(40)) + "\n")
    assert [o.status for o in home.ingest(dataset="d")] == ["duplicate"]
    # The twin now holds other rows (unit 1's first 10 cycles): the copy's 40 rows must not vanish.
    _write(home.landing, names[0], "\n".join(_lines(10)) + "\n")
    os.utime(home.landing / names[0], ns=(time.time_ns(), time.time_ns() + 10**9))
    outcomes = {o.source.rsplit("/", 1)[-1]: o for o in home.ingest(dataset="d")}
    assert outcomes[names[1]].status == "ingested"
    _assert_conserved(outcomes.values())
    lake = home.lake_rows("d")
    assert _keys_unique(lake) and lake.num_rows + len(home.quarantined("d")) == 50
    assert lake.num_rows == 40  # the copy's 40 cycles; the twin's 10 are the same keys: quarantined
    assert home.ingest(dataset="d") == []


def test_touched_but_identical_file_is_unchanged(home):
    path = _write(home.landing, "a.txt", "\n".join(_lines(10)) + "\n")
    home.ingest()
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 5 * 10**9))
    (o,) = home.ingest()
    assert o.status == "unchanged" and o.rows_read == 0
    assert home.ingest() == []


def test_a_file_that_changes_after_ingest_replaces_its_rows(home):
    path = _write(home.landing, "a.txt", "\n".join(_lines(40)) + "\n")
    home.ingest()
    path.write_text("\n".join(_lines(40)[:25] + TRAIN_LINES[200:210]) + "\n")  # unit 1 cut + unit 2 rows
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
    (o,) = home.ingest()
    assert o.status == "ingested" and o.rows_written == 35
    lake = home.lake_rows("a")
    assert lake.num_rows == 35 and _keys_unique(lake)
    assert sorted(set(lake.column(C.ASSET).to_pylist())) == ["1", "2"]
    path.write_text("\n".join(_lines(5)) + "\n")  # asset 2 vanished from the source
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 2 * 10**9))
    home.ingest()
    assert home.lake_rows("a").num_rows == 5
    assert not list((home.lake / "dataset=a" / "asset=2").glob("*.parquet"))


def test_keys_another_file_already_holds_are_quarantined(home):
    _write(home.landing, "part1.txt", "\n".join(_lines(30)) + "\n")
    _write(home.landing, "part2.txt", "\n".join(_lines(50)[20:]) + "\n")  # cycles 21..50, 21..30 overlap
    outcomes = home.ingest(dataset="fleet")
    _assert_conserved(outcomes)
    by_name = {Path(o.source).name: o for o in outcomes}
    assert by_name["part1.txt"].rows_written == 30
    assert (by_name["part2.txt"].rows_written, by_name["part2.txt"].rows_quarantined) == (20, 10)
    lake = home.lake_rows("fleet")
    assert lake.num_rows == 50 and _keys_unique(lake)


def test_file_being_written_is_deferred_until_it_settles(home):
    path = _write(home.landing, "live.txt", "\n".join(_lines(10)) + "\n")
    (o,) = home.ingest(settle_seconds=3600)
    assert o.status == "deferred" and not (home.lake / "dataset=live").exists()
    # A file that grows between listing and reading is deferred too (never half-ingested).
    listed = list_landing(str(home.landing))[0]
    with path.open("a") as fh:
        fh.write(TRAIN_LINES[10] + "\n")
    o = process_file(listed, IngestParams(landing=str(home.landing)), home.lake / "_staging",
                     home.quarantine, "bx")
    assert o.status == "deferred" and "changed while it was read" in o.reason
    (o,) = home.ingest()
    assert o.status == "ingested" and o.rows_written == 11


def test_temp_names_and_hidden_files_are_not_listed(home):
    _write(home.landing, "good.txt", "\n".join(_lines(3)) + "\n")
    for name in (".hidden.txt", "_meta.txt", "in_flight.txt.tmp", "upload.csv.part", "README.md"):
        _write(home.landing, name, "garbage")
    assert [Path(f.path).name for f in list_landing(str(home.landing))] == ["good.txt"]


def test_lake_lock_serialises_ingest_runs(tmp_path):
    lake = tmp_path / "lake"
    with lake_lock(lake, 1):
        with pytest.raises(AlreadyRunning, match="another ingest run"):
            with lake_lock(lake, 0.3):
                pass


def test_two_concurrent_local_runs_never_duplicate_rows(home):
    for k in range(4):
        _write(home.landing, f"f{k}.txt", "\n".join(TRAIN_LINES[k * 400:(k + 1) * 400]) + "\n")
    results, errors = [], []

    def run(i: int) -> None:
        try:
            params = IngestParams(landing=str(home.landing), dataset="fleet")
            results.append(run_local(params, str(home.lake), str(home.quarantine), f"t{i}"))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sorted(len(r) for r in results) == [0, 4]  # the second run found everything in the ledger
    lake = home.lake_rows("fleet")
    assert lake.num_rows == 1600 and _keys_unique(lake)


# --- lake helpers used by other stages ---------------------------------------------------------


def test_write_lake_table_and_read_lake_roundtrip(tmp_path):
    n = 50
    table = pa.table({C.ASSET: [str(i % 3) for i in range(n)], C.TIME: pa.array(range(n), pa.int32()),
                      "s2": np.linspace(600, 650, n)})
    snap = write_lake_table(table, str(tmp_path / "lake"), "gen", "g1")
    assert snap.rows == n and snap.files[0].lake_file == "g1"
    assert sorted(list_files(snap)) == ["0", "1", "2"]
    back = read_lake(snap, columns=[C.ASSET, C.TIME, "s2"])
    assert back.num_rows == n and back.column("s2").null_count == 0
    assert back.column(C.ASSET).to_pylist() == sorted(back.column(C.ASSET).to_pylist())
    again = write_lake_table(table, str(tmp_path / "lake"), "gen", "g1")  # same batch: replaced
    assert read_lake(again).num_rows == n and again.digest == snap.digest
    assert again.version == snap.version + 1 and read_lake(snap).num_rows == n  # both versions readable


def test_snapshot_lists_files_and_reads_only_their_rows(home):
    _write(home.landing, "a.txt", "\n".join(_lines(30)) + "\n")
    home.ingest(dataset="fleet")
    ledger = Ledger(home.lake)
    snap = ledger.snapshot(str(home.lake), "fleet")
    ledger.close()
    assert snap.rows == 30 and len(snap.files) == 1 and snap.files[0].sha256
    write_lake_table(pa.table({C.ASSET: ["9"], C.TIME: pa.array([1], pa.int32())}), str(home.lake), "fleet", "g")
    assert read_lake(snap).num_rows == 30  # rows written after the snapshot's version are not read
    assert latest_snapshot(str(home.lake), "fleet") == snap.model_copy(update={"version": snap.version + 1})
    assert latest_snapshot(str(home.lake), "other") is None
    assert latest_snapshot(str(home.lake.parent / "no-lake"), "fleet") is None


# --- property test: malformed files ------------------------------------------------------------


_OPS = st.lists(st.tuples(st.sampled_from(["drop_field", "string", "dup", "swap", "range", "nan", "truncate",
                                           "extra", "blank"]),
                          st.integers(0, 10_000), st.integers(0, 10_000)), max_size=12)


@hsettings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=_OPS, start=st.integers(0, len(TRAIN_LINES) - 40), n=st.integers(1, 40),
       encoding_error=st.booleans())
def test_malformed_files_conserve_rows_and_never_duplicate_keys(tmp_path_factory, ops, start, n,
                                                                encoding_error):
    lines = plant_faults(TRAIN_LINES[start:start + n], ops, blank="")
    data = "\n".join(lines).encode()
    if encoding_error and data:
        data = data[: len(data) // 2] + b"\xff" + data[len(data) // 2:]
    expected_rows = sum(1 for line in data.splitlines() if line.strip())
    h = Home(tmp_path_factory.mktemp("prop"))
    _write(h.landing, "f.txt", data)
    outcomes = h.ingest(dataset="p")
    _assert_conserved(outcomes)
    (o,) = outcomes
    assert o.rows_read == expected_rows
    lake = h.lake_rows("p")
    assert lake.num_rows == o.rows_written and _keys_unique(lake)
    if o.status == "ingested":
        assert h.quarantined("p").num_rows == o.rows_quarantined
    assert h.ingest(dataset="p") == []  # idempotent: nothing to do the second time


def test_landing_can_be_an_fsspec_url(tmp_path):
    import fsspec

    fs = fsspec.filesystem("memory")
    fs.pipe("/landing-test/plant/a.txt", ("\n".join(_lines(12)) + "\n").encode())
    fs.pipe("/landing-test/plant/notes.md", b"not data")
    params = IngestParams(landing="memory://landing-test", dataset="mem")
    (o,) = run_local(params, str(tmp_path / "lake"), str(tmp_path / "q"), "m1")
    assert o.source.startswith("memory://") and o.source.endswith("/landing-test/plant/a.txt")
    assert o.rows_written == 12
    assert run_local(params, str(tmp_path / "lake"), str(tmp_path / "q"), "m2") == []
    fs.rm("/landing-test", recursive=True)


# --- hostile input: asset ids, BOM, counts (issue: 1,168 malformed files) -----------------------


def _csv(lines: list[str], header: bool = True) -> str:
    head = ["unit,cycle," + ",".join(CM.CMAPSS_COLUMNS[2:])] if header else []
    return "\n".join(head + [",".join(line.split()) for line in lines]) + "\n"


def test_unusable_asset_ids_are_quarantined_rows_not_assets(home):
    rows = [line.split() for line in _lines(12)]
    for i, cell in enumerate(["nan", " NaN ", "inf", "-inf", "null", "None", '""', "A" * 300, "é" * 100,
                              "é" * 33]):
        rows[i][0] = cell
    _write(home.landing, "assets.csv", _csv([" ".join(r) for r in rows]))
    (o,) = home.ingest()
    _assert_conserved([o])
    assert (o.rows_read, o.rows_written, o.rows_quarantined) == (12, 3, 9)
    assert sorted(o.assets) == ["1", "é" * 33]  # 33 x 'é' = 198 characters percent-encoded: fits
    q = dict(zip(home.quarantined("assets").column(C.ASSET).to_pylist(),
                 home.quarantined("assets").column("reason").to_pylist()))
    assert q["A" * 300] == "asset id too long: 300 characters percent-encoded (limit 200)"
    assert q["é" * 100] == "asset id too long: 600 characters percent-encoded (limit 200)"
    assert sum(r == "missing asset id" for r in q.values()) == 7
    lake = home.lake_rows("assets")
    assert lake.num_rows == 3 and not {"nan", "inf", "None"} & set(lake.column(C.ASSET).to_pylist())


def test_csv_with_a_utf8_bom_is_read_like_one_without(home):
    text = _csv(_lines(8)).encode()
    _write(home.landing, "bom.csv", b"\xef\xbb\xbf" + text)
    _write(home.landing, "bomgz.csv.gz", gzip.compress(b"\xef\xbb\xbf" + text))
    outcomes = home.ingest()
    assert [(o.status, o.rows_read, o.rows_written) for o in outcomes] == [("ingested", 8, 8)] * 2
    assert home.lake_rows("bom").column(C.ASSET).to_pylist() == ["1"] * 8  # not '\ufeff1' or a header error
    assert home.lake_rows("bomgz").num_rows == 8


def test_header_less_csv_is_counted_whole(home):
    _write(home.landing, "nohdr.csv", _csv(_lines(9), header=False))
    _write(home.landing, "one.csv", _csv(_lines(1), header=False))
    outcomes = home.ingest()
    _assert_conserved(outcomes)
    assert [(o.rows_read, o.rows_quarantined, o.rows_read_exact) for o in outcomes] == [(9, 9, True), (1, 1, True)]
    assert all("no header" in o.reason for o in outcomes)


def test_corrupt_gzip_and_unreadable_parquet_count_what_could_be_read(home):
    data = gzip.compress(("\n".join(_lines(60)) + "\n").encode())
    _write(home.landing, "trunc.txt.gz", data[: len(data) // 2])
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0xFF
    _write(home.landing, "flipped.txt.gz", bytes(flipped))
    lines = [line.split() for line in _lines(10)]
    cols = {name: [float(f[j]) for f in lines] for j, name in enumerate(CM.CMAPSS_COLUMNS)}
    buf = pa.BufferOutputStream()
    pq.write_table(pa.table(cols), buf, compression="none")
    raw = bytearray(buf.getvalue().to_pybytes())
    raw[100:140] = b"\xff" * 40  # a data page: the footer still reads
    _write(home.landing, "pages.parquet", bytes(raw))
    _write(home.landing, "nofooter.parquet", bytes(raw[:-30]))
    by = {Path(o.source).name: o for o in home.ingest()}
    _assert_conserved(by.values())
    for name in ("trunc.txt.gz", "flipped.txt.gz"):
        o = by[name]
        assert o.status == "quarantined" and not o.rows_read_exact
        assert 0 < o.rows_read < 60 and o.reason.endswith(f"rows: at least {o.rows_read}")
    assert (by["pages.parquet"].rows_read, by["pages.parquet"].rows_read_exact) == (10, False)
    assert by["pages.parquet"].reason.endswith("rows: 10 per the Parquet footer")
    assert (by["nofooter.parquet"].rows_read, by["nofooter.parquet"].reason.endswith("rows: unknown")) == (0, True)
    ledger = Ledger(home.lake)
    recorded = ledger.files()
    ledger.close()
    assert recorded[by["trunc.txt.gz"].source]["reason"] == by["trunc.txt.gz"].reason
    assert recorded[by["trunc.txt.gz"].source]["rows_read"] == by["trunc.txt.gz"].rows_read


def test_landing_names_too_long_for_derived_paths_are_bounded(home):
    good = "g" * 246 + ".csv"  # 250 bytes: the old temp name '.<name>.<8hex>.tmp' was 265
    bad = "é" * 120 + ".txt.gz"  # 247 bytes, a corrupt gzip
    other = "é" * 120 + ".dat.gz"  # same stem: must not collide with the one above
    _write(home.landing, good, _csv(_lines(6)))
    _write(home.landing, bad, b"\x1f\x8b" + b"\x00" * 40)
    _write(home.landing, other, b"\x1f\x8b" + b"\x01" * 40)
    by = {Path(o.source).name: o for o in home.ingest()}
    _assert_conserved(by.values())
    assert by[good].status == "ingested" and by[good].rows_written == 6
    assert len(by[good].dataset) <= 100 and home.lake_rows(by[good].dataset).num_rows == 6
    stored = set()
    for name in (bad, other):
        o = by[name]
        assert o.status == "quarantined" and "corrupt gzip" in o.reason
        (copy,) = [p for p in (home.quarantine / "files" / o.file_id).iterdir() if p.name != "reason.txt"]
        assert len(copy.name.encode()) <= 100 and copy.name.endswith(name[-7:])
        assert copy.read_bytes() == (home.landing / name).read_bytes()
        info = json.loads((home.quarantine / "files" / o.file_id / "reason.txt").read_text())
        assert info["source"] == o.source and info["stored_as"] == copy.name and info["reason"] == o.reason
        stored.add(copy.name)
    assert len(stored) == 2
    assert home.ingest() == []  # and nothing left to fail on the next run


def test_file_quarantine_is_staged_then_published_with_its_ledger_row(home):
    _write(home.landing, "garbage.txt", b"\x00\x01 not telemetry \xff\xfe" * 10)
    src = list_landing(str(home.landing))[0]
    staging = home.lake / "_staging" / "bx"
    o = process_file(src, IngestParams(landing=str(home.landing)), staging, home.quarantine, "bx")
    assert o.status == "quarantined" and o.staged
    assert not (home.quarantine / "files").exists()  # nothing visible before the commit
    assert (Path(o.staged) / "file" / "garbage.txt").exists()
    (o,) = home.ingest()
    folder = home.quarantine / "files" / o.file_id
    assert sorted(p.name for p in folder.iterdir()) == ["garbage.txt", "reason.txt"]
    assert not [p for p in (home.quarantine / "files").iterdir() if p.name.startswith(".")]  # no temp left
    ledger = Ledger(home.lake)
    row = ledger.files()[o.source]
    ledger.close()
    assert (row["status"], row["reason"], row["rows_read"], row["rows_quarantined"]) == \
        ("quarantined", o.reason, o.rows_read, o.rows_quarantined)
    # A new unparseable version replaces the copy atomically; a good version removes it.
    path = home.landing / "garbage.txt"
    path.write_bytes(b"\xff still garbage")
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
    (o2,) = home.ingest()
    assert o2.status == "quarantined" and (folder / "garbage.txt").read_bytes() == b"\xff still garbage"
    path.write_text("\n".join(_lines(4)) + "\n")
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 2 * 10**9))
    (o3,) = home.ingest()
    assert o3.status == "ingested" and not folder.exists()


def test_a_file_that_raises_costs_only_itself_not_its_batch(home, monkeypatch, caplog):
    from twinflow.tasks.ingest import process as P

    for k in range(3):
        _write(home.landing, f"f{k}.txt", "\n".join(TRAIN_LINES[k * 300:(k + 1) * 300]) + "\n")
    real = P.parse_bytes

    def poisoned(data, name, *a, **kw):
        if name == "f1.txt":
            raise OSError(36, "File name too long")
        return real(data, name, *a, **kw)

    monkeypatch.setattr(P, "parse_bytes", poisoned)
    with caplog.at_level("WARNING", logger="twinflow.ingest"):
        by = {Path(o.source).name: o for o in home.ingest(dataset="fleet")}
    assert [by[n].status for n in ("f0.txt", "f1.txt", "f2.txt")] == ["ingested", "quarantined", "ingested"]
    assert by["f0.txt"].rows_written == by["f2.txt"].rows_written == 300
    bad = by["f1.txt"]
    assert bad.reason == "ingest error: OSError: [Errno 36] File name too long; rows: unknown"
    assert not bad.rows_read_exact and (bad.rows_read, bad.rows_written, bad.rows_quarantined) == (0, 0, 0)
    assert (home.quarantine / "files" / bad.file_id / "f1.txt").read_bytes() == \
        (home.landing / "f1.txt").read_bytes()
    assert any("f1.txt" in r.message and "ingest error" in r.message for r in caplog.records)
    assert home.lake_rows("fleet").num_rows == 600
    ledger = Ledger(home.lake)
    assert ledger.files()[bad.source]["status"] == "quarantined"
    ledger.close()
    assert home.ingest(dataset="fleet") == []  # recorded: the next run does not fail on it again

    # When even its bytes cannot be read, the file is deferred (retried next run), the others still go on.
    def unreadable(data, name, *a, **kw):
        raise RuntimeError("boom")

    monkeypatch.setattr(P, "parse_bytes", unreadable)
    monkeypatch.setattr("twinflow.tasks.ingest.quarantine.read_file_bytes",
                        lambda *a: (_ for _ in ()).throw(PermissionError("denied")))
    _write(home.landing, "f3.txt", "\n".join(TRAIN_LINES[900:910]) + "\n")
    (o,) = home.ingest(dataset="fleet")
    assert o.status == "deferred" and o.reason.startswith("ingest error: RuntimeError: boom; not copied")
    monkeypatch.undo()
    (o,) = home.ingest(dataset="fleet")
    assert o.status == "ingested" and o.rows_written == 10


def test_links_are_followed_only_inside_the_landing_unless_allowed(home, caplog):
    outside = home.landing.parent / "elsewhere"
    _write(outside, "secret.txt", "\n".join(_lines(5)) + "\n")
    _write(home.landing / "sub", "real.txt", "\n".join(_lines(7)) + "\n")
    (home.landing / "ext.txt").symlink_to(outside / "secret.txt")
    (home.landing / "extdir").symlink_to(outside, target_is_directory=True)
    (home.landing / "inside.txt").symlink_to(home.landing / "sub" / "real.txt")  # same file: listed once
    (home.landing / "sub" / "loop").symlink_to(home.landing, target_is_directory=True)  # a cycle
    (home.landing / "dangling.txt").symlink_to(home.landing / "gone.txt")
    with caplog.at_level("WARNING", logger="twinflow.ingest"):
        listed = list_landing(str(home.landing))
    assert [f.path for f in listed] == [str((home.landing / "sub" / "real.txt").resolve())]
    warned = " ".join(r.message for r in caplog.records)
    assert "ext.txt" in warned and "extdir" in warned and "outside the landing" in warned
    (o,) = home.ingest()
    assert o.rows_written == 7
    followed = list_landing(str(home.landing), follow_external_links=True)
    assert sorted(Path(f.path).name for f in followed) == ["real.txt", "secret.txt"]
    by = {Path(o.source).name: o for o in home.ingest(follow_external_links=True)}
    assert list(by) == ["secret.txt"] and by["secret.txt"].rows_written == 5
    assert by["secret.txt"].source == str((outside / "secret.txt").resolve())
    assert IngestParams(landing="x", follow_external_links=True).digest("d") == IngestParams(landing="x").digest("d")


def test_ingest_keeps_each_datasets_recent_rows_table_current_without_duplicating_it(home):
    from twinflow import lake
    from twinflow.tasks.features.params import FeatureParams
    from twinflow.tasks.health.params import HealthParams
    from twinflow.tasks.health.score import recent_rows

    cols = [C.ASSET, C.TIME, *CM.SENSORS]
    recent_name = lake.derived_name("train_fd001", lake.RECENT)
    _write(home.landing, "train_FD001.txt", "\n".join(TRAIN_LINES[:400]) + "\n")  # units 1 and 2 (192 and 208 cycles)
    home.ingest(recent_rows=20)
    snap = latest_snapshot(str(home.lake), "train_fd001")
    got, want = lake.read_recent_table(snap, 20, cols), lake.read_recent(snap, 20, cols)
    assert got[0].equals(want[0]) and got[1].equals(want[1]) and got[0].num_rows == 2 * 20
    v = lake.version(str(home.lake), recent_name)

    home.ingest(recent_rows=20)  # nothing new: the table is current, no version is added
    assert lake.version(str(home.lake), recent_name) == v
    assert lake.read_recent_table(snap, 20, cols)[0].num_rows == 2 * 20

    _write(home.landing, "train_FD001.txt", "\n".join(TRAIN_LINES[:700]) + "\n")  # the source grows
    home.ingest(recent_rows=20)
    snap2 = latest_snapshot(str(home.lake), "train_fd001")
    assert snap2.version > snap.version
    got, want = lake.read_recent_table(snap2, 20, cols), lake.read_recent(snap2, 20, cols)
    assert got[0].equals(want[0]) and got[1].equals(want[1])
    assert sum(got[1].column("readings").to_pylist()) == 700

    # Without a window the run keeps what health reads with the default feature and health params.
    home.ingest()
    assert lake.history(str(home.lake), recent_name, limit=1)[0]["twinflow.recent_rows"] == \
        str(recent_rows(FeatureParams(), HealthParams())) == "131"
