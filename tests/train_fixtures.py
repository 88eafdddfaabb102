"""Small real feature datasets for the train stage's tests, built from the bundled C-MAPSS FD001.

The features stage is tested on its own; these tests write the feature layout the train stage
reads (keys, float features, capped ``rul`` label) directly, so they do not depend on it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd

from twinflow.data import cmapss_path
from twinflow.refs import FeatureSetRef, FileRef, LakeSnapshot

COLUMNS = ["unit", "cycle", "op1", "op2", "op3", *[f"s{i}" for i in range(1, 22)]]
SENSORS = ["s2", "s3", "s4", "s7", "s11", "s12", "s15", "s20", "s21"]
ROLLED = ["s4", "s11", "s12"]


def cmapss_frame(split: str = "train", units: list[int] | None = None, rul_cap: float = 125.0) -> pd.DataFrame:
    """Keys, sensors, 5-cycle rolling means of three sensors and the capped RUL (train only)."""
    raw = pd.read_csv(cmapss_path(f"{split}_FD001.txt.gz"), sep=r"\s+", header=None, names=COLUMNS)
    if units is not None:
        raw = raw[raw.unit.isin(units)]
    df = pd.DataFrame({"asset_id": "FD001-" + raw.unit.astype(str), "cycle": raw.cycle.astype("int64")})
    for s in SENSORS:
        df[s] = raw[s].astype("float64").to_numpy()
    for s in ROLLED:
        df[f"{s}_mean5"] = df.groupby("asset_id")[s].transform(lambda v: v.rolling(5, min_periods=1).mean())
    if split == "train":
        last = df.groupby("asset_id")["cycle"].transform("max")
        df["rul"] = np.minimum(last - df["cycle"], rul_cap).astype("float64")
    return df.reset_index(drop=True)


def feature_columns() -> list[str]:
    return [*SENSORS, *[f"{s}_mean5" for s in ROLLED]]


def fd001_lake(lake_path: str, dataset: str) -> LakeSnapshot:
    """The bundled FD001 training fleet as a lake dataset (written once per lake): the snapshot a
    feature set names is real, so what reads it (the promotion gate's twin of the fleet) can."""
    import pyarrow as pa

    from twinflow import lake
    from twinflow.contract import load_contract
    from twinflow.tasks.twin.calibration import read_cmapss_frame

    existing = lake.latest_snapshot(lake_path, dataset)
    if existing is not None:
        return existing
    return lake.write_lake_table(pa.Table.from_pandas(read_cmapss_frame(), preserve_index=False), lake_path,
                                 dataset, "fd001", contract=load_contract("cmapss"))


def write_features(df: pd.DataFrame, out: Path, *, hive: bool = False, label: str | None = "rul",
                   columns: list[str] | None = None) -> FeatureSetRef:
    """Write ``df`` as a Parquet dataset (one file, or hive-partitioned by asset) and reference it."""
    import pyarrow as pa
    import pyarrow.dataset as ds
    import pyarrow.parquet as pq

    out.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pandas(df, preserve_index=False)
    if hive:
        ds.write_dataset(table, out, format="parquet", partitioning=["asset_id"], partitioning_flavor="hive",
                         existing_data_behavior="overwrite_or_ignore")
    else:
        pq.write_table(table, out / "part-0.parquet")
    raw = cmapss_path("train_FD001.txt.gz")
    written = fd001_lake(str(out.parent / "lake"), "cmapss")
    snap = LakeSnapshot(lake_path=str(out.parent / "lake"), dataset="cmapss", batch_id="test-batch",
                        files=[FileRef(path=str(raw), sha256=hashlib.sha256(raw.read_bytes()).hexdigest())],
                        rows=len(df), version=written.version, contract=written.contract)
    return FeatureSetRef(path=str(out), snapshot=snap, feature_columns=columns or feature_columns(),
                         label_column=label, rows=len(df),
                         # Like the features stage, a digest that tells feature sets apart (here: of the data).
                         params_digest=hashlib.sha256(pd.util.hash_pandas_object(df).values.tobytes()).hexdigest()[:16])
