"""The stream benchmark's own runs (tiny sizes, a real mosquitto): its JSON has the figures and exact counts."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(shutil.which("mosquitto") is None and not Path("/usr/sbin/mosquitto").exists(),
                                 reason="mosquitto is not installed")]


def _run(args: list[str], out: Path, timeout: float) -> list[dict]:
    env = {**os.environ, "PREFECT_API_URL": ""}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.stream", *args, "--json", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["machine"]["cpus"] and doc["machine"]["date"]
    return doc["benchmarks"]


def test_quick_run_reports_throughput_latency_and_exact_rows(tmp_path):
    benches = _run(["--quick", "--conditions", "test"], tmp_path / "stream.json", timeout=600)
    throughput = [b for b in benches if b.get("format")]
    assert sorted(b["format"] for b in throughput) == ["json", "sparkplug"]
    for b in throughput:
        assert b["baseline"] == "bare subscriber (decode + list)"
        bare, bridge = b["results"]["bare subscriber (decode + list)"], b["results"]["bridge into the lake"]
        published = bridge["rows_published"]
        assert published == 200 and bare["rows_received"] == [published]
        assert bridge["rows_in_lake"] == bridge["unique_keys_in_lake"] == [published]
        assert bridge["rows_quarantined"] == [0]
        assert b["rows_exact"] is True
        assert bridge["msg_per_s_best"] > 0 and bare["msg_per_s_best"] > 0 and bridge["ratio"] > 0
        assert b["conditions"] == "test" and len(b["load_avg_1_5_15_at_start"]) == 3
    (lat,) = [b for b in benches if b["benchmark"].startswith("stream latency")]
    assert lat["rows_exact"] is True
    small = lat["results"]["small (batch_rows 50, flush 0.1 s)"]
    default = lat["results"]["default (batch_rows 5000, flush 1.0 s)"]
    for r in (small, default):
        assert r["rows_in_lake"] == r["messages"] == 100
        assert 0 < r["p50_s"] <= r["p99_s"] <= r["max_s"]
    assert small["batches"] >= 100 // 50  # batch_rows caps a batch
    assert default["batches"] >= 1


@pytest.mark.slow
def test_tiny_soak_of_the_real_bridge_process_counts_every_row(tmp_path):
    (soak,) = _run(["--soak", "20", "--sample-s", "2", "--rate", "100"], tmp_path / "soak.json", timeout=600)
    assert soak["bridge_exit_code"] == 0, soak["bridge_output_tail"]
    assert soak["rows_published"] > 0
    assert soak["rows_in_lake"] == soak["unique_keys_in_lake"] == soak["rows_published"]
    assert soak["rows_exact"] is True
    assert soak["bridge_stats"]["rows_written"] == soak["rows_published"]
    assert len(soak["rss_samples"]) >= 3 and soak["rss_slope_mb_per_min"] is not None
    assert soak["lake_files_after_final_compaction"] <= soak["lake_files_before_final_compaction"]
