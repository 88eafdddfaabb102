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
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE

from twinflow.contract.model import unit_label
from twinflow.events import emit_model_promoted
from twinflow.naming import model_version_of, task_name
from twinflow.refs import FeatureSetRef
from twinflow.tasks.promotion import (
    BASELINE_NAME,
    FloorCheck,
    TwinComparison,
    check_floor,
    TwinGateParams,
    compare_twin_costs,
    error_model_of,
    policy_costs,
)
from twinflow.tasks.train.eval import predict_model_uri, regression_metrics
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
    mode: str = "rmse"
    challenger_score: float | None = None
    champion_score: float | None = None
    twin: TwinComparison | None = None
    floor: FloorCheck | None = None
    baseline_rmse: float | None = None
    baseline_score: float | None = None
    time_unit: str = "cycle"  # the fleet contract's clock unit: the unit of every RMSE above

    @property
    def verdict(self) -> str:
        """``PROMOTED`` or ``NOT PROMOTED``: the headline of every description."""
        return "PROMOTED" if self.promote else "NOT PROMOTED"

    def event_payload(self) -> dict[str, Any]:
        """The decision as the ``twinflow.model.promoted`` event's ``decision`` (JSON-able, no scenarios)."""
        return {"promote": self.promote, "mode": self.mode, "reason": self.reason, "eval_set": self.eval_set,
                "challenger_rmse": self.challenger_rmse, "champion_version": self.champion_version,
                "champion_rmse": self.champion_rmse, "margin": self.margin,
                "floor_passed": None if self.floor is None else self.floor.passed,
                "baseline_rmse": self.baseline_rmse}

    def _cost(self, role: str, key: str):
        side = None if self.twin is None else getattr(self.twin, role)
        return None if side is None else getattr(side, key)

    def table(self) -> pd.DataFrame:
        """The comparison as a table (challenger, champion if any, naive baseline) for ``mlflow.log_table``.

        Without a champion there is no champion row (not a row of nulls); the baseline row holds the
        naive fleet-mean-life predictor's scores on the same rows when they were computed.
        """
        rows = []
        sides = [(CHALLENGER, self.challenger_version, self.challenger_rmse, self.challenger_score)]
        if self.champion_version is not None:
            sides.append((CHAMPION, self.champion_version, self.champion_rmse, self.champion_score))
        for role, version, rmse, score in sides:
            rows.append({"role": role, "version": version, "eval_rmse": rmse, "eval_score": score,
                         **{f"twin_{k}": self._cost(role, k) for k in
                            ("best_policy", "expected_cost", "cost_ci_low", "cost_ci_high", "p_best")}})
        if self.baseline_rmse is not None:
            rows.append({"role": "baseline", "version": BASELINE_NAME, "eval_rmse": self.baseline_rmse,
                         "eval_score": self.baseline_score})
        df = pd.DataFrame(rows)
        df["eval_set"] = self.eval_set
        df["margin"] = self.margin
        df["mode"] = self.mode
        df["floor_passed"] = None if self.floor is None else self.floor.passed
        df["decision"] = "promote" if self.promote else "keep champion"
        df["reason"] = self.reason
        return df

    def summary(self, model_name: str) -> str:
        """One readable line: what the gate did and why (for the Prefect log)."""
        if self.promote:
            what = f"promoted {model_name} v{self.challenger_version} to {CHAMPION}"
        elif self.champion_version is None:
            what = f"refused {model_name} v{self.challenger_version} (no champion; it stays {CHALLENGER})"
        else:
            what = (f"kept {model_name} v{self.champion_version} as {CHAMPION} (v{self.challenger_version} stays "
                    f"{CHALLENGER})")
        return f"promotion gate ({self.mode}): {what}. {self.reason}"

    def markdown(self, model_name: str) -> str:
        """A Prefect markdown artifact body."""
        fmt = lambda v: "—" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))  # noqa: E731
        verdict = (f"**promoted** v{self.challenger_version} to `{CHAMPION}`" if self.promote else
                   f"**refused** v{self.challenger_version} (no champion)" if self.champion_version is None else
                   f"**kept** v{self.champion_version} as `{CHAMPION}`")
        return "\n".join([
            f"# Promotion gate: `{model_name}`", "", f"Decision: {verdict}. {self.reason}", "",
            f"Evaluation data: `{self.eval_set}`; margin: {self.margin:g} {unit_label(self.time_unit)} of RMSE.", "",
            "| role | version | eval RMSE |", "|---|---|---|",
            f"| {CHALLENGER} | {fmt(self.challenger_version)} | {fmt(self.challenger_rmse)} |",
            *([] if self.champion_version is None else
              [f"| {CHAMPION} | {fmt(self.champion_version)} | {fmt(self.champion_rmse)} |"]),
            *([] if self.baseline_rmse is None else [f"| baseline | {BASELINE_NAME} | {fmt(self.baseline_rmse)} |"]),
            "", f"Mode: `{self.mode}` (rmse: RMSE rule only; twin: maintenance cost on the fleet twin only; "
            "both: both must agree).", "",
            "| role | PHM08 score | twin best policy | expected cost [95% CI] | P(best) |", "|---|---|---|---|---|",
            *[f"| {role} | {fmt(score)} | {fmt(self._cost(role, 'best_policy'))} | "
              f"{_cost_ci(self._cost(role, 'expected_cost'), self._cost(role, 'cost_ci_low'), self._cost(role, 'cost_ci_high'))}"
              f" | {fmt(self._cost(role, 'p_best'))} |"
              for role, score in ((CHALLENGER, self.challenger_score), (CHAMPION, self.champion_score))
              if role == CHALLENGER or self.champion_version is not None],
            *([] if self.twin is None else ["", self.twin.reason]),
        ])


