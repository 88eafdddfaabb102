"""Ingest of large files in batches (``stream_threshold_bytes``, ``batch_rows``): same result as whole.

Every test ingests the same landing file twice, read whole (default threshold) and streamed with tiny
batches, read and decompress chunks and CSV blocks (so batch, chunk and block boundaries fall inside the
planted faults), and asserts identical lake rows, quarantined rows and reasons, and file outcomes.
"""

from __future__ import annotations

import contextlib
import gzip
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st

from ingest_faults import plant_faults
from twinflow import contracts as C
from twinflow.data import cmapss_path
from twinflow.lake import latest_snapshot, list_files
from twinflow.tasks import ingest as I
from twinflow.tasks.ingest import stream
from twinflow.tasks.ingest import IngestParams, read_lake, read_quarantine, run_local
import cmapss_names as CM

TRAIN_LINES = [line for line in gzip.decompress(cmapss_path("train_FD001.txt.gz").read_bytes()).decode()
               .splitlines() if line.strip()]
# Unit 1 has 192 cycles: windows around row 192 hold two assets.
HEADER = "unit,cycle," + ",".join(CM.CMAPSS_COLUMNS[2:])


@contextlib.contextmanager
def _small_io(chunk: int = 64, block: int = 4096):
    """Tiny read chunks and CSV blocks, so that a few rows span several of each."""
    old = stream.CHUNK_BYTES, stream.BLOCK_BYTES
    stream.CHUNK_BYTES, stream.BLOCK_BYTES = chunk, block
    try:
        yield
    finally:
        stream.CHUNK_BYTES, stream.BLOCK_BYTES = old


def _ingest(landing: Path, root: Path, **kw):
    params = IngestParams(landing=str(landing), dataset="d", **kw)
    (o,) = run_local(params, str(root / "lake"), str(root / "q"), "b1")
    snap = latest_snapshot(str(root / "lake"), "d")
    lake = read_lake(snap) if snap is not None else None
    # Per asset, the rows its data files hold in file order (Delta names files by uuid: compare contents).
    files = {} if snap is None or lake.num_rows == 0 else {
        asset: pa.concat_tables([pq.read_table(p) for p, _ in group])
        for asset, group in list_files(snap).items()}
    qfiles = sorted((p.relative_to(root / "q"), p.read_bytes()) for p in (root / "q" / "files").rglob("*")
                    if p.is_file()) if (root / "q" / "files").exists() else []
    staging = list((root / "lake" / I.STAGING_DIR).rglob("*")) if (root / "lake" / I.STAGING_DIR).exists() else []
    return o, lake, files, read_quarantine(str(root / "q"), "d"), qfiles, staging


def _same_whole_and_streamed(tmp: Path, name: str, data: bytes, batch_rows: int, chunk: int = 64,
                             block: int = 4096, **kw) -> object:
    landing = tmp / "landing"
    landing.mkdir(parents=True)
    (landing / name).write_bytes(data)
    whole = _ingest(landing, tmp / "whole", **kw)
    with _small_io(chunk, block):
        streamed = _ingest(landing, tmp / "streamed", stream_threshold_bytes=1, batch_rows=batch_rows, **kw)
    o1, lake1, files1, q1, qf1, st1 = whole
    o2, lake2, files2, q2, qf2, st2 = streamed
    assert o1.model_dump() == o2.model_dump()
    assert o1.conserved
    assert (lake1 is None) == (lake2 is None)
    if lake1 is not None:
        assert lake1.equals(lake2)
    # The same assets hold the same rows (the physical order inside Delta's data files is the writer's).
    assert files1.keys() == files2.keys()
    for k in files1:
        assert files1[k].sort_by(C.TIME).equals(files2[k].sort_by(C.TIME)), k
    assert q1.equals(q2)
    assert qf1 == qf2
    assert st1 == st2 == []
    return o1


_TEXT_OPS = ["stuck", "dup", "swap", "range", "nan", "sentinel", "string", "truncate", "extra", "blank", "spaces"]
_VALUE_OPS = ["stuck", "dup", "swap", "range", "nan", "sentinel"]


