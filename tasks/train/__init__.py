"""The train stage: RUL models behind one trainer interface, trials on Dask, a gated registry.

A feature set in, an MLflow run and a registered model version out. The flow is
:mod:`twinflow.flows.train`; the stage's logic lives in this package, one concept a module:

- :mod:`.stage`: the stage's parameters (:class:`TrainParams`) and its search-and-evaluate body;
- :mod:`.data`: the feature set read, checked, split by asset; evaluation sets;
- :mod:`.trainers`: the model zoo (``gbm``; ``cnn`` in :mod:`.cnn`, PyTorch);
- :mod:`.tuning`: random search, one trial per Dask task;
- :mod:`.eval`: metrics, scoring a logged model, report plots.

The champion/challenger gate is :mod:`twinflow.tasks.registry`. This package re-exports the public
names of :mod:`.stage` (which re-exports those of the concept modules), so
``from twinflow.tasks.train import X`` needs no knowledge of the split. They load on first use
(:pep:`562`): the registry imports :mod:`.eval`, and :mod:`.stage` imports the registry, so an eager
re-export would make ``import twinflow.tasks.registry`` circular. No module here shares a name with
a re-exported function (``tuning``, not ``search``): an imported submodule becomes an attribute of its
package and would shadow the lazily re-exported name.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "TrainParams",
    "SearchOutcome",
    "search_and_evaluate",
    "search_task",
    "available_trainers",
    "build_eval_set",
    "CHALLENGER",
    "CHAMPION",
    "champion_error_model",
    "champion_version",
    "check_frame",
    "cmapss_test_set",
    "dataset_for_mlflow",
    "DataSpec",
    "decide_promotion",
    "Decision",
    "EvalSet",
    "evaluate_model_uri",
    "evaluate_task",
    "evaluate_prognostics",
    "log_prognostics",
    "predict_model_uri",
    "feature_digest",
    "FittedModel",
    "GbmModel",
    "GbmTrainer",
    "get_trainer",
    "IterationCallback",
    "limit_threads",
    "model_io_lock",
    "phm08_score",
    "pip_requirements",
    "plot_feature_importance",
    "plot_learning_curve",
    "plot_pred_vs_true",
    "plot_residuals_per_asset",
    "read_feature_frame",
    "read_true_rul",
    "regression_metrics",
    "RESIDUALS_ARTIFACT",
    "residuals_csv",
    "retry_store",
    "run_trial",
    "sample_hparams",
    "search",
    "spec_for",
    "split_by_asset",
    "split_for_training",
    "trainer_for",
    "AftTrainer",
    "truncated_lives_set",
    "drop_unlabelled",
    "eval_protocol",
    "hold_out_assets",
    "life_ages",
    "mean_life",
    "TrackingTarget",
    "Trainer",
    "TRAINERS",
    "TRIAL_TAG",
    "TrialOutcome",
    "validation_set",
]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from twinflow.tasks.train import stage

        return getattr(stage, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
