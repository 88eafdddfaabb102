"""The generalised evaluation protocol: held-out failed lives cut at random points, scored without a
truth file; the C-MAPSS truth-file protocol stays one mode."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from train_fixtures import cmapss_frame, feature_columns, write_features
from twinflow.errors import ConfigError
from twinflow.tasks.train import (
    DataSpec,
    TrainParams,
    build_eval_set,
    eval_protocol,
    search_and_evaluate,
    split_for_training,
    truncated_lives_set,
)
from twinflow.tasks.train.data import life_ids

SPEC = DataSpec(tuple(feature_columns()), "rul")
TRUNC = TrainParams(n_trials=1, max_iter=30, early_stopping_rounds=10, eval_protocol="truncated",
                    eval_fraction=0.25, use_registry=False)


@pytest.fixture(scope="module")
def small():
    return cmapss_frame("train", list(range(1, 21)))


def test_held_out_lives_are_disjoint_and_cut_inside_each_life(small):
    train, val, held = split_for_training(small, SPEC, TRUNC)
    assets = [set(f.asset_id) for f in (train, val, held)]
    assert not (assets[0] & assets[1]) and not (assets[0] & assets[2]) and not (assets[1] & assets[2])
    assert len(held.asset_id.unique()) == 5 and len(train) + len(val) + len(held) == len(small)
    ev = truncated_lives_set(held, SPEC, per_life=1, seed=0)
    assert ev.name == "truncated-lives" and len(ev.rows) == 5 and len(set(ev.asset_ids)) == 5
    scored = ev.frame.iloc[ev.rows]
    # The truth is each row's own label (end of its life minus its cycle, under the features' cap of
    # 125), never a file, and not capped again at TrainParams.rul_cap.
    life = held.groupby("asset_id")["cycle"].max()
    expected = np.minimum(life.loc[scored.asset_id].to_numpy() - scored.cycle.to_numpy(), 125.0)
    assert np.array_equal(ev.true, expected)
    # Truncation points are drawn, not each life's last row, and the same seed draws the same rows.
    many = truncated_lives_set(held, SPEC, per_life=20, seed=0)
    assert len(many.rows) == 100 and (many.true > 0).mean() > 0.9 and many.true.std() > 10
    assert np.array_equal(truncated_lives_set(held, SPEC, 20, seed=0).rows, many.rows)
    assert not np.array_equal(truncated_lives_set(held, SPEC, 20, seed=1).rows, many.rows)


def test_an_asset_with_two_failed_lives_is_truncated_once_per_life(small):
    one = small[small.asset_id == "FD001-1"]
    two = small[small.asset_id == "FD001-2"].assign(asset_id="FD001-1", cycle=lambda d: d.cycle + one.cycle.max())
    both = pd.concat([one, two], ignore_index=True)
    ids = life_ids(both, SPEC)
    assert list(pd.unique(ids)) == ["FD001-1#0", "FD001-1#1"]
    assert (ids == "FD001-1#0").sum() == len(one)
    ev = truncated_lives_set(both, SPEC, per_life=1, seed=3)
    assert len(ev.rows) == 2 and ev.rows[0] < len(one) <= ev.rows[1]


def test_protocol_choice_is_checked():
    assert eval_protocol(TrainParams(), None) == "validation"
    assert eval_protocol(TrainParams(), object()) == "truth_file"
    with pytest.raises(ConfigError, match="do not also pass test_features"):
        eval_protocol(TRUNC, object())
    with pytest.raises(ConfigError, match="needs test_features"):
        eval_protocol(TrainParams(eval_protocol="truth_file"), None)
    with pytest.raises(ConfigError, match="at least 3 assets"):
        split_for_training(cmapss_frame("train", [1, 2]), SPEC, TRUNC)


def test_a_run_is_scored_on_truncated_lives_and_a_champion_rescored_on_the_same(small, tmp_path):
    ref = write_features(small, tmp_path / "features")
    out = search_and_evaluate(ref, TRUNC, None, None)
    assert out.eval_name == "truncated-lives" and out.eval_metrics["n"] == 5
    # Held-out assets were neither trained nor validated on.
    assert out.assets_train + out.assets_val + 5 == small.asset_id.nunique()
    assert set(out.eval_assets).isdisjoint(set(out.val_set.asset_ids))
    for k in ("rmse", "score"):
        assert np.isfinite(out.eval_metrics[k])
    # Coverage of the conformal interval on the truncation points, no truth file anywhere.
    assert out.prognostics.interval is not None and 0.0 <= out.prognostics.interval.coverage <= 1.0
    # Re-scoring (e.g. the champion) rebuilds the same evaluation rows from the features alone.
    again = build_eval_set(ref, TRUNC, None)
    assert np.array_equal(again.true, out.eval_true) and list(again.asset_ids) == list(out.eval_assets)



def _timestamp_lives(n_assets: int = 8, seed: int = 0) -> tuple[pd.DataFrame, list[float]]:
    """Features of pumps read every 10 minutes (timestamps as µs ticks, labels in hours capped at
    240 h): two failed lives per pump, each failure 10 minutes after the last reading, 5 hours of
    repair between. Returns the rows (with the generator's ``life`` number) and each life's length in h."""
    rng = np.random.default_rng(seed)
    parts, lengths = [], []
    for a in range(n_assets):
        t0 = pd.Timestamp("2026-01-01", tz="UTC").value // 1000 + a * 3_600_000_000
        for k in range(2):
            n = int(rng.integers(300, 900))  # readings in this life
            t = t0 + np.arange(n, dtype="int64") * 600_000_000
            fail = t0 + n * 600_000_000
            parts.append(pd.DataFrame({"asset_id": f"P-{a}", "timestamp": t, "x": rng.normal(size=n),
                                       "rul": np.minimum((fail - t) / 3.6e9, 240.0), "life": f"P-{a}#{k}"}))
            lengths.append(n / 6.0)
            t0 = fail + 5 * 3_600_000_000
    return pd.concat(parts, ignore_index=True), lengths


def test_the_naive_baseline_counts_lives_and_ages_in_the_clock_unit_not_in_ticks():
    from twinflow.tasks.promotion import fleet_mean_life_predictions
    from twinflow.tasks.train import life_ages, mean_life
    from twinflow.tasks.train.eval import regression_metrics
    from twinflow.tasks.train.stage import _baseline_metrics

    frame, lengths = _timestamp_lives()
    spec = DataSpec(("x",), "rul", "asset_id", "timestamp", "h")
    first_four = frame.asset_id.isin([f"P-{a}" for a in range(4)])
    train, held = frame[first_four], frame[~first_four].reset_index(drop=True)
    assert mean_life(train, spec) == pytest.approx(np.mean(lengths[:8]))  # hours, one per life
    lives, age = life_ages(held, spec)
    assert np.array_equal(lives, held.life.to_numpy())  # lives split at the renewal
    start = held.groupby("life")["timestamp"].transform("min")
    assert np.allclose(age, (held.timestamp - start) / 3.6e9)  # hours since the life's first reading
    ev = truncated_lives_set(held, spec, per_life=5, seed=0)
    base = _baseline_metrics(train, spec, ev, 240.0)
    assert base["mean_life"] == pytest.approx(np.mean(lengths[:8]))
    pred = fleet_mean_life_predictions(base["mean_life"], age[ev.rows], 240.0)
    expected = regression_metrics(pred, ev.true)
    assert base["rmse"] == pytest.approx(expected["rmse"]) and base["score"] == pytest.approx(expected["score"])
    # Not the cap (or 0) at every row, as with epoch ticks: the baseline follows each row's age.
    assert np.mean(pred < 240.0) > 0.2 and base["rmse"] < np.sqrt(np.mean((240.0 - ev.true) ** 2))


def test_the_naive_baseline_on_a_cycle_clock_is_the_mean_last_cycle_minus_the_cycle(small):
    from twinflow.tasks.train import life_ages, mean_life

    assert mean_life(small, SPEC) == small.groupby("asset_id")["cycle"].max().mean()
    assert np.array_equal(life_ages(small, SPEC)[1], small.cycle.to_numpy(dtype="float64"))
    # Rows of censored or running lives (no label) are no lifetime.
    censored = small.assign(rul=np.where(small.asset_id == "FD001-1", np.nan, small.rul))
    rest = small[small.asset_id != "FD001-1"]
    assert mean_life(censored, SPEC) == rest.groupby("asset_id")["cycle"].max().mean()
