"""What ``twinflow health`` prints: the ranked fleet as a rich table, from the ``fleet_health`` table."""

from __future__ import annotations

__all__ = ["health_table", "latest_rows"]


def health_table(rows, title: str, top: int):
    """A rich table of the ranked fleet: band, P(failure), RUL with interval, health, action, due by, evidence."""
    from rich.table import Table

    colours = {"critical": "bold red", "high": "red", "elevated": "yellow", "low": "green"}
    table = Table(title=title)
    for col, just in (("#", "right"), ("asset", "left"), ("band", "left"), ("P(fail)", "right"),
                      ("RUL (interval)", "right"), ("health", "right"), ("action", "left"), ("due by", "left"),
                      ("evidence / reason", "left")):
        table.add_column(col, justify=just)
    import math

    for r in rows.head(top).itertuples(index=False):
        rul = f"{r.rul_estimate:.0f} ({r.rul_low:.0f}-{r.rul_high:.0f})" if math.isfinite(r.rul_estimate) else "–"
        table.add_row(str(r.risk_rank), str(r.asset_id), f"[{colours.get(r.risk_band, '')}]{r.risk_band}[/]",
                      f"{r.p_fail:.0%}" if math.isfinite(r.p_fail) else "–", rul,
                      f"{r.health_index:.2f}" if math.isfinite(r.health_index) else "–", r.action, r.due_by or "–",
                      r.evidence if r.status == "scored" else f"{r.status}: {r.reason}")
    return table


def latest_rows(lake_path: str, dataset: str):
    """The latest health run's rows of ``dataset`` from the ``fleet_health`` table (None: never scored)."""
    from twinflow import lake
    from twinflow.flows.health import FLEET_HEALTH

    t = lake.read_results(lake_path, FLEET_HEALTH)
    if t is None:
        return None
    df = t.to_pandas()
    df = df[df.dataset == dataset]
    if df.empty:
        return None
    key = df.sort_values("scored_at").run_key.iloc[-1]
    return df[df.run_key == key].sort_values("risk_rank")
