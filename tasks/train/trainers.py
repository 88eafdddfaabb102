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



# --- censored lives: XGBoost's accelerated-failure-time objective -------------------------------------
#
# Why XGBoost (``xgboost-cpu``, a 6 MB wheel without NCCL): its ``survival:aft`` objective takes each
# row's remaining life as an interval (exact for failure-ended lives, [lower bound, inf) for lives cut
# short by a preventive replacement or still running), on the same gradient-boosted trees as ``gbm``,
# with early stopping and NaN inputs handled natively. lifelines and scikit-survival fit per-asset
# lifetimes or linear/Cox models, not a per-row regression on windowed sensor features; a Weibull AFT
# written by hand on scipy would be linear in the features and lose to the trees.


@dataclass
class AftModel:
    """A fitted XGBoost ``survival:aft`` booster: the predicted time is the row's remaining life.

    Times are shifted by ``offset`` (one clock unit) during the fit, because the AFT objective works on
    log-times and a failure row's remaining life is 0; predictions are shifted back and clipped to
    ``[0, cap]`` (the labels' cap: a censored objective would otherwise extrapolate beyond it).
    """

    booster: Any
    spec: DataSpec
    offset: float
    cap: float
    history: list[dict[str, float]] = field(default_factory=list)
    best_iteration: int = 0

    def predict(self, frame: pd.DataFrame) -> np.ndarray:
        import xgboost as xgb

        x = xgb.DMatrix(frame[list(self.spec.feature_columns)].to_numpy(np.float32), missing=np.nan,
                        feature_names=list(self.spec.feature_columns))
        t = self.booster.predict(x, iteration_range=(0, self.best_iteration))
        return np.clip(np.asarray(t, np.float64) - self.offset, 0.0, self.cap)

    def log(self, name: str, example: pd.DataFrame) -> Any:
        import warnings

        import mlflow.pyfunc
        from mlflow.models import infer_signature

        x = example[list(self.spec.feature_columns)]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # type-hint advice: the signature is explicit
            return mlflow.pyfunc.log_model(name=name, python_model=_aft_pyfunc(self),
                                           signature=infer_signature(x, self.predict(x)), input_example=x,
                                           pip_requirements=pip_requirements("xgboost-cpu", "scipy"))

    def feature_importance(self, frame: pd.DataFrame, true: np.ndarray) -> dict[str, float] | None:
        gain = self.booster.get_score(importance_type="total_gain")
        total = sum(gain.values()) or 1.0
        return {c: float(gain.get(c, 0.0) / total) for c in self.spec.feature_columns}


def _aft_pyfunc(model: AftModel):
    import mlflow.pyfunc

    class AftPyfunc(mlflow.pyfunc.PythonModel):
        """``mlflow.pyfunc`` wrapper: feature columns in, one RUL per row out."""

        def __init__(self, m: AftModel):
            self.model = m

        def predict(self, context, model_input, params=None):  # noqa: D401 - MLflow's signature
            frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
            return self.model.predict(frame)

    return AftPyfunc(model)


def aft_bounds(frame: pd.DataFrame, spec: DataSpec) -> tuple[np.ndarray, np.ndarray]:
    """Each row's remaining life as an interval: ``[label, label]`` where the life ended in a failure,
    ``[lower bound, inf)`` where it was censored or is running (the features' ``rul_lower``)."""
    from twinflow.tasks.features.params import LOWER

    label = frame[spec.label].to_numpy(np.float64)
    lower = frame[LOWER].to_numpy(np.float64) if LOWER in frame else label
    exact = np.isfinite(label)
    return np.where(exact, label, lower), np.where(exact, label, np.inf)


