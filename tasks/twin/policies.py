"""Maintenance policies and the Monte-Carlo kernel that runs them (NumPy or CuPy)."""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Sequence

import numpy as np

from twinflow.tasks.twin.model import (
    CostModel,
    TwinModel,
    child_seed,
    damage_growth,
    draw_units,
    make_rng,
    model_arrays,
    seed_sequence,
    to_numpy,
)
from twinflow.tasks.twin.rul_error import RulErrorModel



class Policy(NamedTuple):
    """A maintenance policy: ``kind`` in run_to_failure / fixed_interval / predictive."""

    name: str
    kind: str
    value: float


def build_policies(intervals: Sequence[int], thresholds: Sequence[float]) -> list[Policy]:
    """Run-to-failure, one fixed-interval policy per ``k`` and one predictive per threshold."""
    out = [Policy("run_to_failure", "run_to_failure", math.inf)]
    out += [Policy(f"fixed_k{int(k)}", "fixed_interval", float(k)) for k in intervals]
    out += [Policy(f"predictive_rul{x:g}", "predictive", float(x)) for x in thresholds]
    return out


OUTPUTS = ("failures", "planned", "downtime")


class _UnitTable:
    """Per-slot sequence of replacement units, drawn lazily in blocks from one stream.

    Every policy lane of a slot installs the same j-th unit (common random numbers), and the table
    grows in a deterministic order, so a batch is a pure function of its seed.
    """

    def __init__(self, model: TwinModel, rng, n_slots: int, block: int, xp):
        self.model, self.rng, self.n, self.block, self.xp = model, rng, n_slots, block, xp
        self.cols: dict[str, Any] | None = None
        self.extend(1)

    def extend(self, need: int) -> None:
        xp = self.xp
        while self.cols is None or self.cols["d"].shape[1] < need:
            new = draw_units(self.model, self.rng, (self.n, self.block), xp)
            self.cols = new if self.cols is None else {
                k: xp.concatenate([self.cols[k], new[k]], axis=1) for k in new}

    def take(self, slot, j) -> dict[str, Any]:
        return {k: v[slot, j] for k, v in self.cols.items()}


