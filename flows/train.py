"""The train stage flow: features in, an MLflow run and a gated registry version out."""

from __future__ import annotations

import logging
import time

from prefect import flow, get_run_logger
from prefect.task_runners import ThreadPoolTaskRunner

from twinflow import runtime
from twinflow.contract.model import unit_label
from twinflow.errors import ConfigError
from twinflow.flows.naming import run_name
from twinflow.refs import FeatureSetRef, TrainResult, contract_tags
from twinflow.tasks.registry import promotion_gate
from twinflow.tasks.train import (
    RESIDUALS_ARTIFACT,
    TrackingTarget,
    TrainParams,
    dataset_for_mlflow,
    eval_protocol,
    feature_digest,
    log_prognostics,
    model_io_lock,
    plot_feature_importance,
    plot_learning_curve,
    plot_pred_vs_true,
    plot_residuals_per_asset,
    search_task,
    trainer_for,
)
from twinflow.tracking import configure_mlflow, retry_store, tracked_run

log = logging.getLogger("twinflow.train")

__all__ = ["train", "TrainParams"]


def _check_inputs(features: FeatureSetRef, params: TrainParams, test_features: FeatureSetRef | None) -> None:
    """Cheap checks before any cluster or tracking work."""
    import fsspec

    trainer_for(params)  # unknown name / missing torch or XGBoost
    for ref, what in ((features, "features"), (test_features, "test_features")):
        if ref is None:
            continue
        fs, root = fsspec.core.url_to_fs(ref.path)
        if not fs.exists(root):
            raise ConfigError(f"{what} dataset {ref.path} does not exist; run the features stage first")
        if not ref.feature_columns:
            raise ConfigError(f"{what} reference lists no feature_columns")
    if features.label_column is None:
        raise ConfigError(f"features {features.path} carry no label column; training needs labels")
    eval_protocol(params, test_features)  # a contradictory protocol fails before any cluster work
    if test_features is not None:
        if sorted(test_features.feature_columns) != sorted(features.feature_columns):
            raise ConfigError("test_features must have the same feature_columns as features")
        if params.true_rul_path is None and test_features.label_column is None:
            raise ConfigError("test_features need params.true_rul_path (the C-MAPSS RUL file) to be scored")
    if params.true_rul_path is not None:
        fs, root = fsspec.core.url_to_fs(params.true_rul_path)
        if not fs.exists(root):
            raise ConfigError(f"true_rul_path {params.true_rul_path} does not exist")


def _log_trials(out, params: TrainParams) -> None:
    """One Prefect log line per trial (best first), so the flow run's log tells the search's story."""
    logger = get_run_logger()
    hp_cols = [c for c in out.trials.columns if c.startswith("hp.")]
    for rank, r in enumerate(out.trials.to_dict("records"), start=1):
        hps = ", ".join(f"{c[3:]}={r[c]}" for c in hp_cols)
        logger.info("trial %d (rank %d/%d): val RMSE %.3f at iteration %d in %.1f s; %s; MLflow run %s",
                    r["trial"], rank, len(out.trials), r["val_rmse"], r["best_iteration"], r["seconds"], hps,
                    r["run_id"])
    logger.info("best trial %d: val RMSE %.3f (%s); evaluated on %s: RMSE %.3f, PHM08 score %.1f",
                out.best.trial, out.best.val_rmse, params.model, out.eval_name, out.eval_metrics["rmse"],
                out.eval_metrics["score"])


def _describe(run_id: str, experiment_id: str, out, metrics: dict, name: str | None, version: str | None,
              decision, params: TrainParams, time_unit: str) -> None:
    """The run's description (MLflow Overview): the verdict, metrics with units, links.

    ``time_unit`` is the fleet contract's clock unit (the features'): the unit of RMSE, MAE and bias.
    """
    import mlflow

    from twinflow.verdict import prefect_flow_run_url, scale_line, set_description, train_description

    tags = mlflow.MlflowClient().get_run(run_id).data.tags
    plots = [p for p in ("plots/pred_vs_true.png", "plots/residuals_per_asset.png", "plots/learning_curve.png",
                         "plots/feature_importance.png") if out.importance or "importance" not in p]
    gate = params.twin_gate
    twin = None if decision is None or decision.twin is None else decision.twin.challenger
    set_description(train_description(
        model_name=name, version=version, decision=decision, metrics=metrics, eval_set=out.eval_name,
        experiment_id=experiment_id, run_id=run_id, plots=plots, prefect_url=prefect_flow_run_url(),
        parent_run_id=tags.get("mlflow.parentRunId"), best_trial_run_id=out.best.run_id,
        currency=gate.costs.currency, time_unit=time_unit,
        # The gate's horizon is in the unit of the twin it ran on.
        gate_scale=scale_line(gate.n_assets, gate.horizon, gate.n_scenarios,
                              time_unit=time_unit if twin is None else twin.time_unit)))