def _cost_ci(m, lo, hi) -> str:
    return "—" if m is None else f"{m:,.0f} [{lo:,.0f}, {hi:,.0f}]"


def decide_gate(mode: str, rmse: Decision, twin: TwinComparison | None) -> Decision:
    """Combine the RMSE rule and the twin's verdict by ``mode`` (``rmse``, ``twin`` or ``both``).

    No champion: the challenger is promoted in every mode. A champion that could not be scored,
    or a twin study that could not run when the mode needs it, keeps the champion: the gate only
    promotes on evidence.
    """
    from dataclasses import replace

    if mode not in ("rmse", "twin", "both"):
        raise ValueError(f"unknown promotion mode {mode!r}; choose rmse, twin or both")
    out = replace(rmse, mode=mode, twin=twin)
    if rmse.champion_version is None or rmse.champion_rmse is None or mode == "rmse":
        return out if twin is None else replace(out, reason=f"{out.reason} {twin.reason}")
    rmse_note = f"RMSE: {rmse.reason}"
    if twin is None or twin.promote is None:
        why = "the twin comparison is unavailable" + (f" ({twin.reason})" if twin is not None else "")
        return replace(out, promote=False, reason=f"Kept: {why}. {rmse_note}")
    if mode == "twin":
        return replace(out, promote=twin.promote, reason=f"{twin.reason} ({rmse_note})")
    promote = rmse.promote and twin.promote
    return replace(out, promote=promote, reason=f"{'Both rules agree. ' if promote else ''}{rmse_note} {twin.reason}")


def apply_floor(decision: Decision, floor: FloorCheck, baseline: dict[str, float] | None = None) -> Decision:
    """The absolute floor over the relative verdict: a model below it is never promoted.

    Without a champion the relative rules cannot refuse anything, so the floor alone decides and
    the reason says so; with one, both must agree.
    """
    from dataclasses import replace

    base = {} if baseline is None else {"baseline_rmse": baseline.get("rmse"), "baseline_score": baseline.get("score")}
    if not floor.passed:
        return replace(decision, promote=False, floor=floor, **base,
                       reason=f"{floor.reason} (Relative rule: {decision.reason})")
    if decision.champion_version is None:
        return replace(decision, floor=floor, **base,
                       reason=f"No champion yet; {floor.reason[0].lower()}{floor.reason[1:]} "
                              f"The first model to meet it becomes champion.")
    return replace(decision, floor=floor, **base, reason=f"{floor.reason} {decision.reason}")


