"""Training stage logic: RUL models behind one trainer interface, trials on Dask, a gated registry.

Pure functions take data and typed params and return data; the thin Prefect tasks at the bottom
add I/O (reading the feature dataset by reference) and MLflow logging. The flow in
``twinflow.flows.train`` strings them together.

Validation never leaks: rows are split by asset, and the split is a deterministic function of the
asset id (not of the seed), so every training run with the same ``val_fraction`` holds out the same
assets and the champion/challenger comparison runs on data neither model trained on.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import io
import logging
import math
import re
import threading
import uuid
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Literal, Protocol

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from twinflow.errors import ConfigError, TwinflowError
from twinflow.refs import FeatureSetRef

log = logging.getLogger("twinflow.train")

# skops (MLflow's sklearn serializer) parses Python ASTs while saving and loading, and CPython's
# AST constructor is not safe across threads ("AST constructor recursion depth mismatch"): model
# saves and loads in one process take turns. Created on first use, not at import: module globals
# travel with Prefect tasks that Dask pickles by value, and a lock does not pickle.
@functools.lru_cache(maxsize=None)
def model_io_lock() -> threading.Lock:
    """The process-wide lock around MLflow model saves and loads."""
    return threading.Lock()


CHAMPION = "champion"
CHALLENGER = "challenger"
RESIDUALS_ARTIFACT = "evaluation/residuals.csv"
TRIAL_TAG = "twinflow.trial"

# ---------------------------------------------------------------------------------------------
# Parameters
# ---------------------------------------------------------------------------------------------


class TrainParams(BaseModel):
    """Parameters of the train stage.

    Attributes:
        model: Trainer name (see :func:`available_trainers`): ``gbm`` (scikit-learn histogram
            gradient boosting on the feature columns) or ``cnn`` (PyTorch 1-D CNN over the last
            ``window`` cycles of each asset; GPU when the Dask worker has one).
        n_trials: Hyperparameter trials (random search), run in parallel as Dask tasks.
        seed: Seed of the search and of every model fit.
        search_space: ``{hyperparameter: [choices]}`` overriding the trainer's default space;
            keys must be hyperparameters the trainer knows.
        val_fraction: Fraction of ASSETS held out for early stopping and trial selection.
        max_iter: Upper bound of boosting iterations (gbm) or epochs (cnn).
        early_stopping_rounds: Stop when validation RMSE has not improved for this many
            iterations (gbm) or epochs (cnn).
        window: Cycles per input sequence (cnn).
        rul_cap: Labels and true test RUL are capped at this value (piecewise-linear RUL).
        promotion_margin: The challenger becomes champion only if its eval RMSE is lower than the
            champion's by at least this many cycles (on the same evaluation data).
        true_rul_path: True RUL file of the C-MAPSS test protocol (one integer per test unit, in
            unit order), e.g. ``twinflow.data.cmapss_path("RUL_FD001.txt.gz")``. Used with the
            flow's ``test_features``.
        nan_policy: ``reject`` NaN/inf in features (error names the columns) or ``drop`` rows.
        use_registry: Register the model and run the promotion gate.
        threads_per_trial: BLAS/OpenMP (and torch CPU) threads per trial. Parallelism comes from
            trials; oversubscribed OpenMP threads on a busy machine are 10-20x slower.
    """

    model_config = ConfigDict(extra="forbid")

    model: str = "gbm"
    n_trials: int = Field(4, ge=1, le=512)
    seed: int = 0
    search_space: dict[str, list[Any]] = Field(default_factory=dict)
    val_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    max_iter: int = Field(400, ge=1, le=100_000)
    early_stopping_rounds: int = Field(40, ge=1)
    window: int = Field(30, ge=2, le=1000)
    rul_cap: float = Field(125.0, gt=0)
    promotion_margin: float = Field(0.0, ge=0.0)
    true_rul_path: str | None = None
    nan_policy: Literal["reject", "drop"] = "reject"
    use_registry: bool = True
    threads_per_trial: int = Field(1, ge=1, le=256)

    @field_validator("model")
    @classmethod
    def _known_model(cls, v: str) -> str:
        if v not in TRAINERS:
            raise ValueError(f"unknown model {v!r}; available: {', '.join(available_trainers())}")
        return v

    @model_validator(mode="after")
    def _known_space(self) -> "TrainParams":
        known = TRAINERS[self.model].default_space
        unknown = sorted(set(self.search_space) - set(known))
        if unknown:
            raise ValueError(f"search_space keys {unknown} unknown to model {self.model!r}; "
                             f"known: {', '.join(sorted(known))}")
        empty = [k for k, v in self.search_space.items() if not v]
        if empty:
            raise ValueError(f"search_space {empty} have no choices")
        return self


# ---------------------------------------------------------------------------------------------
# Data: load, validate, split, evaluation sets
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DataSpec:
    """Which columns are keys, model inputs and label."""

    feature_columns: tuple[str, ...]
    label: str
    asset: str = "asset_id"
    cycle: str = "cycle"

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
    return DataSpec(tuple(ref.feature_columns), ref.label_column or "rul", asset, cycle)


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
    frame = dataset.to_table(columns=cols).to_pandas()
    frame[spec.asset] = frame[spec.asset].astype(str)
    frame[spec.cycle] = frame[spec.cycle].astype("int64")
    for c in [*spec.feature_columns, *([spec.label] if spec.label in frame else [])]:
        frame[c] = frame[c].astype("float64")
    return frame.sort_values(spec.keys, kind="stable").reset_index(drop=True)


def check_frame(frame: pd.DataFrame, spec: DataSpec, *, nan_policy: str = "reject",
                need_label: bool = True, min_assets: int = 1, what: str = "feature dataset") -> pd.DataFrame:
    """Reject or drop bad rows: empty data, NaN/inf features, missing labels, too few assets.

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
    if bad.any():
        bad_cols = [c for c, b in zip(cols, bad.any(axis=0)) if b]
        if nan_policy == "reject":
            raise ConfigError(f"{what} has NaN/inf in columns {bad_cols} ({int(bad.any(axis=1).sum())} rows); "
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


def _natural_key(asset_id: str) -> tuple:
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
    order = sorted(last.index, key=_natural_key)
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


# ---------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------


def phm08_score(pred: np.ndarray, true: np.ndarray) -> float:
    """PHM08 asymmetric score: late predictions (pred > true) cost more than early ones."""
    d = np.asarray(pred, dtype="float64") - np.asarray(true, dtype="float64")
    return float(np.sum(np.where(d < 0, np.exp(-d / 13.0) - 1.0, np.exp(d / 10.0) - 1.0)))


def regression_metrics(pred: np.ndarray, true: np.ndarray) -> dict[str, float]:
    """RMSE, MAE, PHM08 score and bias (mean pred − true)."""
    d = np.asarray(pred, dtype="float64") - np.asarray(true, dtype="float64")
    return {"rmse": float(np.sqrt(np.mean(d**2))), "mae": float(np.mean(np.abs(d))),
            "score": phm08_score(pred, true), "bias": float(np.mean(d)), "n": float(d.size)}


def _rmse(pred: np.ndarray, true: np.ndarray) -> float:
    return float(np.sqrt(np.mean((np.asarray(pred) - np.asarray(true)) ** 2)))


# ---------------------------------------------------------------------------------------------
# Trainers
# ---------------------------------------------------------------------------------------------

IterationCallback = Callable[[int, dict[str, float]], None]


class FittedModel(Protocol):
    """A trained model: predicts on frames of keys + features, logs itself to MLflow."""

    history: list[dict[str, float]]
    best_iteration: int

    def predict(self, frame: pd.DataFrame) -> np.ndarray: ...

    def log(self, name: str, example: pd.DataFrame) -> Any: ...

    def feature_importance(self, frame: pd.DataFrame, true: np.ndarray) -> dict[str, float] | None: ...


class Trainer(Protocol):
    """Fit a model on train rows with early stopping on validation rows."""

    name: str
    default_space: dict[str, list[Any]]

    def fit(self, train: pd.DataFrame, val: pd.DataFrame, spec: DataSpec, hparams: dict[str, Any],
            params: TrainParams, seed: int) -> FittedModel: ...


def pip_requirements(*modules: str) -> list[str]:
    """Pinned pip requirements of a logged model: mlflow, numpy, pandas and ``modules``.

    Versions are the installed ones (local ``+cu...`` suffixes dropped); a package that is not
    installed is listed unpinned.
    """
    from importlib.metadata import PackageNotFoundError, version

    dist = {"sklearn": "scikit-learn"}
    out = []
    for m in ("mlflow", "numpy", "pandas", *modules):
        name = dist.get(m, m)
        try:
            out.append(f"{name}=={version(name).split('+')[0]}")
        except PackageNotFoundError:
            out.append(name)
    return out


def _signature(example: pd.DataFrame, pred: np.ndarray):
    from mlflow.models import infer_signature

    return infer_signature(example, pred)


@dataclass
class GbmModel:
    """A fitted scikit-learn HistGradientBoostingRegressor over the feature columns."""

    estimator: Any
    spec: DataSpec
    history: list[dict[str, float]] = field(default_factory=list)
    best_iteration: int = 0

    def predict(self, frame: pd.DataFrame) -> np.ndarray:
        return self.estimator.predict(frame[list(self.spec.feature_columns)])

    def log(self, name: str, example: pd.DataFrame) -> Any:
        import mlflow.sklearn

        x = example[list(self.spec.feature_columns)]
        return mlflow.sklearn.log_model(
            self.estimator, name=name, signature=_signature(x, self.estimator.predict(x)),
            input_example=x, pip_requirements=pip_requirements("sklearn"),
            # We wrote these trees ourselves; skops asks for the type to be trusted explicitly.
            skops_trusted_types=["sklearn.ensemble._hist_gradient_boosting.predictor.TreePredictor"])

    def feature_importance(self, frame: pd.DataFrame, true: np.ndarray) -> dict[str, float] | None:
        from sklearn.inspection import permutation_importance

        x = frame[list(self.spec.feature_columns)]
        if len(x) > 3000:  # a sample keeps this a fraction of the fit time
            idx = np.random.default_rng(0).choice(len(x), 3000, replace=False)
            x, true = x.iloc[idx], np.asarray(true)[idx]
        res = permutation_importance(self.estimator, x, true, n_repeats=3, random_state=0,
                                     scoring="neg_root_mean_squared_error")
        return dict(zip(self.spec.feature_columns, map(float, res.importances_mean)))


class GbmTrainer:
    """scikit-learn histogram gradient boosting, early-stopped on the by-asset validation split.

    scikit-learn's default early stopping would hold out random ROWS (leaking assets), so our split
    is passed as its explicit validation set (``X_val``/``y_val``): the data is binned once and the
    per-iteration losses come for free. scikit-learn keeps the ``early_stopping_rounds`` iterations
    after the best one, so the model is refit to exactly the best iteration (same seed: same trees).
    """

    name = "gbm"
    step = 10  # learning-curve points are kept every `step` iterations (plus the best and the last)
    default_space: dict[str, list[Any]] = {
        "learning_rate": [0.03, 0.05, 0.1],
        "max_leaf_nodes": [15, 31, 63],
        "min_samples_leaf": [20, 50, 100],
        "l2_regularization": [0.0, 0.1, 1.0],
        "max_features": [0.5, 0.8, 1.0],
    }

    def fit(self, train: pd.DataFrame, val: pd.DataFrame, spec: DataSpec, hparams: dict[str, Any],
            params: TrainParams, seed: int) -> GbmModel:
        from sklearn.ensemble import HistGradientBoostingRegressor

        cols = list(spec.feature_columns)
        xtr, ytr = train[cols], train[spec.label].to_numpy()
        xva, yva = val[cols], val[spec.label].to_numpy()
        common = dict(loss="squared_error", random_state=seed, **hparams)
        est = HistGradientBoostingRegressor(
            max_iter=params.max_iter, early_stopping=True, scoring="loss", tol=0.0,
            n_iter_no_change=params.early_stopping_rounds, **common).fit(xtr, ytr, X_val=xva, y_val=yva)
        # Scores are minus the half squared error, one per iteration after the initial constant.
        val_rmse = np.sqrt(np.maximum(-2.0 * est.validation_score_[1:], 0.0))
        train_rmse = np.sqrt(np.maximum(-2.0 * est.train_score_[1:], 0.0))
        best = int(np.argmin(val_rmse)) + 1
        last = len(val_rmse)
        keep = sorted({*range(self.step, last + 1, self.step), best, last})
        history = [{"step": it, "val_rmse": float(val_rmse[it - 1]), "train_rmse": float(train_rmse[it - 1])}
                   for it in keep]
        model = est
        if best != est.n_iter_:
            model = HistGradientBoostingRegressor(max_iter=best, early_stopping=False, **common).fit(xtr, ytr)
        return GbmModel(model, spec, history, best)


TRAINERS: dict[str, Trainer] = {"gbm": GbmTrainer()}


def available_trainers() -> list[str]:
    """Names accepted by ``TrainParams.model``."""
    return sorted(TRAINERS)


def get_trainer(name: str) -> Trainer:
    """The trainer registered under ``name``.

    Raises:
        ConfigError: unknown name (listing the available ones), or its library is not installed.
    """
    if name not in TRAINERS:
        raise ConfigError(f"unknown model {name!r}; available: {', '.join(available_trainers())}")
    if name == "cnn" and importlib.util.find_spec("torch") is None:
        raise ConfigError("model 'cnn' needs PyTorch: pip install 'twinflow[torch]'")
    return TRAINERS[name]


# The PyTorch trainer registers itself here only when its module imports cleanly; torch itself is
# imported lazily at fit time, so listing the trainer costs nothing.
from twinflow.tasks import train_torch as _train_torch  # noqa: E402

TRAINERS["cnn"] = _train_torch.CnnTrainer()


# ---------------------------------------------------------------------------------------------
# Search
# ---------------------------------------------------------------------------------------------


def sample_hparams(space: dict[str, list[Any]], n: int, seed: int) -> list[dict[str, Any]]:
    """``n`` random configurations from a discrete space; distinct while the space allows."""
    rng = np.random.default_rng(seed)
    keys = sorted(space)
    size = math.prod(len(space[k]) for k in keys) if keys else 1
    seen: set[tuple] = set()
    out = []
    for _ in range(n):
        for _attempt in range(50):
            choice = tuple(int(rng.integers(len(space[k]))) for k in keys)
            if choice not in seen or len(seen) >= size:
                break
        seen.add(choice)
        out.append({k: _plain(space[k][i]) for k, i in zip(keys, choice)})
    return out


def _plain(v: Any) -> Any:
    return v.item() if isinstance(v, np.generic) else v


@dataclass(frozen=True)
class TrackingTarget:
    """Where trial child runs go: enough to log from a Dask worker process."""

    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    registry_uri: str | None = None


@dataclass
class TrialOutcome:
    """One trial: its configuration, validation metrics, child run id and (optionally) model."""

    trial: int
    hparams: dict[str, Any]
    val_rmse: float
    best_iteration: int
    run_id: str | None = None
    model: Any = None
    seconds: float = 0.0


@contextmanager
def limit_threads(n: int) -> Iterator[None]:
    """Limit OpenMP/BLAS pools (and torch, when loaded) to ``n`` threads for a block."""
    import sys

    from threadpoolctl import threadpool_limits

    torch = sys.modules.get("torch")
    before = torch.get_num_threads() if torch is not None else None
    with threadpool_limits(limits=n):
        if torch is not None:
            torch.set_num_threads(n)
        try:
            yield
        finally:
            if torch is not None:
                torch.set_num_threads(before)


def _point_mlflow(target: TrackingTarget) -> None:
    import mlflow

    # Workers serve many flows: point them at this flow's store on every trial.
    if mlflow.get_tracking_uri() != target.tracking_uri:
        mlflow.set_tracking_uri(target.tracking_uri)
    if target.registry_uri:
        mlflow.set_registry_uri(target.registry_uri)
    mlflow.set_experiment(experiment_id=target.experiment_id)


def run_trial(trial: int, hparams: dict[str, Any], train: pd.DataFrame, val: pd.DataFrame, spec: DataSpec,
              params: TrainParams, target: TrackingTarget | None = None) -> TrialOutcome:
    """Fit one configuration; log it as a child run of ``target.parent_run_id`` when given.

    Per-iteration metrics (``train_rmse``, ``val_rmse`` by step) are logged in one batch at the
    end of the fit, which keeps the SQLite store's write lock short under many parallel trials.
    """
    import time

    trainer = get_trainer(params.model)
    t0 = time.perf_counter()
    if target is None:
        with limit_threads(params.threads_per_trial):
            model = trainer.fit(train, val, spec, hparams, params, seed=params.seed + trial)
        return TrialOutcome(trial, hparams, min(h["val_rmse"] for h in model.history), model.best_iteration,
                            None, model, time.perf_counter() - t0)

    import mlflow
    from mlflow.entities import Metric

    from twinflow.tracking import tracked_run

    _point_mlflow(target)
    with tracked_run(f"trial-{trial:03d}", stage="train.trial", parent_run_id=target.parent_run_id,
                     params={"model": params.model, **hparams}, tags={TRIAL_TAG: str(trial)}) as run:
        with limit_threads(params.threads_per_trial):
            model = trainer.fit(train, val, spec, hparams, params, seed=params.seed + trial)
        ts = int(time.time() * 1000)
        metrics = [Metric(k, float(v), ts, int(h["step"])) for h in model.history for k, v in h.items() if k != "step"]
        val_rmse = min(h["val_rmse"] for h in model.history)
        metrics += [Metric("best_val_rmse", val_rmse, ts, 0), Metric("best_iteration", model.best_iteration, ts, 0)]
        for i in range(0, len(metrics), 1000):  # the tracking API's limit per batch
            mlflow.MlflowClient().log_batch(run.info.run_id, metrics=metrics[i:i + 1000])
        run_id = run.info.run_id
    return TrialOutcome(trial, hparams, val_rmse, model.best_iteration, run_id, model, time.perf_counter() - t0)


def search(train: pd.DataFrame, val: pd.DataFrame, spec: DataSpec, params: TrainParams,
           target: TrackingTarget | None = None, client: Any = None) -> list[TrialOutcome]:
    """Random search: ``params.n_trials`` trials, in parallel as Dask tasks when ``client`` is given.

    The frames are scattered once to the cluster; each trial is one plain Dask task (a few ms of
    overhead, against ~150 ms for a Prefect task). Without a client the trials run sequentially
    in this process (the baseline of ``benchmarks/train.py``).

    Returns:
        The outcomes sorted best (lowest validation RMSE) first.
    """
    space = {**get_trainer(params.model).default_space, **params.search_space}
    configs = sample_hparams(space, params.n_trials, params.seed)
    if client is None:
        outcomes = [run_trial(i, hp, train, val, spec, params, target) for i, hp in enumerate(configs)]
    else:
        train_f, val_f = client.scatter([train, val], broadcast=False, hash=False)
        futures = [client.submit(run_trial, i, hp, train_f, val_f, spec, params, target, pure=False,
                                 key=f"train-trial-{i}-{uuid.uuid4().hex[:12]}")
                   for i, hp in enumerate(configs)]
        outcomes = client.gather(futures)
    return sorted(outcomes, key=lambda o: (o.val_rmse, o.trial))


# ---------------------------------------------------------------------------------------------
# Promotion gate
# ---------------------------------------------------------------------------------------------


@dataclass
class Decision:
    """The outcome of the promotion gate."""

    promote: bool
    reason: str
    challenger_version: str | None
    challenger_rmse: float
    champion_version: str | None = None
    champion_rmse: float | None = None
    margin: float = 0.0
    eval_set: str = ""

    def table(self) -> pd.DataFrame:
        """The comparison as a two-row table (challenger, champion) for ``mlflow.log_table``."""
        rows = [{"role": CHALLENGER, "version": self.challenger_version, "eval_rmse": self.challenger_rmse},
                {"role": CHAMPION, "version": self.champion_version, "eval_rmse": self.champion_rmse}]
        df = pd.DataFrame(rows)
        df["eval_set"] = self.eval_set
        df["margin"] = self.margin
        df["decision"] = "promote" if self.promote else "keep champion"
        df["reason"] = self.reason
        return df

    def markdown(self, model_name: str) -> str:
        """A Prefect markdown artifact body."""
        fmt = lambda v: "—" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))  # noqa: E731
        verdict = f"**promoted** v{self.challenger_version} to `{CHAMPION}`" if self.promote else \
            f"**kept** v{self.champion_version} as `{CHAMPION}`"
        return "\n".join([
            f"# Promotion gate: `{model_name}`", "", f"Decision: {verdict}. {self.reason}", "",
            f"Evaluation data: `{self.eval_set}`; margin: {self.margin} RMSE cycles.", "",
            "| role | version | eval RMSE |", "|---|---|---|",
            f"| {CHALLENGER} | {fmt(self.challenger_version)} | {fmt(self.challenger_rmse)} |",
            f"| {CHAMPION} | {fmt(self.champion_version)} | {fmt(self.champion_rmse)} |",
        ])


