"""Training data: the feature dataset read, checked and split by asset, and the evaluation sets.

Validation never leaks: rows are split by asset, and the split is a deterministic function of the
asset id (not of the seed), so every training run with the same ``val_fraction`` holds out the same
assets and the champion/challenger comparison runs on data neither model trained on.
"""

from __future__ import annotations

import hashlib
import re
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from twinflow.errors import ConfigError
from twinflow.refs import FeatureSetRef

if TYPE_CHECKING:
    from twinflow.tasks.train import TrainParams


@dataclass(frozen=True)
class DataSpec:
    """Which columns are keys, model inputs and label.

    ``cycle`` names the time key whatever the clock (``cycle``, or ``timestamp``: read as int64
    microseconds, which orders an asset's rows as the cycle number does); ``time_unit`` is the unit
    of the label and of every RUL figure derived from it (``cycle``, or e.g. ``h``).
    """

    feature_columns: tuple[str, ...]
    label: str
    asset: str = "asset_id"
    cycle: str = "cycle"
    time_unit: str = "cycle"

    @property
    def keys(self) -> list[str]:
        return [self.asset, self.cycle]


def spec_for(ref: FeatureSetRef) -> DataSpec:
    """The :class:`DataSpec` of a feature dataset reference."""
    if not ref.feature_columns:
        raise ConfigError(f"feature set {ref.path} lists no feature_columns")
    if len(ref.key_columns) < 2:
        raise ConfigError(f"feature set {ref.path} needs two key columns (asset, cycle), got {ref.key_columns}")
    asset, cycle = ref.key_columns[:2]
    return DataSpec(tuple(ref.feature_columns), ref.label_column or "rul", asset, cycle, ref.time_unit)


def read_feature_frame(ref: FeatureSetRef, *, need_label: bool = True) -> pd.DataFrame:
    """Read the keys, features and (optionally) the label of a feature dataset.

    The dataset may be a single Parquet file or a (hive-partitioned) directory.

    Raises:
        ConfigError: the path is missing, columns are missing, or the label is required but absent.
    """
    import pyarrow.dataset as ds

    spec = spec_for(ref)
    try:
        dataset = ds.dataset(ref.path, format="parquet", partitioning="hive")
    except (FileNotFoundError, OSError) as exc:
        raise ConfigError(f"feature dataset {ref.path} cannot be read: {exc}") from None
    names = set(dataset.schema.names)
    if need_label and (ref.label_column is None or ref.label_column not in names):
        raise ConfigError(f"feature dataset {ref.path} has no label column {ref.label_column!r}; "
                          "training needs labels (recompute features with labels)")
    missing = [c for c in [*spec.keys, *spec.feature_columns] if c not in names]
    if missing:
        raise ConfigError(f"feature dataset {ref.path} lacks columns {missing}")
    cols = [*spec.keys, *spec.feature_columns]
    if spec.label in names:
        cols.append(spec.label)
    from twinflow.tasks.features.params import LOWER

    if LOWER in names and LOWER not in cols:
        cols.append(LOWER)  # the lower bound of censored rows' remaining life (censored="aft")
    frame = dataset.to_table(columns=cols).to_pandas()
    frame[spec.asset] = frame[spec.asset].astype(str)
    key = frame[spec.cycle]
    # A timestamp key becomes its integer microseconds: the models and metrics only order by it.
    frame[spec.cycle] = (np.asarray(key.array.as_unit("us").asi8, dtype="int64")
                         if pd.api.types.is_datetime64_any_dtype(key.dtype) else key.astype("int64"))
    for c in [*spec.feature_columns, *(c for c in (spec.label, LOWER) if c in frame)]:
        frame[c] = frame[c].astype("float64")
    return frame.sort_values(spec.keys, kind="stable").reset_index(drop=True)


