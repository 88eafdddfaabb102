"""Run descriptions written for a decision: the verdict first, rounded numbers with units, clickable links.

A reviewer opening a run in the MLflow UI reads its description (the ``mlflow.note.content`` tag)
before anything else. These helpers turn a stage's results into that text: the verdict and the rule
that made it, the few numbers that matter rounded with their units, the recommended maintenance
policy against the best fixed-interval one with currency and the fleet/horizon it was costed on,
and markdown links to the Prefect flow run, the sibling runs and the key plots.

Links into the MLflow UI are fragment routes (``#/experiments/<id>/runs/<id>``): the UI renders
descriptions inside its own page, so a fragment link works on whatever host and port serves it
(``twinflow server`` picks a port per home); they carry ``workflowType`` so the classic view opens.
Everything here is pure apart from :func:`set_description`.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping

from twinflow.contract.model import unit_label
from twinflow.tracking import WORKFLOW_PARAM

NOTE_TAG = "mlflow.note.content"

# The unit of a duration metric: the fleet contract's clock unit, filled in when it is written
# (cycles for C-MAPSS, hours for a timestamp clock ...), never a fixed word.
DURATION = "{time}"

# metric key -> (label, unit, format); the order is the order shown.
METRIC_FORMATS: dict[str, tuple[str, str, str]] = {
    "eval_rmse": ("RMSE", DURATION, "{:.1f}"),
    "eval_mae": ("MAE", DURATION, "{:.1f}"),
    "eval_score": ("PHM08 score", "", "{:,.0f}"),
    "eval_bias": ("bias", DURATION, "{:+.1f}"),
    "eval_late_fraction": ("late estimates", "", "{:.0%}"),
    "eval_alpha_accuracy": ("α-λ accuracy", "", "{:.0%}"),
    "eval_pi_coverage": ("interval coverage", "", "{:.0%}"),
    "eval_asymmetry": ("late/early asymmetry", "", "{:.2f}"),
}


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def duration(value: float, time_unit: str, fmt: str = "{:.1f}") -> str:
    """A duration with the clock's unit: ``14.2 cycles``, ``28.0 h``."""
    return f"{fmt.format(value)} {unit_label(time_unit)}"


def fmt_metric(key: str, value: float | None, *, time_unit: str) -> str:
    """One metric as ``label value unit`` (``RMSE 14.2 cycles``, ``RMSE 28.0 h``); ``label —`` when missing.

    Args:
        key: The metric key (``eval_rmse`` ...); unknown keys are written as they are.
        value: Its value.
        time_unit: The fleet contract's clock unit (``contract.clock.time_unit``): the unit of the
            duration metrics (RMSE, MAE, bias).
    """
    label, unit, fmt = METRIC_FORMATS.get(key, (key, "", "{:.3g}"))
    if key == "eval_score" and time_unit != "cycle":
        # PHM08's time constants (13 and 10) are cycles of the C-MAPSS challenge: summed over errors in
        # another unit the score is no figure to set beside a C-MAPSS one, and the label says so.
        label = f"{label} (errors in {unit_label(time_unit)})"
    if not _finite(value):
        return f"{label} —"
    return f"{label} {duration(value, time_unit, fmt)}" if unit == DURATION else f"{label} {fmt.format(value)}{unit}"


def metrics_line(metrics: Mapping[str, float | None], *, time_unit: str) -> str:
    """The known metrics present in ``metrics``, rounded with units (durations in ``time_unit``), in a stable order."""
    shown = [fmt_metric(k, metrics[k], time_unit=time_unit) for k in METRIC_FORMATS
             if k in metrics and _finite(metrics[k])]
    return ", ".join(shown) or "no metrics"


def money(value: float | None, currency: str) -> str:
    """A cost rounded to whole units with its currency: ``1,241,000 EUR``."""
    return f"{value:,.0f} {currency}" if _finite(value) else "—"


def mlflow_route(*, experiment_id: str | None = None, run_id: str | None = None, artifact: str | None = None,
                 model: str | None = None, version: str | int | None = None) -> str:
    """A fragment link into the MLflow UI (run, run artifact, model or model version), classic view."""
    from urllib.parse import quote

    if model is not None:
        route = f"/models/{quote(model, safe='')}" + (f"/versions/{version}" if version is not None else "")
    else:
        route = f"/experiments/{experiment_id}" + (f"/runs/{run_id}" if run_id else "")
        if artifact:
            route += f"/artifacts/{artifact}"
    return f"#{route}?{WORKFLOW_PARAM}"


def md_link(text: str, url: str | None) -> str:
    """``[text](url)``, or the bare text when there is no URL."""
    return f"[{text}]({url})" if url else text


