"""Stream bridge benchmark: MQTT (JSON, Sparkplug B) into the lake vs a bare subscriber; latency; soak.

In one run, against a mosquitto of its own: throughput of a bare subscriber (decode, append to a list;
the baseline) and of the bridge (in-process, until every row is readable in the lake), exact row
counts; publish-to-readable latency p50/p99 at a fixed rate for two batch settings. ``--soak SECONDS``
runs the real ``twinflow stream run`` process under a steady publisher and reports its RSS slope.

Run: ``python -m benchmarks.stream [--quick] [--soak SECONDS] [--json benchmarks/results/<date>-stream.json]``.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Iterator

from benchmarks._harness import (Bench, Result, _PeakRSS, arg_parser, free_port, start_mosquitto, stop_process,
                                 write_json)

TOPICS = {"json": ["twinflow/telemetry/#"], "sparkplug": ["spBv1.0/#"]}
WARMUP_ASSET = "warmup-0"


def _keys(lake: str, dataset: str = "stream") -> list[tuple[str, int]]:
    """(asset, cycle) of every row readable in the dataset, warm-up row excluded."""
    from twinflow import lake as lk

    snap = lk.snapshot(lake, dataset)
    if snap is None:
        return []
    t = lk.read_lake(snap, columns=["asset_id", "cycle"])
    return [k for k in zip(t.column("asset_id").to_pylist(), t.column("cycle").to_pylist()) if k[0] != WARMUP_ASSET]


def _warmup_message(fmt: str) -> tuple[str, bytes]:
    from twinflow.tasks.bridge.simulate import mqtt_messages

    row = {"asset_id": WARMUP_ASSET, "cycle": 1, "setting1": 0.0, "setting2": 0.0, "setting3": 100.0}
    return next(mqtt_messages([row], fmt))


# With --tls: how subscribers (the bare one and the bridge) connect — TLS with a client certificate and
# a password on the broker's second listener; publishers keep the plain one. None: plain for everyone.
TLS: dict[str, Any] | None = None


def _subscriber_mqtt(host: str, port: int) -> dict[str, Any]:
    """The bridge's ``mqtt`` settings for a subscriber (TLS ones under --tls)."""
    if TLS is None:
        return {"host": host, "port": port}
    return {"host": host, "port": TLS["port"], "tls": True, "ca_file": str(TLS["ca"]), "cert_file": str(TLS["cert_c"]),
            "key_file": str(TLS["key_c"]), "username": TLS["user"], "password": TLS["password"]}


def bare_subscriber(host: str, port: int, fmt: str, msgs: list[tuple[str, bytes]]) -> dict[str, Any]:
    """Baseline: a QoS 1 paho subscriber that decodes each message and appends its rows to a list."""
    import paho.mqtt.client as mqtt

    from twinflow.tasks.bridge.decode import decode_message
    from twinflow.tasks.bridge.simulate import publish_mqtt

    rows: list[dict[str, Any]] = []
    subscribed, warm, done = threading.Event(), threading.Event(), threading.Event()
    count = {"n": 0}

    def on_message(client: Any, userdata: Any, msg: Any) -> None:
        out = decode_message(fmt, msg.topic, bytes(msg.payload))
        if out and out[0]["asset_id"] == WARMUP_ASSET:
            warm.set()
            return
        rows.extend(out)
        count["n"] += 1
        if count["n"] >= len(msgs):
            done.set()

    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="", protocol=mqtt.MQTTv5)
    c.on_connect = lambda client, *a: client.subscribe([(t, 1) for t in TOPICS[fmt]])
    c.on_subscribe = lambda *a: subscribed.set()
    c.on_message = on_message
    sub = _subscriber_mqtt(host, port)
    if TLS is not None:  # the same TLS session setup as the bridge's (twinflow.tasks.bridge.mqtt.apply_tls)
        from twinflow.tasks.bridge.config import MqttSource
        from twinflow.tasks.bridge.mqtt import apply_tls

        apply_tls(c, MqttSource(**sub))
        c.username_pw_set(TLS["user"], TLS["password"])
    c.connect(host, sub["port"])
    c.loop_start()
    try:
        assert subscribed.wait(10), "bare subscriber: no SUBACK"
        publish_mqtt([_warmup_message(fmt)], host=host, port=port)
        assert warm.wait(10), "bare subscriber: warm-up message not received"
        t0 = time.perf_counter()
        publish_mqtt(msgs, host=host, port=port)
        assert done.wait(300), f"bare subscriber received {count['n']} of {len(msgs)}"
        seconds = time.perf_counter() - t0
    finally:
        c.disconnect()
        c.loop_stop()
    return {"seconds": seconds, "messages": count["n"], "rows": len(rows)}