def check_frame(frame: pd.DataFrame, spec: DataSpec, *, nan_policy: str = "reject",
                need_label: bool = True, min_assets: int = 1, what: str = "feature dataset") -> pd.DataFrame:
    """Reject or drop bad rows: empty data, NaN/inf features, missing labels, too few assets.

    ``nan_policy``: ``reject`` any NaN/inf, ``drop`` the rows that hold one, or ``keep`` NaN
    features for the model to handle (a missing reading or a window without enough valid ones;
    the trainers accept NaN inputs) while still rejecting inf and a missing label.

    Returns:
        The frame (rows with NaN/inf dropped under ``nan_policy="drop"``).

    Raises:
        ConfigError: naming the offending columns, or saying why the data cannot be used.
    """
    if frame.empty:
        raise ConfigError(f"{what} is empty: nothing to train or evaluate on")
    cols = list(spec.feature_columns) + ([spec.label] if need_label else [])
    values = frame[cols].to_numpy(dtype="float64")
    bad = ~np.isfinite(values)
    if nan_policy == "keep":
        bad &= ~np.isnan(values)
        if need_label:
            bad[:, -1] |= np.isnan(values[:, -1])
    if bad.any():
        bad_cols = [c for c, b in zip(cols, bad.any(axis=0)) if b]
        if nan_policy != "drop":
            what_bad = "NaN/inf" if nan_policy == "reject" else "inf (or a missing label)"
            raise ConfigError(f"{what} has {what_bad} in columns {bad_cols} ({int(bad.any(axis=1).sum())} rows); "
                              "clean them or pass nan_policy='drop'")
        frame = frame.loc[~bad.any(axis=1)].reset_index(drop=True)
        if frame.empty:
            raise ConfigError(f"{what} has no rows left after dropping NaN/inf in {bad_cols}")
    n_assets = frame[spec.asset].nunique()
    if n_assets < min_assets:
        raise ConfigError(f"{what} has {n_assets} asset(s); a split by asset needs at least {min_assets}")
    return frame


def _asset_rank(asset_id: str) -> str:
    # A hash, not the seed: the same asset lands on the same side in every run.
    return hashlib.sha256(f"twinflow-split:{asset_id}".encode()).hexdigest()


def split_by_asset(frame: pd.DataFrame, spec: DataSpec, val_fraction: float) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split rows into train/validation by asset: no asset has rows on both sides.

    Raises:
        ConfigError: fewer than two assets.
    """
    assets = sorted(frame[spec.asset].unique(), key=_asset_rank)
    if len(assets) < 2:
        raise ConfigError(f"cannot split by asset: the data has {len(assets)} asset(s), need at least 2")
    n_val = min(max(1, round(val_fraction * len(assets))), len(assets) - 1)
    val_ids = set(assets[:n_val])
    is_val = frame[spec.asset].isin(val_ids).to_numpy()
    return frame.loc[~is_val].reset_index(drop=True), frame.loc[is_val].reset_index(drop=True)


def drop_unlabelled(frame: pd.DataFrame, spec: DataSpec) -> pd.DataFrame:
    """Rows of censored or running lives carry no RUL label (NaN, from the life segments): they are
    left out of training and evaluation and said so, never treated as failures."""
    import logging

    if spec.label not in frame.columns:
        return frame
    missing = frame[spec.label].isna()
    if missing.any():
        logging.getLogger("twinflow.train").info(
            "training excludes %d rows of %d censored or running lives (no observed failure, so no RUL label)",
            int(missing.sum()), frame.loc[missing, spec.asset].nunique())
        frame = frame.loc[~missing].reset_index(drop=True)
    return frame


def hold_out_assets(frame: pd.DataFrame, spec: DataSpec, fraction: float) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Set aside whole assets for the truncated-lives evaluation, before the train/validation split.

    A different hash than :func:`split_by_asset`'s, still a function of the asset id alone, so the
    champion is re-scored on exactly the lives the challenger was scored on, and neither the trials
    nor early stopping ever saw them. At least two assets stay for training and validation.

    Returns:
        ``(rest, held_out)``.

    Raises:
        ConfigError: fewer than three assets (one to hold out, two to train and validate on).
    """
    assets = sorted(frame[spec.asset].unique(),
                    key=lambda a: hashlib.sha256(f"twinflow-eval:{a}".encode()).hexdigest())
    if len(assets) < 3:
        raise ConfigError(f"the truncated-lives evaluation needs at least 3 assets with a failed life "
                          f"(one held out, two to train and validate on); the data has {len(assets)}")
    n = min(max(1, round(fraction * len(assets))), len(assets) - 2)
    held = frame[spec.asset].isin(set(assets[:n])).to_numpy()
    return frame.loc[~held].reset_index(drop=True), frame.loc[held].reset_index(drop=True)