def decide_promotion(challenger_rmse: float, champion_rmse: float | None, margin: float, *,
                     challenger_version: str | None = None, champion_version: str | None = None,
                     eval_set: str = "", champion_error: str | None = None, time_unit: str) -> Decision:
    """Promote when there is no champion, or the challenger beats it by at least ``margin``.

    A champion that could not be evaluated on this data (``champion_error``) is kept: the gate
    only promotes on evidence. ``time_unit`` is the fleet contract's clock unit, the unit of the
    RMSEs and of ``margin``.
    """
    u = unit_label(time_unit)
    args = dict(challenger_version=challenger_version, challenger_rmse=challenger_rmse,
                champion_version=champion_version, champion_rmse=champion_rmse, margin=margin, eval_set=eval_set,
                time_unit=time_unit)
    if champion_version is None:
        return Decision(True, "No champion yet: the first model that meets the absolute floor becomes champion.",
                        **args)
    if champion_rmse is None:
        return Decision(False, f"The champion could not be evaluated on this data ({champion_error}).", **args)
    gain = champion_rmse - challenger_rmse
    if gain > 0 and gain >= margin:
        return Decision(True, f"The challenger is better by {gain:.3f} {u} of RMSE (margin {margin:g} {u}).",
                        **args)
    return Decision(False, f"The challenger is not better by the margin (gain {gain:.3f} {u} of RMSE < "
                           f"{margin:g} {u}, or no improvement).", **args)


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
        # The version the alias resolved to, not the alias: what a reader of the run can reopen.
        "model_uri": f"models:/{name}/{mv.version}",
        "model_id": getattr(mv, "model_id", None),
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


@task(name="train-evaluate-champion", cache_policy=NO_CACHE, retries=1, retry_delay_seconds=2,
      task_run_name=task_name("train-evaluate-champion", lambda p: model_version_of(p["model_uri"])))
def evaluate_task(model_uri: str, features: FeatureSetRef, params: TrainParams,
                  test_features: FeatureSetRef | None, tracking_uri: str) -> dict[str, Any]:
    """Score a registered model on this run's evaluation data.

    Returns:
        The regression metrics (``rmse``, ``mae``, ``score``, ``bias``, ``n``) and the scored
        ``true_rul``/``pred_rul`` lists (the twin gate builds the model's error model from them).
    """
    from twinflow import runtime

    rt = runtime.current()
    if rt is not None and rt.cluster is not None:
        # Loading and scoring a model is compute: one Dask task, this task run only waits for it.
        return runtime.run_on_cluster(score_model_uri, model_uri, features, params, test_features, tracking_uri,
                                      key="train-evaluate-champion")
    return score_model_uri(model_uri, features, params, test_features, tracking_uri)


def score_model_uri(model_uri: str, features: FeatureSetRef, params: TrainParams,
                    test_features: FeatureSetRef | None, tracking_uri: str) -> dict[str, Any]:
    """What :func:`evaluate_task` computes: the metrics and the scored RUL lists of one model."""
    ev, pred = predict_model_uri(model_uri, features, params, test_features, tracking_uri)
    return {**regression_metrics(pred, ev.true), "true_rul": ev.true.tolist(), "pred_rul": pred.tolist()}


def gate_twin(gate: TwinGateParams, snapshot: Any) -> tuple[Any, str | None]:
    """The twin the gate studies: the fleet's own, calibrated on the training features' lake snapshot.

    The models predict remaining life for this fleet, in its contract's clock unit; a twin of another
    fleet (the bundled FD001 one) would turn an error in hours into costs of cycles.

    Returns:
        ``(twin, None)``, or ``(None, why)`` when the snapshot cannot determine a twin (no
        run-to-failure lives, degenerate data): the gate then has no twin evidence, and says so.
    """
    from twinflow.tasks.twin.model import DegenerateCalibration, NoRunToFailureData
    from twinflow.tasks.twin.tasks import calibrate_twin

    try:
        model, _ = calibrate_twin.fn(gate.twin_params(), snapshot)
    except (NoRunToFailureData, DegenerateCalibration) as exc:
        return None, f"no twin of fleet dataset {snapshot.dataset!r} ({exc})"
    return model, None