def simulate_batch(model: TwinModel, policies: Sequence[Policy], costs: CostModel, n_scenarios: int,
                   n_assets: int, horizon: int, seed: int | np.random.SeedSequence,
                   error_model: RulErrorModel, *, inspect_every: int = 10, xp=np) -> dict[str, np.ndarray]:
    """Monte-Carlo of ``n_scenarios`` x ``n_assets`` x ``horizon`` cycles under every policy.

    A "cycle" here is one simulation step: one unit of the twin's clock (``model.time_unit``: a
    cycle for cycle clocks, e.g. an hour for a timestamp clock); intervals, thresholds, downtimes and
    ``inspect_every`` are in the same unit.

    Vectorised over (policy, scenario, asset) lanes, stepping through cycles. The per-cycle shocks,
    regimes, RUL-estimate draws and replacement units are shared by the policies' lanes of one
    (scenario, asset) slot (common random numbers), so policy differences are not sampling noise.

    At each cycle an operating asset ages by its regime's severity and fails when its noisy health
    reaches 0 (unplanned repair: cost ``costs.failure``, ``failure_downtime`` cycles down); else
    the policy may stop it for planned maintenance (``costs.planned``, ``planned_downtime``
    cycles): fixed interval when its age reaches ``k`` cycles; predictive when, at an inspection
    (every ``inspect_every`` cycles), true RUL + a draw of the RUL error is ``<= threshold``.
    Either event installs a new unit from the slot's unit sequence.

    Returns:
        numpy arrays of shape ``(n_policies, n_scenarios)``: ``failures``, ``planned``, ``downtime``
        (asset-cycles down) and ``cost``, each summed over the fleet.
    """
    ss = seed_sequence(seed)
    n_pol, n_slots = len(policies), n_scenarios * n_assets
    f64 = xp.float64
    arr = model_arrays(model, xp)
    interval = xp.asarray([p.value if p.kind == "fixed_interval" else np.inf for p in policies], f64)[:, None]
    threshold = xp.asarray([p.value if p.kind == "predictive" else -np.inf for p in policies], f64)[:, None]
    predictive = any(p.kind == "predictive" for p in policies)
    err = error_model.device_arrays(xp)
    rng_units, rng_noise, rng_regime, rng_error = (make_rng(xp, child_seed(ss, i)) for i in range(4))
    table = _UnitTable(model, rng_units, n_slots, max(2, horizon // 100), xp)
    shape = (n_pol, n_slots)
    first = table.take(xp.arange(n_slots), xp.zeros(n_slots, dtype=xp.int64))
    lane = {k: xp.broadcast_to(v, shape).copy() for k, v in first.items()}
    # One regime and one shape b: the age is the cycle count and a * tau**b = a * table[age].
    fast = model.n_regimes == 1 and model.b_sd == 0
    sev0 = float(model.regime_severity[0])
    if fast:
        pow_table = (sev0 * xp.arange(horizon + 2, dtype=f64)) ** model.b_mean
    else:
        tau = xp.zeros(shape, f64)
    unit_j = xp.zeros(shape, dtype=xp.int64)
    resume = xp.ones(shape, dtype=xp.int64)  # first cycle the lane's current unit operates
    out = {k: xp.zeros(shape, dtype=xp.int64) for k in OUTPUTS}
    mean_sev, sigma = model.mean_severity, model.process_noise
    for t in range(1, horizon + 1):
        age = (t + 1) - resume  # cycles operated by the current unit, this one included
        active = age > 0
        if fast:
            x = lane["a"] * pow_table[xp.maximum(age, 0)]
        else:
            if model.n_regimes > 1:
                regime = xp.searchsorted(arr["cum_probs"], rng_regime.random(n_slots), side="right")
                tau += arr["severity"][regime] * active
            else:
                tau += sev0 * active
            x = damage_growth(lane["log_a"], lane["b"], tau, xp)
        eps = rng_noise.standard_normal(n_slots)
        eps *= sigma
        fail = (x >= lane["c"] - eps) & active
        plan = (age >= interval) & ~fail
        if predictive and t % inspect_every == 0:
            tau_now = sev0 * xp.maximum(age, 0) if fast else tau
            rul = (lane["tau_f"] - tau_now) / mean_sev
            if error_model.kind == "gaussian":
                e = error_model.gaussian_mean + error_model.gaussian_sd * rng_error.standard_normal(n_slots)
            else:
                u = rng_error.random(n_slots)
                bins = xp.searchsorted(err["edges"], rul, side="right")
                cnt = err["counts"][bins]
                e = err["flat"][err["offsets"][bins] + xp.minimum((u * cnt).astype(xp.int64), cnt - 1)]
            plan |= active & ~fail & (rul + e <= threshold)
        lanes = xp.nonzero(fail | plan)
        if lanes[0].shape[0] == 0:
            continue
        lf = fail[lanes]
        out["failures"][lanes] += lf
        out["planned"][lanes] += ~lf
        dur = xp.where(lf, costs.failure_downtime, costs.planned_downtime)
        out["downtime"][lanes] += xp.minimum(dur, horizon - t)
        resume[lanes] = t + 1 + dur
        unit_j[lanes] += 1
        table.extend(int(unit_j[lanes].max()) + 1)
        new = table.take(lanes[1], unit_j[lanes])
        for k, v in new.items():
            lane[k][lanes] = v
        if not fast:
            tau[lanes] = 0.0
    res = {k: to_numpy(v.reshape(n_pol, n_scenarios, n_assets).sum(axis=2)) for k, v in out.items()}
    res["cost"] = (costs.failure * res["failures"] + costs.planned * res["planned"]
                   + costs.downtime_per_cycle * res["downtime"])
    return res


def simulate_loop(model: TwinModel, policy: Policy, costs: CostModel, n_scenarios: int, n_assets: int,
                  horizon: int, seed: int, error_model: RulErrorModel, *, inspect_every: int = 10) -> dict[str, np.ndarray]:
    """Reference and benchmark baseline: the same model as :func:`simulate_batch`, one policy,
    a straightforward Python loop per asset and cycle (own random streams, same distributions).

    Returns:
        numpy arrays of shape ``(n_scenarios,)``: ``failures``, ``planned``, ``downtime``, ``cost``.
    """
    rng = np.random.default_rng(seed)
    cum = np.cumsum(model.regime_probs)[:-1]
    sev = model.regime_severity
    mean_sev = model.mean_severity
    flat = np.concatenate(error_model.residuals) if error_model.kind == "empirical" else None
    counts = [len(r) for r in error_model.residuals]
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]) if counts else []

    def new_unit():
        u = draw_units(model, rng, 1)
        return float(u["a"][0]), float(u["b"][0]), float(u["c"][0]), float(u["tau_f"][0])

    res = {k: np.zeros(n_scenarios, dtype=np.int64) for k in OUTPUTS}
    for s in range(n_scenarios):
        for _ in range(n_assets):
            a, b, c, tau_f = new_unit()
            tau = age = 0.0
            down = 0
            eps = rng.standard_normal(horizon)
            draws = rng.random(horizon)
            for t in range(1, horizon + 1):
                if down > 0:
                    down -= 1
                    res["downtime"][s] += 1
                    continue
                tau += sev[int(np.searchsorted(cum, draws[t - 1], side="right"))] if len(cum) else sev[0]
                age += 1
                failed = a * tau ** b >= c - model.process_noise * eps[t - 1]
                planned = False
                if not failed:
                    if policy.kind == "fixed_interval":
                        planned = age >= policy.value
                    elif policy.kind == "predictive" and t % inspect_every == 0:
                        rul = (tau_f - tau) / mean_sev
                        if error_model.kind == "gaussian":
                            e = error_model.gaussian_mean + error_model.gaussian_sd * rng.standard_normal()
                        else:
                            i = int(np.searchsorted(error_model.bin_edges, rul, side="right"))
                            e = flat[offsets[i] + min(int(rng.random() * counts[i]), counts[i] - 1)]
                        planned = rul + e <= policy.value
                if failed or planned:
                    res["failures" if failed else "planned"][s] += 1
                    down = costs.failure_downtime if failed else costs.planned_downtime
                    a, b, c, tau_f = new_unit()
                    tau = age = 0.0
    res["cost"] = (costs.failure * res["failures"] + costs.planned * res["planned"]
                   + costs.downtime_per_cycle * res["downtime"])
    return res
