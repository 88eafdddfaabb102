"""The twin on life segments: it calibrates on the failure-ended lives only and checks its lifetimes
against the Kaplan–Meier estimate of every life, suspensions included."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from twin_fixtures import pump_fleet
from twinflow import lake
from twinflow.contract import load_contract
from twinflow.tasks.ingest.events import build_segments
from twinflow.tasks.twin import CostModel, TwinParams
from twinflow.tasks.twin.calibration import read_cmapss_frame
from twinflow.tasks.twin.tasks import calibrate_twin


def _with_segments(snap, extents, life_end, contract):
    segments = build_segments(extents, None, contract, life_end)
    version = lake.write_table(snap.lake_path, lake.derived_name(snap.dataset, "segments"), segments,
                               overwrite=True)
    return snap.model_copy(update={"segments": version}), segments


def test_pump_twin_calibrates_on_failed_lives_and_checks_all_lives(tmp_path):
    pumps = load_contract("pumps")
    # These generated pumps start new at their first reading (the bundled contract says the plant's
    # records begin mid-life): declare it, so that their first lives count.
    pumps = pumps.model_copy(update={"datasets": [r.model_copy(update={"life_start": "new"})
                                                  for r in pumps.datasets]})
    table, _ = pump_fleet(n_pumps=24, seed=3)
    # A quarter of the pumps are still running: their telemetry stops at 60 % of their life.
    assets = sorted(set(table.column("asset_id").to_pylist()))
    running = set(assets[::4])
    keep = []
    for a in assets:
        rows = table.filter(pc.equal(table.column("asset_id"), a))
        if a in running:
            rows = rows.slice(0, int(rows.num_rows * 0.6))
        keep.append(rows)
    table = pa.concat_tables(keep)
    snap = lake.write_lake_table(table, str(tmp_path), "pumps", "b1", contract=pumps)
    ts = table.column("timestamp").cast(pa.int64()).to_numpy()
    ids = np.array(table.column("asset_id").to_pylist())
    extents = {a: (int(ts[ids == a].min()), int(ts[ids == a].max())) for a in assets}
    snap, segments = _with_segments(snap, extents, {a: "running" if a in running else "failure" for a in assets},
                                    pumps)
    model, report = calibrate_twin.fn(TwinParams(min_lifetime=50), snap)
    assert report.n_assets == len(assets) - len(running)  # running lives never calibrate degradation
    lives = report.lives
    assert lives is not None and (lives.failures, lives.suspensions) == (18, 6)
    assert lives.weibull is not None and lives.weibull.failures == 18
    assert lives.twin_km is not None and 0.0 <= lives.twin_km.inside_share <= 1.0


def test_fd001_twin_passes_the_kaplan_meier_check_with_unchanged_ks(tmp_path):
    cmapss = load_contract("cmapss")
    frame = read_cmapss_frame()
    snap = lake.write_lake_table(pa.Table.from_pandas(frame, preserve_index=False), str(tmp_path), "train_fd001",
                                 "b1", contract=cmapss)
    extents = {a: (int(g.cycle.min()), int(g.cycle.max())) for a, g in frame.groupby("asset_id")}
    with_segments, _ = _with_segments(snap, extents, {a: "failure" for a in extents}, cmapss)
    _, report = calibrate_twin.fn(TwinParams(), with_segments)
    _, legacy = calibrate_twin.fn(TwinParams(truncated_sources="^test_"), snap)  # the file-name rule
    assert report.ks_statistic == legacy.ks_statistic and report.n_assets == legacy.n_assets == 100
    assert report.lives.failures == 100 and report.lives.suspensions == 0
    assert report.lives.weibull_km.passed and report.lives.twin_km.passed


def test_lives_of_unobserved_start_are_left_out_and_the_weibull_recovers_the_truth():
    """The pump generator's lives (known true Weibull lifetimes, planned replacements censoring ~15-30 %
    of them, first lives already under way when the records begin): with the bundled contract's
    ``life_start: unknown`` the censored fit recovers the true shape and scale within its intervals
    and the Kaplan-Meier band holds the true survival; counting first lives from the first reading
    is measurably biased."""
    import math

    import pandas as pd

    from twinflow.fleets.pumps import PumpFleetParams, _lives
    from twinflow.tasks.twin.lives import life_check

    p = PumpFleetParams(n_pumps=300, days=120, seed=0)
    rows = []
    for i, seq in enumerate(np.random.SeedSequence(7).spawn(p.n_pumps)):
        for k, lf in enumerate(_lives(np.random.default_rng(seq), p, p.days * 86400.0)):
            rows.append({"asset_id": f"P{i}", "segment": k, "duration": (lf["end"] - lf["start"]) / 3600.0,
                         "end_reason": "failure" if lf["reason"] == "failure" else "censored"})
    segments = pa.Table.from_pandas(pd.DataFrame(rows), preserve_index=False)
    censored = np.mean([r["end_reason"] != "failure" for r in rows])
    assert 0.15 <= censored <= 0.4
    true_scale = p.mean_life_days * 24 / math.gamma(1 + 1 / p.weibull_shape)
    pumps = load_contract("pumps")
    assert not pumps.first_life_observed("pumps")
    right = life_check(segments, [], pumps, "pumps")
    naive = life_check(segments, [])
    assert right.unobserved_start == p.n_pumps and naive.unobserved_start == 0
    w = right.weibull
    # life_check fits a failure-free period too; the 2-parameter fit is the generator's model.
    from twinflow.tasks.twin.survival import kaplan_meier, km_check, weibull_fit

    seg = segments.to_pandas()
    later = seg[seg.segment > 0]
    fit = weibull_fit(later.duration, later.end_reason == "failure")
    assert fit.shape_ci[0] <= p.weibull_shape <= fit.shape_ci[1], fit
    assert fit.scale_ci[0] <= true_scale <= fit.scale_ci[1], fit
    biased = weibull_fit(seg.duration, seg.end_reason == "failure")
    assert not biased.scale_ci[0] <= true_scale <= biased.scale_ci[1], biased  # residual lives pull it down
    def truth(t):
        return np.exp(-(np.asarray(t) / true_scale) ** p.weibull_shape)
    assert km_check(truth, kaplan_meier(later.duration, later.end_reason == "failure")).passed
    assert not km_check(truth, kaplan_meier(seg.duration, seg.end_reason == "failure")).passed
    assert w is not None and right.weibull_km is not None and right.weibull_km.passed


def test_pump_twin_lifetimes_follow_the_kaplan_meier_band_of_a_fleet_with_suspensions(tmp_path):
    """The generated pump fleet (about half its observed lives suspended by planned replacements or the
    end of the export): matched to its failures alone, the twin's lives were too short (44 % of its
    survival curve inside the Kaplan-Meier band in the pump demo); matched to the lognormal fitted
    with the suspensions, it passes the check and its median life is the generator's true one."""
    from twinflow.tasks.ingest.events import parse_events, time_ticks
    from twinflow.tasks.twin.report import _lives_line, lives_metrics

    from twinflow.fleets.pumps import PumpFleetParams, generate_pumps

    pumps = load_contract("pumps")
    # Hourly readings (the pump demo's lives, a sixth of its rows); no logger faults: ingest would
    # quarantine them, and this test writes the lake directly.
    params = PumpFleetParams(n_pumps=30, days=120, seed=0, interval="1h", sentinel_rate=0.0, spike_rate=0.0,
                             stuck_rate_per_week=0.0)
    fleet = generate_pumps(params, pumps)
    r = fleet.readings
    table = pa.table({"asset_id": r.column("machine"),
                      "timestamp": r.column("ts").cast(pa.timestamp("us", tz="UTC")),
                      **{c: r.column(c) for c in pumps.channel_names}})
    snap = lake.write_lake_table(table, str(tmp_path), "pumps", "b1", contract=pumps)
    ticks = time_ticks(table.column("timestamp"))
    ids = np.array(table.column("asset_id").to_pylist())
    extents = {a: (int(ticks[ids == a].min()), int(ticks[ids == a].max())) for a in np.unique(ids)}
    # No telemetry bounds: hourly readings can stop more than the contract's 10-minute step before a
    # failure event (which ingest would then quarantine; it is not what this test is about).
    events, quarantined = parse_events(fleet.events, pumps, "events.csv")
    assert quarantined.num_rows == 0
    segments = build_segments(extents, events, pumps)
    version = lake.write_table(snap.lake_path, lake.derived_name("pumps", "segments"), segments, overwrite=True)
    snap = snap.model_copy(update={"segments": version})

    _, report = calibrate_twin.fn(TwinParams(min_lifetime=24), snap)
    lives = report.lives
    assert lives.unobserved_start == params.n_pumps  # first lives began before the export
    assert lives.suspensions >= 0.3 * (lives.failures + lives.suspensions)
    assert lives.weibull_km.passed
    assert lives.twin_km.passed, lives.twin_km
    assert report.lifetime_fit is not None and report.lifetime_fit.failures == lives.failures
    failed = np.array(report.observed_lifetimes)
    assert report.lifetime_fit.median > np.median(failed)  # the failures alone are the shorter lives
    # Against the generator's truth: the lives after a renewal start new (the first ones do not).
    true_ttf = np.median([lf["time_to_failure_h"] for lf in fleet.lives if lf["index"] > 0])
    assert abs(np.median(report.simulated_lifetimes) / true_ttf - 1) < 0.1
    metrics = lives_metrics(report)
    assert metrics["lifetime_median"] == report.lifetime_fit.median and metrics["calibration_km_inside"] >= 0.9
    assert "suspensions, simulated lifetimes matched to their lognormal" in _lives_line(report, "h")
    # Failure modes as competing risks: each mode's failures and share as the generator recorded them.
    truth = Counter(lf["failure_mode"] for lf in fleet.lives if lf["index"] > 0 and lf["end_reason"] == "failure")
    by_mode = lives.by_mode  # the log's failure types name the modes (the contract declares no mode column)
    assert {m.removeprefix("failure_"): v.failures for m, v in by_mode.items()} == dict(truth)
    assert sum(v.failures for v in by_mode.values()) == lives.failures
    assert abs(sum(v.share for v in by_mode.values()) - 1) < 1e-12
    fitted = [v for v in by_mode.values() if v.weibull is not None]
    assert fitted and all(v.failures >= 5 and v.weibull.failures == v.failures for v in fitted)
    assert all(f"mode_{m}_share" in metrics for m in by_mode)
    # A failure is priced by the recorded mix of modes where the costs declare a cost per mode.
    costs = CostModel(failure=100.0, failure_by_mode={m: 1000.0 * (i + 1) for i, m in enumerate(sorted(by_mode))})
    priced, note = costs.priced_by_mode(lives.mode_shares)
    want = sum(v.share * costs.failure_by_mode[m] for m, v in by_mode.items())
    assert abs(priced.failure - want) < 1e-6 and "mix" in note