def _ops(kinds):
    return st.lists(st.tuples(st.sampled_from(kinds), st.integers(0, 10_000), st.integers(0, 10_000)), max_size=10)


@hsettings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=_ops(_TEXT_OPS), start=st.integers(100, 260), n=st.integers(1, 120), batch_rows=st.integers(3, 50),
       kind=st.sampled_from(["txt", "txt.gz", "csv", "csv.gz"]), chunk=st.sampled_from([1, 7, 64, 1 << 20]),
       utf8_error=st.integers(0, 6), tail=st.sampled_from(["\n", "", "\r\n", "  \n\n"]))
def test_streamed_files_give_exactly_what_whole_files_give(tmp_path_factory, ops, start, n, batch_rows, kind,
                                                           chunk, utf8_error, tail):
    lines = plant_faults(TRAIN_LINES[start:start + n], ops)
    if kind.startswith("csv"):
        lines = [HEADER] + [",".join(line.split()) for line in lines]
        if tail == "\r\n":
            lines = [line + "\r" for line in lines]
    data = "\n".join(lines).encode() + tail.encode()
    if utf8_error == 1 and data:  # an invalid byte, mostly after the first batch
        at = len(data) * 3 // 4
        data = data[:at] + b"\xff" + data[at:]
    if kind.endswith(".gz"):
        data = gzip.compress(data)
    _same_whole_and_streamed(tmp_path_factory.mktemp("s"), f"f.{kind}", data, batch_rows, chunk)


@hsettings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=_ops(_VALUE_OPS), start=st.integers(100, 260), n=st.integers(1, 120), batch_rows=st.integers(3, 50),
       row_group=st.integers(5, 200))
def test_streamed_parquet_gives_exactly_what_whole_parquet_gives(tmp_path_factory, ops, start, n, batch_rows,
                                                                 row_group):
    lines = [line.split() for line in plant_faults(TRAIN_LINES[start:start + n], ops)]
    cols = {name: [float(f[j]) for f in lines] for j, name in enumerate(CM.CMAPSS_COLUMNS)}
    cols["unit"] = [str(int(v)) for v in cols["unit"]]
    cols[C.TIME] = [int(v) for v in cols[C.TIME]]
    tmp = tmp_path_factory.mktemp("p")
    pq.write_table(pa.table(cols), tmp / "x.parquet", row_group_size=row_group)
    _same_whole_and_streamed(tmp, "f.parquet", (tmp / "x.parquet").read_bytes(), batch_rows)


def test_stuck_run_across_batches_and_out_of_order_batches(tmp_path):
    lines = [line.split() for line in TRAIN_LINES[:300]]  # unit 1 (192 rows), then unit 2
    for f in lines[170:215]:
        f[7] = "1590.00"  # s3 frozen across the asset boundary and many batch boundaries
    lines = [" ".join(f) for f in lines]
    lines[40:60] = lines[50:60] + lines[40:50]  # cycles that go back across a batch boundary
    o = _same_whole_and_streamed(tmp_path, "stuck.txt", ("\n".join(lines) + "\n").encode(), batch_rows=7)
    assert o.flagged["stuck"] >= 22 + 23 and o.flagged["out_of_order"] == 10


def test_cmapss_text_gzip_and_wrong_field_counts_stream_like_whole(tmp_path):
    lines = list(TRAIN_LINES[:400])
    lines[5] = lines[5][:30]  # truncated
    lines[11] = lines[11] + " 7.0"  # extra field
    lines[12] = lines[3]  # duplicate of a key from an earlier batch
    lines[390] = lines[390].replace(" ", " s", 1)  # string in a numeric cell: the whole file reads as strings
    data = gzip.compress(("\n".join("  " + line + "  " for line in lines) + "\n").encode())
    o = _same_whole_and_streamed(tmp_path, "train.txt.gz", data, batch_rows=4)
    assert (o.rows_read, o.rows_written, o.rows_quarantined) == (400, 396, 4)
    assert "duplicate key" in o.reason