def decide_promotion(challenger_rmse: float, champion_rmse: float | None, margin: float, *,
                     challenger_version: str | None = None, champion_version: str | None = None,
                     eval_set: str = "", champion_error: str | None = None) -> Decision:
    """Promote when there is no champion, or the challenger beats it by at least ``margin``.

    A champion that could not be evaluated on this data (``champion_error``) is kept: the gate
    only promotes on evidence.
    """
    args = dict(challenger_version=challenger_version, challenger_rmse=challenger_rmse,
                champion_version=champion_version, champion_rmse=champion_rmse, margin=margin, eval_set=eval_set)
    if champion_version is None:
        return Decision(True, "No champion yet: the first model becomes champion.", **args)
    if champion_rmse is None:
        return Decision(False, f"The champion could not be evaluated on this data ({champion_error}).", **args)
    gain = champion_rmse - challenger_rmse
    if gain > 0 and gain >= margin:
        return Decision(True, f"The challenger is better by {gain:.3f} RMSE (margin {margin}).", **args)
    return Decision(False, f"The challenger is not better by the margin (gain {gain:.3f} < {margin} "
                           "or no improvement).", **args)


# ---------------------------------------------------------------------------------------------
# Plots and lineage
# ---------------------------------------------------------------------------------------------


def plot_pred_vs_true(true: np.ndarray, pred: np.ndarray, title: str):
    """Scatter of predicted vs true RUL with the identity line."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5))
    ax.scatter(true, pred, s=6, alpha=0.5)
    hi = float(max(np.max(true), np.max(pred), 1.0))
    ax.plot([0, hi], [0, hi], "k--", lw=1)
    ax.set(xlabel="true RUL", ylabel="predicted RUL", title=title)
    fig.tight_layout()
    return fig


def plot_residuals_per_asset(asset_ids: np.ndarray, residuals: np.ndarray):
    """Box plot (or bar) of prediction − truth per asset, assets in natural order."""
    import matplotlib.pyplot as plt

    df = pd.DataFrame({"asset": asset_ids, "res": residuals})
    order = sorted(df["asset"].unique(), key=_natural_key)
    fig, ax = plt.subplots(figsize=(max(6, len(order) * 0.12), 4))
    if df.groupby("asset").size().max() > 1:
        ax.boxplot([df.loc[df.asset == a, "res"].to_numpy() for a in order], showfliers=False)
    else:
        ax.bar(range(1, len(order) + 1), df.set_index("asset").loc[order, "res"].to_numpy())
    ax.axhline(0, color="k", lw=1)
    ax.set_xticks(range(1, len(order) + 1), order, rotation=90, fontsize=5)
    ax.set(xlabel="asset", ylabel="predicted − true RUL", title="residuals per asset")
    fig.tight_layout()
    return fig


def plot_learning_curve(history: list[dict[str, float]], best_iteration: int):
    """Train and validation RMSE by iteration/epoch of the chosen model."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    steps = [h["step"] for h in history]
    for key in ("train_rmse", "val_rmse"):
        ax.plot(steps, [h[key] for h in history], label=key)
    ax.axvline(best_iteration, color="k", ls=":", label="best")
    ax.set(xlabel="iteration / epoch", ylabel="RMSE", title="learning curve")
    ax.legend()
    fig.tight_layout()
    return fig


