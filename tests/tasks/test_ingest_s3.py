"""Ingest into a lake on S3-compatible object storage (a real SeaweedFS on loopback): the lease that
serialises ingest runs on several hosts, the ledger kept in the lake, racing runs, a run killed
mid-commit, and refused or unreachable stores."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pytest

import cmapss_names as CM
from object_store import requires_weed, s3_filesystem
from twinflow import contracts as C
from twinflow import lake as lk
from twinflow.data import cmapss_path
from twinflow.errors import AlreadyRunning, ConfigError, ServiceUnavailable
from twinflow.tasks.ingest import IngestParams, read_quarantine, run_local
from twinflow.tasks.ingest.ledger import ingested_snapshot

pytestmark = [pytest.mark.integration, requires_weed]
pytest.importorskip("s3fs")

TRAIN_LINES = [x for x in gzip.decompress(cmapss_path("train_FD001.txt.gz").read_bytes()).decode().splitlines()
               if x.strip()]
SENSOR = CM.SENSORS[1]
WORKER = Path(__file__).resolve().parents[1] / "ingest_s3_worker.py"


def _landing(root: Path, files: int = 4, lines: int = 400, bad_every: int = 97) -> Path:
    """C-MAPSS text files of FD001 rows, with an out-of-range value every ``bad_every`` lines (quarantined)."""
    root.mkdir(parents=True, exist_ok=True)
    for k in range(files):
        chunk = TRAIN_LINES[k * lines:(k + 1) * lines]
        chunk = [(" ".join(line.split()[:5] + ["1e9"] + line.split()[6:]) if i % bad_every == 5 else line)
                 for i, line in enumerate(chunk)]
        (root / f"f{k}.txt").write_text("\n".join(chunk) + "\n")
    return root


def _lake_rows(lake_url: str, so: dict) -> pa.Table:
    snap = lk.snapshot(lake_url, "fleet", so)
    rows = lk.read_lake(snap, columns=[C.ASSET, C.TIME, SENSOR, "source_file"], storage_options=so)
    return rows.sort_by([(C.ASSET, "ascending"), (C.TIME, "ascending")])


def _same_rows(a: pa.Table, b: pa.Table) -> bool:
    return all(a.column(c).to_pylist() == b.column(c).to_pylist() for c in (C.ASSET, C.TIME, SENSOR))


def _keys_unique(rows: pa.Table) -> bool:
    keys = pc.binary_join_element_wise(rows.column(C.ASSET).cast(pa.string()),
                                       rows.column(C.TIME).cast(pa.string()), "/")
    return len(pc.unique(keys)) == rows.num_rows


def _worker(s3, landing: Path, lake_url: str, quarantine: Path, batch: str, crash: str = "",
            ttl: float = 60.0) -> subprocess.Popen:
    env = {**os.environ, "TWINFLOW_TEST_S3_OPTIONS": json.dumps(s3.options()),
           "TWINFLOW_TEST_LEASE_TTL": str(ttl),
           "PYTHONPATH": os.pathsep.join([str(WORKER.parent), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, str(WORKER), str(landing), lake_url, str(quarantine), batch, crash],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def test_ingest_into_an_s3_lake_keeps_its_ledger_in_the_lake(s3, tmp_path):
    so, lake_url = s3.options(), s3.url("ingest-a")
    landing = _landing(tmp_path / "landing", files=2, lines=120)
    params = IngestParams(landing=str(landing), dataset="fleet", contract="cmapss", storage_options=so)
    first = run_local(params, lake_url, str(tmp_path / "q"), "b1")
    assert sorted(o.status for o in first) == ["ingested", "ingested"]
    fs = s3_filesystem(s3)
    names = {p.rsplit("/", 1)[-1] for p in fs.ls(f"{s3.bucket}/ingest-a", refresh=True)}
    assert {"_ledger.sqlite", "_ingest.lock", "fleet"} <= names  # nothing of the writer's left on this host
    rows = _lake_rows(lake_url, so)
    q = read_quarantine(str(tmp_path / "q"), "fleet")
    assert rows.num_rows + q.num_rows == 240 and q.num_rows == 4 and _keys_unique(rows)
    # Another "host" (a fresh ledger copy) finds everything recorded: nothing is read twice.
    assert run_local(params, lake_url, str(tmp_path / "q"), "b2") == []
    snap = ingested_snapshot(lake_url, "fleet", so)
    assert snap is not None and snap.rows == rows.num_rows and len(snap.files) == 2
    assert lk.read_lake(snap, storage_options=so).num_rows == rows.num_rows
    assert lk.latest_snapshot(lake_url, "fleet", so) == snap


def test_staging_and_quarantine_live_under_the_lake_prefix(s3, tmp_path):
    """Workers stage under ``<lake>/_staging/<batch>`` (any host can commit what they staged) and the
    quarantine defaults to ``<lake>/_quarantine``: every row read ends in the lake or there, with its
    reason; a source read again replaces its quarantine objects; no staging is left behind."""
    from twinflow.tasks.ingest.names import file_id
    from twinflow.tasks.ingest.run import ingest_sequence, process_files

    so, lake_url = s3.options(), s3.url("ingest-q")
    quarantine = lk.default_quarantine(lake_url)
    assert quarantine == f"{lake_url}/_quarantine"
    landing = _landing(tmp_path / "landing", files=2, lines=200)
    (landing / "junk.txt").write_text("this is not\na sensor log\n")
    params = IngestParams(landing=str(landing), dataset="fleet", contract="cmapss", storage_options=so)
    seen: dict[str, list[str]] = {}

    def on_workers(batches, staging):
        outcomes = [o for b in batches for o in process_files(b, params, staging, quarantine, "b1", so)]
        # What the workers staged is on the store, under the lake, before the commit reads it.
        seen.update({o.source: lk.find_objects(o.staged, "**", so) for o in outcomes if o.staged})
        return outcomes, []

    run = ingest_sequence(params, lake_url, quarantine, "b1", on_workers)
    assert {o.status for o in run.outcomes} == {"ingested", "quarantined"}
    # The tails the workers staged came through the store too: the recent table is built from them alone.
    made = lk.history(lake_url, lk.derived_name("fleet", lk.RECENT), limit=1, storage_options=so)[0]
    assert made["twinflow.recent_assets_read"] == "0" and int(made["twinflow.recent_assets_from_tails"]) > 0
    snap = lk.snapshot(lake_url, "fleet", so)
    cols = [C.ASSET, C.TIME, *CM.SENSORS]
    for got, want in zip(lk.read_recent_table(snap, 20, cols, so), lk.read_recent(snap, 20, cols, so)):
        assert got.equals(want)
    staging = lk.staging_uri(lake_url, "b1")
    assert len(seen) == 3 and all(objs and all(p.startswith(staging + "/") for p in objs) for objs in seen.values())
    assert lk.find_objects(lk.meta_uri(lake_url, "staging"), "**", so) == []  # removed after the commit
    rows = _lake_rows(lake_url, so)
    q = read_quarantine(quarantine, "fleet", so)
    read = sum(o.rows_read for o in run.outcomes if o.source.endswith(("f0.txt", "f1.txt")))
    assert read == 400 and rows.num_rows + q.num_rows == read and q.num_rows == 6 and _keys_unique(rows)
    assert all("outside valid range" in r for r in q.column("reason").to_pylist())
    objs = lk.find_objects(quarantine, "**", so)
    junk = file_id(str(landing / "junk.txt"))
    assert f"{quarantine}/rows/dataset=fleet/{file_id(str(landing / 'f0.txt'))}.parquet" in objs
    copy = [p for p in objs if p.startswith(f"{quarantine}/files/{junk}/")]
    assert sorted(p.rsplit("/", 1)[-1] for p in copy) == ["junk.txt", "reason.txt"]
    assert not (tmp_path / "q").exists()  # nothing of the quarantine on this host
    # f0 fixed and junk replaced by a good file: their quarantine objects go, f1's stay.
    (landing / "f0.txt").write_text("\n".join(TRAIN_LINES[:200]) + "\n")
    (landing / "junk.txt").write_text("\n".join(TRAIN_LINES[400:450]) + "\n")
    again = run_local(params, lake_url, quarantine, "b2")
    assert sorted(o.status for o in again) == ["ingested", "ingested"]
    q2 = read_quarantine(quarantine, "fleet", so)
    assert q2.num_rows == 3 and set(q2.column("source_file").to_pylist()) == {str(landing / "f1.txt")}
    assert [p for p in lk.find_objects(quarantine, "**", so) if "/files/" in p] == []
    assert _lake_rows(lake_url, so).num_rows + q2.num_rows == 450
    assert lk.find_objects(lk.meta_uri(lake_url, "staging"), "**", so) == []


def test_lease_is_exclusive_expires_and_fences_a_lost_holder(s3):
    so, lake_url = s3.options(), s3.url("lease")
    with lk.writer_lease(lake_url, "w.lock", timeout_s=5, ttl_s=30, what="test writer", storage_options=so) as a:
        with pytest.raises(AlreadyRunning, match="test writer: the lease .* is held by"):
            with lk.writer_lease(lake_url, "w.lock", timeout_s=0.5, what="test writer", storage_options=so):
                pass
        a.check()  # still ours
    # Released: the next writer gets it at once.
    with lk.writer_lease(lake_url, "w.lock", timeout_s=1, what="test writer", storage_options=so, ttl_s=2) as b:
        b._stop.set()  # a holder that stops renewing (frozen, or its host gone)
        time.sleep(2.5)
        with lk.writer_lease(lake_url, "w.lock", timeout_s=5, what="test writer", storage_options=so) as c:
            c.check()
            with pytest.raises(lk.LeaseLost, match="another writer took over"):
                b.check()  # the old holder must not commit now


@pytest.mark.slow
def test_two_ingest_processes_racing_on_one_s3_lake_write_every_row_once(s3, tmp_path):
    so, lake_url = s3.options(), s3.url("race")
    landing = _landing(tmp_path / "landing")
    procs = [_worker(s3, landing, lake_url, tmp_path / "q", f"r{i}") for i in range(2)]
    results = [_finish(p) for p in procs]
    assert [rc for rc, _, _ in results] == [0, 0], [err[-2000:] for _, _, err in results]
    statuses = sorted(tuple(json.loads(out)) for _, out, _ in results)
    # One run read the four files; the other waited for the lease, then found them in the lake's ledger
    # and read none.
    assert statuses == [(), ("ingested",) * 4]
    rows = _lake_rows(lake_url, so)
    q = read_quarantine(str(tmp_path / "q"), "fleet")
    assert rows.num_rows + q.num_rows == 1600 and q.num_rows == 4 * 5 and _keys_unique(rows)


@pytest.mark.slow
@pytest.mark.parametrize("crash", ["before_commit", "after_commit"])
def test_kill_9_mid_commit_on_s3_then_rerun_equals_a_one_shot_run(s3, tmp_path, crash):
    so = s3.options()
    landing = _landing(tmp_path / "landing", files=3, lines=300)
    one_shot = s3.url(f"oneshot-{crash.replace('_', '-')}")
    rc, _, err = _finish(_worker(s3, landing, one_shot, tmp_path / "q1", "o1"))
    assert rc == 0, err[-2000:]
    lake_url = s3.url(f"killed-{crash.replace('_', '-')}")
    rc, _, err = _finish(_worker(s3, landing, lake_url, tmp_path / "q2", "k1", crash=crash, ttl=3))
    assert rc == -9, err[-2000:]
    # The killed run's lease outlives it by its ttl; the re-run waits for it, settles the commit and goes on.
    rc, out, err = _finish(_worker(s3, landing, lake_url, tmp_path / "q2", "k2"))
    assert rc == 0, err[-2000:]
    assert ("applied (the table has the commit)" if crash == "after_commit" else "were dropped") in err
    rows, expected = _lake_rows(lake_url, so), _lake_rows(one_shot, so)
    assert rows.num_rows == expected.num_rows and _same_rows(rows, expected) and _keys_unique(rows)
    q1, q2 = read_quarantine(str(tmp_path / "q1"), "fleet"), read_quarantine(str(tmp_path / "q2"), "fleet")
    assert q2.num_rows == q1.num_rows == 3 * 4
    # A third run reads nothing: the ledger in the lake has every file.
    rc, out, _ = _finish(_worker(s3, landing, lake_url, tmp_path / "q2", "k3"))
    assert rc == 0 and json.loads(out) == []


def test_refused_credentials_and_unreachable_store_fail_ingest_in_one_line_losing_nothing(s3, tmp_path):
    landing = _landing(tmp_path / "landing", files=1, lines=50)
    before = {p.name: p.read_bytes() for p in landing.iterdir()}
    secret = "not-the-secret-42"
    params = IngestParams(landing=str(landing), dataset="fleet", contract="cmapss", lock_timeout_s=5)
    with pytest.raises(ConfigError, match="refused the credentials") as bad:
        run_local(params.model_copy(update={"storage_options": s3.options(secret=secret)}), s3.url("refused"),
                  str(tmp_path / "q"), "b1")
    assert "\n" not in str(bad.value) and secret not in str(bad.value)
    dead = {**s3.options(), "AWS_ENDPOINT_URL": "http://127.0.0.1:9"}  # discard port: nothing listens
    with pytest.raises(ServiceUnavailable, match="unreachable") as down:
        run_local(params.model_copy(update={"storage_options": dead}), s3.url("refused"), str(tmp_path / "q"), "b2")
    assert "\n" not in str(down.value)
    # Nothing was lost: the landing is untouched and a run with the right credentials ingests it all.
    assert {p.name: p.read_bytes() for p in landing.iterdir()} == before
    (o,) = run_local(params.model_copy(update={"storage_options": s3.options()}), s3.url("refused"),
                     str(tmp_path / "q"), "b3")
    assert o.status == "ingested" and o.rows_written + o.rows_quarantined == 50