class _BridgeRun:
    """The bridge in-process (``run_bridge`` in a thread, as the tests drive it) into a fresh lake.

    Its persistent session is created before it starts, and one warm-up message is committed first
    (creating the table, importing what a commit needs), so timings are of the steady state.
    """

    def __init__(self, host: str, port: int, fmt: str, work: Path, bridge_id: str, **settings: Any) -> None:
        from twinflow.tasks.bridge.config import BridgeConfig
        from twinflow.tasks.bridge.mqtt import create_session

        self.lake, self.quar = str(work / f"lake-{bridge_id}"), str(work / f"q-{bridge_id}")
        shutil.rmtree(self.lake, ignore_errors=True)
        shutil.rmtree(self.quar, ignore_errors=True)
        self.cfg = BridgeConfig(bridge_id=bridge_id, emit_events=False,
                                mqtt={**_subscriber_mqtt(host, port), "topics": TOPICS[fmt], "format": fmt}, **settings)
        create_session(self.cfg.mqtt, f"twinflow-bridge-{bridge_id}")
        self.host, self.port, self.fmt = host, port, fmt
        self.stop = threading.Event()
        self.batches: list[tuple[float, int]] = []  # (time committed, cumulative rows written), warm-up excluded
        self.rows = 0
        self.quarantined = 0
        self.target: int | None = None
        self.reached = threading.Event()
        self.warm = threading.Event()
        self.out: dict[str, Any] = {}

    def _on_batch(self, res: Any) -> None:
        now = time.perf_counter()
        if not self.warm.is_set():
            self.warm.set()
            return
        self.rows += res.rows_written
        self.quarantined += res.rows_quarantined
        self.batches.append((now, self.rows))
        if self.target is not None and self.rows >= self.target:
            self.reached.set()

    def __enter__(self) -> "_BridgeRun":
        from twinflow.tasks.bridge.run import run_bridge
        from twinflow.tasks.bridge.simulate import publish_mqtt

        self.thread = threading.Thread(target=lambda: self.out.setdefault(
            "stats", run_bridge(self.cfg, self.lake, self.quar, stop=self.stop, on_batch=self._on_batch)), daemon=True)
        self.thread.start()
        publish_mqtt([_warmup_message(self.fmt)], host=self.host, port=self.port)
        if not self.warm.wait(120):
            raise RuntimeError("bridge: the warm-up message was not committed in 120 s")
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(120)


def bridge_throughput(host: str, port: int, fmt: str, msgs: list[tuple[str, bytes]], work: Path,
                      run: int) -> dict[str, Any]:
    """Publish all messages as fast as the broker takes them; time until every row is in the lake."""
    from twinflow.tasks.bridge.simulate import publish_mqtt

    with _BridgeRun(host, port, fmt, work, f"bench-{fmt}-{run}") as b:
        b.target = len(msgs)
        t0 = time.perf_counter()
        publish_mqtt(msgs, host=host, port=port)
        if not b.reached.wait(600):
            raise RuntimeError(f"bridge wrote {b.rows} of {len(msgs)} rows in 600 s")
        seconds = time.perf_counter() - t0
        batches = len(b.batches)
    keys = _keys(b.lake)
    shutil.rmtree(b.lake, ignore_errors=True)
    shutil.rmtree(b.quar, ignore_errors=True)
    return {"seconds": seconds, "rows_in_lake": len(keys), "unique_keys_in_lake": len(set(keys)),
            "rows_quarantined": b.quarantined, "batches": batches}


def latency(host: str, port: int, fmt: str, msgs: list[tuple[str, bytes]], rate: float, work: Path,
            label: str, **settings: Any) -> dict[str, Any]:
    """Publish-to-readable latency of each message at a fixed rate.

    A message is readable when the commit that holds it returns (the Delta commit is then visible). One
    publisher, one subscription: the broker delivers in publish order and the buffer keeps it, so the
    first k rows written are the first k messages published; message i is readable at the first batch
    whose cumulative row count exceeds i.
    """
    from twinflow.tasks.bridge.simulate import publish_mqtt

    sent_at: list[float] = []
    with _BridgeRun(host, port, fmt, work, f"lat-{label}", **settings) as b:
        b.target = len(msgs)
        publish_mqtt(msgs, host=host, port=port, rate=rate, on_sent=lambda n, t, p: sent_at.append(time.perf_counter()))
        if not b.reached.wait(600):
            raise RuntimeError(f"bridge wrote {b.rows} of {len(msgs)} rows in 600 s")
        batches = list(b.batches)
    keys = _keys(b.lake)
    shutil.rmtree(b.lake, ignore_errors=True)
    shutil.rmtree(b.quar, ignore_errors=True)
    lat, j = [], 0
    for i, t in enumerate(sent_at):
        while batches[j][1] <= i:
            j += 1
        lat.append(batches[j][0] - t)
    lat.sort()
    return {"rate_msg_s": rate, "messages": len(msgs), "batch_rows": b.cfg.batch_rows,
            "flush_interval_s": b.cfg.flush_interval_s, "batches": len(batches),
            "p50_s": statistics.median(lat), "p99_s": lat[min(len(lat) - 1, int(0.99 * len(lat)))],
            "max_s": lat[-1], "rows_in_lake": len(keys), "unique_keys_in_lake": len(set(keys))}


