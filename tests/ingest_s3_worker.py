"""One ingest run in its own process, as another host would run it (for the object-store tests).

``python ingest_s3_worker.py LANDING LAKE_URL QUARANTINE BATCH_ID [CRASH]`` with the lake's object-store
options as JSON in ``TWINFLOW_TEST_S3_OPTIONS``. Prints the outcomes' statuses as JSON on success.

``CRASH`` ends the process with SIGKILL (no clean-up, no ``finally``: what ``kill -9`` does) at a point
of the commit: ``before_commit`` (the ledger's intent is published, the Delta commit not made) or
``after_commit`` (the Delta commit is in, the ledger has not recorded it).
"""

from __future__ import annotations

import json
import os
import signal
import sys


def main(argv: list[str]) -> None:
    landing, lake_url, quarantine, batch_id = argv[:4]
    crash = argv[4] if len(argv) > 4 else ""
    options = json.loads(os.environ["TWINFLOW_TEST_S3_OPTIONS"])
    from twinflow import lake as lk
    from twinflow.tasks.ingest import IngestParams
    from twinflow.tasks.ingest.run import ingest_sequence, process_files

    real = lk.commit_data_files

    def commit_then_maybe_die(*args, **kw):
        if crash == "before_commit":
            os.kill(os.getpid(), signal.SIGKILL)
        version = real(*args, **kw)
        if crash == "after_commit":
            os.kill(os.getpid(), signal.SIGKILL)
        return version

    lk.commit_data_files = commit_then_maybe_die
    params = IngestParams(landing=landing, dataset="fleet", contract="cmapss", lease_ttl_s=float(
        os.environ.get("TWINFLOW_TEST_LEASE_TTL", "60")), lock_timeout_s=120)

    def sequential(batches, staging):
        from pathlib import Path

        out = []
        for b in batches:
            out.extend(process_files(b, params, staging, Path(quarantine), batch_id, {}, staging_options=options))
        return out, []

    run = ingest_sequence(params, lake_url, quarantine, batch_id, sequential, storage_options=options)
    print(json.dumps(sorted(o.status for o in run.outcomes)))


if __name__ == "__main__":
    main(sys.argv[1:])