class AftTrainer:
    """Gradient-boosted trees on the censored AFT objective (``TrainParams.censored="aft"``).

    Early-stopped on the validation lives' RMSE of the predicted remaining life (those are
    failure-ended, so their RUL is known), the same criterion as ``gbm``'s.
    """

    name = "gbm-aft"
    default_space: dict[str, list[Any]] = {
        "learning_rate": [0.03, 0.05, 0.1],
        "max_depth": [4, 6, 8],
        "min_child_weight": [1, 5, 20],
        "colsample_bytree": [0.5, 0.8, 1.0],
        "aft_loss_distribution": ["normal", "logistic", "extreme"],
        "aft_loss_distribution_scale": [0.5, 1.0, 1.5],
    }
    offset = 1.0

    def fit(self, train: pd.DataFrame, val: pd.DataFrame, spec: DataSpec, hparams: dict[str, Any],
            params: TrainParams, seed: int) -> AftModel:
        import xgboost as xgb

        cols = list(spec.feature_columns)
        lo, hi = aft_bounds(train, spec)
        keep = np.isfinite(lo)
        if not keep.any():
            raise ConfigError("no training row has a remaining life or a lower bound of one")
        cap = float(np.nanmax(lo[keep]))
        dtrain = xgb.DMatrix(train.loc[keep, cols].to_numpy(np.float32), missing=np.nan, feature_names=cols)
        dtrain.set_float_info("label_lower_bound", lo[keep] + self.offset)
        dtrain.set_float_info("label_upper_bound", hi[keep] + self.offset)
        yva = val[spec.label].to_numpy(np.float64)
        dval = xgb.DMatrix(val[cols].to_numpy(np.float32), missing=np.nan, feature_names=cols)
        dval.set_float_info("label_lower_bound", yva + self.offset)
        dval.set_float_info("label_upper_bound", yva + self.offset)
        ytr = np.where(np.isfinite(hi[keep]), hi[keep], np.nan)  # train RMSE on the exact rows only

        def rmse(pred: np.ndarray, d: Any) -> tuple[str, float]:
            y = yva if d is dval else ytr
            err = np.clip(pred - self.offset, 0.0, cap) - y
            return "rmse", float(np.sqrt(np.nanmean(err ** 2))) if np.isfinite(err).any() else float("nan")

        booster_params = {"objective": "survival:aft", "tree_method": "hist", "seed": seed,
                          "nthread": params.threads_per_trial, "disable_default_eval_metric": 1, **hparams}
        evals: dict[str, dict[str, list[float]]] = {}
        booster = xgb.train(booster_params, dtrain, num_boost_round=params.max_iter,
                            evals=[(dtrain, "train"), (dval, "val")], custom_metric=rmse,
                            early_stopping_rounds=params.early_stopping_rounds, evals_result=evals,
                            verbose_eval=False)
        val_rmse, train_rmse = evals["val"]["rmse"], evals["train"]["rmse"]
        best = int(booster.best_iteration) + 1
        keep_steps = sorted({*range(10, len(val_rmse) + 1, 10), best, len(val_rmse)})
        history = [{"step": it, "val_rmse": float(val_rmse[it - 1]), "train_rmse": float(train_rmse[it - 1])}
                   for it in keep_steps]
        return AftModel(booster, spec, self.offset, cap, history, best)


#: The trainer a ``censored="aft"`` run uses in place of ``gbm``: listed apart from the model names
#: (``TrainParams.model``), because it is a choice about censored lives, not another model family.
CENSORED_TRAINERS: dict[str, Trainer] = {"gbm": AftTrainer()}


def trainer_for(params: TrainParams) -> Trainer:
    """The trainer of a run: ``params.model``'s, or its censored variant under ``censored="aft"``.

    Raises:
        ConfigError: as :func:`get_trainer`, or ``aft`` for a model without a censored variant, or
            XGBoost missing.
    """
    if getattr(params, "censored", "exclude") != "aft":
        return get_trainer(params.model)
    if params.model not in CENSORED_TRAINERS:
        raise ConfigError(f"censored='aft' is available for model(s) {', '.join(sorted(CENSORED_TRAINERS))}, "
                          f"not {params.model!r}")
    if importlib.util.find_spec("xgboost") is None:
        raise ConfigError("censored='aft' needs XGBoost: pip install xgboost-cpu")
    return CENSORED_TRAINERS[params.model]
