"""The features flow against a real Prefect server and Dask cluster, on lakes written here."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pump_fixtures import pump_rows
from twinflow import contracts, lake as lake_api
from twinflow.data import cmapss_path
from twinflow.errors import ConfigError
from twinflow.flows.features import features
from twinflow.refs import FileRef, LakeSnapshot
from twinflow.tasks.features import FIT_FILE, MANIFEST_FILE, FeatureParams, FitStats
import cmapss_names as CM

pytestmark = pytest.mark.integration

SMALL = dict(windows=[5, 30], ewm_spans=[10], partition_bytes=512 * 1024)


def _read_cmapss(name: str) -> pd.DataFrame:
    raw = pd.read_csv(cmapss_path(name), sep=r"\s+", header=None)
    raw.columns = CM.CMAPSS_COLUMNS
    return raw


def write_lake(frame: pd.DataFrame, lake: Path, dataset: str, source: str = "src.txt") -> LakeSnapshot:
    """Write ``frame`` (columns unit/cycle/op_setting_*/channels) in the lake's canonical layout."""
    frame = frame.rename(columns={"unit": contracts.ASSET})
    frame[contracts.ASSET] = frame[contracts.ASSET].astype(str)
    channels = [c for c in frame.columns if c not in (contracts.ASSET, contracts.TIME)]
    n = len(frame)
    cols = {contracts.ASSET: pa.array(frame[contracts.ASSET].to_numpy(), pa.string()),
            contracts.TIME: pa.array(frame[contracts.TIME].to_numpy(), pa.int32())}
    cols |= {c: pa.array(frame[c].to_numpy(dtype=np.float64), pa.float64()) for c in channels}
    version = lake_api.commit(str(lake), dataset, lake_api.conform(pa.table(cols), "b1", source),
                              replace={"source_file": [source]})
    assert n == 0 or version is not None
    sha = hashlib.sha256(pd.util.hash_pandas_object(frame, index=False).to_numpy().tobytes()).hexdigest()
    return LakeSnapshot(lake_path=str(lake), dataset=dataset, batch_id="b1",
                        files=[FileRef(path=source, sha256=sha, rows_read=len(frame))], rows=len(frame),
                        version=version)


def read_features(path: str) -> pd.DataFrame:
    return pq.read_table(path).to_pandas().sort_values(["asset_id", "cycle"]).reset_index(drop=True)


@pytest.fixture(scope="module")
def runtime(tmp_path_factory, prefect_server, dask_scheduler_address):
    """One runtime for this module on the session's server and cluster (the stage needs no MLflow)."""
    from twinflow import runtime as rt_mod
    from twinflow.settings import get_settings

    settings = get_settings(home=tmp_path_factory.mktemp("features-home"),
                            prefect={"api_url": prefect_server.url},
                            dask={"mode": "address", "address": dask_scheduler_address})
    with rt_mod.start(settings, mlflow=False) as rt:
        yield rt


@pytest.fixture(scope="module")
def fd001() -> pd.DataFrame:
    return _read_cmapss("train_FD001.txt.gz")


@pytest.fixture(scope="module")
def fd001_features(runtime, fd001):
    snap = write_lake(fd001, Path(runtime.settings.lake_path), "fd001")
    params = FeatureParams(**SMALL)
    return snap, params, features(snap, params)


