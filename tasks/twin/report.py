"""The policy study's report: calibration and cost figures, the Markdown table, the MLflow run."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from twinflow.refs import LakeSnapshot
from twinflow.tasks.twin.calibration import CalibrationReport
from twinflow.tasks.twin.fleet import health_fan
from twinflow.tasks.twin.model import TwinModel, TwinParams, unit_label
from twinflow.tasks.twin.rul_error import RulErrorModel


def study_figures(model: TwinModel, report: CalibrationReport, rows: list[dict], params: TwinParams) -> dict[str, Any]:
    """The study's figures by artifact path: calibration lifetimes, cost vs policy, health fan."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    figs = {}
    u = unit_label(model.time_unit)  # durations are in the clock unit of the twin's contract
    # Calibration: lifetime distributions, observed vs simulated.
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    obs, sim = np.sort(report.observed_lifetimes), np.sort(report.simulated_lifetimes)
    bins = np.linspace(min(obs.min(), sim.min()), max(obs.max(), sim.max()), 30)
    ax[0].hist(obs, bins=bins, density=True, alpha=0.6, label=f"observed (n={len(obs)})")
    ax[0].hist(sim, bins=bins, density=True, alpha=0.6, label=f"simulated (n={len(sim)})")
    ax[0].set_xlabel(f"lifetime ({u})")
    ax[0].set_ylabel(f"density (share of assets per {u})")
    ax[0].set_title("lifetimes: observed vs simulated")
    ax[0].legend()
    ax[1].step(obs, np.arange(1, len(obs) + 1) / len(obs), where="post", label="observed")
    ax[1].step(sim, np.arange(1, len(sim) + 1) / len(sim), where="post", label="simulated")
    ax[1].set_xlabel(f"lifetime ({u})")
    ax[1].set_ylabel("ECDF")
    ax[1].set_title(f"two-sample KS = {report.ks_statistic:.3f}")
    ax[1].legend()
    fig.tight_layout()
    figs["plots/calibration_lifetimes.png"] = fig

    # Cost vs policy parameter, with 95% CIs; the recommended policy marked.
    cur = params.costs.currency
    rec = next((r for r in rows if r.get("recommended")), None)
    fig, ax = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    rtf = next(r for r in rows if r["kind"] == "run_to_failure")
    for a, kind, xlabel in ((ax[0], "predictive", f"RUL threshold ({u})"),
                            (ax[1], "fixed_interval", f"maintenance interval k ({u})")):
        sel = [r for r in rows if r["kind"] == kind]
        if sel:
            x = [r["value"] for r in sel]
            y = np.array([r["expected_cost"] for r in sel])
            err = np.array([[r["expected_cost"] - r["cost_ci_low"] for r in sel],
                            [r["cost_ci_high"] - r["expected_cost"] for r in sel]])
            a.errorbar(x, y, yerr=err, marker="o", capsize=3, label=f"{kind.replace('_', ' ')} (95% CI)")
            best_here = min(sel, key=lambda r: r["expected_cost"])
            if rec is not None and best_here["policy"] == rec["policy"]:
                a.scatter([best_here["value"]], [best_here["expected_cost"]], s=180, marker="*", color="crimson",
                          zorder=5, label=f"recommended: {rec['policy']}")
        a.axhline(rtf["expected_cost"], color="grey", ls="--", label="run to failure")
        a.set_xlabel(xlabel)
        a.set_title(("predictive (act on the RUL estimate)" if kind == "predictive" else "fixed interval"),
                    fontsize=10)
        a.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:,.0f}"))
        a.legend(fontsize=8)
    ax[0].set_ylabel(f"expected fleet cost ({cur})")
    fig.suptitle(f"Expected cost of a {params.n_assets:,}-asset fleet over {params.horizon:,} {u} by policy "
                 f"({params.n_scenarios:,} scenarios)", fontsize=11)
    fig.tight_layout()
    figs["plots/cost_vs_threshold.png"] = fig

    # Fan chart of simulated health trajectories.
    fan = health_fan(model, params.fan_units, seed=params.seed)
    fig, ax = plt.subplots(figsize=(7, 4))
    q, c = fan["q"], fan["cycle"]
    ax.fill_between(c, q[0], q[-1], alpha=0.25, label="5-95%")
    ax.fill_between(c, q[1], q[-2], alpha=0.4, label="25-75%")
    ax.plot(c, q[2], label="median")
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xlabel("cycle since installation" if model.time_unit == "cycle" else f"time since installation ({u})")
    ax.set_ylabel("health h")
    # fan_units sample trajectories, not the studied fleet (n_assets): the title says which.
    ax.set_title(f"health of {params.fan_units} simulated units, run to failure\n"
                 f"(trajectory sample; the policy study's fleet is {params.n_assets} assets)", fontsize=10)
    ax.legend()
    fig.tight_layout()
    figs["plots/health_fan.png"] = fig
    return figs


