"""Parsing: the bytes of one source file -> typed canonical columns, plus the rows that could not be parsed.

Shared by the whole-file and the streamed readers (:mod:`.stream`): column naming, type coercion and
the per-row parse errors are decided here once.
"""

from __future__ import annotations
import gzip
import io
import re
import zlib
from typing import Any
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field
from twinflow import contracts as C
from twinflow.contract import Clock, FleetContract, resolve_contract

from twinflow.tasks.ingest.names import COMPRESSION_SUFFIXES, Format, detect_format

class Parsed(BaseModel):
    """A parsed source: typed canonical columns plus rows that could not be parsed."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    table: pa.Table | None = None  # canonical columns present in the source, plus "record"
    reasons: dict[int, str] = Field(default_factory=dict)  # row -> reason (cells that did not convert)
    bad_rows: list[tuple[str, str]] = Field(default_factory=list)  # (reason, raw text) of unparseable rows
    file_error: str | None = None
    rows_read: int = 0
    # Empty when rows_read is what the file held; else how it was counted (the file could not be read to
    # its end): "rows: at least N", "rows: N per the Parquet footer" or "rows: unknown".
    rows_note: str = ""
    notes: list[str] = Field(default_factory=list)


def types_for(contract: FleetContract) -> dict[str, pa.DataType]:
    """The type each canonical column is read as from text: timestamps are read as text and parsed by
    :func:`parse_times` (the contract's format and timezone; pyarrow's reader takes neither)."""
    return {C.ASSET: pa.string(), C.TIME: pa.int64(), C.TIMESTAMP: pa.string(),
            **{c: pa.float64() for c in contract.channel_names}}


NON_BLANK = re.compile(rb"\S")


def count_lines(data: bytes) -> int:
    # Rows the source holds as far as a reader can tell: non-blank lines.
    return sum(1 for line in data.splitlines() if line.strip())


BOM = b"\xef\xbb\xbf"


def strip_bom(text: bytes) -> bytes:
    """Text without a leading UTF-8 byte-order mark (spreadsheet exports write one before the header)."""
    return text[3:] if text.startswith(BOM) else text


def gzip_partial_lines(fh: Any, chunk: int = 8 << 20) -> tuple[int, bytes]:
    """Non-blank lines of a corrupt or truncated gzip stream up to the point where it breaks.

    Decompresses member after member until the error, in ``chunk`` reads (memory: one chunk plus one
    line), counting what a reader saw: a lower bound of the rows the file held. Returns (lines, first 8
    bytes of the text). Both readers call it on the raw file, so they give the same count.
    """
    lines, carry, head = 0, b"", b""
    d = zlib.decompressobj(wbits=31)
    first = True
    try:
        while True:
            data = fh.read(chunk)
            if not data:
                break
            while data:
                # Small inputs: the output of the call that hits the error is lost, so keep it small.
                rest = data[1024:]
                out = d.decompress(data[:1024])
                data = d.unused_data + rest if d.eof else rest
                if out:
                    if first:
                        out, first = strip_bom(out) if len(out) >= 3 else out, False
                    if len(head) < 8:
                        head += out[:8 - len(head)]
                    text = carry + out
                    cut = max(text.rfind(b"\n"), text.rfind(b"\r")) + 1
                    lines += count_lines(text[:cut])
                    carry = text[cut:]
                if d.eof:
                    if data[:2] != b"\x1f\x8b":
                        data = b""  # trailing garbage after the last member
                    d = zlib.decompressobj(wbits=31)
    except zlib.error:
        pass
    return lines + (1 if carry.strip() else 0), head


def gzip_reason(exc: Exception) -> str:
    """Why a gzip stream is corrupt, in the same words whether it was read whole or streamed (the CRC
    values that only ``GzipFile`` reports are left out)."""
    msg = re.sub(r"^(CRC check failed|Incorrect length of data produced).*", r"\1", str(exc))
    return f"corrupt gzip stream ({exc.__class__.__name__}: {msg[:80]})"


def rows_note(rows: int) -> str:
    return f"rows: at least {rows}" if rows else "rows: unknown"


def first_line_is_data(fields: list[str], contract: FleetContract) -> bool:
    """A CSV "header" that is a data row: no field names a contract column and most fields are numbers."""
    if any(contract.canonical_name(f) is not None for f in fields):
        return False
    tokens = [t for t in re.split(r"[,;\t ]+", ",".join(fields)) if t]

    def number(t: str) -> bool:
        try:
            float(t)
            return True
        except ValueError:
            return False

    return bool(tokens) and 2 * sum(number(t) for t in tokens) >= len(tokens)


NO_HEADER = ("no header: the first line looks like data, not column names (a header-less CSV needs "
             "columns: in the contract's datasets rule, or columns=[...])")


NO_COLUMNS = ("header-less text needs its column order: declare columns: in the contract's datasets rule "
              "for this file (or pass columns=[...])")


def decompress(data: bytes, name: str) -> bytes:
    if data[:2] == b"\x1f\x8b" or name.lower().endswith(COMPRESSION_SUFFIXES):
        return gzip.decompress(data)
    return data


def normalise_whitespace(data: bytes) -> bytes:
    # C-MAPSS files separate fields by runs of spaces and end lines with trailing spaces: make
    # them single-space separated so that the CSV reader counts fields exactly.
    # bytes.replace runs at memory speed; a regex over every separator is ~50x slower.
    data = data.replace(b"\t", b" ").replace(b"\r\n", b"\n")
    while b"  " in data:
        data = data.replace(b"  ", b" ")
    return data.replace(b" \n", b"\n").replace(b"\n ", b"\n").strip(b" ")


def is_utf8_error(exc: Exception) -> bool:
    return "utf8" in str(exc).lower() or "utf-8" in str(exc).lower()


_OFFSET = r"(?:[Zz]|[+-]\d\d(?::?\d\d)?)\s*$"


def parse_times(col: pa.ChunkedArray | pa.Array, clock: Clock) -> tuple[pa.Array, np.ndarray]:
    """Timestamps (text, or Parquet timestamps) as UTC µs, and a mask of cells that did not parse.

    With ``clock.format`` the text is parsed with it (``strptime``); otherwise ISO 8601 and its common
    variants. Times without an offset are local times of ``clock.timezone`` (DST: an ambiguous or
    skipped local time takes the earlier instant); times with one are converted. Blank cells are null,
    not errors (the key check quarantines them as a missing timestamp).
    """
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    utc = pa.timestamp("us", tz="UTC")
    if pa.types.is_timestamp(arr.type):
        if arr.type.tz is None:
            arr = pc.assume_timezone(arr.cast(pa.timestamp("us")), clock.timezone, ambiguous="earliest",
                                     nonexistent="earliest")
        return arr.cast(utc), np.zeros(len(arr), bool)
    text = pc.utf8_trim_whitespace(arr.cast(pa.string()))
    blank = pc.fill_null(pc.or_(pc.equal(text, ""), pc.is_in(text, value_set=pa.array(
        ["nan", "NaN", "NA", "N/A", "null", "NULL", "NaT"]))), True)
    text = pc.if_else(blank, pa.scalar(None, pa.string()), text)

    def local(naive: pa.Array) -> pa.Array:
        return pc.assume_timezone(naive, clock.timezone, ambiguous="earliest", nonexistent="earliest").cast(utc)

    if clock.format:
        out = pc.strptime(text, format=clock.format, unit="us", error_is_null=True)
        out = out.cast(utc) if out.type.tz is not None else local(out)
    else:
        # The usual export: every time naive, or every time with an offset, and ISO 8601. A cast fails
        # only after parsing up to the first cell of the other kind, so try first the kind the first
        # time is (one parse instead of two for files with offsets); the result is the same either way.
        casts = [lambda: local(text.cast(pa.timestamp("us"))), lambda: text.cast(utc)]
        if _first_has_offset(text):
            casts.reverse()
        try:
            out = casts[0]()
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            try:
                out = casts[1]()
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                out = _times_mixed(text, local)
    bad = np.asarray(pc.and_(pc.is_null(out), pc.invert(blank)).to_numpy(zero_copy_only=False), bool)
    return out, bad


def _first_has_offset(text: pa.Array) -> bool:
    """Whether the first non-null cell of a text column ends with a UTC offset (``Z``, ``+02:00``)."""
    valid = text.is_valid()
    first = pc.index(valid, True).as_py()
    return first >= 0 and re.search(_OFFSET, text[first].as_py()) is not None


def _times_mixed(text: pa.Array, local) -> pa.Array:
    """:func:`parse_times` of text mixing naive times, times with offsets and unparseable cells."""
    import pandas as pd

    has_off = np.asarray(pc.fill_null(pc.match_substring_regex(text, _OFFSET), False).to_numpy(
        zero_copy_only=False), bool)
    values = np.array(text.to_pylist(), dtype=object)
    out = np.full(len(values), np.datetime64("NaT"), "datetime64[us]")
    if has_off.any():
        aware = pd.to_datetime(pd.Series(values[has_off]), format="ISO8601", utc=True, errors="coerce")
        out[has_off] = aware.dt.tz_localize(None).to_numpy("datetime64[us]")
    naive = ~has_off
    result = pa.array(out, pa.timestamp("us"), mask=np.isnat(out)).cast(pa.timestamp("us", tz="UTC"))
    if naive.any():
        local_ts = pd.to_datetime(pd.Series(values[naive]), format="ISO8601", errors="coerce")
        if getattr(local_ts.dt, "tz", None) is not None:  # pragma: no cover - mixed parse gave aware
            local_ts = local_ts.dt.tz_localize(None)
        n = local_ts.to_numpy("datetime64[us]")
        conv = local(pa.array(n, pa.timestamp("us"), mask=np.isnat(n))).to_numpy(zero_copy_only=False)
        merged = result.to_numpy(zero_copy_only=False).copy()
        merged[naive] = conv
        result = pa.array(merged, pa.timestamp("us", tz="UTC"), mask=np.isnat(merged))
    return result


def normalise_asset(arr: pa.Array, numeric_ok: bool) -> pa.Array:
    """Asset ids as trimmed strings; with ``numeric_ok`` a numeric id is stored as its integer text
    (``7``, ``7.0`` and a Parquet float 7.0 all become ``"7"``)."""
    if pa.types.is_floating(arr.type) and numeric_ok:
        vals = arr.to_numpy(zero_copy_only=False)
        whole = np.isfinite(vals) & (vals == np.floor(vals)) & (np.abs(vals) < 2**53)
        if whole.all() or not len(vals):
            return pa.array(vals.astype(np.int64), pa.int64(), mask=np.asarray(pc.is_null(arr).to_numpy(
                zero_copy_only=False), bool)).cast(pa.string())
    # A fleet has few asset ids and many rows each: normalise each distinct id once.
    enc = pc.dictionary_encode(pc.cast(arr, pa.string()))
    ids = pc.utf8_trim_whitespace(enc.dictionary)
    if numeric_ok:
        ids = pc.replace_substring_regex(ids, r"^([+-]?\d+)\.0*$", r"\1")
    return ids.take(enc.indices)


def _coerce(col: pa.ChunkedArray | pa.Array, name: str) -> tuple[pa.Array, np.ndarray]:
    """Cast a string column to its canonical type; return the values and a mask of unparseable cells."""
    import pandas as pd

    s = pd.Series(col.to_pylist(), dtype=object)
    stripped = s.map(lambda v: v.strip() if isinstance(v, str) else v)
    blank = stripped.isna() | stripped.isin(["", "nan", "NaN", "NA", "N/A", "null", "NULL", "-nan"])
    if name == C.ASSET:
        return pa.array(stripped.where(~stripped.isna(), None).tolist(), pa.string()), np.zeros(len(s), bool)
    num = pd.to_numeric(stripped.where(~blank, None), errors="coerce").astype("float64")
    bad = (num.isna() & ~blank).to_numpy()
    if name == C.TIME:
        nonint = (~num.isna() & (num != np.floor(num))).to_numpy()
        bad = bad | nonint
        vals = num.to_numpy()
        ok = ~np.isnan(vals) & ~bad & (np.abs(np.nan_to_num(vals)) < 2**62)
        out = np.zeros(len(vals), np.int64)
        out[ok] = vals[ok].astype(np.int64)
        return pa.array(out, pa.int64(), mask=~ok), bad
    return pa.array(num.to_numpy(), pa.float64(), from_pandas=True), bad


def canonicalise(table: pa.Table, names: list[str], allow_missing: bool, type_errors: bool,
                  notes: list[str], offset: int = 0, contract: FleetContract | None = None
                  ) -> tuple[pa.Table | None, dict[int, str] | None, str | None]:
    """Rename source columns to the contract's names, check required ones, cast (string fallback).

    The asset column and the clock column (``cycle`` or ``timestamp``) are required; a file lacking
    some channels is refused unless ``allow_missing``. ``offset`` numbers the rows (``record``) of a
    batch that does not start the file."""
    contract = contract or resolve_contract(None)
    key = contract.key
    types = types_for(contract)
    mapping: dict[str, str] = {}
    ignored = []
    for src in names:
        canon = contract.canonical_name(src) if src != "_" else None
        if canon is None:
            if src != "_":
                ignored.append(src)
            continue
        if canon in mapping.values():
            return None, None, f"two columns map to {canon!r}: fix the header"
        mapping[src] = canon
    missing_keys = [k for k in (C.ASSET, key) if k not in mapping.values()]
    if missing_keys:
        hint = ""
        if len(names) == 1:
            hint = f" (the header has a single column {names[0][:40]!r}: wrong delimiter?)"
        declared = {C.ASSET: contract.asset.names, key: contract.clock.names}
        spelled = "; ".join(f"{k}: {' / '.join(declared[k][:4])}" for k in missing_keys)
        return None, None, (f"missing required column(s) {', '.join(missing_keys)} (contract "
                            f"{contract.name!r} v{contract.version} accepts {spelled}){hint}")
    missing = [c for c in contract.channel_names if c not in mapping.values()]
    if missing and not allow_missing:
        return None, None, (f"missing channel column(s) {', '.join(missing)} of contract {contract.name!r} "
                            "(set allow_missing_channels=True to accept them as null)")
    if missing:
        notes.append(f"missing channels stored as null: {', '.join(missing)}")
    if ignored:
        notes.append(f"ignored columns not in the contract: {', '.join(ignored)}")
    n = table.num_rows
    reasons: dict[int, str] = {}
    cols, out_names = [], []
    for src, canon in mapping.items():
        col = table.column(src)
        if canon == C.ASSET:
            arr = normalise_asset(col.combine_chunks(), contract.asset.numeric_ok)
        elif canon == C.TIMESTAMP:
            arr, bad = parse_times(col, contract.clock)
            if bad.any():
                raw = col.to_pylist()
                fmt = f" (format {contract.clock.format!r})" if contract.clock.format else ""
                for i in np.flatnonzero(bad):
                    reasons.setdefault(int(i), f"unparseable timestamp{fmt}: {str(raw[i])[:40]!r}")
        elif pa.types.is_string(col.type) or pa.types.is_large_string(col.type) or type_errors:
            if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
                arr, bad = _coerce(col, canon)
            else:
                arr, bad = col.combine_chunks().cast(types[canon]), np.zeros(n, bool)
            if bad.any():
                raw = col.to_pylist()
                for i in np.flatnonzero(bad):
                    reasons.setdefault(int(i), f"non-numeric value in {canon}: {str(raw[i])[:40]!r}")
        else:
            try:
                arr = pc.cast(col, types[canon])
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                arr, bad = _coerce(col.cast(pa.string()), canon)
                for i in np.flatnonzero(bad):
                    reasons.setdefault(int(i), f"value of {canon} not convertible to {types[canon]}")
        cols.append(arr)
        out_names.append(canon)
    cols.append(pa.array(np.arange(offset, offset + n, dtype=np.int64)))
    out_names.append("record")
    return pa.Table.from_arrays(cols, names=out_names), reasons, None


def source_columns(names: list[str], contract: FleetContract) -> tuple[list[str], set[str]]:
    """A text source's column names, and those the contract knows (the others are not read)."""
    return list(names), {n for n in names if n != "_" and contract.canonical_name(n) is not None}


