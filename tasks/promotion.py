"""The twin gate: promotion decided on the maintenance cost a model leads to, not its RMSE alone.

A lower RMSE can still mean more LATE estimates, and a late RUL estimate lets an asset run past
its planned stop into a failure. The gate runs the fleet twin's policy study
(:mod:`twinflow.tasks.twin.study`) once with the challenger's measured error model and once with
the champion's, with the same seeds (common random numbers: the same units, shocks and error
draws, so the difference is the models' and not sampling noise), and compares each model's best
policy cost. Everything here is pure (the registry writes are in :mod:`twinflow.tasks.registry`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from twinflow.tasks.twin.model import CostModel, TwinModel, TwinParams
from twinflow.tasks.twin.policies import build_policies
from twinflow.tasks.twin.rul_error import RulErrorModel
from twinflow.tasks.twin.study import plan_batches, run_batch, run_batches, summarize

PromotionMode = Literal["rmse", "twin", "both"]


class TwinGateParams(BaseModel):
    """Size and rule of the twin gate's policy study (small: it runs in every training).

    Only the policies that act on the model's RUL estimate (predictive thresholds) and the
    run-to-failure baseline are simulated: fixed-interval policies cost the same whatever the model.

    Attributes:
        n_scenarios: Monte-Carlo scenarios (paired across the two models).
        n_assets: Assets per simulated fleet.
        horizon: Simulated steps per scenario, in the twin's clock unit (cycles, hours ...).
        seed: Root seed of the study, the same for both models.
        thresholds: Predictive policies: maintain at RUL estimate <= x.
        inspect_every: Time between RUL estimates, in the same unit.
        costs: Failure/planned/downtime costs.
        criterion: ``ci``: promote only when the challenger's 95% CI of its best policy cost lies
            entirely below the champion's (no overlap); ``margin``: when its expected best cost is
            lower by at least ``margin`` (a fraction of the champion's cost).
        margin: Relative margin of the ``margin`` criterion (0.02 = 2% cheaper).
        process_noise: The twin's process noise (the twin is calibrated on the training data's own
            fleet: its lake snapshot and fleet contract).
        min_lifetime: Lives shorter than this (clock units) are left out of the twin's calibration.
    """

    model_config = ConfigDict(extra="forbid")

    n_scenarios: int = Field(40, ge=2, le=100_000)
    n_assets: int = Field(20, gt=0, le=100_000)
    horizon: int = Field(500, gt=0, le=100_000)
    seed: int = Field(0, ge=0)
    thresholds: list[float] = Field(default_factory=lambda: [10.0, 20.0, 30.0, 45.0, 60.0])
    inspect_every: int = Field(10, gt=0)
    costs: CostModel = Field(default_factory=CostModel)
    criterion: Literal["ci", "margin"] = "ci"
    margin: float = Field(0.0, ge=0.0, lt=1.0)
    process_noise: float = Field(0.005, ge=0)
    min_lifetime: int = Field(20, gt=0)

    def twin_params(self) -> TwinParams:
        """The policy-study parameters (CPU backend: the result must not depend on the worker)."""
        return TwinParams(n_scenarios=self.n_scenarios, n_assets=self.n_assets, horizon=self.horizon,
                          seed=self.seed, batch_scenarios=min(10, self.n_scenarios), intervals=[],
                          thresholds=self.thresholds, inspect_every=self.inspect_every, costs=self.costs,
                          process_noise=self.process_noise, min_lifetime=self.min_lifetime, backend="numpy",
                          on_no_run_to_failure="error")


class TwinCost(BaseModel):
    """One model's policy study on the twin: its best policy and that policy's cost."""

    source: str
    best_policy: str
    expected_cost: float
    cost_ci_low: float
    cost_ci_high: float
    p_best: float = Field(description="Share of the paired scenarios in which the best policy is cheapest.")
    scenario_costs: list[float] = Field(description="The best policy's cost per scenario (paired).")
    policies: list[dict[str, Any]] = Field(default_factory=list)
    time_unit: str = Field("cycle", description="The twin's clock unit: the unit of the study's horizon.")


def error_model_of(true_rul, pred_rul, source: str) -> RulErrorModel:
    """A model's measured RUL error (by true-RUL bin) from its scored predictions.

    Raises:
        ValueError: fewer than 3 usable predictions.
    """
    n = int(np.isfinite(np.asarray(true_rul, float)).sum())
    return RulErrorModel.from_residuals(true_rul, pred_rul, min_per_bin=max(3, min(10, n)), source=source)


def policy_costs(error_model: RulErrorModel, gate: TwinGateParams, model: TwinModel | None = None,
                 client: Any = None) -> TwinCost:
    """The twin's policy study with one error model: the existing scenario batches and summary.

    Args:
        error_model: The model's measured RUL error.
        gate: Study size, seeds and costs.
        model: The twin of the fleet the models predict for (the gate passes the one calibrated on
            the training snapshot); None: the bundled FD001 calibration, a C-MAPSS twin.
        client: A Dask client to run the batches on; without one they run in this process
            (same batches and seeds: the same numbers).
    """
    from twinflow.tasks.twin.calibration import default_model

    params = gate.twin_params()
    model = model or default_model(gate.process_noise)
    policies = build_policies(params.intervals, params.thresholds)
    if client is not None:
        res = run_batches(client, model, policies, params, error_model)
    else:
        parts = [run_batch(model, policies, params, n, ss, error_model)
                 for n, ss in plan_batches(params.n_scenarios, params.batch_scenarios, params.seed)]
        res = {k: np.concatenate([p[k] for p in parts], axis=1) for k in parts[0]}
    rows, best = summarize(policies, res, params.n_assets, params.horizon)
    i = next(k for k, r in enumerate(rows) if r["policy"] == best)
    r = rows[i]
    return TwinCost(source=error_model.source, best_policy=best, expected_cost=r["expected_cost"],
                    cost_ci_low=r["cost_ci_low"], cost_ci_high=r["cost_ci_high"], p_best=r["p_best"],
                    scenario_costs=[float(c) for c in res["cost"][i]], policies=rows, time_unit=model.time_unit)


@dataclass
class TwinComparison:
    """The twin gate's verdict: both models' best policy costs and whether the challenger wins.

    ``promote`` is None when there was nothing to compare against (no champion, or an error model
    could not be built).
    """

    challenger: TwinCost | None
    champion: TwinCost | None
    promote: bool | None
    reason: str
    criterion: str = "ci"
    margin: float = 0.0
    paired_saving: float | None = None
    paired_saving_ci: tuple[float, float] | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (scenario costs included) for ``promotion/twin.json``."""
        return asdict(self) | {"challenger": self.challenger and self.challenger.model_dump(),
                               "champion": self.champion and self.champion.model_dump()}


