"""The model zoo: RUL trainers behind one interface, and the registry of their names.

A trainer fits a model on train rows with early stopping on validation rows; the fitted model
predicts on frames of keys + features and logs itself to MLflow. ``gbm`` (scikit-learn) lives
here; ``cnn`` (PyTorch) lives in :mod:`twinflow.tasks.train.cnn` and registers itself below.
"""

from __future__ import annotations

import functools
import importlib.util
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Protocol

import numpy as np
import pandas as pd

from twinflow.errors import ConfigError

if TYPE_CHECKING:
    from twinflow.tasks.train import TrainParams
    from twinflow.tasks.train.data import DataSpec

# skops (MLflow's sklearn serializer) parses Python ASTs while saving and loading, and CPython's
# AST constructor is not safe across threads ("AST constructor recursion depth mismatch"): model
# saves and loads in one process take turns. Created on first use, not at import: module globals
# travel with Prefect tasks that Dask pickles by value, and a lock does not pickle.
@functools.lru_cache(maxsize=None)
def model_io_lock() -> threading.Lock:
    """The process-wide lock around MLflow model saves and loads."""
    return threading.Lock()


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
from twinflow.tasks.train import cnn as _train_torch  # noqa: E402

TRAINERS["cnn"] = _train_torch.CnnTrainer()