def test_fd001_features_label_summary_and_cache(runtime, fd001, fd001_features):
    """FD001 end to end: every row, RUL label, constant channels dropped, artifact, cache skip."""
    from prefect.client.orchestration import get_client

    snap, params, ref = fd001_features

    out = read_features(ref.path)
    assert ref.rows == len(fd001) == len(out)
    assert len(list(Path(ref.path).glob("part-*.parquet"))) > 1, "expected several partitions"
    # Each asset lives in exactly one partition file: windows never straddle files.
    files_per_asset = {}
    for f in Path(ref.path).glob("part-*.parquet"):
        for a in pq.read_table(f, columns=["asset_id"]).column(0).unique().to_pylist():
            files_per_asset[a] = files_per_asset.get(a, 0) + 1
    assert set(files_per_asset.values()) == {1} and len(files_per_asset) == fd001.unit.nunique()

    expected = fd001.assign(asset_id=fd001.unit.astype(str)).sort_values(["asset_id", "cycle"])
    rul = expected.groupby("asset_id").cycle.transform("max") - expected.cycle
    np.testing.assert_array_equal(out["rul"].to_numpy(), np.minimum(rul.to_numpy(), 125))

    constant = {c for c in CM.SENSORS if fd001[c].nunique() == 1}
    assert constant, "FD001 has constant sensors"
    fit = FitStats.model_validate_json((Path(ref.path) / FIT_FILE).read_text())
    assert set(fit.dropped) == constant and set(fit.kept) == set(CM.SENSORS) - constant
    assert fit.n_regimes == 1  # FD001 runs in a single operating condition
    assert not any(c.startswith(tuple(f"{s}_" for s in constant)) for c in ref.feature_columns)
    assert set(ref.feature_columns) <= set(out.columns) and "rul" not in ref.feature_columns
    # Per-regime normalisation over the whole fleet: z-scores with mean 0 and std 1.
    z = out[[f"{c}_norm" for c in fit.kept]]
    np.testing.assert_allclose(z.mean().to_numpy(), 0, atol=1e-5)
    np.testing.assert_allclose(z.std().to_numpy(), 1, atol=1e-3)
    # Rolling mean of the z-score of one asset equals pandas on that asset.
    a1 = out[out.asset_id == "1"]
    np.testing.assert_allclose(a1["s2_mean_30"], a1["s2_norm"].astype(float).rolling(30, min_periods=1).mean(),
                               rtol=1e-5, atol=1e-5)

    manifest = json.loads((Path(ref.path) / MANIFEST_FILE).read_text())
    assert manifest["summary"]["rows"] == len(fd001)
    assert manifest["summary"]["nan_counts"]["s2_std_5"] == fd001.unit.nunique()  # 1st row of each
    with get_client(sync_client=True) as client:
        arts = client.read_latest_artifacts()
    assert any(a.key == "features-fd001" and "NaN count" in str(a.data) for a in arts)
    # Its task runs are named after the dataset they worked on.
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterName

    with get_client(sync_client=True) as client:
        named = {r.name for r in client.read_task_runs(
            task_run_filter=TaskRunFilter(name=TaskRunFilterName(like_=f"features-%-{snap.dataset}")))}
    assert {f"features-fit-{snap.dataset}", f"features-transform-{snap.dataset}"} <= named, named

    # Unchanged snapshot + params + code: skipped (same folder, files untouched).
    mtimes = {p.name: p.stat().st_mtime_ns for p in Path(ref.path).iterdir()}
    again = features(snap, params)
    assert again == ref
    assert {p.name: p.stat().st_mtime_ns for p in Path(ref.path).iterdir()} == mtimes
    # Changed parameters: recomputed into another folder.
    other = features(snap, FeatureParams(**{**SMALL, "windows": [7]}))
    assert other.path != ref.path and "s2_mean_7" in other.feature_columns
    assert not list(Path(runtime.settings.features_path).rglob(".tmp-*"))


def test_fit_from_transforms_test_data_with_the_training_fit(runtime, fd001_features):
    """Test data is normalised with the training statistics; label=False gives no rul column."""
    lake = Path(runtime.settings.lake_path)
    train = fd001_features[2]
    test_raw = _read_cmapss("test_FD001.txt.gz")
    test = features(write_lake(test_raw, lake, "test", source="test.txt"),
                    FeatureParams(**SMALL, label=False), fit_from=train)
    assert test.feature_columns == train.feature_columns and test.label_column is None
    out = read_features(test.path)
    assert "rul" not in out.columns and len(out) == len(test_raw)
    fit = FitStats.model_validate_json((Path(train.path) / FIT_FILE).read_text())
    assert (Path(test.path) / FIT_FILE).read_text() == (Path(train.path) / FIT_FILE).read_text()
    j = fit.kept.index("s7")
    raw = test_raw.assign(asset_id=test_raw.unit.astype(str)).sort_values(["asset_id", "cycle"])
    np.testing.assert_allclose(out["s7_norm"], (raw["s7"].to_numpy() - fit.mean[0][j]) / fit.std[0][j],
                               rtol=1e-5, atol=1e-5)
    # The test set's own statistics differ from the training fit's.
    assert abs(out["s7_norm"].mean()) > 1e-3


