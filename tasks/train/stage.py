"""Training stage logic: RUL models behind one trainer interface, trials on Dask, a gated registry.

Pure functions take data and typed params and return data; the thin Prefect task at the bottom
adds I/O (reading the feature dataset by reference). The flow in ``twinflow.flows.train`` strings
the steps together. This module holds the stage's parameters and its search-and-evaluate body;
each concept lives in its own module (all their public names are re-exported here and by the
package, so ``from twinflow.tasks.train import X`` keeps working):

- :mod:`twinflow.tasks.train.data`: the feature dataset read, checked, split by asset; eval sets.
- :mod:`twinflow.tasks.train.trainers`: the model zoo (``gbm``; ``cnn`` in :mod:`twinflow.tasks.train.cnn`).
- :mod:`twinflow.tasks.train.tuning`: random search, one trial per Dask task.
- :mod:`twinflow.tasks.train.eval`: metrics, scoring a logged model, report plots.
- :mod:`twinflow.tasks.registry`: the champion/challenger promotion gate.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Literal

import numpy as np
import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from twinflow.errors import ConfigError
from twinflow.refs import FeatureSetRef
from twinflow.tasks.registry import (
    CHALLENGER,
    CHAMPION,
    RESIDUALS_ARTIFACT,
    Decision,
    champion_error_model,
    champion_version,
    decide_promotion,
    evaluate_task,
)
from twinflow.tasks.train.data import (
    DataSpec,
    EvalSet,
    build_eval_set,
    check_frame,
    cmapss_test_set,
    dataset_for_mlflow,
    drop_unlabelled,
    eval_protocol,
    feature_digest,
    hold_out_assets,
    life_ages,
    mean_life,
    read_feature_frame,
    read_true_rul,
    spec_for,
    split_by_asset,
    split_for_training,
    truncated_lives_set,
    validation_set,
)
from twinflow.tasks.prognostics import PrognosticsReport
from twinflow.tasks.promotion import PromotionFloor, PromotionMode, TwinGateParams, fleet_mean_life_predictions
from twinflow.tasks.train.eval import (
    evaluate_model_uri,
    evaluate_prognostics,
    log_prognostics,
    predict_model_uri,
    phm08_score,
    plot_feature_importance,
    plot_learning_curve,
    plot_pred_vs_true,
    plot_residuals_per_asset,
    regression_metrics,
    residuals_csv,
)
from twinflow.tasks.train.tuning import (
    TRIAL_TAG,
    TrackingTarget,
    TrialOutcome,
    limit_threads,
    run_trial,
    sample_hparams,
    search,
)
from twinflow.tasks.train.trainers import (
    CENSORED_TRAINERS,
    TRAINERS,
    AftTrainer,
    FittedModel,
    GbmModel,
    GbmTrainer,
    IterationCallback,
    Trainer,
    available_trainers,
    get_trainer,
    model_io_lock,
    pip_requirements,
    trainer_for,
)
from twinflow.tracking import retry_store

# The stage's own names, then the re-exported names of its concept modules: one list, the package's
# (its lazy __getattr__ serves exactly these from this module).
from twinflow.tasks.train import __all__  # noqa: E402,F401

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
        promotion_mode: What the promotion gate decides on: ``rmse`` (the RMSE rule above),
            ``twin`` (the fleet twin's policy study with each model's measured error: the
            challenger's best policy must cost less, see ``twin_gate``) or ``both`` (both must
            say promote). The first model becomes champion in every mode.
        twin_gate: Size, seeds and rule (CI non-overlap or a relative margin) of the twin gate.
        promotion_floor: The absolute bar every model must clear before any champion comparison:
            beat the naive fleet-mean-life predictor, optional RMSE/PHM08/coverage thresholds.
        interval_level: Nominal coverage of the conformal prediction intervals (calibrated on
            validation residuals, coverage reported on the evaluation data).
        true_rul_path: True RUL file of the C-MAPSS test protocol (one integer per test unit, in
            unit order), e.g. ``twinflow.data.cmapss_path("RUL_FD001.txt.gz")``. Used with the
            flow's ``test_features``.
        eval_protocol: How the model is scored (logged, and the run's ``twinflow.eval_set`` tag):
            ``truth_file`` (the C-MAPSS test protocol: ``test_features`` scored at each unit's last
            cycle against ``true_rul_path``, comparable with the literature), ``truncated`` (the same
            protocol for any fleet: assets holding ``eval_fraction`` of the fleet are set aside before
            training, and each of their failure-ended lives is cut at ``eval_truncations`` random
            points, scored against its own label; no truth file), ``validation`` (every row of the
            validation assets) or ``auto`` (``truth_file`` with test features, else ``validation``).
        eval_fraction: Fraction of assets held out by the ``truncated`` protocol.
        eval_truncations: Random truncation points per held-out life (``truncated``; seeded by ``seed``).
        censored: What training does with rows of lives that did not end in an observed failure
            (preventive replacements, assets still running): ``exclude`` them (their RUL is unknown;
            the count is logged), or ``aft``: fit gradient-boosted trees on XGBoost's censored
            accelerated-failure-time objective, where such a row says "at least this long remained"
            (the features' ``rul_lower``) instead of nothing. Logged as a param.
        nan_policy: ``reject`` NaN/inf in features (error names the columns), ``drop`` those rows,
            or ``keep`` NaN features (missing readings, e.g. a channel some assets lack, or windows
            with too few valid readings) for the model: ``gbm`` handles them natively, ``cnn`` reads
            a missing value as the training mean. Inf and a missing label are rejected in every mode.
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
    promotion_mode: PromotionMode = "both"
    twin_gate: TwinGateParams = Field(default_factory=TwinGateParams)
    promotion_floor: PromotionFloor = Field(default_factory=PromotionFloor)
    interval_level: float = Field(0.9, gt=0.0, lt=1.0)
    true_rul_path: str | None = None
    eval_protocol: Literal["auto", "truth_file", "truncated", "validation"] = "auto"
    eval_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    eval_truncations: int = Field(1, ge=1, le=1000)
    censored: Literal["exclude", "aft"] = "exclude"
    nan_policy: Literal["reject", "drop", "keep"] = "reject"
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
        known = (CENSORED_TRAINERS.get(self.model) or TRAINERS[self.model]).default_space \
            if self.censored == "aft" else TRAINERS[self.model].default_space
        if self.censored == "aft" and self.model not in CENSORED_TRAINERS:
            raise ValueError(f"censored='aft' is available for model(s) {', '.join(sorted(CENSORED_TRAINERS))}, "
                             f"not {self.model!r}")
        unknown = sorted(set(self.search_space) - set(known))
        if unknown:
            raise ValueError(f"search_space keys {unknown} unknown to model {self.model!r}; "
                             f"known: {', '.join(sorted(known))}")
        empty = [k for k, v in self.search_space.items() if not v]
        if empty:
            raise ValueError(f"search_space {empty} have no choices")
        return self


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
    prognostics: PrognosticsReport | None = None
    val_prognostics: PrognosticsReport | None = None
    val_set: EvalSet | None = None
    val_pred: np.ndarray | None = None
    baseline_metrics: dict[str, float] | None = None


def search_and_evaluate(features: FeatureSetRef, params: TrainParams, test_features: FeatureSetRef | None,
                        target: TrackingTarget | None, client: Any = None) -> SearchOutcome:
    """Read and check the features, split by asset, run the search, evaluate the best model."""
    spec = spec_for(features)
    frame = read_feature_frame(features)
    if params.censored == "aft":
        frame = _censored_rows_kept(frame, spec)
    else:
        frame = drop_unlabelled(frame, spec)
    frame = check_frame(frame, spec, nan_policy=params.nan_policy, min_assets=2,
                        need_label=params.censored != "aft")
    train, val, held = split_for_training(frame, spec, params, test_features)
    if params.censored == "aft":
        # Validation and evaluation score against known remaining lives: failure-ended rows only.
        val = val.loc[val[spec.label].notna()].reset_index(drop=True)
        if val.empty:
            raise ConfigError("the validation assets have no failure-ended life to early-stop on")
    outcomes = search(train, val, spec, params, target, client)
    with limit_threads(params.threads_per_trial):
        return _evaluate_best(outcomes, train, val, spec, features, params, test_features, held)


def _censored_rows_kept(frame: pd.DataFrame, spec: DataSpec) -> pd.DataFrame:
    """For ``censored="aft"``: keep censored and running rows (their lower bound is their target),
    drop only rows outside every life (no bound at all), and say how many rows are censored."""
    import logging

    from twinflow.tasks.features.params import LOWER

    if LOWER not in frame:
        raise ConfigError(f"censored='aft' needs the features' {LOWER!r} column (features computed from life "
                          "segments); these features have none: recompute them, or use censored='exclude'")
    frame = frame.loc[frame[LOWER].notna() | frame[spec.label].notna()].reset_index(drop=True)
    censored = frame[spec.label].isna()
    logging.getLogger("twinflow.train").info(
        "censored='aft': training uses %d rows of censored or running lives as lower bounds of the remaining "
        "life, beside %d rows of failure-ended lives", int(censored.sum()), int((~censored).sum()))
    return frame


def _evaluate_best(outcomes: list[TrialOutcome], train: pd.DataFrame, val: pd.DataFrame, spec: DataSpec,
                   features: FeatureSetRef, params: TrainParams,
                   test_features: FeatureSetRef | None, held: pd.DataFrame | None = None) -> SearchOutcome:
    best = outcomes[0]
    trials = pd.DataFrame([{"trial": o.trial, "run_id": o.run_id, "val_rmse": o.val_rmse,
                            "best_iteration": o.best_iteration, "seconds": o.seconds,
                            **{f"hp.{k}": v for k, v in o.hparams.items()}} for o in outcomes])
    ev = build_eval_set(features, params, test_features, val=val, held=held)
    pred = np.asarray(best.model.predict(ev.frame), dtype="float64")[ev.rows]
    metrics = regression_metrics(pred, ev.true)
    vs = validation_set(val, spec)
    val_pred = np.asarray(best.model.predict(vs.frame), dtype="float64")[vs.rows]
    prog, val_prog = evaluate_prognostics(ev, pred, vs, val_pred, level=params.interval_level)
    baseline = _baseline_metrics(train, spec, ev, params.rul_cap)
    # The frame of the validation set stays behind: the flow plots from the scored columns only.
    vs_small = EvalSet(vs.name, vs.frame[["asset_id", "cycle"]], vs.rows, vs.true)
    importance = best.model.feature_importance(validation_set(val, spec).frame, val[spec.label].to_numpy())
    example = train[[*spec.keys, *spec.feature_columns]].head(max(params.window, 5)).rename(
        columns={spec.asset: "asset_id", spec.cycle: "cycle"})
    return SearchOutcome(best, trials, ev.name, metrics, residuals_csv(ev, pred), ev.true, pred, ev.asset_ids,
                         importance, example, len(train), len(val),
                         int(train[spec.asset].nunique()), int(val[spec.asset].nunique()),
                         prog, val_prog, vs_small, val_pred, baseline)


def _baseline_metrics(train: pd.DataFrame, spec: DataSpec, ev: EvalSet, rul_cap: float) -> dict[str, float] | None:
    """The naive fleet-mean-life predictor scored on the evaluation rows (the promotion floor's bar).

    Lifetimes and ages are in the contract's clock unit (:func:`life_ages`), like the labels: on a
    timestamp clock the time key is read as microsecond ticks, and a mean "life" of epoch ticks made
    the baseline predict the cap (or 0) at every row.
    """
    life = mean_life(train, spec)
    if life is None or "cycle" not in ev.frame:
        return None
    _, age = life_ages(ev.frame, replace(spec, asset="asset_id", cycle="cycle"))
    return {**regression_metrics(fleet_mean_life_predictions(life, age[ev.rows], rul_cap), ev.true),
            "mean_life": life}


# ---------------------------------------------------------------------------------------------
# Prefect tasks (thin wrappers: coarse, one per step of the flow)
# ---------------------------------------------------------------------------------------------


def _trial_client():
    """The Dask client for trials (the worker's client, seceding, when run on a worker)."""
    from twinflow import runtime

    return runtime.using_dask()


@task(name="train-search", cache_policy=NO_CACHE, log_prints=False,
      task_run_name="train-search-{params.model}-{features.snapshot.dataset}")
def search_task(features: FeatureSetRef, params: TrainParams, test_features: FeatureSetRef | None,
                target: TrackingTarget) -> SearchOutcome:
    """Search hyperparameters with trials as Dask tasks; evaluate the best on the eval data."""
    with _trial_client() as client:
        return search_and_evaluate(features, params, test_features, target, client)