def compare_twin_costs(challenger: TwinCost, champion: TwinCost, criterion: str = "ci",
                       margin: float = 0.0) -> TwinComparison:
    """Does the challenger's best policy cost less than the champion's, by the gate's rule?

    ``ci``: the challenger's 95% CI lies below the champion's (the intervals do not overlap).
    ``margin``: the challenger's expected cost is lower by at least ``margin`` × the champion's.
    The paired saving (champion − challenger per scenario, mean and 95% CI) is reported with
    either rule.
    """
    a, b = np.asarray(champion.scenario_costs, float), np.asarray(challenger.scenario_costs, float)
    saving = ci = None
    if a.size == b.size and a.size > 1:
        d = a - b
        saving = float(d.mean())
        half = 1.96 * float(d.std(ddof=1)) / math.sqrt(d.size)
        ci = (saving - half, saving + half)
    fmt = lambda c: f"{c.expected_cost:,.0f} [{c.cost_ci_low:,.0f}, {c.cost_ci_high:,.0f}] ({c.best_policy})"  # noqa: E731
    costs = f"challenger {fmt(challenger)} vs champion {fmt(champion)}"
    if criterion == "ci":
        ok = challenger.cost_ci_high < champion.cost_ci_low
        rule = "its 95% CI lies below the champion's" if ok else "the 95% CIs overlap or it costs more"
    elif criterion == "margin":
        gain = champion.expected_cost - challenger.expected_cost
        ok = gain > 0 and gain >= margin * champion.expected_cost
        rule = (f"cheaper by {gain:,.0f} (margin {margin:.1%} = {margin * champion.expected_cost:,.0f})"
                if ok else f"not cheaper by the margin {margin:.1%} (saving {gain:,.0f})")
    else:
        raise ValueError(f"unknown twin gate criterion {criterion!r}")
    verdict = "the challenger wins" if ok else "the challenger does not win"
    return TwinComparison(challenger, champion, ok, f"Twin: {verdict}: {rule}; best policy cost {costs}.",
                          criterion, margin, saving, ci)


# ---------------------------------------------------------------------------------------------
# The absolute floor: what any model must reach, with or without a champion to beat
# ---------------------------------------------------------------------------------------------

BASELINE_NAME = "fleet-mean-life baseline"