def test_each_failure_mode_is_fitted_with_the_other_modes_as_suspensions():
    """Competing risks: a life ended by the other mode, a renewal or the end of the records says only
    that this mode had not struck yet. Fitted that way each mode's Weibull recovers its truth; fitted on
    its own failures alone it is biased short."""
    import pandas as pd

    from twinflow.tasks.twin.lives import mode_lives

    rng = np.random.default_rng(7)
    n = 600
    bearing = 1000.0 * rng.weibull(3.0, n)
    seal = 1400.0 * rng.weibull(1.5, n)
    cut = rng.uniform(300, 2500, n)  # planned replacements and the end of the export
    duration = np.minimum.reduce([bearing, seal, cut])
    ended = np.where(duration == cut, "renewal", "failure")
    mode = np.where(ended == "failure", np.where(bearing < seal, "bearing", "seal"), None)
    segments = pd.DataFrame({"asset_id": [f"p{i}" for i in range(n)], "duration": duration,
                             "end_reason": ended, "failure_mode": mode})
    by_mode = mode_lives(segments)
    assert set(by_mode) == {"bearing", "seal"}
    assert by_mode["bearing"].failures + by_mode["seal"].failures == int((ended == "failure").sum())
    for m, (shape, scale) in {"bearing": (3.0, 1000.0), "seal": (1.5, 1400.0)}.items():
        w = by_mode[m].weibull
        assert w.shape_ci[0] <= shape <= w.shape_ci[1], (m, w)
        assert w.scale_ci[0] <= scale <= w.scale_ci[1], (m, w)
        assert by_mode[m].weibull_km.passed
    naive = np.median(duration[mode == "seal"])
    true_median = 1400.0 * np.log(2) ** (1 / 1.5)
    assert naive < 0.8 * true_median  # the seal failures alone: the long seal lives were cut first
    # One mode is the whole-life check itself: nothing per mode.
    assert mode_lives(segments.assign(failure_mode=np.where(ended == "failure", "any", None))) == {}