def links_line(links: Mapping[str, str | None]) -> str:
    """``Links: [a](u) · [b](v)`` from ``{text: url}`` (entries without a URL are left out)."""
    shown = [md_link(k, v) for k, v in links.items() if v]
    return ("Links: " + " · ".join(shown)) if shown else ""


def plot_links(experiment_id: str, run_id: str, plots: Iterable[str]) -> dict[str, str]:
    """``{plot name: link}`` to a run's PNG artifacts (``plots/x.png`` -> ``x``)."""
    return {p.rsplit("/", 1)[-1].removesuffix(".png").replace("_", " "):
            mlflow_route(experiment_id=experiment_id, run_id=run_id, artifact=p) for p in plots}


def scale_line(n_assets: int, horizon: int, n_scenarios: int, *, time_unit: str) -> str:
    """What a cost is a cost of: the fleet size, the horizon (in the twin's clock unit) and how many
    scenarios averaged it."""
    return (f"expected cost of a fleet of {n_assets:,} assets over {horizon:,} {unit_label(time_unit)} "
            f"(mean of {n_scenarios:,} simulated scenarios, 95% CI)")


def best_fixed_interval(rows: list[dict]) -> dict | None:
    """The cheapest fixed-interval policy row, or None when none was studied."""
    fixed = [r for r in rows if r.get("kind") == "fixed_interval" and _finite(r.get("expected_cost"))]
    return min(fixed, key=lambda r: r["expected_cost"]) if fixed else None


def policy_verdict(rows: list[dict], recommended: str, currency: str) -> str:
    """The recommended policy against the best fixed-interval policy (and run-to-failure), in one sentence."""
    rec = next((r for r in rows if r.get("policy") == recommended), None)
    if rec is None:
        return f"Recommended policy `{recommended}`."
    ci = ""
    if _finite(rec.get("cost_ci_low")) and _finite(rec.get("cost_ci_high")):
        ci = f" [95% CI {rec['cost_ci_low']:,.0f} to {rec['cost_ci_high']:,.0f}]"
    text = f"Recommended policy **`{recommended}`**: {money(rec['expected_cost'], currency)}{ci}"
    fixed = best_fixed_interval(rows)
    if fixed is not None and fixed["policy"] != recommended:
        saving = fixed["expected_cost"] - rec["expected_cost"]
        share = saving / fixed["expected_cost"] if fixed["expected_cost"] else float("nan")
        text += (f", {money(abs(saving), currency)} ({abs(share):.0%}) "
                 f"{'cheaper' if saving >= 0 else 'dearer'} than the best fixed-interval policy "
                 f"`{fixed['policy']}` ({money(fixed['expected_cost'], currency)})")
    elif fixed is None:
        text += " (no fixed-interval policy was studied)"
    rtf = next((r for r in rows if r.get("kind") == "run_to_failure"), None)
    if rtf is not None and rtf.get("policy") != recommended:
        text += f"; run to failure costs {money(rtf['expected_cost'], currency)}"
    return text + "."


def set_description(text: str, run_id: str | None = None) -> None:
    """Write ``text`` as the description of the active run (or of ``run_id``)."""
    import mlflow

    from twinflow.tracking import retry_store

    if run_id is None:
        mlflow.set_tag(NOTE_TAG, text)
    else:
        retry_store(mlflow.MlflowClient().set_tag, run_id, NOTE_TAG, text)


def prefect_flow_run_url() -> str | None:
    """The Prefect UI URL of the current flow run (None outside one)."""
    from twinflow.tracking import PREFECT_URL_TAG, prefect_tags

    return prefect_tags().get(PREFECT_URL_TAG)


