"""The registry gate: champion/challenger promotion of trained models in the MLflow registry.

One place for the gate: the pure decision (:func:`decide_promotion`), the registry reads
(:func:`champion_version`, :func:`champion_error_model` for the digital twin), the Prefect task
that scores the champion on a run's evaluation data (``train-evaluate-champion``) and the registry
writes of one gate pass (:func:`promotion_gate`, called by the train flow). Aliases: a new version
is ``challenger``; it becomes ``champion`` only when :func:`decide_promotion` says so.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE

from twinflow.refs import FeatureSetRef
from twinflow.tasks.train_eval import evaluate_model_uri
from twinflow.tracking import retry_store

if TYPE_CHECKING:
    from twinflow.tasks.train import TrainParams

log = logging.getLogger("twinflow.train")

CHAMPION = "champion"
CHALLENGER = "challenger"
RESIDUALS_ARTIFACT = "evaluation/residuals.csv"


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


@task(name="train-evaluate-champion", cache_policy=NO_CACHE, retries=1, retry_delay_seconds=2)
def evaluate_task(model_uri: str, features: FeatureSetRef, params: TrainParams,
                  test_features: FeatureSetRef | None, tracking_uri: str) -> dict[str, float]:
    """Score a registered model on this run's evaluation data."""
    return evaluate_model_uri(model_uri, features, params, test_features, tracking_uri)


@dataclass
class GateOutcome:
    """What one pass of the gate did in the registry."""

    decision: Decision
    version: str
    aliases: list[str]
    champion_rmse: float | None = None


def promotion_gate(client: Any, name: str, model_uri: str, challenger_rmse: float, eval_set: str,
                   features: FeatureSetRef, params: TrainParams, test_features: FeatureSetRef | None,
                   tracking_uri: str) -> GateOutcome:
    """Register a trained model as ``challenger`` and promote it to ``champion`` if it earns it.

    Runs inside the train flow, in its stage run: the current champion is scored on the same
    evaluation data by the ``train-evaluate-champion`` task, :func:`decide_promotion` decides, and
    the decision is written as an MLflow table (``promotion/decision.json``), tags
    (``twinflow.promotion``, ``twinflow.registered_version``), a ``champion_eval_rmse`` metric and
    a Prefect markdown artifact (``train-promotion``).

    Args:
        client: An ``mlflow.MlflowClient`` on the flow's tracking/registry store.
        name: The registered model name.
        model_uri: The logged model to register.
        challenger_rmse: Its eval RMSE on ``eval_set``.
        eval_set: The name of the evaluation data (both models are scored on it).
        features: The run's training features (the champion is scored on the same eval data).
        params: The run's train params (``promotion_margin``, eval-set options).
        test_features: The run's test features, if any.
        tracking_uri: Where the evaluation task loads the champion from.

    Returns:
        The decision, the new version, its aliases after the gate and the champion's RMSE.
    """
    import mlflow
    from prefect.artifacts import create_markdown_artifact

    incumbent = champion_version(client, name)
    mv = mlflow.register_model(model_uri, name, tags={"twinflow.eval_set": eval_set})
    retry_store(client.set_registered_model_alias, name, CHALLENGER, mv.version)
    champ_rmse, champ_err = None, None
    if incumbent is not None:
        try:
            champ = evaluate_task.submit(f"models:/{name}/{incumbent.version}", features, params,
                                         test_features, tracking_uri).result()
            champ_rmse = champ["rmse"]
        except Exception as exc:  # the gate keeps the champion and records why
            champ_err = f"{exc.__class__.__name__}: {exc}"
            log.warning("champion v%s could not be scored: %s", incumbent.version, champ_err)
    decision = decide_promotion(challenger_rmse, champ_rmse, params.promotion_margin,
                                challenger_version=str(mv.version),
                                champion_version=None if incumbent is None else str(incumbent.version),
                                eval_set=eval_set, champion_error=champ_err)
    if decision.promote:
        retry_store(client.set_registered_model_alias, name, CHAMPION, mv.version)
    mlflow.log_table(decision.table(), "promotion/decision.json")
    mlflow.set_tags({"twinflow.promotion": "promoted" if decision.promote else "kept",
                     "twinflow.registered_version": str(mv.version)})
    if champ_rmse is not None:
        mlflow.log_metric("champion_eval_rmse", champ_rmse)
    create_markdown_artifact(decision.markdown(name), key="train-promotion",
                             description=f"promotion gate for {name} v{mv.version}")
    aliases = sorted(client.get_model_version(name, mv.version).aliases)
    return GateOutcome(decision, str(mv.version), aliases, champ_rmse)