def _fmt_ci(m: float, lo: float, hi: float, digits: int = 0) -> str:
    if not math.isfinite(lo):
        return f"{m:,.{digits}f}"
    return f"{m:,.{digits}f} [{lo:,.{digits}f}, {hi:,.{digits}f}]"


def policy_markdown(rows: list[dict], best: str, params: TwinParams, report: CalibrationReport,
                    error_model: RulErrorModel, cost_note: str | None = None) -> str:
    """The policy table and the recommendation as Markdown (``cost_note``: how a failure was priced,
    from :meth:`CostModel.priced_by_mode`)."""
    rec = next(r for r in rows if r["policy"] == best)
    u = unit_label(report.time_unit)  # durations are in the clock unit of the twin's contract
    per = "cycle" if report.time_unit == "cycle" else report.time_unit
    p_best = f", probability best {rec['p_best']:.0%}" if "p_best" in rec else ""
    lines = [
        "# Digital twin: maintenance policy study",
        "",
        f"**Recommended policy: `{best}`** (least expected cost "
        f"{_fmt_ci(rec['expected_cost'], rec['cost_ci_low'], rec['cost_ci_high'])}{p_best}: the share of the "
        f"paired scenarios in which it is the cheapest). {params.n_scenarios} scenarios x "
        f"{params.n_assets} assets x {params.horizon} {u}; 95% confidence intervals.",
        "",
        f"| policy | expected cost ({params.costs.currency}) | availability | failures | planned stops | P(best) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        mark = " **(recommended)**" if r["policy"] == best else ""
        lines.append(
            f"| {r['policy']}{mark} | {_fmt_ci(r['expected_cost'], r['cost_ci_low'], r['cost_ci_high'])} | "
            f"{_fmt_ci(100 * r['availability'], 100 * r['availability_ci_low'], 100 * r['availability_ci_high'], 2)} % | "
            f"{_fmt_ci(r['failures'], r['failures_ci_low'], r['failures_ci_high'], 1)} | {r['planned']:,.1f} | "
            f"{r.get('p_best', float('nan')):.0%} |")
    c = params.costs
    lines += [
        "",
        f"Costs ({c.currency}, for a fleet of {params.n_assets:,} assets over {params.horizon:,} {u}): failure "
        f"{c.failure:,.0f} (+{c.failure_downtime} {u} down), planned {c.planned:,.0f} "
        f"(+{c.planned_downtime} {u} down), downtime {c.downtime_per_cycle:,.0f}/asset-{per}."
        f"{f' Failure modes: {cost_note}.' if cost_note else ''}",
        f"Calibration: {report.n_assets} run-to-failure assets"
        f"{f' (fleet contract {report.contract.name} v{report.contract.version})' if report.contract else ''}, "
        f"lifetime KS statistic "
        f"{report.ks_statistic:.3f}{' (fallback parameters)' if report.fallback else ''}"
        f"{_lives_line(report, u)}.",
        f"RUL estimate error: {error_model.kind} ({error_model.source}), inspections every "
        f"{params.inspect_every} {u}.",
    ]
    return "\n".join(lines)


def log_study_run(params: TwinParams, model: TwinModel, report: CalibrationReport, error_model: RulErrorModel,
                  rows: list[dict], best: str, markdown: str, snapshot: LakeSnapshot | None) -> str:
    """Log the study as the ``simulate`` MLflow run (params, per-policy metrics, twin, figures).

    Returns:
        The run id.
    """
    import matplotlib.pyplot as plt
    import mlflow

    from twinflow.tracking import log_lake_input, tracked_run
    from twinflow.verdict import (
        best_fixed_interval,
        mlflow_route,
        plot_links,
        prefect_flow_run_url,
        scale_line,
        set_description,
        simulate_description,
    )

    tags = {"twinflow.recommended_policy": best, "twinflow.twin_source": model.source,
            "twinflow.rul_error_model": f"{error_model.kind}: {error_model.source}"[:250]}
    version = model_version_of_source(error_model.source)
    if version is not None:
        tags["twinflow.model_version"] = f"{version[0]} v{version[1]}"
        tags["twinflow.model_uri"] = error_model.source
    if snapshot is not None:
        tags["twinflow.snapshot"] = f"{snapshot.dataset}@{snapshot.digest}"
    if model.contract is not None:
        ref = model.contract.ref
        tags.update({"twinflow.contract.name": ref.name, "twinflow.contract.version": str(ref.version),
                     "twinflow.contract.digest": ref.digest, "twinflow.contract.time_unit": model.time_unit})
    with tracked_run("simulate", stage="simulate", params=params, tags=tags) as run:
        if snapshot is not None:
            log_lake_input(snapshot, context="calibration")
        if version is not None:
            _log_model_input(*version)
        rec = next(r for r in rows if r["policy"] == best)
        fixed = best_fixed_interval(rows)
        rtf = next((r for r in rows if r["kind"] == "run_to_failure"), None)
        # Headline metrics only (the runs table shows these); every policy's numbers are in the
        # ``twin/policies_table.json`` table artifact.
        metrics = {"calibration_ks": report.ks_statistic, "calibration_assets": report.n_assets,
                   "twin_b": report.b}
        metrics.update(lives_metrics(report))
        for key in ("expected_cost", "cost_ci_low", "cost_ci_high", "p_best"):
            metrics[f"recommended_{key}"] = rec.get(key)
        if fixed is not None:
            metrics["best_fixed_interval_cost"] = fixed["expected_cost"]
            metrics["saving_vs_fixed_interval"] = fixed["expected_cost"] - rec["expected_cost"]
        if rtf is not None:
            metrics["run_to_failure_cost"] = rtf["expected_cost"]
        mlflow.log_metrics({k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(v)})
        import pandas as pd

        table = pd.DataFrame(rows)
        table.insert(1, "recommended", table["policy"] == best)
        table["currency"] = params.costs.currency
        mlflow.log_table(table, "twin/policies_table.json")
        mlflow.log_dict(model.model_dump(), "twin/model.json")
        mlflow.log_dict(report.model_dump(), "twin/calibration.json")
        mlflow.log_dict({"recommended": best, "policies": rows}, "twin/policies.json")
        mlflow.log_text(markdown, "twin/policy_study.md")
        marked = [{**r, "recommended": r["policy"] == best} for r in rows]
        names = []
        for name, fig in study_figures(model, report, marked, params).items():
            mlflow.log_figure(fig, name)
            names.append(name)
            plt.close(fig)
        eid, rid = run.info.experiment_id, run.info.run_id
        links = {"Prefect flow run": prefect_flow_run_url()}
        parent = mlflow.MlflowClient().get_run(rid).data.tags.get("mlflow.parentRunId")
        if parent:
            links["pipeline run"] = mlflow_route(experiment_id=eid, run_id=parent)
        if version is not None:
            links[f"model version v{version[1]}"] = mlflow_route(model=version[0], version=version[1])
        links.update(plot_links(eid, rid, names))
        links["policy table"] = mlflow_route(experiment_id=eid, run_id=rid, artifact="twin/policies_table.json")
        set_description(simulate_description(
            rows=rows, policy=best, currency=params.costs.currency,
            scale=scale_line(params.n_assets, params.horizon, params.n_scenarios, time_unit=model.time_unit),
            error_source=error_model.source,
            model_version=None if version is None else f"{version[0]} v{version[1]}",
            snapshot=None if snapshot is None else f"{snapshot.dataset}@{snapshot.digest[:16]}", links=links))
        return rid


def model_version_of_source(source: str) -> tuple[str, str] | None:
    """``(name, version)`` from an error model's source ``models:/<name>/<version>``, else None."""
    if not source.startswith("models:/"):
        return None
    name, _, version = source[len("models:/"):].rpartition("/")
    return (name, version) if name and version.isdigit() else None


def _log_model_input(name: str, version: str) -> None:
    """Record the registered model version the study used as the run's model input (MLflow 3)."""
    import logging

    import mlflow

    try:
        from mlflow.entities import LoggedModelInput

        mv = mlflow.MlflowClient().get_model_version(name, version)
        if getattr(mv, "model_id", None):
            mlflow.log_inputs(models=[LoggedModelInput(mv.model_id)])
    except Exception as exc:  # noqa: BLE001 - lineage is informative; the tags name the version anyway
        logging.getLogger("twinflow.simulate").warning("model input %s v%s not logged: %s", name, version, exc)


def _lives_line(report, unit: str) -> str:
    """The lifetime check with suspensions, for the calibration line (empty without life segments)."""
    lives, out = report.lives, ""
    if lives is None:
        return out
    out = f"; {lives.failures} failures and {lives.suspensions} suspensions"
    if report.lifetime_fit is not None:
        out += (f", simulated lifetimes matched to their lognormal with suspensions (median "
                f"{report.lifetime_fit.median:,.0f} {unit})")
    if lives.twin_km is not None:
        out += (f", {lives.twin_km.inside_share:.0%} of the twin's survival curve inside the Kaplan-Meier band "
                f"({'passed' if lives.twin_km.passed else 'FAILED'})")
    return out


def lives_metrics(report) -> dict[str, float]:
    """The lifetime check with suspensions as MLflow metrics (empty without life segments)."""
    lives = report.lives
    if lives is None:
        return {}
    out = {"lives_failures": lives.failures, "lives_suspensions": lives.suspensions,
           "lives_unobserved_start": lives.unobserved_start}
    if lives.weibull is not None:
        out.update(weibull_shape=lives.weibull.shape, weibull_scale=lives.weibull.scale,
                   weibull_location=lives.weibull.location)
    if lives.weibull_km is not None:
        out["weibull_km_inside"] = lives.weibull_km.inside_share
    if lives.twin_km is not None:
        out["calibration_km_inside"] = lives.twin_km.inside_share
    if report.lifetime_fit is not None:
        out.update(lifetime_median=report.lifetime_fit.median, lifetime_log_sd=report.lifetime_fit.sigma)
    for mode, m in lives.by_mode.items():
        key = "".join(ch if ch.isalnum() or ch in "_-." else "_" for ch in mode)
        out[f"mode_{key}_share"] = m.share
        if m.weibull is not None:
            out.update({f"mode_{key}_weibull_shape": m.weibull.shape, f"mode_{key}_weibull_scale": m.weibull.scale})
        if m.weibull_km is not None:
            out[f"mode_{key}_weibull_km_inside"] = m.weibull_km.inside_share
    return {k: float(v) for k, v in out.items()}