@flow(name="train", task_runner=ThreadPoolTaskRunner(), validate_parameters=True,
      flow_run_name=run_name("train", lambda p: f"{(p.get('params') or TrainParams()).model}-{p['features'].snapshot.dataset}"))
def train(features: FeatureSetRef, params: TrainParams | None = None,
          test_features: FeatureSetRef | None = None) -> TrainResult:
    """Train RUL models on a feature dataset, track everything in MLflow, gate the registry.

    Steps:
        1. Check params and input references (no cluster or tracking work yet); point MLflow at
           the configured store (a tracking server that is down fails here, before any run).
        2. Open the stage run (tagged with the Prefect flow-run id/URL), log the flattened params
           and the input datasets (feature digest + lake snapshot digest and raw file hashes).
        3. Search: ``params.n_trials`` trials as parallel Dask tasks, each a child run with
           per-iteration metrics; early stopping on a by-asset validation split.
        4. Evaluate the best model on the evaluation data (C-MAPSS test protocol when
           ``test_features`` are given, else the validation assets): RMSE, MAE, PHM08 score,
           bias; log plots, residuals (``evaluation/residuals.csv``) and the model with its
           signature and input example.
        5. Register the model version, alias it ``challenger``; score the current champion on
           the same evaluation data; promote to ``champion`` only if better by
           ``params.promotion_margin`` (the first model becomes champion); write the decision as
           an MLflow table and a Prefect markdown artifact
           (:func:`twinflow.tasks.registry.promotion_gate`).

    Args:
        features: The training feature dataset (with labels).
        params: Stage parameters; defaults to ``TrainParams()``.
        test_features: Optional test feature dataset for the C-MAPSS protocol (with
            ``params.true_rul_path``).

    Returns:
        The stage run id, the model URI, the registry version, its aliases and the eval metrics.
    """
    import mlflow
    from mlflow.entities import Metric

    params = params or TrainParams()
    _check_inputs(features, params, test_features)
    with runtime.ensure() as rt:
        settings = rt.settings
        experiment_id = configure_mlflow(settings)
        name = settings.mlflow.registered_model
        client = mlflow.MlflowClient()
        with tracked_run(f"train-{params.model}", stage="train", params=params,
                         tags={"twinflow.model": params.model}) as run:
            run_id = run.info.run_id
            # 2. lineage
            # One digest per feature set: the features stage's own (its folder name, the report's).
            digest = features.params_digest or feature_digest(features)
            snap = features.snapshot
            retry_store(mlflow.log_input, dataset_for_mlflow(features, digest), context="training",
                        tags={"lake_snapshot_digest": snap.digest, "lake_batch_id": snap.batch_id,
                              "feature_params_digest": features.params_digest})
            mlflow.set_tags({"twinflow.feature_digest": digest, "twinflow.lake_snapshot_digest": snap.digest,
                             "twinflow.time_unit": features.time_unit, **contract_tags(features.contract)})
            if snap.version is not None:
                # The lake upkeep keeps this table version's files while this model is champion.
                mlflow.set_tags({"twinflow.lake.dataset": snap.dataset, "twinflow.lake.version": str(snap.version)})
                if snap.segments is not None:  # its labels' life segments (health reads them too)
                    mlflow.set_tag("twinflow.lake.segments", str(snap.segments))
            lineage = {"features": features.model_dump(mode="json"), "feature_digest": digest}
            if test_features is not None:
                tdigest = test_features.params_digest or feature_digest(test_features)
                retry_store(mlflow.log_input, dataset_for_mlflow(test_features, tdigest), context="evaluation",
                            tags={"lake_snapshot_digest": test_features.snapshot.digest})
                lineage["test_features"] = test_features.model_dump(mode="json")
                lineage["test_feature_digest"] = tdigest
            mlflow.log_dict(lineage, "data/lineage.json")

            # 3-4. trials on the cluster, best model evaluated
            target = TrackingTarget(settings.mlflow_tracking_uri, experiment_id, run_id, settings.mlflow.registry_uri)
            out = search_task.submit(features, params, test_features, target).result()
            best = out.best
            m = out.eval_metrics
            metrics = {"eval_rmse": m["rmse"], "eval_mae": m["mae"], "eval_score": m["score"],
                       "eval_bias": m["bias"], "eval_n": m["n"], "val_rmse": best.val_rmse,
                       "best_iteration": float(best.best_iteration), "n_trials": float(len(out.trials)),
                       "rows_train": float(out.rows_train), "rows_val": float(out.rows_val),
                       "assets_train": float(out.assets_train), "assets_val": float(out.assets_val)}
            if out.baseline_metrics is not None:  # the naive predictor the floor compares with, same rows
                metrics["baseline_eval_rmse"] = out.baseline_metrics["rmse"]
            # val_rmse is also the learning curve's key (by step, below): logged here at step 0 it
            # drew a stray point at the start of the curve, so the run's summary is best_val_rmse.
            # Headline metrics only: counts are facts about the data, logged as params so the run's
            # metric charts and the runs table show what decides (RMSE, PHM08, coverage ...).
            counts = ("eval_n", "n_trials", "best_iteration", "rows_train", "rows_val", "assets_train", "assets_val")
            mlflow.log_params({f"data.{k}": int(metrics[k]) for k in counts})
            mlflow.log_metrics({("best_val_rmse" if k == "val_rmse" else k): v for k, v in metrics.items()
                                if k not in counts})
            _log_trials(out, params)
            # The chosen model's learning curve, in batches: one store write per 1000 points.
            points = [Metric(k, float(v), int(time.time() * 1000), int(h["step"]))
                      for h in best.model.history for k, v in h.items() if k != "step"]
            for i in range(0, len(points), 1000):
                retry_store(client.log_batch, run_id, metrics=points[i:i + 1000])
            mlflow.log_params({f"best.{k}": v for k, v in best.hparams.items()})
            mlflow.log_param("data.eval_protocol", eval_protocol(params, test_features))  # ``auto`` resolved
            mlflow.set_tags({"twinflow.eval_set": out.eval_name, "twinflow.best_trial_run_id": best.run_id or "",
                             "twinflow.device": getattr(best.model, "device", "cpu")})
            mlflow.log_table(out.trials, "search/trials.json")
            mlflow.log_text(out.residuals_csv, RESIDUALS_ARTIFACT)
            unit = features.time_unit  # every plotted duration is in the fleet contract's clock unit
            mlflow.log_figure(plot_pred_vs_true(out.eval_true, out.eval_pred,
                                                f"{out.eval_name} (RMSE {m['rmse']:.2f} {unit_label(unit)})",
                                                time_unit=unit), "plots/pred_vs_true.png")
            mlflow.log_figure(plot_residuals_per_asset(out.eval_assets, out.eval_pred - out.eval_true, time_unit=unit),
                              "plots/residuals_per_asset.png")
            mlflow.log_figure(plot_learning_curve(best.model.history, best.best_iteration, time_unit=unit),
                              "plots/learning_curve.png")
            if out.importance:
                mlflow.log_figure(plot_feature_importance(out.importance), "plots/feature_importance.png")
                mlflow.log_dict(out.importance, "evaluation/feature_importance.json")
            if out.prognostics is not None:
                log_prognostics(out.prognostics, out.val_prognostics, out.eval_true, out.eval_pred, out.val_set,
                                out.val_pred, time_unit=unit)
                metrics.update(out.prognostics.metrics("eval"))
            import matplotlib.pyplot as plt

            plt.close("all")
            with model_io_lock():
                info = best.model.log("model", out.example)
            result = TrainResult(run_id=run_id, model_uri=info.model_uri, metrics=metrics)

            # 5. registry and promotion gate
            if params.use_registry:
                gate = promotion_gate(client, name, info.model_uri, m["rmse"], out.eval_name, features, params,
                                      test_features, settings.mlflow_tracking_uri, challenger_true=out.eval_true,
                                      challenger_pred=out.eval_pred, challenger_metrics=metrics,
                                      baseline_metrics=out.baseline_metrics)
                result = result.model_copy(update={"registered_model": name, "version": gate.version,
                                                   "aliases": gate.aliases})
            _describe(run_id, experiment_id, out, metrics, name if params.use_registry else None,
                      result.version, gate.decision if params.use_registry else None, params, features.time_unit)
        log.info("train: run %s, %s v%s %s, eval RMSE %.3f", run_id, name, result.version, result.aliases,
                 m["rmse"])
        get_run_logger().info("train finished: %s model, eval on %s: RMSE %.2f, MAE %.2f, PHM08 score %.1f; "
                              "registered %s v%s aliases %s; MLflow run %s", params.model, out.eval_name,
                              m["rmse"], m["mae"], m["score"], name if params.use_registry else "(registry off)",
                              result.version, ", ".join(result.aliases) or "none", run_id)
        return result