def test_a_line_longer_than_the_streaming_block_is_read_as_a_whole_file_reads_it(tmp_path):
    lines = list(TRAIN_LINES[:60])
    f = lines[30].split()
    f[5] = "9" * 700 + "x"  # a 700-character non-numeric cell
    lines[30] = " ".join(f)
    o = _same_whole_and_streamed(tmp_path, "long.txt", ("\n".join(lines) + "\n").encode(), batch_rows=8,
                                 block=256)
    assert (o.rows_written, o.rows_quarantined) == (59, 1) and "non-numeric" in o.reason


@pytest.mark.parametrize("name, content", [
    ("header_only.csv", b"unit,cycle,s1\n\n   \n"),
    ("dup_header.csv", b"unit,unit,s1\n1,1,1\n"),
    ("missing.csv", b"unit,cycle,s1\n1,1,1\n1,2,1\n"),
    ("semicolons.csv", b"unit;cycle;s1\n1;2;3\n"),
    ("blank.txt", b"\n\n  \n \t \n"),
    ("broken.txt.gz", gzip.compress("\n".join(TRAIN_LINES[:300]).encode())[:-30]),
    ("broken.parquet", b"PAR1 not really parquet"),
])
def test_file_level_errors_are_the_same_streamed(tmp_path, name, content):
    o = _same_whole_and_streamed(tmp_path, name, content, batch_rows=3)
    assert o.status == "quarantined"


def _corrupt_parquet(pages: bool) -> bytes:
    lines = [line.split() for line in TRAIN_LINES[:80]]
    cols = {name: [float(f[j]) for f in lines] for j, name in enumerate(CM.CMAPSS_COLUMNS)}
    buf = pa.BufferOutputStream()
    pq.write_table(pa.table(cols), buf, compression="none", row_group_size=30)
    raw = bytearray(buf.getvalue().to_pybytes())
    if pages:
        raw[100:140] = b"\xff" * 40
        return bytes(raw)
    return bytes(raw[:-30])


