"""A fresh home and a landing folder of >= 1,000 malformed files, as a new user found it (issue 13).

Every file is generated so that the test knows how many rows it holds. After the first run, a re-run and
a run after modifying some files, each file's rows must be accounted for: rows read = rows in the lake
from that source + rows quarantined from it (or, for a file quarantined whole, the copy in the file
quarantine holds them all; for a duplicate file, its twin's rows). Nothing unaccounted, no duplicate
(asset_id, cycle) key in the lake. Results are read only through read_lake/latest_snapshot,
read_quarantine and the returned FileOutcome counts.

The suite runs under both bundled fleet contracts: C-MAPSS (the NASA lines, cycle clock) and the pump
fleet (generated lines of the same shape: asset, ISO timestamp, ten channels in plant units, with a
header-less text rule added to the pumps contract so that every file kind exists under it too).
"""

from __future__ import annotations

import collections
import gzip
import os
import random
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ingest_faults import plant_faults
from twinflow import contracts as C
from twinflow.contract import DatasetRule, FleetContract, dump_contract, load_contract
from twinflow.data import cmapss_path
from twinflow.tasks.ingest import IngestParams, latest_snapshot, read_lake, read_quarantine, run_local
import cmapss_names as CM

TRAIN_LINES = [line for line in gzip.decompress(cmapss_path("train_FD001.txt.gz").read_bytes()).decode()
               .splitlines() if line.strip()]
HEADER = "unit,cycle," + ",".join(CM.CMAPSS_COLUMNS[2:])
ALIASES = "engine,time_cycles,setting_1,setting_2,setting_3," + ",".join(f"sensor_{i}" for i in range(1, 22))
OPS = ["drop_field", "string", "dup", "swap", "range", "nan", "truncate", "extra", "blank", "sentinel"]
KINDS = 20
PER_KIND = 53  # 1,007 files plus 106 links
DS = "h"


@dataclass
class Fleet:
    """One contract's version of the suite: its source lines (asset, time, channels), headers, contract."""

    name: str
    lines: list[str]
    header: str
    aliases: str
    contract: FleetContract
    names: list[str]  # source column names, in line order

    def time_value(self, field: str):
        return int(float(field)) if self.contract.key == C.TIME else field


def _pump_fleet() -> Fleet:
    pumps = load_contract("pumps")
    rng = random.Random(24)
    start = datetime(2026, 1, 1, tzinfo=timezone.utc)
    lines = []
    for m in range(1, 81):
        t = start
        for _ in range(rng.randint(120, 360)):
            t += timedelta(minutes=10, seconds=rng.randint(-90, 90))
            vals = [f"{rng.uniform(c.low + 0.2 * (c.high - c.low), c.high - 0.2 * (c.high - c.low)):.3f}"
                    for c in pumps.channels]
            lines.append(" ".join([f"P{m:03d}", t.strftime("%Y-%m-%dT%H:%M:%SZ"), *vals]))
    source = ["machine", "ts", *pumps.channel_names]
    text = DatasetRule(match=["*.txt", "*.txt.gz", "*.dat"], format="text", columns=source)
    table = DatasetRule(match=["*.csv", "*.csv.gz", "*.parquet"])
    contract = pumps.model_copy(update={"datasets": [*pumps.datasets, text, table]})
    aliases = ["pump", "timestamp", *[(c.aliases[0] if c.aliases else c.name) for c in pumps.channels]]
    return Fleet("pumps", lines, ",".join(source), ",".join(f'"{a}"' if " " in a else a for a in aliases),
                 contract, source)


def _fleet(name: str) -> Fleet:
    if name == "cmapss":
        return Fleet("cmapss", TRAIN_LINES, HEADER, ALIASES, load_contract("cmapss"), list(CM.CMAPSS_COLUMNS))
    return _pump_fleet()