def plot_feature_importance(importance: dict[str, float]):
    """Horizontal bar chart of permutation importance (RMSE increase)."""
    import matplotlib.pyplot as plt

    items = sorted(importance.items(), key=lambda kv: kv[1])
    fig, ax = plt.subplots(figsize=(6, max(3, 0.25 * len(items))))
    ax.barh([k for k, _ in items], [v for _, v in items])
    ax.set(xlabel="RMSE increase when permuted", title="feature importance")
    fig.tight_layout()
    return fig


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


def retry_store(fn: Callable[..., Any], *args: Any, attempts: int = 6, **kwargs: Any) -> Any:
    """Call an MLflow store write, retrying the races of concurrent writers on one SQLite file.

    MLflow inserts a logged dataset or a registry alias after checking that it does not exist
    yet, so two runs doing it at once can collide on the unique key ("UNIQUE constraint failed");
    a retry finds the row and links to (or moves) it. "database is locked" beyond SQLite's busy
    timeout is retried too. Only idempotent writes may be wrapped.
    """
    import random
    import time

    from mlflow.exceptions import MlflowException

    for attempt in range(attempts):
        try:
            return fn(*args, **kwargs)
        except MlflowException as exc:
            msg = str(exc)
            if attempt == attempts - 1 or not ("UNIQUE constraint failed" in msg or "database is locked" in msg):
                raise
            log.info("retrying %s after a concurrent-writer conflict: %s", getattr(fn, "__name__", fn), msg[:120])
            time.sleep(0.2 * (attempt + 1) + random.random() * 0.3)