def _flip(data: bytes) -> bytes:
    out = bytearray(data)
    out[len(out) // 2] ^= 0xFF
    return bytes(out)


_GZ = gzip.compress(("\n".join(TRAIN_LINES[:300]) + "\n").encode())
_CSV = "\n".join([HEADER] + [",".join(line.split()) for line in TRAIN_LINES[180:260]]) + "\n"
_ASSETS = "\n".join([HEADER] + [",".join([a] + line.split()[1:]) for a, line in
                               zip(["nan", "1", "", "INF", "A" * 201, "é" * 33, "é" * 34, " null "] * 10,
                                   TRAIN_LINES[:80])]) + "\n"


@pytest.mark.parametrize("name, content", [
    ("bom.csv", b"\xef\xbb\xbf" + _CSV.encode()),
    ("bom.csv.gz", gzip.compress(b"\xef\xbb\xbf" + _CSV.encode())),
    ("bom.txt", b"\xef\xbb\xbf" + "\n".join(TRAIN_LINES[:50]).encode()),
    ("nohdr.csv", "\n".join(",".join(line.split()) for line in TRAIN_LINES[:70]).encode()),
    ("assets.csv", _ASSETS.encode()),
    ("truncated.txt.gz", _GZ[: len(_GZ) // 2]),
    ("flipped.txt.gz", _flip(_GZ)),
    ("flipped.csv.gz", _flip(gzip.compress(_CSV.encode()))),
    ("pages.parquet", _corrupt_parquet(pages=True)),
    ("nofooter.parquet", _corrupt_parquet(pages=False)),
])
def test_bom_header_less_asset_ids_and_partial_counts_are_the_same_streamed(tmp_path, name, content):
    o = _same_whole_and_streamed(tmp_path, name, content, batch_rows=7)
    if name.startswith("bom"):
        assert o.status == "ingested" and o.rows_quarantined == 0
    elif name == "assets.csv":
        assert (o.rows_read, o.rows_written, o.rows_quarantined) == (80, 20, 60)
    elif name == "nohdr.csv":
        assert o.status == "quarantined" and o.rows_read == 70 and o.rows_read_exact
    else:
        assert o.status == "quarantined" and not o.rows_read_exact and "rows: " in o.reason


def test_invalid_utf8_after_the_first_batches_quarantines_the_whole_file(tmp_path):
    lines = list(TRAIN_LINES[:200])
    data = ("\n".join(lines) + "\n").encode()
    at = data.index(lines[150].encode())
    data = data[:at] + b"\xe9" + data[at:]
    src = tmp_path / "landing" / "late.txt"
    src.parent.mkdir()
    src.write_bytes(data)
    staging, quarantine = tmp_path / "staging", tmp_path / "q"
    info = I.list_landing(str(src))[0]
    with _small_io(chunk=256):
        o = I.process_file(info, IngestParams(landing=str(src), stream_threshold_bytes=1, batch_rows=10),
                           staging, quarantine, "b1")
    # the offset is in the whitespace-normalised text, as parse_bytes reports it
    assert o.status == "quarantined" and o.reason == I.parse_bytes(data, "late.txt").file_error
    assert o.reason.startswith("not valid UTF-8 text (byte ")
    assert o.rows_read == o.rows_quarantined == 200 and o.rows_written == 0 and not o.assets
    # nothing of the file's rows is staged; its copy is, for the commit to publish
    assert o.staged == str(staging / o.file_id)
    assert sorted(p.name for p in Path(o.staged).iterdir()) == ["file"]
    assert (Path(o.staged) / "file" / "late.txt").read_bytes() == data
    assert not (quarantine / "files").exists()
    # and end to end: same as the whole-file path, nothing in the lake
    o2 = _same_whole_and_streamed(tmp_path / "e2e", "late.txt", data, batch_rows=10, chunk=256)
    assert o2.reason == o.reason


def test_stream_params_do_not_change_the_digest():
    a = IngestParams(landing="x")
    b = IngestParams(landing="x", stream_threshold_bytes=1, batch_rows=5)
    assert a.digest("d") == b.digest("d")
    with pytest.raises(ValueError):
        IngestParams(landing="x", batch_rows=0)
    with pytest.raises(ValueError):
        IngestParams(landing="x", stream_threshold_bytes=0)


@hsettings(max_examples=200, deadline=None)
@given(text=st.text(alphabet=" \t\r\na1", max_size=60), cuts=st.lists(st.integers(0, 60), max_size=6))
def test_whitespace_normalisation_per_line_aligned_chunk_equals_whole(text, cuts):
    data = text.encode()
    bounds = sorted({c for c in cuts if c <= len(data)})
    # chunks end just after a newline, as _TextStream cuts them
    ends = sorted({data.index(b"\n", b) + 1 for b in bounds if b"\n" in data[b:]} | {len(data)})
    pieces, prev = [], 0
    for e in ends:
        pieces.append(data[prev:e])
        prev = e
    assert b"".join(I.normalise_whitespace(p) for p in pieces) == I.normalise_whitespace(data)


def test_streaming_memory_follows_the_batch_not_the_file(tmp_path):
    """Python/numpy memory (tracemalloc; Arrow's own pool is not traced) while ingesting a 7 MB file: read
    whole it holds the file's bytes and more; streamed in 2,000-row batches, a fraction of the file."""
    import tracemalloc

    lines = TRAIN_LINES + [str(int(line.split()[0]) + 1000) + " " + line.split(" ", 1)[1] for line in TRAIN_LINES]
    src = tmp_path / "landing" / "big.txt"
    src.parent.mkdir()
    src.write_bytes(("\n".join(lines) + "\n").encode())
    size = src.stat().st_size
    info = I.list_landing(str(src))[0]
    peaks = {}
    for mode, kw in (("whole", {}), ("streamed", dict(stream_threshold_bytes=1, batch_rows=2_000))):
        with _small_io(chunk=256 << 10, block=64 << 10):
            tracemalloc.start()
            try:
                o = I.process_file(info, IngestParams(landing=str(src), **kw), tmp_path / mode, tmp_path / "q", "b")
                peaks[mode] = tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()
        assert o.status == "ingested" and o.rows_written == len(lines)
    # (measured 2026-11-25: whole 29 MB, streamed 4.8 MB for a 7 MB file)
    assert peaks["whole"] > 2 * size
    assert peaks["streamed"] < min(size, peaks["whole"] / 3), (peaks, size)
