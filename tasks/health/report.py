"""The health run's figures and Markdown summary."""

from __future__ import annotations

import numpy as np
import pandas as pd


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def plot_risk_ranking(table: pd.DataFrame, top: int = 30):
    """Bar chart of P(failure within the alert horizon) of the riskiest assets, coloured by band."""
    plt = _plt()
    t = table.head(top)
    colours = {"low": "#4caf50", "elevated": "#ffc107", "high": "#ff7043", "critical": "#d32f2f"}
    fig, ax = plt.subplots(figsize=(7, max(3, 0.25 * len(t) + 1)))
    y = np.arange(len(t))[::-1]
    ax.barh(y, t["p_fail"].fillna(0).to_numpy(), color=[colours.get(b, "grey") for b in t["risk_band"]])
    ax.set_yticks(y, t["asset_id"].astype(str).tolist(), fontsize=7)
    h = t["alert_horizon"].iat[0] if len(t) else float("nan")
    unit = t["time_unit"].iat[0] if len(t) else ""
    ax.set(xlim=(0, 1), xlabel=f"P(failure within {h:g} {unit})", title=f"risk ranking (top {len(t)})")
    fig.tight_layout()
    return fig


def plot_rul_fans(grid: np.ndarray, posteriors: dict[str, np.ndarray], table: pd.DataFrame):
    """Remaining-life distributions (posterior survival curves with 10/50/90 % marks) of the riskiest assets."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    info = table.set_index("asset_id")
    for asset, post in posteriors.items():
        surv = 1.0 - np.cumsum(post)
        line, = ax.plot(grid, surv, label=f"{asset}")
        row = info.loc[asset]
        if np.isfinite(row["rul_estimate"]):
            ax.axvspan(row["rul_low"], row["rul_high"], color=line.get_color(), alpha=0.08)
            ax.axvline(row["rul_estimate"], color=line.get_color(), ls=":", lw=1)
    unit = table["time_unit"].iat[0] if len(table) else ""
    hi = max((float(grid[np.argmax(np.cumsum(p) >= 0.995)]) for p in posteriors.values()), default=float(grid[-1]))
    ax.set(xlim=(0, max(hi, 1.0)), ylim=(0, 1.02), xlabel=f"remaining life ({unit})", ylabel="P(still running)",
           title="remaining-life fan of the riskiest assets (dotted: model estimate, band: its interval)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_health_trends(history: pd.DataFrame, assets: list[str]):
    """Health index and P(failure) per run for ``assets`` (from the fleet_health table's history)."""
    plt = _plt()
    fig, axes = plt.subplots(2, 1, figsize=(7, 5), sharex=True)
    h = history[history["asset_id"].isin(assets)].sort_values("scored_at")
    for a, g in h.groupby("asset_id"):
        x = pd.to_datetime(g["scored_at"], utc=True, format="ISO8601")
        axes[0].plot(x, g["health_index"], marker="o", ms=3, label=str(a))
        axes[1].plot(x, g["p_fail"], marker="o", ms=3, label=str(a))
    axes[0].set(ylabel="health index", ylim=(-0.02, 1.02), title="health trends (one point per health run)")
    axes[1].set(ylabel="P(failure within H)", ylim=(-0.02, 1.02), xlabel="health run")
    axes[0].legend(fontsize=7, ncol=2)
    fig.autofmt_xdate()
    fig.tight_layout()
    return fig


def artifact_rows(table: pd.DataFrame, top: int = 200) -> list[dict]:
    """The ranked table as rows for a Prefect table artifact (readable, rounded)."""
    cols = ["risk_rank", "asset_id", "risk_band", "p_fail", "rul_estimate", "rul_low", "rul_high", "health_index",
            "anomaly_score", "action", "due_by", "expected_cost", "evidence", "status", "reason"]
    t = table.head(top)[cols].copy()
    for c in ("p_fail", "health_index"):
        t[c] = t[c].round(3)
    for c in ("rul_estimate", "rul_low", "rul_high", "anomaly_score", "expected_cost"):
        t[c] = t[c].round(1)
    return t.astype(object).where(t.notna(), None).to_dict("records")


def summary_markdown(table: pd.DataFrame, *, dataset: str, version, model: str, run_id: str | None,
                     drift: pd.DataFrame | None, announced: list[str], notes: list[str], links: dict[str, str]) -> str:
    """The markdown summary: counts by band and status, the riskiest assets, drift, what was announced."""
    n = len(table)
    h = table["alert_horizon"].iat[0] if n else float("nan")
    unit = table["time_unit"].iat[0] if n else ""
    lines = [f"# Fleet health `{dataset}` (table version {version})", "",
             f"- assets: {n:,}; scored {int((table.status == 'scored').sum()):,}, partial "
             f"{int((table.status == 'partial').sum()):,}, skipped {int((table.status == 'skipped').sum()):,}",
             f"- model: {model}", f"- bands (P(failure within {h:g} {unit})): " + ", ".join(
                 f"{b} {int((table.risk_band == b).sum())}" for b in ("critical", "high", "elevated", "low")),
             f"- work orders: {int(table.action.str.startswith(('maintain', 'schedule')).sum())}",
             f"- announced (`twinflow.asset.at_risk`): {', '.join(announced) or 'none'}"]
    if run_id:
        lines.append(f"- MLflow run: `{run_id}`")
    lines += [f"- {k}: {v}" for k, v in links.items()]
    lines += ["", "## Riskiest assets", "", "| # | asset | band | P(fail) | RUL (interval) | health | action | due by | evidence |",
              "|---:|---|---|---:|---|---:|---|---|---|"]
    for r in table.head(15).itertuples(index=False):
        rul = f"{r.rul_estimate:.0f} ({r.rul_low:.0f}-{r.rul_high:.0f})" if np.isfinite(r.rul_estimate) else "–"
        p = f"{r.p_fail:.0%}" if np.isfinite(r.p_fail) else "–"
        hi = f"{r.health_index:.2f}" if np.isfinite(r.health_index) else "–"
        lines.append(f"| {r.risk_rank} | {r.asset_id} | {r.risk_band} | {p} | {rul} | {hi} | {r.action} | "
                     f"{r.due_by or '–'} | {r.evidence or r.reason or ''} |")
    skipped = table[table.reason != ""]
    if len(skipped):
        lines += ["", "## Assets with reasons", ""] + [f"- `{r.asset_id}` ({r.status}): {r.reason}"
                                                          for r in skipped.head(30).itertuples(index=False)]
    if drift is not None and len(drift):
        top = drift.sort_values("psi", ascending=False).head(10)
        lines += ["", "## Drift vs the champion's training data (top PSI)", "", "| channel | regime | PSI | KS |",
                  "|---|---|---:|---:|"]
        lines += [f"| {r.channel} | {r.regime} | {r.psi:.3f} | {r.ks:.3f} |" for r in top.itertuples(index=False)]
    if notes:
        lines += ["", "## Method notes", ""] + [f"- {x}" for x in notes]
    return "\n".join(lines)