def life_ids(frame: pd.DataFrame, spec: DataSpec) -> np.ndarray:
    """Which life of its asset each labelled row belongs to: ``<asset>#<k>``.

    Within one failure-ended life the label (end of life minus time, capped) never rises; it rises
    where an asset's next life begins. The feature set carries no segment column, and the labels
    alone say where lives split, whatever the clock or the contract. ``frame`` must be sorted by
    (asset, time) with its labels present.
    """
    asset = frame[spec.asset].astype(str).to_numpy()
    label = frame[spec.label].to_numpy(dtype="float64")
    new_asset = np.r_[True, asset[1:] != asset[:-1]]
    new_life = new_asset | np.r_[False, label[1:] > label[:-1]]
    # Number lives within each asset: count of life starts so far minus the count at the asset's start.
    starts = np.cumsum(new_life)
    first = np.maximum.accumulate(np.where(new_asset, starts, 0))
    return np.char.add(np.char.add(asset.astype(str), "#"), (starts - first).astype(str))


def _ticks_per_unit(spec: DataSpec) -> float:
    """Time-key ticks per unit of ``spec.time_unit``: 1 for cycles, microseconds per unit for timestamps."""
    if spec.time_unit == "cycle":
        return 1.0
    from twinflow.contract import parse_duration

    return parse_duration(f"1{spec.time_unit}").total_seconds() * 1e6


def life_ages(frame: pd.DataFrame, spec: DataSpec) -> tuple[np.ndarray, np.ndarray]:
    """Which life each row belongs to and its age in that life, in ``spec.time_unit``.

    Lives split where the label rises (:func:`life_ids`) when every row has a label, else each asset's
    rows are one life (e.g. unlabelled test units). Ages count like the life segments' durations: on a
    cycle clock the cycles since the one before the life's first row (C-MAPSS: the cycle number); on a
    timestamp clock the time since the life's first reading, in the clock's unit (hours, not the
    microsecond ticks the time key is read as). A life whose start was not observed (the records began
    mid-life) counts from its first reading.

    Args:
        frame: Rows sorted by (asset, time), with ``spec.asset``, ``spec.cycle`` and optionally the label.
        spec: Column roles and the time unit.

    Returns:
        ``(life ids, ages)``, one per row.
    """
    if frame.empty:
        return np.array([], dtype=object), np.zeros(0)
    labelled = spec.label in frame and not frame[spec.label].isna().any()
    lives = life_ids(frame, spec) if labelled else frame[spec.asset].astype(str).to_numpy()
    t = frame[spec.cycle].to_numpy(dtype="int64")
    new = np.r_[True, lives[1:] != lives[:-1]]
    first = t[np.flatnonzero(new)][np.cumsum(new) - 1]
    # A cycle clock's life starts the cycle before its first row (cycle 1 is one cycle old).
    since = t - first + (1 if spec.time_unit == "cycle" else 0)
    return lives, since / _ticks_per_unit(spec)


def mean_life(frame: pd.DataFrame, spec: DataSpec) -> float | None:
    """Mean length of the failure-ended lives of ``frame``, in ``spec.time_unit`` (None without any).

    A life's length is the age of its last labelled row plus that row's label (its remaining life:
    the failure need not coincide with the last reading on a timestamp clock). Unlabelled rows
    (censored or running lives, kept by ``censored="aft"``) do not count.
    """
    if spec.label not in frame:
        return None
    rows = frame.loc[frame[spec.label].notna()].reset_index(drop=True)
    if rows.empty:
        return None
    lives, age = life_ages(rows, spec)
    last = np.r_[lives[1:] != lives[:-1], True]
    return float(np.mean(age[last] + rows[spec.label].to_numpy(dtype="float64")[last]))