def throughput(host: str, port: int, rows: list[dict[str, Any]], work: Path, repeat: int, json_path: str | None
               ) -> list[dict[str, Any]]:
    """Bare subscriber vs bridge, per format, interleaved ``repeat`` times; ratio = bare time / bridge time."""
    from twinflow.tasks.bridge.simulate import mqtt_messages

    out = []
    for fmt in ("json", "sparkplug"):
        msgs = list(mqtt_messages(rows, fmt))
        bench = Bench(f"stream throughput ({fmt}, {len(msgs):,} messages of 1 row, QoS 1)",
                      baseline="bare subscriber (decode + list)", units=len(msgs), unit_name="msg")
        runs: dict[str, list[dict[str, Any]]] = {"bare subscriber (decode + list)": [], "bridge into the lake": []}
        peaks = {label: 0.0 for label in runs}
        for r in range(repeat):  # round-robin, so machine load falls on both alike
            for label, fn in (("bare subscriber (decode + list)", lambda: bare_subscriber(host, port, fmt, msgs)),
                              ("bridge into the lake", lambda: bridge_throughput(host, port, fmt, msgs, work, r))):
                with _PeakRSS() as mem:  # this process and its children (mosquitto)
                    runs[label].append(fn())
                peaks[label] = max(peaks[label], mem.peak / 2**20)
        for label, rs in runs.items():
            extra: dict[str, Any] = {"messages_published": len(msgs), "rows_published": len(rows),
                                     "msg_per_s_best": len(msgs) / min(x["seconds"] for x in rs),
                                     "rows_per_s_best": len(rows) / min(x["seconds"] for x in rs)}
            if label == "bare subscriber (decode + list)":
                extra["rows_received"] = [x["rows"] for x in rs]
            else:
                extra["rows_in_lake"] = [x["rows_in_lake"] for x in rs]
                extra["unique_keys_in_lake"] = [x["unique_keys_in_lake"] for x in rs]
                extra["rows_quarantined"] = [x["rows_quarantined"] for x in rs]
                extra["batches"] = [x["batches"] for x in rs]
            bench.results[label] = Result(label, [x["seconds"] for x in rs], peaks[label], extra)
        summary = bench.report()
        summary["format"] = fmt
        lake_rows = runs["bridge into the lake"]
        summary["rows_exact"] = all(x["rows_in_lake"] == x["unique_keys_in_lake"] == len(rows) for x in lake_rows)
        print(f"bridge/bare throughput: {bench.ratio('bridge into the lake'):.2f}x; "
              f"rows in lake {[x['rows_in_lake'] for x in lake_rows]} of {len(rows)} published "
              f"(exact: {summary['rows_exact']})")
        out.append(summary)
    return out


