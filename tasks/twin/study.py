"""The policy study: fixed scenario batches on Dask and their aggregation into a policy table."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from twinflow.tasks.twin.fused import simulate_batch_fused
from twinflow.tasks.twin.model import TwinModel, TwinParams, array_module
from twinflow.tasks.twin.policies import Policy, simulate_batch
from twinflow.tasks.twin.rul_error import RulErrorModel



def plan_batches(n_scenarios: int, batch_scenarios: int, seed: int) -> list[tuple[int, np.random.SeedSequence]]:
    """Fixed decomposition of the scenarios into batches, each with its own spawned seed.

    Depends only on the parameters, never on the cluster, so results are identical for any number
    of workers.
    """
    sizes = [batch_scenarios] * (n_scenarios // batch_scenarios)
    if n_scenarios % batch_scenarios:
        sizes.append(n_scenarios % batch_scenarios)
    seeds = np.random.SeedSequence(seed).spawn(len(sizes))
    return list(zip(sizes, seeds))


def run_batch(model: TwinModel, policies: Sequence[Policy], params: TwinParams, n_scenarios: int,
              seed: np.random.SeedSequence, error_model: RulErrorModel) -> dict[str, np.ndarray]:
    """One Dask unit of work: a scenario batch on this worker's backend (GPU when it has one)."""
    xp = array_module(params.backend)
    if xp is not np:
        return simulate_batch_fused(model, policies, params.costs, n_scenarios, params.n_assets,
                                             params.horizon, seed, error_model,
                                             inspect_every=params.inspect_every)
    return simulate_batch(model, policies, params.costs, n_scenarios, params.n_assets, params.horizon,
                          seed, error_model, inspect_every=params.inspect_every, xp=np)


def run_batches(client, model: TwinModel, policies: Sequence[Policy], params: TwinParams,
                error_model: RulErrorModel) -> dict[str, np.ndarray]:
    """Submit the scenario batches to a Dask client; results concatenated in batch order.

    Returns:
        arrays of shape ``(n_policies, n_scenarios)``.
    """
    plan = plan_batches(params.n_scenarios, params.batch_scenarios, params.seed)
    model_f, pol_f, par_f, err_f = client.scatter([model, list(policies), params, error_model], broadcast=True,
                                                   hash=False)
    from twinflow.runtime import gpu_resources

    # auto/cupy batches go to GPU workers when the cluster has any (the fused kernel runs there).
    resources = gpu_resources(client, params.backend != "numpy")
    futures = [client.submit(run_batch, model_f, pol_f, par_f, n, ss, err_f, pure=False, resources=resources)
               for n, ss in plan]
    parts = client.gather(futures)
    return {k: np.concatenate([p[k] for p in parts], axis=1) for k in parts[0]}


def _mean_ci(x: np.ndarray, z: float = 1.96, lo: float | None = None,
             hi: float | None = None) -> tuple[float, float, float]:
    """Mean and normal 95% CI, clipped to the quantity's range (a count is never negative)."""
    x = np.asarray(x, float)
    m = float(x.mean())
    half = z * float(x.std(ddof=1)) / math.sqrt(len(x)) if len(x) > 1 else float("nan")
    low, high = m - half, m + half
    if lo is not None and math.isfinite(low):
        low = max(low, lo)
    if hi is not None and math.isfinite(high):
        high = min(high, hi)
    return m, low, high


def wilson_ci(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a proportion: inside [0, 1] even at 0 or n successes.

    Args:
        successes: Number of successes (may be fractional, e.g. shared ties).
        n: Number of trials.
    """
    if n <= 0:
        return float("nan"), float("nan")
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def prob_best(cost: np.ndarray) -> np.ndarray:
    """Per policy, the share of scenarios in which it is the cheapest (ties shared equally).

    The scenarios are paired (common random numbers), so this is the probability that the policy
    is the best one on a fleet drawn like these.

    Args:
        cost: ``(n_policies, n_scenarios)`` fleet costs.
    """
    c = np.asarray(cost, float)
    cheapest = c == c.min(axis=0, keepdims=True)
    return (cheapest / cheapest.sum(axis=0, keepdims=True)).mean(axis=1)


def summarize(policies: Sequence[Policy], results: dict[str, np.ndarray], n_assets: int,
              horizon: int) -> tuple[list[dict], str]:
    """Per-policy expected fleet cost, availability, failures and planned stops with 95% CIs, and
    ``p_best``: the share of the (paired) scenarios in which the policy is the cheapest.

    Returns:
        ``(rows, recommended policy name)``: the recommendation is the least expected cost.
    """
    rows = []
    p_best = prob_best(results["cost"])
    for i, p in enumerate(policies):
        cost = _mean_ci(results["cost"][i])
        # Availability is a share (CI kept in [0, 1]); failures a count per fleet (CI never below 0).
        avail = _mean_ci(1.0 - results["downtime"][i] / (n_assets * horizon), lo=0.0, hi=1.0)
        fails = _mean_ci(results["failures"][i], lo=0.0)
        n_sc = int(np.asarray(results["cost"]).shape[1])
        pb_lo, pb_hi = wilson_ci(float(p_best[i]) * n_sc, n_sc)
        rows.append({
            "policy": p.name, "kind": p.kind, "value": None if math.isinf(p.value) else p.value,
            "expected_cost": cost[0], "cost_ci_low": cost[1], "cost_ci_high": cost[2],
            "availability": avail[0], "availability_ci_low": avail[1], "availability_ci_high": avail[2],
            "failures": fails[0], "failures_ci_low": fails[1], "failures_ci_high": fails[2],
            "planned": float(np.mean(results["planned"][i])),
            "cost_per_asset_cycle": cost[0] / (n_assets * horizon),
            "p_best": float(p_best[i]), "p_best_ci_low": pb_lo, "p_best_ci_high": pb_hi,
        })
    best = min(rows, key=lambda r: r["expected_cost"])["policy"]
    return rows, best