def truncated_lives_set(frame: pd.DataFrame, spec: DataSpec, per_life: int = 1, seed: int = 0) -> EvalSet:
    """The C-MAPSS test protocol generalised: held-out failed lives cut at random points.

    C-MAPSS truncates each test engine at a random cycle before its failure and publishes the true
    RUL at that cycle. Any fleet with failure-ended lives can do the same without a truth file: for
    each held-out life, ``per_life`` distinct rows drawn uniformly (seeded) are the truncation points,
    and the row's label (end of life minus its time, under the features' cap like every training
    label) is the truth. It is not capped again at ``TrainParams.rul_cap``: as in the validation
    protocol, truth and labels share one cap (a second, lower one would count every prediction above
    it as an error; only an uncapped truth file is capped at ``rul_cap``). Predictions at a row only use that row's features (and for sequence models the rows before it),
    so the rows after the truncation point stay unseen as in the original protocol.

    Args:
        frame: Labelled rows of the held-out assets (:func:`hold_out_assets`).
        spec: Column roles.
        per_life: Truncation points per life (1 = the C-MAPSS protocol; more = a steadier estimate).
        seed: Seed of the draw; the same seed scores the same rows.

    Returns:
        An :class:`EvalSet` named ``truncated-lives`` scoring one row per (life, truncation point).

    Raises:
        ConfigError: no labelled rows to truncate.
    """
    if frame.empty or spec.label not in frame or frame[spec.label].isna().all():
        raise ConfigError("the truncated-lives evaluation found no failed life among the held-out assets")
    frame = frame.loc[frame[spec.label].notna()].sort_values(spec.keys, kind="stable").reset_index(drop=True)
    lives = life_ids(frame, spec)
    rng = np.random.default_rng(seed)
    rows = []
    for life in sorted(set(lives.tolist()), key=lambda k: (natural_key(k.rsplit("#", 1)[0]), int(k.rsplit("#", 1)[1]))):
        idx = np.flatnonzero(lives == life)
        rows.append(np.sort(rng.choice(idx, size=min(per_life, len(idx)), replace=False)))
    rows = np.concatenate(rows)
    true = frame[spec.label].to_numpy(dtype="float64")[rows]
    return EvalSet("truncated-lives", frame.rename(columns={spec.asset: "asset_id", spec.cycle: "cycle"}), rows, true)


def eval_protocol(params: TrainParams, test_features: FeatureSetRef | None) -> str:
    """The evaluation protocol a run uses: ``auto`` resolved (the truth file with test features, else
    the validation assets); ``truncated`` with test features is a contradiction and refused."""
    p = params.eval_protocol
    if p == "auto":
        return "truth_file" if test_features is not None else "validation"
    if p == "truncated" and test_features is not None:
        raise ConfigError("eval_protocol='truncated' holds out lives of the training features; "
                          "do not also pass test_features (or choose eval_protocol='truth_file')")
    if p == "truth_file" and test_features is None:
        raise ConfigError("eval_protocol='truth_file' needs test_features (and params.true_rul_path)")
    return p


def split_for_training(frame: pd.DataFrame, spec: DataSpec, params: TrainParams,
                       test_features: FeatureSetRef | None = None
                       ) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame | None]:
    """``(train, validation, held-out assets or None)``: the one split every run and re-scoring uses."""
    held = None
    if eval_protocol(params, test_features) == "truncated":
        frame, held = hold_out_assets(frame, spec, params.eval_fraction)
    train, val = split_by_asset(frame, spec, params.val_fraction)
    return train, val, held


def natural_key(asset_id: str) -> tuple:
    """Sort key of asset ids in natural order: ``..._2`` before ``..._10``."""
    m = re.search(r"(\d+)$", asset_id)
    return (0, int(m.group(1)), asset_id) if m else (1, 0, asset_id)


def read_true_rul(path: str) -> np.ndarray:
    """True RUL per test unit, in unit order (one number per line; gzip allowed)."""
    try:
        values = np.loadtxt(path, dtype="float64", ndmin=1)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"true RUL file {path} cannot be read: {exc}") from None
    if values.ndim != 1 or values.size == 0:
        raise ConfigError(f"true RUL file {path} must hold one number per test unit")
    return values


@dataclass
class EvalSet:
    """Evaluation data: the frame to predict on and the rows (with truth) that are scored.

    ``frame`` holds whole asset histories (sequence models need the context), ``rows`` the
    positions that are scored: each test unit's last cycle (C-MAPSS protocol) or every
    validation row.
    """

    name: str
    frame: pd.DataFrame
    rows: np.ndarray
    true: np.ndarray

    @property
    def asset_ids(self) -> np.ndarray:
        return self.frame["asset_id"].to_numpy()[self.rows] if "asset_id" in self.frame else np.array([])