def test_bad_input_fails_clearly_and_leaves_nothing(runtime):
    """Unknown channel, bad window, short assets, an all-NaN channel and a corrupt file."""
    lake = Path(runtime.settings.lake_path)
    rng = np.random.default_rng(1)
    n = [3, 40, 1]  # assets shorter than the windows
    frame = pd.DataFrame({"unit": np.repeat([1, 2, 3], n),
                          "cycle": np.concatenate([np.arange(1, k + 1) for k in n]),
                          "op_setting_1": 0.0, "op_setting_2": 0.0, "op_setting_3": 100.0,
                          "s2": rng.normal(size=sum(n)), "s3": np.nan, "s4": rng.normal(size=sum(n))})
    snap = write_lake(frame, lake, "odd")
    feats_root = Path(runtime.settings.features_path)

    with pytest.raises(ConfigError, match="unknown channel 's99'"):
        features(snap, FeatureParams(channels=["s2", "s99"]))
    with pytest.raises(Exception, match="greater than 0"):
        features(snap, {"windows": [5, 0]})  # rejected by the flow's parameter validation
    assert not (feats_root / "odd").exists(), "nothing may be written before validation passes"

    ref = features(snap, FeatureParams(windows=[5, 30], partition_bytes=1))  # one asset per partition
    fit = FitStats.model_validate_json((Path(ref.path) / FIT_FILE).read_text())
    # The lake holds every contract channel (null where a source lacks it): those are all-NaN too.
    assert fit.dropped["s3"] == "all-NaN" and set(fit.dropped.values()) == {"all-NaN"}
    assert fit.kept == ["s2", "s4"]
    out = read_features(ref.path)
    assert len(out) == sum(n) and out["rul"].tolist()[:3] == [2, 1, 0]
    short = out[out.asset_id == "3"]  # a single row: a mean, but no std or slope
    assert short["s2_mean_30"].notna().all() and short["s2_std_30"].isna().all()

    # A corrupt lake file: the flow fails and leaves no partial output behind.
    Path(lake_api.list_files(snap)["2"][0][0]).write_bytes(b"not parquet")
    before = sorted(p.name for p in (feats_root / "odd").iterdir())
    with pytest.raises(Exception):
        features(snap, FeatureParams(windows=[6]))
    assert sorted(p.name for p in (feats_root / "odd").iterdir()) == before


def test_a_timestamped_pump_fleet_gets_time_windows_hour_labels_and_its_contract(runtime):
    """The same flow on a non-C-MAPSS contract: channels, regimes, keys and units from the contract."""
    from twinflow.contract import load_contract

    pumps = load_contract("pumps")
    rows = pump_rows()
    snap = lake_api.write_lake_table(pa.Table.from_pandas(rows, preserve_index=False),
                                     runtime.settings.lake_path, "pumps", "b1", contract=pumps)
    # Raw (unnormalised) values, so that windows compare with pandas on the lake's own numbers.
    params = FeatureParams(windows=[3], time_windows=["1h", "6h"], ewm_spans=[6], regimes=1, normalise=False,
                           rul_cap=None)
    ref = features(snap, params)
    assert ref.key_columns == ["asset_id", "timestamp"] and ref.time_unit == "h"
    assert ref.contract == pumps.ref
    # Sensors of the contract that the data holds become features; settings do not.
    assert "time_since_start" in ref.feature_columns and "vibration_mm_s_mean_6h" in ref.feature_columns
    assert not any(c.startswith(("speed_rpm", "load_pct")) for c in ref.feature_columns)
    assert "inlet_temp_c" not in ref.feature_columns  # all null in this fleet: dropped, not a feature
    out = pq.read_table(ref.path).to_pandas().sort_values(["asset_id", "timestamp"]).reset_index(drop=True)
    assert len(out) == len(rows)
    rows = rows.sort_values(["asset_id", "timestamp"]).reset_index(drop=True)
    pd.testing.assert_series_equal(out["timestamp"], rows["timestamp"], check_names=False)
    end = rows.groupby("asset_id")["timestamp"].transform("max")
    np.testing.assert_allclose(out["rul"], (end - rows["timestamp"]).dt.total_seconds() / 3600)
    # The 1-hour mean against pandas' time-based rolling over the same readings (gap and NaNs included).
    want = (rows.groupby("asset_id").rolling("1h", on="timestamp", min_periods=1)["vibration_mm_s"]
            .mean().to_numpy())
    np.testing.assert_allclose(out["vibration_mm_s_mean_1h"], want, rtol=1e-5, equal_nan=True)
    lacking = out["asset_id"] == "P-002"
    assert out.loc[lacking, "bearing_temp_c_mean_6h"].isna().all()
    assert out.loc[~lacking, "bearing_temp_c_mean_6h"].notna().all()
    # Regimes come from the contract's settings (two speeds) when asked for.
    ref2 = features(snap, params.model_copy(update={"regimes": "auto", "normalise": True}))
    assert ref2.params_digest != ref.params_digest
    fit = FitStats.model_validate_json((Path(ref2.path) / FIT_FILE).read_text())
    assert fit.n_regimes == 2 and "speed_rpm" in fit.op_columns and "regime" in ref2.feature_columns
    # Time windows on a cycle-clock table are refused, naming the remedy.
    with pytest.raises(ConfigError, match="need a timestamp clock"):
        features(write_lake(_read_cmapss("train_FD001.txt.gz").head(200), Path(runtime.settings.lake_path),
                            "fd001-head"), FeatureParams(time_windows=["1h"]))