def _parquet(fleet: Fleet, lines: list[list[str]], corrupt: bool = False) -> bytes:
    cols = {name: [float(f[j]) for f in lines] for j, name in enumerate(fleet.names) if j > 1}
    cols[fleet.names[0]] = [f[0] for f in lines]
    cols[fleet.names[1]] = [fleet.time_value(f[1]) for f in lines]
    buf = pa.BufferOutputStream()
    pq.write_table(pa.table(cols), buf, compression="none")
    raw = bytearray(buf.getvalue().to_pybytes())
    if corrupt:
        raw[100:140] = b"\xff" * 40  # a data page; the footer still reads
    return bytes(raw)


def _nonblank(text: str) -> int:
    return sum(1 for line in text.splitlines() if line.strip())


class Landing:
    """The generated landing folder: per real file its expected row count (None: not listed)."""

    def __init__(self, root: Path, fleet: Fleet, seed: int = 13):
        self.fleet = fleet
        self.dir = root / "landing"
        self.dir.mkdir(parents=True)
        self.outside = root / "outside"
        self.outside.mkdir()
        self.rng = random.Random(seed)
        self.expected: dict[str, int] = {}  # resolved path -> rows the file holds
        self.exact: dict[str, bool] = {}  # whether a reader can count them all (False: broken gzip)
        self.twins: dict[str, str] = {}  # duplicate file -> the file whose content it copies
        self.external: list[Path] = []

    def rows(self, k: int, shared: bool = False) -> list[list[str]]:
        source = self.fleet.lines
        start = self.rng.randrange(0, len(source) - 40)
        lines = [line.split() for line in source[start:start + self.rng.randint(1, 30)]]
        if not shared:
            for f in lines:
                f[0] = f"{k}-{f[0]}"
        return lines

    def put(self, name: str, data: bytes, rows: int, exact: bool = True) -> Path:
        path = self.dir / name
        path.write_bytes(data)
        self.expected[str(path.resolve())] = rows
        self.exact[str(path.resolve())] = exact
        return path

    def make(self, k: int) -> None:
        kind, rng = k % KINDS, self.rng
        lines = self.rows(k, shared=kind == 14)
        txt = "\n".join(" ".join(f) for f in lines) + "\n"
        header = self.fleet.header
        csv = "\n".join([header] + [",".join(f) for f in lines]) + "\n"
        n = len(lines)
        if kind == 0 or kind == 14:
            self.put(f"{k:05d}.txt", txt.encode(), n)
        elif kind == 1:
            ops = [(rng.choice(OPS), rng.randrange(10_000), rng.randrange(10_000)) for _ in range(rng.randint(1, 8))]
            text = "\n".join(plant_faults([" ".join(f) for f in lines], ops, blank="")) + "\n"
            self.put(f"{k:05d}.txt", text.encode(), _nonblank(text))
        elif kind == 2:
            self.put(f"{k:05d}.csv", ("\n".join([self.fleet.aliases] + [",".join(f) for f in lines]) + "\n").encode(), n)
        elif kind == 3:
            self.put(f"{k:05d}.csv", b"\xef\xbb\xbf" + csv.encode(), n)
        elif kind == 4:
            self.put(f"{k:05d}.csv.gz", gzip.compress(b"\xef\xbb\xbf" + csv.encode()), n)
        elif kind == 5:  # header-less CSV: quarantined whole, every line counted
            self.put(f"{k:05d}.csv", "\n".join(",".join(f) for f in lines).encode(), n)
        elif kind == 6:
            self.put(f"{k:05d}.parquet", _parquet(self.fleet, lines), n)
        elif kind == 7:
            self.put(f"{k:05d}.parquet", _parquet(self.fleet, lines, corrupt=True), n)
        elif kind == 8:
            self.put(f"{k:05d}.txt.gz", gzip.compress(txt.encode()), n)
        elif kind == 9:
            data = gzip.compress(txt.encode())
            self.put(f"{k:05d}.txt.gz", data[: len(data) * 2 // 3], n, exact=False)
        elif kind == 10:
            data = bytearray(gzip.compress(txt.encode()))
            data[len(data) // 2] ^= 0xFF
            self.put(f"{k:05d}.txt.gz", bytes(data), n, exact=False)
        elif kind == 11:  # 246-byte name
            self.put(f"{k:05d}-" + "n" * 236 + ".txt", txt.encode(), n)
        elif kind == 12:  # long and non-ASCII asset ids
            for f in lines:
                f[0] = rng.choice([f[0], "A" * 300, "é" * 100, "é" * 33 + str(k), f"moteur-é-{k}", "x" * 199])
            self.put(f"{k:05d}.csv", ("\n".join([header] + [",".join(f) for f in lines]) + "\n").encode(), n)
        elif kind == 13:  # asset cells meaning "no value"
            for f in lines:
                f[0] = rng.choice([f[0], "nan", "NaN", "inf", "-inf", "", " ", "null", "None"])
            self.put(f"{k:05d}.csv", ("\n".join([header] + [",".join(f) for f in lines]) + "\n").encode(), n)
        elif kind == 15:  # the same bytes as the previous plain text file
            twin = self.dir / f"{k - 15:05d}.txt"
            path = self.put(f"{k:05d}-copy.txt", twin.read_bytes(), self.expected[str(twin.resolve())])
            self.twins[str(path.resolve())] = str(twin.resolve())
        elif kind == 16:
            self.put(f"{k:05d}.txt", b"", 0)
        elif kind == 17:  # binary garbage on one line
            self.put(f"{k:05d}.dat", bytes(rng.randrange(0x80, 0x100) for _ in range(rng.randint(1, 300))), 1)
        elif kind == 18:  # 249-byte non-ASCII name, gzip CSV
            self.put(f"{k:05d}-" + "é" * 118 + ".csv.gz", gzip.compress(csv.encode()), n)
        elif kind == 19:  # links: to a landing file (listed once, under its target) and out of the landing
            (self.dir / f"{k:05d}-link.txt").symlink_to(self.dir / f"{k - 19:05d}.txt")
            out = self.outside / f"{k:05d}.txt"
            out.write_text(txt)
            (self.dir / f"{k:05d}-external.txt").symlink_to(out)
            self.external.append(out)

    def modify(self, k: int) -> None:
        """Rewrite file ``k`` in place (valid rows, or garbage every third time) with a new mtime.

        Only files no duplicate copies (kinds 1, 11, 16, 17): see the report on duplicates of a changed twin.
        """
        assert k % KINDS in (1, 11, 16, 17)
        (path,) = [Path(p) for p in self.expected if Path(p).name.startswith(f"{k:05d}")]
        if k % 3 == 0:
            data, rows = bytes(self.rng.randrange(0x80, 0x100) for _ in range(50)), 1
        else:
            lines = self.rows(k + 10_000)
            data, rows = ("\n".join(" ".join(f) for f in lines) + "\n").encode(), len(lines)
        self.put(path.name, data, rows)
        os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))


def _ingest(landing: Landing, root: Path, batch: str):
    path = root / "contract.yaml"
    if not path.exists():
        dump_contract(landing.fleet.contract, path)
    params = IngestParams(landing=str(landing.dir), dataset=DS, stream_threshold_bytes=3000, batch_rows=7,
                          contract=str(path))
    return run_local(params, str(root / "lake"), str(root / "q"), batch)


def _account(landing: Landing, root: Path, ledger: dict[str, object]) -> dict[str, int]:
    """Check every landing file's rows against the lake and the quarantine; return the figures."""
    snap = latest_snapshot(str(root / "lake"), DS)
    contract = landing.fleet.contract
    lake = read_lake(snap) if snap else contract.lake_schema().empty_table()
    if snap:
        assert snap.contract is not None and snap.contract.name == contract.name
    keys = list(zip(lake.column(C.ASSET).to_pylist(), lake.column(contract.key).to_pylist()))
    assert len(keys) == len(set(keys)), "duplicate (asset_id, time) keys in the lake"
    in_lake = collections.Counter(lake.column("source_file").to_pylist())
    quar = read_quarantine(str(root / "q"), DS)
    in_quar = collections.Counter(quar.column("source_file").to_pylist())
    assert set(in_lake) | set(in_quar) <= set(landing.expected), "rows from a file that is not in the landing"
    figures = collections.Counter()
    for src, expected in landing.expected.items():
        o = ledger[src]
        figures["files"] += 1
        figures["rows_in"] += expected
        if o.status == "ingested":
            accounted = in_lake[src] + in_quar[src]
            assert o.rows_read == expected == accounted, (src, o)
            assert (o.rows_written, o.rows_quarantined) == (in_lake[src], in_quar[src]), o
            figures["lake"] += in_lake[src]
            figures["quarantined_rows"] += in_quar[src]
        elif o.status == "quarantined":
            assert in_lake[src] == in_quar[src] == 0, o
            copy = [p for p in (root / "q" / "files" / o.file_id).iterdir() if p.name != "reason.txt"]
            assert [p.read_bytes() for p in copy] == [Path(src).read_bytes()], o  # it holds all its rows
            assert o.rows_read == o.rows_quarantined, o
            assert o.rows_read == expected if landing.exact[src] else o.rows_read <= expected, (src, o, expected)
            assert o.rows_read_exact or "rows: " in o.reason, o
            accounted = expected
            figures["quarantined_file_rows"] += expected
            figures["quarantined_files"] += 1
        elif o.status == "duplicate":
            twin = ledger[landing.twins[src]]
            assert twin.status == "ingested" and landing.expected[landing.twins[src]] == expected, o
            accounted = expected
            figures["duplicate_file_rows"] += expected
        else:
            raise AssertionError(f"unexpected outcome {o}")
        assert not o.reason.startswith("ingest error"), o  # isolation is a safety net, not a path
        figures["unaccounted"] += expected - accounted
    return dict(figures)


@pytest.mark.slow
@pytest.mark.parametrize("fleet", ["cmapss", "pumps"])
def test_a_landing_of_a_thousand_malformed_files_loses_no_row(tmp_path, capsys, fleet):
    landing = Landing(tmp_path, _fleet(fleet))
    for k in range(KINDS * PER_KIND):
        landing.make(k)
    assert len(landing.expected) >= 1000

    first = _ingest(landing, tmp_path, "b1")
    ledger = {o.source: o for o in first}
    assert len(first) == len(ledger) == len(landing.expected)  # every real file, once; no link outside
    assert set(ledger) == set(landing.expected)
    assert not {str(p.resolve()) for p in landing.external} & set(ledger)
    assert all(o.conserved for o in first)
    figures = _account(landing, tmp_path, ledger)
    assert figures["unaccounted"] == 0
    figures_status = dict(collections.Counter(o.status for o in ledger.values()))

    assert _ingest(landing, tmp_path, "b2") == []  # re-run: nothing new, same lake and quarantine
    assert _account(landing, tmp_path, ledger) == figures

    # plain, faulty, empty and garbage files become valid or garbage
    changed = [k for k in range(KINDS * PER_KIND) if k % KINDS in (1, 11, 16, 17)][::9]
    for k in changed:
        landing.modify(k)
    third = _ingest(landing, tmp_path, "b3")
    assert all(o.conserved for o in third)
    for o in third:
        ledger[o.source] = o
    after = _account(landing, tmp_path, ledger)
    after_status = dict(collections.Counter(o.status for o in ledger.values()))
    assert after["unaccounted"] == 0 and len(third) == len(changed)
    assert _ingest(landing, tmp_path, "b4") == []
    assert _account(landing, tmp_path, ledger) == after

    with capsys.disabled():
        for label, f, statuses in (("first run", figures, figures_status),
                                   ("after modifying %d files" % len(changed), after, after_status)):
            print(f"\nhostile landing ({fleet}), {label}: {f['files']} files, {f['rows_in']} rows in, "
                  f"{f.get('lake', 0)} in the lake, {f.get('quarantined_rows', 0)} quarantined rows + "
                  f"{f.get('quarantined_file_rows', 0)} in {f.get('quarantined_files', 0)} quarantined files, "
                  f"{f.get('duplicate_file_rows', 0)} in duplicate files (held by their twin), "
                  f"{f['unaccounted']} unaccounted; statuses {statuses}")