# ---------------------------------------------------------------------------------------------
# Registry reads (for the flow and for the digital twin)
# ---------------------------------------------------------------------------------------------


def champion_version(client: Any, name: str, alias: str = CHAMPION):
    """The model version behind ``alias``, or None when the model or alias does not exist."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND") or \
                "not found" in str(exc).lower() or "does not exist" in str(exc).lower():
            return None
        raise


def champion_error_model(settings: Any) -> dict | None:
    """The champion's evaluation residuals, for the digital twin's error model.

    Reads ``models:/<registered_model>@champion``: the version's run holds
    ``evaluation/residuals.csv`` (``asset_id,true_rul,pred_rul``) and metrics ``eval_rmse`` and
    ``eval_bias``.

    Args:
        settings: twinflow ``Settings`` (tracking/registry URI and the registered model name).

    Returns:
        ``{"model_uri", "version", "run_id", "eval_set", "eval_rmse", "eval_bias", "asset_id",
        "true_rul", "pred_rul", "residuals"}`` (lists; residual = pred − true), or None when
        there is no champion.

    Raises:
        ServiceUnavailable: the tracking server does not answer.
    """
    import mlflow
    from mlflow.artifacts import download_artifacts

    from twinflow.tracking import check_reachable

    uri = settings.mlflow_tracking_uri
    check_reachable(uri)
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=settings.mlflow.registry_uri or uri)
    name = settings.mlflow.registered_model
    mv = champion_version(client, name)
    if mv is None:
        return None
    run = client.get_run(mv.run_id)
    local = download_artifacts(run_id=mv.run_id, artifact_path=RESIDUALS_ARTIFACT, tracking_uri=uri)
    df = pd.read_csv(local, dtype={"asset_id": str})
    return {
        "model_uri": f"models:/{name}@{CHAMPION}",
        "version": str(mv.version),
        "run_id": mv.run_id,
        "eval_set": run.data.tags.get("twinflow.eval_set", ""),
        "eval_rmse": float(run.data.metrics["eval_rmse"]),
        "eval_bias": float(run.data.metrics["eval_bias"]),
        "asset_id": df["asset_id"].tolist(),
        "true_rul": df["true_rul"].astype(float).tolist(),
        "pred_rul": df["pred_rul"].astype(float).tolist(),
        "residuals": (df["pred_rul"] - df["true_rul"]).astype(float).tolist(),
    }


def residuals_csv(eval_set: EvalSet, pred: np.ndarray) -> str:
    """``asset_id,true_rul,pred_rul`` for the scored rows of an evaluation set."""
    buf = io.StringIO()
    pd.DataFrame({"asset_id": eval_set.asset_ids, "true_rul": eval_set.true, "pred_rul": pred}).to_csv(buf, index=False)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# Stage bodies (run inside coarse Prefect tasks, on a Dask worker)
# ---------------------------------------------------------------------------------------------


@dataclass
class SearchOutcome:
    """What the search task hands back to the flow: small tables, the best model, eval results."""

    best: TrialOutcome
    trials: pd.DataFrame
    eval_name: str
    eval_metrics: dict[str, float]
    residuals_csv: str
    eval_true: np.ndarray
    eval_pred: np.ndarray
    eval_assets: np.ndarray
    importance: dict[str, float] | None
    example: pd.DataFrame
    rows_train: int
    rows_val: int
    assets_train: int
    assets_val: int


def build_eval_set(features: FeatureSetRef, params: TrainParams, test_features: FeatureSetRef | None,
                   val: pd.DataFrame | None = None) -> EvalSet:
    """The evaluation data of a run: the C-MAPSS test protocol when test features are given,
    else the held-out validation assets of ``features``."""
    spec = spec_for(features)
    if test_features is not None:
        tspec = spec_for(test_features)
        has_label = test_features.label_column is not None
        frame = read_feature_frame(test_features, need_label=False)
        frame = check_frame(frame, tspec, nan_policy=params.nan_policy, need_label=False, what="test feature dataset")
        if params.true_rul_path:
            true = read_true_rul(params.true_rul_path)
        elif has_label and tspec.label in frame:
            # Test features that carry labels score themselves: the label at each unit's last cycle.
            last = frame.groupby(tspec.asset, sort=False)[tspec.cycle].idxmax()
            true = frame.loc[last.loc[sorted(last.index, key=_natural_key)].to_numpy(), tspec.label].to_numpy()
        else:
            raise ConfigError("test_features need params.true_rul_path (or a label column) to be scored")
        return cmapss_test_set(frame, tspec, true, params.rul_cap)
    if val is None:
        frame = check_frame(read_feature_frame(features), spec, nan_policy=params.nan_policy, min_assets=2)
        _, val = split_by_asset(frame, spec, params.val_fraction)
    return validation_set(val, spec)


def search_and_evaluate(features: FeatureSetRef, params: TrainParams, test_features: FeatureSetRef | None,
                        target: TrackingTarget | None, client: Any = None) -> SearchOutcome:
    """Read and check the features, split by asset, run the search, evaluate the best model."""
    spec = spec_for(features)
    frame = check_frame(read_feature_frame(features), spec, nan_policy=params.nan_policy, min_assets=2)
    train, val = split_by_asset(frame, spec, params.val_fraction)
    outcomes = search(train, val, spec, params, target, client)
    with limit_threads(params.threads_per_trial):
        return _evaluate_best(outcomes, train, val, spec, features, params, test_features)


def _evaluate_best(outcomes: list[TrialOutcome], train: pd.DataFrame, val: pd.DataFrame, spec: DataSpec,
                   features: FeatureSetRef, params: TrainParams,
                   test_features: FeatureSetRef | None) -> SearchOutcome:
    best = outcomes[0]
    trials = pd.DataFrame([{"trial": o.trial, "run_id": o.run_id, "val_rmse": o.val_rmse,
                            "best_iteration": o.best_iteration, "seconds": o.seconds,
                            **{f"hp.{k}": v for k, v in o.hparams.items()}} for o in outcomes])
    ev = build_eval_set(features, params, test_features, val=val)
    pred = np.asarray(best.model.predict(ev.frame), dtype="float64")[ev.rows]
    metrics = regression_metrics(pred, ev.true)
    importance = best.model.feature_importance(validation_set(val, spec).frame, val[spec.label].to_numpy())
    example = train[[*spec.keys, *spec.feature_columns]].head(max(params.window, 5)).rename(
        columns={spec.asset: "asset_id", spec.cycle: "cycle"})
    return SearchOutcome(best, trials, ev.name, metrics, residuals_csv(ev, pred), ev.true, pred, ev.asset_ids,
                         importance, example, len(train), len(val),
                         int(train[spec.asset].nunique()), int(val[spec.asset].nunique()))


def evaluate_model_uri(model_uri: str, features: FeatureSetRef, params: TrainParams,
                       test_features: FeatureSetRef | None, tracking_uri: str | None = None) -> dict[str, float]:
    """Score a logged/registered model (via ``mlflow.pyfunc``) on a run's evaluation data.

    The model gets exactly the input columns of its signature, so models trained on other
    feature sets fail here with a clear error rather than silently mis-scoring.

    Raises:
        TwinflowError: the model needs inputs the evaluation data lacks.
    """
    import mlflow

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    ev = build_eval_set(features, params, test_features)
    with model_io_lock():
        model = mlflow.pyfunc.load_model(model_uri)
    sig = model.metadata.get_input_schema()
    cols = sig.input_names() if sig is not None else list(ev.frame.columns)
    missing = [c for c in cols if c not in ev.frame.columns]
    if missing:
        raise TwinflowError(f"{model_uri} needs inputs {missing} that the evaluation data lacks")
    pred = np.asarray(model.predict(ev.frame[cols]), dtype="float64").reshape(-1)[ev.rows]
    return regression_metrics(pred, ev.true)


# ---------------------------------------------------------------------------------------------
# Prefect tasks (thin wrappers: coarse, one per step of the flow)
# ---------------------------------------------------------------------------------------------

from prefect import task  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402


def _trial_client():
    """The Dask client for trials (the worker's client, seceding, when run on a worker)."""
    from twinflow import runtime

    return runtime.using_dask()


@task(name="train-search", cache_policy=NO_CACHE, log_prints=False)
def search_task(features: FeatureSetRef, params: TrainParams, test_features: FeatureSetRef | None,
                target: TrackingTarget) -> SearchOutcome:
    """Search hyperparameters with trials as Dask tasks; evaluate the best on the eval data."""
    with _trial_client() as client:
        return search_and_evaluate(features, params, test_features, target, client)


@task(name="train-evaluate-champion", cache_policy=NO_CACHE, retries=1, retry_delay_seconds=2)
def evaluate_task(model_uri: str, features: FeatureSetRef, params: TrainParams,
                  test_features: FeatureSetRef | None, tracking_uri: str) -> dict[str, float]:
    """Score a registered model on this run's evaluation data."""
    return evaluate_model_uri(model_uri, features, params, test_features, tracking_uri)