def cmapss_test_set(test_frame: pd.DataFrame, spec: DataSpec, true_rul: np.ndarray, rul_cap: float) -> EvalSet:
    """The C-MAPSS test protocol: score each unit's last cycle against its (capped) true RUL.

    Units are matched to ``true_rul`` in natural order of their id (``..._2`` before ``..._10``).

    Raises:
        ConfigError: the number of test units and true RUL values differ.
    """
    last = test_frame.groupby(spec.asset, sort=False)[spec.cycle].idxmax()
    order = sorted(last.index, key=natural_key)
    if len(order) != len(true_rul):
        raise ConfigError(f"test features have {len(order)} units but the true RUL file has {len(true_rul)} values")
    rows = last.loc[order].to_numpy()
    true = np.minimum(np.asarray(true_rul, dtype="float64"), rul_cap)
    frame = test_frame.rename(columns={spec.asset: "asset_id", spec.cycle: "cycle"})
    return EvalSet("cmapss-test", frame, rows, true)


def validation_set(val_frame: pd.DataFrame, spec: DataSpec) -> EvalSet:
    """Every row of the held-out assets, scored against its label."""
    frame = val_frame.rename(columns={spec.asset: "asset_id", spec.cycle: "cycle"})
    return EvalSet("validation", frame, np.arange(len(frame)), frame[spec.label].to_numpy(dtype="float64"))


def build_eval_set(features: FeatureSetRef, params: TrainParams, test_features: FeatureSetRef | None,
                   val: pd.DataFrame | None = None, held: pd.DataFrame | None = None) -> EvalSet:
    """The evaluation data of a run, by :func:`eval_protocol`: the C-MAPSS truth-file protocol on
    test features, held-out failed lives truncated at random points (``truncated``), or every row
    of the held-out validation assets of ``features``.

    ``val``/``held``: the run's own split (:func:`split_for_training`); recomputed from ``features``
    when absent (re-scoring a champion), which gives the same rows since the split is by asset hash.
    """
    spec = spec_for(features)
    protocol = eval_protocol(params, test_features)
    if protocol == "truth_file":
        tspec = spec_for(test_features)
        has_label = test_features.label_column is not None
        frame = read_feature_frame(test_features, need_label=False)
        frame = check_frame(frame, tspec, nan_policy=params.nan_policy, need_label=False, what="test feature dataset")
        if params.true_rul_path:
            true = read_true_rul(params.true_rul_path)
        elif has_label and tspec.label in frame:
            # Test features that carry labels score themselves: the label at each unit's last cycle.
            last = frame.groupby(tspec.asset, sort=False)[tspec.cycle].idxmax()
            true = frame.loc[last.loc[sorted(last.index, key=natural_key)].to_numpy(), tspec.label].to_numpy()
        else:
            raise ConfigError("test_features need params.true_rul_path (or a label column) to be scored")
        return cmapss_test_set(frame, tspec, true, params.rul_cap)
    if val is None or (protocol == "truncated" and held is None):
        frame = drop_unlabelled(read_feature_frame(features), spec)
        frame = check_frame(frame, spec, nan_policy=params.nan_policy, min_assets=2)
        _, val, held = split_for_training(frame, spec, params, test_features)
    if protocol == "truncated":
        return truncated_lives_set(held, spec, params.eval_truncations, params.seed)
    return validation_set(val, spec)


def feature_digest(ref: FeatureSetRef) -> str:
    """Digest of a feature dataset: its files' bytes, its params digest and its lake snapshot."""
    import fsspec

    h = hashlib.sha256(f"{ref.params_digest}|{ref.snapshot.digest}|{','.join(ref.feature_columns)}".encode())
    fs, root = fsspec.core.url_to_fs(ref.path)
    files = [root] if fs.isfile(root) else sorted(p for p in fs.find(root) if p.endswith(".parquet"))
    for p in files:
        h.update(p[len(root):].encode())
        with fs.open(p, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


def dataset_for_mlflow(ref: FeatureSetRef, digest: str):
    """An MLflow dataset (source path, digest, schema) without loading the data."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.types import ColSpec, Schema

    spec = spec_for(ref)
    cols = [ColSpec("string", spec.asset), ColSpec("long", spec.cycle)]
    cols += [ColSpec("double", c) for c in spec.feature_columns]
    if ref.label_column:
        cols.append(ColSpec("double", ref.label_column))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        source = resolve_dataset_source(ref.path)
    return MetaDataset(source, name=f"features/{ref.snapshot.dataset}", digest=digest, schema=Schema(cols))