def soak(host: str, port: int, rows: list[dict[str, Any]], work: Path, seconds: float, rate: float,
         sample_s: float, warmup_s: float) -> dict[str, Any]:
    """The real ``twinflow stream run`` process under a steady publisher for ``seconds``; RSS every ``sample_s``.

    The C-MAPSS rows are replayed round after round with cycles shifted by 1000 per round (keys stay
    unique, the 100 assets stay the same).
    """
    import psutil

    from twinflow import lake as lk
    from twinflow.tasks.bridge.config import BridgeConfig
    from twinflow.tasks.bridge.mqtt import create_session
    from twinflow.tasks.bridge.simulate import mqtt_messages, publish_mqtt

    lake, quar = str(work / "lake-soak"), str(work / "q-soak")
    cfg = {"bridge_id": "soak", "lake": lake, "quarantine": quar, "emit_events": False,
           "mqtt": {"host": host, "port": port, "topics": TOPICS["json"]}}
    config = work / "soak-bridge.json"
    config.write_text(json.dumps(cfg))
    bcfg = BridgeConfig.model_validate(cfg)
    create_session(bcfg.mqtt, "twinflow-bridge-soak")
    env = {**os.environ, "PREFECT_API_URL": ""}
    proc = subprocess.Popen([sys.executable, "-m", "twinflow.cli", "stream", "run", "--config", str(config)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    ps = psutil.Process(proc.pid)
    samples: list[tuple[float, float]] = []
    stop_pub = threading.Event()
    sampling = threading.Event()

    def sampler() -> None:
        t0 = time.monotonic()
        while not sampling.is_set():
            try:
                samples.append((time.monotonic() - t0, ps.memory_info().rss / 2**20))
            except psutil.Error:
                return
            sampling.wait(sample_s)

    def messages() -> Iterator[tuple[str, bytes]]:
        k = 0
        while True:
            shifted = [{**r, "cycle": r["cycle"] + 1000 * k} for r in rows]
            yield from mqtt_messages(shifted, "json")
            k += 1

    th = threading.Thread(target=sampler, daemon=True)
    th.start()
    timer = threading.Timer(seconds, stop_pub.set)
    timer.start()
    t_start = time.monotonic()
    published = publish_mqtt(messages(), host=host, port=port, rate=rate, stop=stop_pub)
    publish_s = time.monotonic() - t_start
    deadline = time.monotonic() + 300
    in_lake = -1
    while time.monotonic() < deadline:
        keys = _keys(lake)
        in_lake = len(keys)
        if in_lake >= published:
            break
        time.sleep(3)
    drain_s = time.monotonic() - t_start - publish_s
    sampling.set()
    th.join(30)
    proc.send_signal(15)
    out = proc.communicate(timeout=120)[0].decode()
    last = out.strip().splitlines()[-1] if out.strip() else ""
    stats = json.loads(last) if last.startswith("{") else {}
    keys = _keys(lake)
    snap = lk.snapshot(lake, "stream")
    files_before = sum(len(v) for v in lk.list_files(snap).values())
    optimizes = sum(1 for h in lk.history(lake, "stream") if h.get("operation") == "OPTIMIZE")
    lk.optimize(lake, "stream")
    files_after = sum(len(v) for v in lk.list_files(lk.snapshot(lake, "stream")).values())
    parquet_on_disk = sum(1 for _ in Path(lake).rglob("*.parquet"))
    after = [(t, m) for t, m in samples if t >= warmup_s]
    slope = None
    if len(after) >= 3:
        ts, ms = [t / 60 for t, _ in after], [m for _, m in after]
        mt, mm = statistics.fmean(ts), statistics.fmean(ms)
        slope = sum((t - mt) * (m - mm) for t, m in zip(ts, ms)) / sum((t - mt) ** 2 for t in ts)
    summary = {
        "benchmark": f"stream soak ({seconds:g} s at {rate:g} msg/s, real `twinflow stream run` process)",
        "seconds": seconds, "rate_msg_s": rate, "publish_s": publish_s, "drain_s": drain_s,
        "rows_published": published, "rows_in_lake": len(keys), "unique_keys_in_lake": len(set(keys)),
        "rows_exact": published == len(keys) == len(set(keys)), "bridge_exit_code": proc.returncode,
        "bridge_stats": stats, "bridge_output_tail": out[-1500:] if proc.returncode else "",
        "rss_sample_s": sample_s, "rss_warmup_s": warmup_s,
        "rss_mb_first_after_warmup": after[0][1] if after else None, "rss_mb_last": samples[-1][1] if samples else None,
        "rss_mb_max": max((m for _, m in samples), default=None),
        "rss_slope_mb_per_min": slope, "rss_samples": [[round(t, 1), round(m, 1)] for t, m in samples],
        "delta_optimize_commits_by_bridge": optimizes,
        "lake_files_before_final_compaction": files_before, "lake_files_after_final_compaction": files_after,
        "parquet_files_on_disk_incl_removed": parquet_on_disk,
        "delta_log_json_files": sum(1 for _ in (Path(lake) / "stream" / "_delta_log").glob("*.json"))
        if (Path(lake) / "stream" / "_delta_log").is_dir() else None,
    }
    print(f"\n== {summary['benchmark']} ==")
    print(f"rows published {published:,}, in lake {len(keys):,} (unique {len(set(keys)):,}; exact: {summary['rows_exact']}); "
          f"drain after publishing {drain_s:.1f} s")
    print(f"RSS after {warmup_s:g} s warm-up: {summary['rss_mb_first_after_warmup']} MB -> {summary['rss_mb_last']} MB "
          f"(max {summary['rss_mb_max']}); slope {slope if slope is None else round(slope, 2)} MB/min")
    print(f"lake files {files_before:,} -> {files_after:,} after a final compaction; bridge compactions: {optimizes}")
    return summary


def _tls_setup(work: Path) -> dict[str, Any]:
    """A throwaway PKI and password file for the broker's TLS listener; sets :data:`TLS`."""
    import secrets

    from twinflow.tasks.bridge.testpki import make_pki

    global TLS
    pki = make_pki(work / "pki")
    user, password = "bench", secrets.token_hex(8)
    passwd = work / "passwd"
    subprocess.run([shutil.which("mosquitto_passwd") or "mosquitto_passwd", "-b", "-c", str(passwd), user, password],
                   check=True, capture_output=True)
    TLS = {"port": free_port(), "ca": pki["ca_cert"], "cert": pki["server_cert"], "key": pki["server_key"],
           "cert_c": pki["client_cert"], "key_c": pki["client_key"], "passwd": passwd, "user": user,
           "password": password}
    return TLS


def main() -> None:
    parser = arg_parser(__doc__.splitlines()[0])
    parser.add_argument("--soak", type=float, default=None, metavar="SECONDS",
                        help="only the soak: the real bridge process under a steady publisher for SECONDS")
    parser.add_argument("--rate", type=float, default=200.0, help="messages/s of the latency runs and the soak")
    parser.add_argument("--sample-s", type=float, default=5.0, help="soak: RSS sampling interval")
    parser.add_argument("--warmup-s", type=float, default=None, help="soak: RSS samples before this are ignored "
                        "(default: a fifth of the soak)")
    parser.add_argument("--conditions", default=None, help="free text recorded in the JSON (load, nice, ...)")
    parser.add_argument("--tls", action="store_true", help="subscribers (bare and bridge) connect over TLS with a "
                        "client certificate and a password (generated throwaway PKI); publishers stay plain")
    args = parser.parse_args()

    from twinflow.tasks.bridge.simulate import cmapss_rows, mqtt_messages

    work = Path(tempfile.mkdtemp(prefix="twinflow-bench-stream-"))
    tls = _tls_setup(work) if args.tls else None
    broker, port = start_mosquitto(str(work), tls=tls)
    host = "127.0.0.1"
    load = os.getloadavg()
    try:
        if args.soak:
            rows = cmapss_rows()
            summary = soak(host, port, rows, work, args.soak, args.rate, args.sample_s,
                           args.warmup_s if args.warmup_s is not None else args.soak / 5)
            summary["load_avg_1_5_15_at_start"] = load
            summary["load_avg_1_5_15_at_end"] = os.getloadavg()
            summary["conditions"] = args.conditions
            if args.json:
                write_json(args.json, summary)
            return
        rows = cmapss_rows(units=5, max_cycles=40) if args.quick else cmapss_rows()
        repeat = 1 if args.quick else args.repeat
        summaries = throughput(host, port, rows, work, repeat, args.json)
        lat_rows = cmapss_rows(units=4, max_cycles=25) if args.quick else cmapss_rows(units=20, max_cycles=150)
        lat_msgs = list(mqtt_messages(lat_rows, "json"))
        small = {"batch_rows": 50, "flush_interval_s": 0.1}
        lats = {"default (batch_rows 5000, flush 1.0 s)": latency(host, port, "json", lat_msgs, args.rate, work, "default"),
                "small (batch_rows 50, flush 0.1 s)": latency(host, port, "json", lat_msgs, args.rate, work, "small",
                                                               **small)}
        print(f"\n== stream latency (json, {len(lat_msgs):,} messages at {args.rate:g} msg/s, publish -> readable) ==")
        for label, r in lats.items():
            print(f"{label:<40} p50 {r['p50_s'] * 1000:8.1f} ms  p99 {r['p99_s'] * 1000:8.1f} ms  "
                  f"({r['batches']} batches; rows in lake {r['rows_in_lake']} of {r['messages']})")
        lat_summary = {"benchmark": f"stream latency (json, {args.rate:g} msg/s)", "results": lats,
                       "rows_exact": all(r["rows_in_lake"] == r["unique_keys_in_lake"] == r["messages"]
                                         for r in lats.values())}
        for s in [*summaries, lat_summary]:
            s["load_avg_1_5_15_at_start"] = load
            s["load_avg_1_5_15_at_end"] = os.getloadavg()
            s["conditions"] = args.conditions
            s["subscribers_over_tls"] = bool(args.tls)
            if args.json:
                write_json(args.json, s)
    finally:
        stop_process(broker)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