class BadRows:
    """pyarrow's ``invalid_row_handler``: skips rows with a wrong field count, recording why and their text."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, str]] = []  # (reason, raw text)
        self.actual: list[int] = []  # field count of each such row

    def __call__(self, row: Any) -> str:
        self.actual.append(row.actual_columns)
        self.rows.append((f"expected {row.expected_columns} fields, got {row.actual_columns}"
                          + (" (truncated line?)" if row.actual_columns < row.expected_columns else ""),
                          row.text[:500]))
        return "skip"


def csv_options(names: list[str], mapped: set[str], types: dict[str, pa.DataType], header: bool, delim: str,
                on_invalid: "BadRows", block: int) -> dict[str, Any]:
    """pyarrow CSV options, the same for the whole-file and the streamed reader (only the block differs):
    the source's column names, the mapped ones read with ``types``, rows with another field count
    handed to ``on_invalid``."""
    return dict(
        read_options=pacsv.ReadOptions(column_names=names, skip_rows=1 if header else 0, block_size=block),
        parse_options=pacsv.ParseOptions(delimiter=delim, invalid_row_handler=on_invalid, newlines_in_values=False),
        convert_options=pacsv.ConvertOptions(include_columns=[n for n in names if n in mapped], column_types=types,
                                             quoted_strings_can_be_null=True))


def parse_bytes(data: bytes, name: str, fmt: Format = "auto", columns: list[str] | None = None,
                delimiter: str = ",", allow_missing_channels: bool = False,
                contract: FleetContract | None = None) -> Parsed:
    """Parse the bytes of one source file into canonical typed columns.

    Never raises for bad content: problems come back as ``file_error`` (the whole file is unusable) or
    as row-level reasons (``bad_rows`` for rows with a wrong field count, ``reasons`` for cells that do not
    convert).

    Args:
        data: File content, possibly gzip-compressed.
        name: File name (for format detection and messages).
        fmt: Declared format or ``auto``.
        columns: Column names of a header-less CSV or text file.
        delimiter: CSV delimiter.
        allow_missing_channels: Accept sources that lack some channels.
        contract: The fleet contract (default: the settings').
    """
    contract = contract or resolve_contract(None)
    if not data:
        return Parsed(file_error="empty file")
    try:
        raw = decompress(data, name)
    except (OSError, EOFError, zlib.error) as exc:
        return gzip_error(gzip_reason(exc),
                          io.BytesIO(data), name, fmt, columns)
    fmt = detect_format(name, raw[:8], fmt)
    if fmt == "parquet":
        return _parse_parquet(raw, allow_missing_channels, contract)
    raw = strip_bom(raw)
    if NON_BLANK.search(raw) is None:  # not raw.strip(): that copies the whole file
        return Parsed(file_error="empty file")
    if fmt == "text" and columns is None:  # called without a route: the contract's rule for this name
        rule = contract.rule_for(name)
        columns = list(rule.columns) if rule is not None and rule.columns else None
    header = fmt == "csv" and columns is None
    if fmt == "text":
        if columns is None:
            return Parsed(file_error=NO_COLUMNS, rows_read=count_lines(raw))
        raw, delim, names = normalise_whitespace(raw), " ", list(columns)
    else:
        delim = delimiter
        names = columns
    if not raw.isascii():
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            return Parsed(file_error=f"not valid UTF-8 text (byte {exc.start})",
                          rows_read=max(count_lines(raw) - header, 0))
    if header:
        end = raw.find(b"\n")
        first = raw[:end if end >= 0 else len(raw)].rstrip(b"\r")  # not split(): that copies the rest
        try:
            names = [h.strip().strip('"') for h in first.decode("utf-8").split(delim)]
        except UnicodeDecodeError:
            return Parsed(file_error="not valid UTF-8 text (header)", rows_read=max(count_lines(raw) - 1, 0))
        if first_line_is_data(names, contract):
            return Parsed(file_error=NO_HEADER, rows_read=count_lines(raw))
        if NON_BLANK.search(raw, len(first) + 1) is None:
            return Parsed(file_error="no data rows (header only)")
        if len(set(names)) != len(names):
            return Parsed(file_error=f"duplicate column names in header: {names}",
                          rows_read=count_lines(raw) - 1)
    assert names is not None
    names, mapped = source_columns(names, contract)
    types = types_for(contract)
    on_invalid = BadRows()
    bad_rows, actual = on_invalid.rows, on_invalid.actual

    def read(types: dict[str, pa.DataType], block: int = WHOLE_BLOCK_BYTES) -> pa.Table:
        bad_rows.clear()
        actual.clear()
        return pacsv.read_csv(io.BytesIO(raw), **csv_options(names, mapped, types, header, delim, on_invalid,
                                                              block))

    canon_of = {n: contract.canonical_name(n) for n in mapped}
    type_errors = False
    typed = {n: types[canon_of[n]] for n in mapped}
    table = None
    if len(raw) > FAST_BLOCK_BYTES:
        # Small blocks parse in parallel and cost ~25% less CPU than whole-file ones. The result is
        # kept only for a clean file (no error, no row with another field count: the order in which
        # parallel blocks report bad rows is not the file's); anything else is read again below
        # exactly as before, with blocks as large as the longest line the reader accepts.
        try:
            table = read(typed, FAST_BLOCK_BYTES)
        except pa.ArrowInvalid:
            table = None
        if bad_rows:
            table = None
    try:
        if table is None:
            table = read(typed)
    except pa.ArrowInvalid as exc:
        if is_utf8_error(exc):
            return Parsed(file_error="not valid UTF-8 text", rows_read=count_lines(raw) - header)
        try:
            table = read({n: pa.string() for n in mapped})
            type_errors = True
        except pa.ArrowInvalid as exc2:
            if is_utf8_error(exc2):
                return Parsed(file_error="not valid UTF-8 text", rows_read=count_lines(raw) - header)
            return Parsed(file_error=f"unparseable {fmt}: {str(exc2).splitlines()[0][:160]}",
                          rows_read=count_lines(raw) - header)
    rows_read = table.num_rows + len(bad_rows)
    if table.num_rows == 0 and bad_rows:
        return Parsed(file_error=f"no row has the expected {len(names)} fields (the first has {actual[0]}): "
                                 "wrong delimiter or wrong format", rows_read=rows_read)
    notes: list[str] = []
    out, reasons, err = canonicalise(table, list(names), allow_missing_channels, type_errors, notes,
                                     contract=contract)
    if err:
        return Parsed(file_error=err, rows_read=rows_read)
    return Parsed(table=out, reasons=reasons, bad_rows=list(bad_rows), rows_read=rows_read, notes=notes)


def parquet_error(exc: Exception) -> str:
    # The same words whether the file was read from memory or streamed from its file system.
    msg = re.sub(r"^Could not open Parquet input source '[^']*': ", "", str(exc).splitlines()[0])
    return f"unreadable Parquet ({msg[:120]})"


def gzip_error(reason: str, fh: Any, name: str, fmt: Format, columns: list[str] | None) -> Parsed:
    """A corrupt gzip file: rows counted as far as it decompresses (text), unknown for Parquet."""
    lines, head = gzip_partial_lines(fh)
    fmt_ = detect_format(name, head, fmt)
    if fmt_ == "parquet":
        return Parsed(file_error=reason, rows_note="rows: unknown")
    rows = max(lines - (fmt_ == "csv" and columns is None), 0)
    return Parsed(file_error=reason, rows_read=rows, rows_note=rows_note(rows))


def parquet_footer_rows(fh: Any) -> tuple[int, str]:
    """(rows, note) of an unreadable Parquet file: its footer's row count when the footer reads."""
    try:
        n = pq.ParquetFile(fh).metadata.num_rows
    except Exception:  # noqa: BLE001 - any failure to read the footer means: unknown
        return 0, "rows: unknown"
    return n, f"rows: {n} per the Parquet footer"


def _parse_parquet(raw: bytes, allow_missing: bool, contract: FleetContract) -> Parsed:
    try:
        table = pq.read_table(io.BytesIO(raw))
    except (pa.ArrowException, OSError) as exc:
        n, note = parquet_footer_rows(io.BytesIO(raw))
        return Parsed(file_error=parquet_error(exc), rows_read=n, rows_note=note)
    if table.num_rows == 0:
        return Parsed(file_error="no data rows (empty Parquet file)")
    notes: list[str] = []
    lineage = set(C.LINEAGE)
    names = [n for n in table.column_names if n not in lineage and n not in ("asset", "dataset")]
    out, reasons, err = canonicalise(table.select(names), names, allow_missing, False, notes, contract=contract)
    if err:
        return Parsed(file_error=err, rows_read=table.num_rows)
    return Parsed(table=out, reasons=reasons, rows_read=table.num_rows, notes=notes)



WHOLE_BLOCK_BYTES = 16 << 20
FAST_BLOCK_BYTES = 1 << 20  # first try of a whole file larger than this (see parse_bytes)