def train_description(*, model_name: str | None, version: str | None, decision: Any, metrics: Mapping[str, float],
                      eval_set: str, experiment_id: str, run_id: str, plots: Iterable[str],
                      prefect_url: str | None = None, parent_run_id: str | None = None,
                      best_trial_run_id: str | None = None, gate_scale: str | None = None,
                      currency: str = "", time_unit: str) -> str:
    """The train run's description: the promotion verdict and rule, metrics with units, links.

    Args:
        model_name: The registered model (None with the registry off).
        version: Its new version.
        decision: The gate's :class:`twinflow.tasks.registry.Decision` (None with the registry off).
        metrics: The run's metrics (``eval_*``).
        eval_set: What the metrics were measured on.
        experiment_id: The run's experiment (for links).
        run_id: The run.
        plots: Its plot artifact paths.
        prefect_url: The train flow run in the Prefect UI.
        parent_run_id: The pipeline run, if any.
        best_trial_run_id: The best trial's child run.
        gate_scale: What the twin gate's costs are costs of (fleet, horizon, scenarios).
        currency: The twin gate's currency.
        time_unit: The fleet contract's clock unit (the unit of RMSE, MAE and bias).
    """
    if decision is None:
        head = "**NO VERDICT** (registry off: the model was logged, not gated)."
    else:
        head = f"**{decision.verdict}**: {model_name} v{version}. Rule: {decision.reason}"
    body = [head, f"Evaluated on `{eval_set}`: {metrics_line(metrics, time_unit=time_unit)}."]
    if decision is not None and decision.baseline_rmse is not None:
        body.append("Naive fleet-mean-life baseline on the same rows: "
                    f"RMSE {duration(decision.baseline_rmse, time_unit)}.")
    twin = None if decision is None else decision.twin
    if twin is not None and twin.challenger is not None:
        c = twin.challenger
        body.append(f"Twin gate: this model's best policy `{c.best_policy}` costs {money(c.expected_cost, currency)} "
                    f"[95% CI {c.cost_ci_low:,.0f} to {c.cost_ci_high:,.0f}]"
                    + ("" if twin.champion is None else
                       f" against the champion's {money(twin.champion.expected_cost, currency)}")
                    + (f"; {gate_scale}, a smaller study than the simulate stage's" if gate_scale else "") + ".")
    links: dict[str, str | None] = {"Prefect flow run": prefect_url}
    if parent_run_id:
        links["pipeline run"] = mlflow_route(experiment_id=experiment_id, run_id=parent_run_id)
    if best_trial_run_id:
        links["best trial"] = mlflow_route(experiment_id=experiment_id, run_id=best_trial_run_id)
    if model_name and version:
        links[f"model version v{version}"] = mlflow_route(model=model_name, version=version)
    links.update(plot_links(experiment_id, run_id, plots))
    links["promotion decision"] = mlflow_route(experiment_id=experiment_id, run_id=run_id,
                                               artifact="promotion/decision.json") if decision is not None else None
    body.append(links_line(links))
    return "\n\n".join(body)


def trial_run_name(trial: int, hparams: Mapping[str, Any], val_rmse: float) -> str:
    """A trial run's name from its validation score and hyperparameters (sorts by score as text).

    ``val 18.42 · t03 · lr=0.05 depth=6``: long hyperparameter names are shortened to their
    initials so the name fits the runs table's column.
    """
    def initials(k: str) -> str:
        parts = k.split("_")
        return k if len(parts) == 1 else "".join(p[0] for p in parts)

    # Initials only where they name one hyperparameter: learning_rate and l2_regularization are both
    # "lr", and "lr=0 lr=0.03" in a run name says nothing.
    counts: dict[str, int] = {}
    for k in hparams:
        counts[initials(k)] = counts.get(initials(k), 0) + 1

    def short(k: str) -> str:
        return initials(k) if counts[initials(k)] == 1 else k

    def val(v: Any) -> str:
        return f"{v:g}" if isinstance(v, float) else str(v)

    hps = " ".join(f"{short(k)}={val(v)}" for k, v in sorted(hparams.items()))
    return f"val {val_rmse:.2f} · t{trial:02d} · {hps}"[:250]


def pipeline_description(*, promoted: bool | None, model_name: str | None, version: str | None, reason: str,
                         metrics: Mapping[str, float], eval_set: str, policy: str | None, rows: list[dict],
                         currency: str, scale: str, experiment_id: str, links: Mapping[str, str | None],
                         time_unit: str) -> str:
    """The pipeline run's description: is the model good enough, and what does the twin recommend?

    ``time_unit`` is the fleet contract's clock unit: the unit of the RMSE, MAE and bias shown.
    """
    if promoted is None:
        head = "**NO MODEL VERDICT** (the train stage did not run or the registry is off)."
    else:
        head = (f"**{'PROMOTED' if promoted else 'NOT PROMOTED'}**: {model_name} v{version}"
                f"{' is the new champion' if promoted else ' stays challenger'}. Rule: {reason}")
    body = [head]
    if metrics:
        body.append(f"Evaluated on `{eval_set}`: {metrics_line(metrics, time_unit=time_unit)}.")
    if policy is not None:
        body.append(f"{policy_verdict(rows, policy, currency)} Costs are the {scale}.")
    body.append(links_line(links))
    return "\n\n".join(b for b in body if b)


def simulate_description(*, rows: list[dict], policy: str, currency: str, scale: str, model_version: str | None,
                         error_source: str, snapshot: str | None, links: Mapping[str, str | None]) -> str:
    """The simulate run's description: the recommendation against the best fixed interval, what it rests on."""
    body = [policy_verdict(rows, policy, currency), f"Costs are the {scale}.",
            f"RUL error model: {error_source}" + (f" (model version {model_version})" if model_version else
                                                  " (no registered model: stated fallback)") + ".",
            f"Twin calibrated on lake snapshot `{snapshot}`." if snapshot else
            "Twin calibrated on the bundled FD001 training set.",
            links_line(links)]
    return "\n\n".join(b for b in body if b)