class PromotionFloor(BaseModel):
    """The absolute bar of the promotion gate, checked before any champion comparison.

    The relative rules (RMSE margin, twin cost) only say a challenger is better than the champion;
    without a champion they say nothing. The floor says a model is good enough at all: it must beat
    the naive fleet-mean-life predictor (RUL = mean training lifetime − current cycle) on the same
    evaluation rows, and may be held to fixed thresholds.

    Attributes:
        beat_baseline: The model's eval RMSE must be below the naive baseline's.
        baseline_margin: ...by at least this fraction of the baseline's RMSE (0.1 = 10% lower).
        max_rmse: Highest acceptable eval RMSE, in the fleet contract's clock unit (cycles, hours ...);
            None: no threshold.
        max_score: Highest acceptable PHM08 score (summed over the evaluation rows); None: none.
        min_coverage: Lowest acceptable empirical coverage of the prediction interval on the
            evaluation data (0..1); None: none.
    """

    model_config = ConfigDict(extra="forbid")

    beat_baseline: bool = True
    baseline_margin: float = Field(0.0, ge=0.0, lt=1.0)
    max_rmse: float | None = Field(None, gt=0)
    max_score: float | None = Field(None, gt=0)
    min_coverage: float | None = Field(None, ge=0.0, le=1.0)


def fleet_mean_life_predictions(mean_life: float, cycles, rul_cap: float | None = None) -> np.ndarray:
    """The naive baseline's RUL estimates: mean fleet lifetime minus the cycle reached, at least 0.

    Args:
        mean_life: Mean lifetime of the training assets (each ran to failure), in the clock's unit.
        cycles: The time reached by each scored row (cycle, or time since the asset's first reading),
            in the same unit.
        rul_cap: The labels' piecewise-linear cap (the baseline is capped like the truth).
    """
    pred = np.maximum(float(mean_life) - np.asarray(cycles, dtype="float64"), 0.0)
    return pred if rul_cap is None else np.minimum(pred, float(rul_cap))


@dataclass
class FloorCheck:
    """The floor's verdict: passed, and one readable sentence per rule (failed rules first)."""

    passed: bool
    failed: list[str] = field(default_factory=list)
    met: list[str] = field(default_factory=list)

    @property
    def reason(self) -> str:
        """One sentence for the decision."""
        if not self.failed:
            return "Absolute floor met: " + "; ".join(self.met or ["no rule configured"]) + "."
        return "Absolute floor not met: " + "; ".join(self.failed) + "."


def check_floor(metrics: dict[str, float | None], baseline: dict[str, float] | None,
                floor: PromotionFloor, *, time_unit: str) -> FloorCheck:
    """Check a model's eval metrics against the absolute floor.

    Args:
        metrics: The model's ``eval_rmse``, ``eval_score`` and (if any) ``eval_pi_coverage``.
        baseline: The naive baseline's regression metrics on the same rows (``rmse``, ``score``),
            or None when it could not be computed.
        floor: The rules.
        time_unit: The fleet contract's clock unit (``contract.clock.time_unit``): the unit of the
            RMSEs and of ``floor.max_rmse``, written into the reasons.

    Returns:
        The verdict. A configured rule whose metric is missing fails: the gate promotes on
        evidence only.
    """
    from twinflow.contract.model import unit_label

    failed, met = [], []
    dur = "{:.1f} " + unit_label(time_unit)

    def rule(ok: bool, text: str) -> None:
        (met if ok else failed).append(text)

    rmse = metrics.get("eval_rmse")
    if floor.beat_baseline:
        if baseline is None or rmse is None:
            failed.append(f"the {BASELINE_NAME} could not be scored on the evaluation data")
        else:
            bar = (1.0 - floor.baseline_margin) * baseline["rmse"]
            margin = f" by {floor.baseline_margin:.0%}" if floor.baseline_margin else ""
            rule(rmse < bar, f"RMSE {dur.format(rmse)} {'beats' if rmse < bar else 'does not beat'} the "
                             f"{BASELINE_NAME}'s {dur.format(baseline['rmse'])}{margin}")
    for key, limit, what, fmt, lower in (("eval_rmse", floor.max_rmse, "RMSE", dur, True),
                                         ("eval_score", floor.max_score, "PHM08 score", "{:,.0f}", True),
                                         ("eval_pi_coverage", floor.min_coverage, "interval coverage", "{:.0%}",
                                          False)):
        if limit is None:
            continue
        value = metrics.get(key)
        if value is None or not math.isfinite(value):
            failed.append(f"{what} unavailable (threshold {fmt.format(limit)})")
            continue
        ok = value <= limit if lower else value >= limit
        rule(ok, f"{what} {fmt.format(value)} {'within' if ok else 'outside'} the threshold "
                 f"{'≤' if lower else '≥'} {fmt.format(limit)}")
    return FloorCheck(not failed, failed, met)
