"""Scoring a fleet in-process: a real (small) model on C-MAPSS FD001, bad inputs giving per-asset
reasons, and the label-free path on a timestamped pump fleet of the bundled ``pumps`` contract."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from health_fixtures import pumps_frame as _pumps
from twinflow.contract.store import load_contract
from twinflow.data import cmapss_path
from twinflow.tasks.features import FeatureParams, compute_features, feature_names
from twinflow.tasks.features.fit import identity_fit
from twinflow.tasks.health import HealthParams
from twinflow.tasks.health.champion import Champion, lifetimes_from_keys
from twinflow.tasks.health.evaluate import evaluate_against_truth, spearman
from twinflow.tasks.health.lifetime import ErrorDensity, fit_weibull
from twinflow.tasks.health.score import PARTIAL, SCORED, SKIPPED, life_frame, score_fleet

CHANNELS = ["s2", "s3", "s4", "s7", "s11", "s12", "s15", "s20", "s21"]
COLS = ["asset_id", "cycle", "op_setting_1", "op_setting_2", "op_setting_3", *[f"s{i}" for i in range(1, 22)]]


def _read(split: str) -> pd.DataFrame:
    df = pd.read_csv(cmapss_path(f"{split}_FD001.txt.gz"), sep=r"\s+", header=None, names=COLS)
    df["asset_id"] = df["asset_id"].astype(str)
    return df


class _Linear:
    def __init__(self, names, coef, intercept):
        self.names, self.coef, self.intercept = names, coef, intercept

    def predict(self, frame):
        return np.clip(frame[self.names].to_numpy() @ self.coef + self.intercept, 0, 125)


@pytest.fixture(scope="module")
def champion() -> Champion:
    """A ridge model on FD001 train features (unit-split validation gives its error model)."""
    from sklearn.linear_model import Ridge

    train = _read("train")
    fit, fp = identity_fit(CHANNELS), FeatureParams(windows=[5, 20], ewm_spans=[10], label=True, channels=CHANNELS)
    keys, x = compute_features(train, fit, fp)
    names = feature_names(fit, fp)
    frame = pd.DataFrame(x.T.astype("float64"), columns=names).fillna(0.0)
    units = keys.asset_id.astype(int).to_numpy()
    val = units % 5 == 0
    y = keys.rul.to_numpy(dtype="float64")
    reg = Ridge(alpha=1.0).fit(frame[~val], y[~val])
    model = _Linear(names, reg.coef_, reg.intercept_)
    pred = model.predict(frame[val])
    return Champion(name="m", version="1", run_id="r", model_uri="models:/m@champion", model=model, input_names=names,
                    features=None, feature_params=fp, fit=fit, rul_cap=125.0, interval_level=0.9,
                    half_width=float(np.quantile(np.abs(pred - y[val]), 0.9)),
                    errors=ErrorDensity.from_residuals(y[val], pred),
                    lifetime=fit_weibull(lifetimes_from_keys(train, "asset_id", "cycle")), val_true=y[val], val_pred=pred)


def test_fd001_test_units_are_scored_against_the_truth(champion):
    test = _read("test")
    contract = load_contract("cmapss")
    out = score_fleet(test, contract, HealthParams(), champion, baseline_frame=_read("train"))
    t = out.table
    assert len(t) == 100 and (t.status == SCORED).all() and t.risk_rank.tolist() == list(range(1, 101))
    truth = pd.Series(np.loadtxt(cmapss_path("RUL_FD001.txt.gz")), index=[str(i) for i in range(1, 101)])
    m = evaluate_against_truth(t, truth, cap=125.0)
    # A linear model is weaker than the champion of the flow test; floors for it:
    assert m["health_flag_precision"] >= 0.6 and m["health_flag_recall"] >= 0.5, m
    assert m["health_pi_coverage"] >= 0.75, m
    assert m["health_anomaly_spearman"] <= -0.5, m
    # Ranked by risk; actions follow the probabilities.
    assert t.p_fail.is_monotonic_decreasing
    assert t.action.iloc[0].startswith("maintain") and t.evidence.iloc[0]
    assert all(0 <= p <= 1 for p in t.p_fail)


def test_bad_inputs_give_per_asset_reasons_not_a_failed_run(champion):
    test = _read("test")
    test = test[test.asset_id.isin(["1", "2", "3", "4"])].copy()
    lone = test[test.asset_id == "1"].head(1).assign(asset_id="lonely")  # one reading only
    test.loc[test.asset_id == "2", "s11"] = np.nan  # a channel the model needs, gone for one asset
    t = score_fleet(pd.concat([test, lone]), load_contract("cmapss"), HealthParams(), champion,
                    baseline_frame=_read("train")).table.set_index("asset_id")
    assert t.loc["lonely", "status"] == SKIPPED and "only 1 reading" in t.loc["lonely", "reason"]
    assert t.loc["2", "status"] == PARTIAL and "features missing at the last reading: s11" in t.loc["2", "reason"]
    assert np.isnan(t.loc["2", "rul_estimate"]) and np.isfinite(t.loc["2", "p_fail"])  # the prior still speaks
    assert (t.loc[["1", "3", "4"], "status"] == SCORED).all()

    # A dataset without a channel the model's features need: every asset says so, the run goes on.
    t = score_fleet(test.drop(columns=["s4"]), load_contract("cmapss"), HealthParams(), champion).table
    assert (t.status == PARTIAL).all() and t.reason.str.contains("model needs channel\\(s\\) the data lacks: s4").all()
    assert t.anomaly_score.notna().all()


def test_a_pump_fleet_without_failures_still_gets_a_ranked_list():
    df, wear = _pumps()
    t = score_fleet(df, load_contract("pumps"), HealthParams(max_staleness="6h", horizons=[24.0], alert_horizon=24.0),
                    None).table
    assert (t.time_unit == "h").all() and t.p_fail.isna().all() and t.action.eq("no estimate").all()
    stale = t.set_index("asset_id").loc["p-00"]
    assert stale.status == SKIPPED and "no recent data" in stale.reason
    live = t[t.asset_id != "p-00"].set_index("asset_id")
    assert (live.status == SCORED).all()
    assert spearman(live.anomaly_score, wear.reindex(live.index)) > 0.7
    top = live.sort_values("anomaly_score").iloc[-1]
    assert {"vibration_mm_s", "bearing_temp_c"} & {e.split("↑")[0].split()[0] for e in top.evidence.split(", ")}
    assert t.risk_rank.tolist() == list(range(1, len(t) + 1))
    assert t.set_index("asset_id").loc[top.name, "risk_rank"] == 1


def test_scoring_each_assets_recent_rows_equals_scoring_whole_histories(champion, tmp_path):
    import pyarrow as pa

    from twinflow import lake
    from twinflow.tasks.health.score import life_frame, rows_needed

    contract = load_contract("cmapss")
    test = _read("test")
    snap = lake.write_lake_table(pa.Table.from_pandas(test, preserve_index=False), str(tmp_path), "running", "b1",
                                 contract=contract)
    cols = ["asset_id", "cycle", *CHANNELS]
    n = max(rows_needed(champion.feature_params), HealthParams().window)
    recent, extents = lake.read_recent(snap, n, cols)
    assert recent.num_rows < len(test)  # some histories are longer than the tail
    params, train = HealthParams(), _read("train")
    whole = score_fleet(lake.read_lake(snap, columns=cols).to_pandas(), contract, params, champion,
                        baseline_frame=train, scored_at="t").table
    part = score_fleet(recent.to_pandas(), contract, params, champion, baseline_frame=train, scored_at="t",
                       lives=life_frame(extents.to_pandas(), contract)).table
    pd.testing.assert_frame_equal(part.drop(columns=["life"]), whole.drop(columns=["life"]), rtol=1e-6)


def test_health_reads_the_recent_rows_table_and_falls_back_to_the_asset_files_saying_why(champion, tmp_path,
                                                                                          caplog):
    import logging

    import pyarrow as pa

    from twinflow import lake
    from twinflow.flows.health import read_fleet
    from twinflow.tasks.health.score import recent_rows

    contract, root = load_contract("cmapss"), str(tmp_path)
    test, train, params = _read("test"), _read("train"), HealthParams()
    snap = lake.write_lake_table(pa.Table.from_pandas(test, preserve_index=False), root, "running", "b1",
                                 contract=contract)

    def scored(s):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="twinflow.health"):
            frame, lives = read_fleet(s, contract, params, champion)
        t = score_fleet(frame, contract, params, champion, baseline_frame=train, scored_at="t", lives=lives).table
        return t, " ".join(r.getMessage() for r in caplog.records)

    from_files, why = scored(snap)
    assert "running__recent does not exist" in why
    # The flow reads only the columns the champion uses: the scores are those of every column read.
    every, extents = lake.read_recent(snap, recent_rows(champion.feature_params, params), COLS)
    assert len(every.column_names) == len(COLS)  # settings and all 21 sensors, not only the fit's 9
    whole = score_fleet(every.to_pandas(), contract, params, champion, baseline_frame=train, scored_at="t",
                        lives=life_frame(extents.to_pandas(), contract)).table
    pd.testing.assert_frame_equal(from_files, whole, check_exact=True)
    w = recent_rows(champion.feature_params, params)
    lake.refresh_recent(root, "running", w - 1)
    _, why = scored(snap)
    assert f"keeps the last {w - 1} readings per asset, {w} are needed" in why
    lake.refresh_recent(root, "running", w)
    from_table, why = scored(snap)
    assert why == ""
    pd.testing.assert_frame_equal(from_table, from_files, check_exact=True)

    # Telemetry committed without a refresh (its writer crashed in between): stale, so the files answer;
    # the previous snapshot still reads the version built from it.
    later = test[test.asset_id == "1"].assign(cycle=lambda d: d.cycle + 1000)
    snap2 = lake.write_lake_table(pa.Table.from_pandas(later, preserve_index=False), root, "running", "b2",
                                  contract=contract)
    stale, why = scored(snap2)
    assert f"stale: built from telemetry version {snap.version}, the snapshot is version {snap2.version}" in why
    again, why = scored(snap)
    assert why == ""
    pd.testing.assert_frame_equal(again, from_table, check_exact=True)
    lake.refresh_recent(root, "running", w)
    fresh, why = scored(snap2)
    assert why == ""
    pd.testing.assert_frame_equal(fresh, stale, check_exact=True)
    assert fresh.set_index("asset_id").loc["1", "readings"] == 2 * (test.asset_id == "1").sum()


def test_an_assets_age_counts_from_its_last_renewal_and_a_new_life_says_so(champion):
    test = _read("test")
    test = test[test.asset_id.isin(["1", "2", "3"])]
    contract = load_contract("cmapss")
    last = test.groupby("asset_id").cycle.max()
    # Asset 1 was renewed 20 cycles before its last reading, asset 2 one cycle before; 3 never.
    segments = pd.DataFrame({"asset_id": ["1", "1", "2", "2", "3"], "segment": [0, 1, 0, 1, 0],
                             "origin": [0, last["1"] - 20, 0, last["2"] - 1, 0],
                             "start": [1, last["1"] - 19, 1, last["2"], 1]})
    params = HealthParams()
    plain = score_fleet(test, contract, params, champion).table.set_index("asset_id")
    t = score_fleet(test, contract, params, champion,
                    lives=life_frame(None, contract, segments)).table.set_index("asset_id")
    assert t.loc["1", "age"] == 20 and t.loc["1", "life"] == 1 and t.loc["1", "status"] == SCORED
    assert t.loc["3", "age"] == plain.loc["3", "age"] == last["3"] and t.loc["3", "life"] == 0
    assert t.loc["2", "age"] == 1 and t.loc["2", "status"] == PARTIAL
    assert "new life: renewed 1 cycle ago, 1 reading(s) since" in t.loc["2", "reason"]
    assert np.isnan(t.loc["2", "rul_estimate"]) and np.isfinite(t.loc["2", "p_fail"])
    # A renewed asset is younger: the lifetime model gives it a lower failure probability.
    assert t.loc["1", "p_fail"] <= plain.loc["1", "p_fail"]


def test_the_pump_generators_truth_gives_each_running_pumps_remaining_life():
    from twinflow.fleets.pumps import PumpFleetParams, generate_pumps
    from twinflow.tasks.health.evaluate import true_rul_from_lives

    lives = generate_pumps(PumpFleetParams(n_pumps=6, days=90, seed=2)).lives
    running = true_rul_from_lives(lives)
    assert set(running.index) == {lf["machine"] for lf in lives if lf["end_reason"] == "censored"}
    assert (running > 0).all()
    # The same arithmetic on lives that did fail puts their failure at their end: nothing left.
    failed = {lf["machine"]: dict(lf, end_reason="censored") for lf in lives if lf["end_reason"] == "failure"}
    assert failed and np.allclose(true_rul_from_lives(list(failed.values())), 0.0, atol=0.01)
    # In the clock's unit (e.g. days).
    assert np.allclose(true_rul_from_lives(lives, time_unit_hours=24.0), running / 24.0)


def test_live_features_at_the_last_reading_equal_the_full_pass_over_whole_histories(champion):
    from twinflow.tasks.health.score import fleet_frame, live_features

    test = _read("test")
    ff = fleet_frame(test, load_contract("cmapss"))
    fit, fp, names = champion.fit, champion.feature_params, champion.input_names
    live = live_features(ff, fit, fp, names)
    assert live.asset_id.tolist() == sorted(test.asset_id.unique()) and list(live.columns[2:]) == names
    keys, full = compute_features(test, fit, fp.model_copy(update={"label": False}))
    last = np.r_[np.flatnonzero(keys.asset_id.to_numpy()[1:] != keys.asset_id.to_numpy()[:-1]), len(keys) - 1]
    want = pd.DataFrame(full[:, last].T.astype("float64"), columns=names)
    assert (test.groupby("asset_id").size() > 31).any()  # tails cut: only the rows the windows and EWMs see
    # Windows summed over their own rows, and EWMs cut where their weight is < 1e-9: float32 rounding.
    pd.testing.assert_frame_equal(live[names], want, rtol=2.4e-7, atol=1e-6)
    # Only the features the model takes: a model on a few of them gets those, in its order.
    few = [names[7], names[0], names[-1]]
    part = live_features(ff, fit, fp, few)
    pd.testing.assert_frame_equal(part[few], live[few], check_exact=True)


def test_drift_standardises_only_the_last_window_and_gives_what_every_row_gave(champion):
    from twinflow.flows.health import drift_table
    from twinflow.tasks.health import drift as dr
    from twinflow.tasks.health.score import fleet_frame, regimes, standardised

    contract, params = load_contract("cmapss"), HealthParams()
    test, train = _read("test"), _read("train")
    got = drift_table(test, train, contract, champion, params)
    # As it was computed before: every reading standardised, then each asset's last window kept.
    ff, bf = fleet_frame(test, contract), fleet_frame(train, contract)
    recent = ff.frame.groupby("asset_id", sort=False).cumcount(ascending=False).to_numpy() < params.window
    fr, br = regimes(ff, champion.fit), regimes(bf, champion.fit)
    channels = [c for c in champion.fit.kept if c in test.columns]
    z, bz = standardised(ff, channels, champion.fit, fr), standardised(bf, channels, champion.fit, br)
    want = dr.drift_table(bz, br, z[recent], fr[recent], channels)
    assert len(got) == len(channels)
    pd.testing.assert_frame_equal(got, want, check_exact=True)


def test_scores_from_a_recent_table_built_from_ingest_tails_equal_those_from_the_asset_files(champion, tmp_path,
                                                                                             caplog):
    """Two ingests, the second appending to every asset (and adding rows older than some tails): the
    recent table is brought forward from the staged tails alone, and health scores the same from it."""
    import logging

    import pyarrow as pa
    import pyarrow.parquet as pq

    from twinflow import lake
    from twinflow.flows.health import read_fleet
    from twinflow.tasks.health.score import recent_rows
    from twinflow.tasks.ingest import IngestParams, latest_snapshot, run_local

    contract, params, train = load_contract("cmapss"), HealthParams(), _read("train")
    test = _read("test")
    test["cycle"] = test["cycle"] + 30  # room for older readings later
    landing, root, q = tmp_path / "landing", str(tmp_path / "lake"), str(tmp_path / "q")
    landing.mkdir()
    w = recent_rows(champion.feature_params, params)
    ingest = IngestParams(landing=str(landing), dataset="running", contract="cmapss", recent_rows=w)
    half = test.groupby("asset_id").cycle.transform(lambda c: c <= c.min() + (c.max() - c.min()) // 2)
    pq.write_table(pa.Table.from_pandas(test[half], preserve_index=False), landing / "first.parquet")
    run_local(ingest, root, q, "b1")
    older = test[test.asset_id.isin(["1", "2"]) & (test.cycle <= 40)].assign(cycle=lambda d: d.cycle - 30)
    later = pd.concat([test[~half], older], ignore_index=True)
    pq.write_table(pa.Table.from_pandas(later, preserve_index=False), landing / "second.parquet")
    run_local(ingest, root, q, "b2")
    made = lake.history(root, lake.derived_name("running", lake.RECENT), limit=1)[0]
    assert made["twinflow.recent_assets_read"] == "0"
    assert made["twinflow.recent_assets_from_tails"] == str(test.asset_id.nunique())

    snap = latest_snapshot(root, "running")
    with caplog.at_level(logging.WARNING, logger="twinflow.health"):
        frame, lives = read_fleet(snap, contract, params, champion)
    assert " ".join(r.getMessage() for r in caplog.records) == ""  # the table answered
    from_table = score_fleet(frame, contract, params, champion, baseline_frame=train, scored_at="t",
                             lives=lives).table
    every, extents = lake.read_recent(snap, w, COLS)
    from_files = score_fleet(every.to_pandas(), contract, params, champion, baseline_frame=train, scored_at="t",
                             lives=life_frame(extents.to_pandas(), contract)).table
    pd.testing.assert_frame_equal(from_table, from_files, check_exact=True)
    assert from_table.set_index("asset_id").loc["1", "readings"] == (test.asset_id == "1").sum() + len(
        older[older.asset_id == "1"])