def twin_comparison(challenger: tuple[Any, Any] | None, champion: tuple[Any, Any] | None, gate: TwinGateParams,
                    *, challenger_source: str = CHALLENGER, champion_source: str = CHAMPION,
                    client: Any = None, model: Any = None) -> TwinComparison:
    """The twin gate over two models' scored ``(true_rul, pred_rul)``: the same study, same seeds.

    Either side may be None (no champion yet, or no predictions): the other side's cost is still
    studied and logged, and ``promote`` is None. ``model`` is the twin to study on (see
    :func:`gate_twin`; None: the bundled FD001 twin).
    """
    notes, costs = [], {}
    for role, data, src in (("challenger", challenger, challenger_source), ("champion", champion, champion_source)):
        if data is None:
            continue
        try:
            costs[role] = policy_costs(error_model_of(data[0], data[1], src), gate, model=model, client=client)
        except ValueError as exc:
            notes.append(f"{role}: no error model ({exc})")
    if len(costs) == 2:
        out = compare_twin_costs(costs["challenger"], costs["champion"], gate.criterion, gate.margin)
        out.notes = notes
        return out
    reason = "; ".join(notes) or "no champion to compare against"
    if "challenger" in costs:
        c = costs["challenger"]
        reason = (f"Twin: {reason}; the challenger's best policy {c.best_policy} costs {c.expected_cost:,.0f} "
                  f"[{c.cost_ci_low:,.0f}, {c.cost_ci_high:,.0f}].")
    return TwinComparison(costs.get("challenger"), costs.get("champion"), None, reason, gate.criterion,
                          gate.margin, notes=notes)


def run_link(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    """Where a person opens the run: the MLflow UI URL on a tracking server, else ``runs:/`` + store."""
    if tracking_uri.startswith(("http://", "https://")):
        from twinflow.tracking import ui_link

        return ui_link(tracking_uri, experiment_id=experiment_id, run_id=run_id)
    return f"runs:/{run_id} (tracking store {tracking_uri}; `twinflow server` opens the MLflow UI)"


def run_markdown_link(tracking_uri: str, experiment_id: str, run_id: str, text: str | None = None) -> str:
    """A clickable markdown link to the run in the MLflow UI (relative to the UI that renders it on a
    local store, so it works on whatever port `twinflow server` serves), with the ``runs:/`` URI."""
    from twinflow.verdict import mlflow_route

    url = run_link(tracking_uri, experiment_id, run_id)
    if not url.startswith("http"):
        url = mlflow_route(experiment_id=experiment_id, run_id=run_id)
    return f"[{text or run_id}]({url}) (`runs:/{run_id}`)"


def version_description(decision: Decision, *, run_link_text: str, data: str, metrics: dict[str, float],
                        links: dict[str, str] | None = None) -> str:
    """The registry description of one model version, written for a decision.

    The verdict and the rule that made it first, then the metrics rounded with units (and the naive
    baseline's), the data it was trained on and markdown links (run, Prefect flow run, plots).
    """
    from twinflow.verdict import duration, links_line, metrics_line

    verdict = "promoted to champion" if decision.promote else "not promoted: stays challenger"
    lines = [f"**{decision.verdict}** ({verdict}). {decision.reason}",
             f"Evaluated on `{decision.eval_set}`: {metrics_line(metrics, time_unit=decision.time_unit)}."
             + ("" if decision.baseline_rmse is None else
                f" Naive {BASELINE_NAME}: RMSE {duration(decision.baseline_rmse, decision.time_unit)}."),
             f"Promotion mode `{decision.mode}`. Trained on: {data}.",
             f"MLflow run: {run_link_text}"]
    if links:
        lines.append(links_line(links))
    return "\n\n".join(lines)


@dataclass
class GateOutcome:
    """What one pass of the gate did in the registry."""

    decision: Decision
    version: str
    aliases: list[str]
    champion_rmse: float | None = None


def _run_logger():
    from prefect import get_run_logger

    try:
        return get_run_logger()
    except Exception:  # noqa: BLE001 - outside a flow or task run
        return log


def promotion_gate(client: Any, name: str, model_uri: str, challenger_rmse: float, eval_set: str,
                   features: FeatureSetRef, params: TrainParams, test_features: FeatureSetRef | None,
                   tracking_uri: str, *, challenger_true=None, challenger_pred=None,
                   challenger_metrics: dict[str, float] | None = None,
                   champion_scorer: Callable[[str], dict[str, Any]] | None = None,
                   baseline_metrics: dict[str, float] | None = None) -> GateOutcome:
    """Register a trained model as ``challenger`` and promote it to ``champion`` if it earns it.

    Runs inside the train flow, in its stage run: the current champion is scored on the same
    evaluation data by the ``train-evaluate-champion`` task; with ``params.promotion_mode`` ``twin``
    or ``both`` the fleet twin's policy study runs with each model's measured error model (same
    seeds) and compares their best policy costs (:mod:`twinflow.tasks.promotion`);
    :func:`decide_gate` decides. The decision is written as an MLflow table
    (``promotion/decision.json``), the twin study (``promotion/twin.json``), tags
    (``twinflow.promotion``, ``twinflow.registered_version``), metrics (``champion_eval_rmse``,
    ``gate_challenger_cost``/``gate_champion_cost`` with their CIs), the descriptions of the
    registered model and of the version, a Prefect markdown artifact (``train-promotion``) and
    one Prefect log line.

    Args:
        client: An ``mlflow.MlflowClient`` on the flow's tracking/registry store.
        name: The registered model name.
        model_uri: The logged model to register.
        challenger_rmse: Its eval RMSE on ``eval_set``.
        eval_set: The name of the evaluation data (both models are scored on it).
        features: The run's training features (the champion is scored on the same eval data).
        params: The run's train params (``promotion_margin``, ``promotion_mode``, ``twin_gate``).
        test_features: The run's test features, if any.
        tracking_uri: Where the evaluation task loads the champion from.
        challenger_true: The challenger's scored true RUL (for its twin error model).
        challenger_pred: Its predictions on those rows.
        challenger_metrics: Its metrics for the version description (``eval_score`` is shown in
            the decision).
        champion_scorer: Scores a champion model URI like ``train-evaluate-champion`` does (the
            default submits that task).
        baseline_metrics: The naive fleet-mean-life predictor's regression metrics on the same
            evaluation rows (``rmse``, ``score``), for the absolute floor (``params.promotion_floor``).

    Returns:
        The decision, the new version, its aliases after the gate and the champion's RMSE.
    """
    import mlflow
    from prefect.artifacts import create_markdown_artifact

    mode = params.promotion_mode
    challenger_metrics = dict(challenger_metrics or {})
    incumbent = champion_version(client, name)
    mv = mlflow.register_model(model_uri, name, tags={"twinflow.eval_set": eval_set})
    retry_store(client.set_registered_model_alias, name, CHALLENGER, mv.version)
    champ, champ_err = None, None
    if incumbent is not None:
        uri = f"models:/{name}/{incumbent.version}"
        try:
            champ = (champion_scorer(uri) if champion_scorer is not None else
                     evaluate_task.submit(uri, features, params, test_features, tracking_uri).result())
        except Exception as exc:  # the gate keeps the champion and records why
            champ_err = f"{exc.__class__.__name__}: {exc}"
            log.warning("champion v%s could not be scored: %s", incumbent.version, champ_err)
    champ_rmse = None if champ is None else champ["rmse"]
    rmse = decide_promotion(challenger_rmse, champ_rmse, params.promotion_margin,
                            challenger_version=str(mv.version),
                            champion_version=None if incumbent is None else str(incumbent.version),
                            eval_set=eval_set, champion_error=champ_err, time_unit=features.time_unit)
    rmse.challenger_score = challenger_metrics.get("eval_score")
    rmse.champion_score = None if champ is None else champ.get("score")
    twin = None
    if mode != "rmse":
        mine = None if challenger_true is None else (challenger_true, challenger_pred)
        theirs = None if champ is None or "true_rul" not in champ else (champ["true_rul"], champ["pred_rul"])
        from twinflow import runtime

        rt = runtime.current()  # the study's batches run on the cluster when there is one
        fleet_twin, no_twin = gate_twin(params.twin_gate, features.snapshot)
        if fleet_twin is None:
            twin = TwinComparison(None, None, None, f"Twin: {no_twin}.", params.twin_gate.criterion,
                                  params.twin_gate.margin, notes=[no_twin])
        else:
            twin = twin_comparison(mine, theirs, params.twin_gate, challenger_source=f"{name} v{mv.version}",
                                   champion_source=f"{name} v{None if incumbent is None else incumbent.version}",
                                   client=rt.cluster.client if rt is not None and rt.cluster is not None else None,
                                   model=fleet_twin)
    decision = decide_gate(mode, rmse, twin)
    floor_metrics = {"eval_rmse": challenger_rmse, **challenger_metrics}
    decision = apply_floor(decision, check_floor(floor_metrics, baseline_metrics, params.promotion_floor,
                                                 time_unit=features.time_unit), baseline_metrics)
    if decision.promote:
        retry_store(client.set_registered_model_alias, name, CHAMPION, mv.version)
        # One role per version: the promoted challenger is now the champion, not both.
        retry_store(client.delete_registered_model_alias, name, CHALLENGER)
        # Advisory (deployments/triggers.py: simulate-on-new-champion); never fails the promotion.
        emit_model_promoted(name, str(mv.version), mv.run_id, decision.event_payload())
    _record(client, name, str(mv.version), decision, features, challenger_metrics, champ_rmse, tracking_uri)
    create_markdown_artifact(decision.markdown(name), key="train-promotion",
                             description=f"promotion gate for {name} v{mv.version}")
    _run_logger().info(decision.summary(name))
    aliases = sorted(client.get_model_version(name, mv.version).aliases)
    return GateOutcome(decision, str(mv.version), aliases, champ_rmse)


def _record(client: Any, name: str, version: str, decision: Decision, features: FeatureSetRef,
            challenger_metrics: dict[str, float], champ_rmse: float | None, tracking_uri: str) -> None:
    """The decision in the active MLflow run and in the registry's descriptions."""
    import mlflow

    run = mlflow.active_run()
    mlflow.log_table(decision.table(), "promotion/decision.json")
    mlflow.set_tags({"twinflow.promotion": "promoted" if decision.promote else "kept",
                     "twinflow.promotion_mode": decision.mode, "twinflow.registered_version": version,
                     "twinflow.promotion_reason": decision.reason[:4000]})
    metrics = {} if champ_rmse is None else {"champion_eval_rmse": champ_rmse}
    if decision.champion_score is not None:
        metrics["champion_eval_score"] = decision.champion_score
    if decision.twin is not None:
        mlflow.log_dict(decision.twin.to_dict(), "promotion/twin.json")
        for role in (CHALLENGER, CHAMPION):
            side = getattr(decision.twin, role)
            if side is not None:
                metrics |= {f"gate_{role}_cost": side.expected_cost, f"gate_{role}_cost_ci_low": side.cost_ci_low,
                            f"gate_{role}_cost_ci_high": side.cost_ci_high, f"gate_{role}_p_best": side.p_best}
    mlflow.log_metrics({k: float(v) for k, v in metrics.items() if v is not None and np.isfinite(v)})
    link = run_markdown_link(tracking_uri, run.info.experiment_id, run.info.run_id) if run is not None else "—"
    snap = features.snapshot
    data = (f"features `{features.path}` ({features.rows:,} rows, {len(features.feature_columns)} feature columns, "
            f"params digest {features.params_digest}) from lake dataset `{snap.dataset}` (snapshot {snap.digest[:16]})")
    shown = {k: challenger_metrics.get(k) for k in ("eval_rmse", "eval_score", "eval_mae", "eval_late_fraction",
                                                      "eval_asymmetry", "eval_alpha_accuracy", "eval_pi_coverage")}
    if shown["eval_rmse"] is None:
        shown["eval_rmse"] = decision.challenger_rmse
    links = None
    if run is not None:
        from twinflow.verdict import plot_links, prefect_flow_run_url

        links = {"Prefect flow run": prefect_flow_run_url(),
                 **plot_links(run.info.experiment_id, run.info.run_id,
                              ["plots/pred_vs_true.png", "plots/residuals_per_asset.png"])}
    retry_store(client.update_model_version, name, version,
                description=version_description(decision, run_link_text=link, data=data, metrics=shown, links=links))
    champ = champion_version(client, name)
    champ_line = "no champion yet" if champ is None else f"`{CHAMPION}` is v{champ.version} (run {champ.run_id})"
    contract = "" if features.contract is None else f" of fleet contract `{features.contract.name}`"
    retry_store(client.update_registered_model, name, description=(
        f"Remaining-useful-life (RUL, {unit_label(features.time_unit)}) model of the twinflow predictive-maintenance "
        f"pipeline, trained on the telemetry features{contract}. {champ_line}.\n\n"
        f"Last gate, on v{version}: {decision.summary(name)}"))
