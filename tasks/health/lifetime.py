"""Failure probabilities of running assets: a censored lifetime model combined with the RUL model.

Method (documented in ``tasks/health/README.md`` too):

1. **Lifetime prior.** A Weibull distribution ``S(t) = exp(-(t / scale) ** shape)`` fitted by maximum
   likelihood to the fleet's lifetimes, right-censored ones included (a censored life contributes
   ``S(t)``, an observed failure ``f(t)``). Today every training asset is run to failure; the
   ``censored`` flags take the life segments of the event-log issue unchanged.
2. **Conditioned on age.** A running asset of age ``a`` has not failed: its remaining life ``R``
   has the prior ``P(R > r | T > a) = S(a + r) / S(a)``, discretised on a grid of ``r``.
3. **Combined with the model.** The champion's estimate ``r_hat`` is one noisy observation of
   ``min(R, cap)`` (models are trained on capped labels): its likelihood is the density of the
   model's error ``e = r_hat - min(r, cap)``, a kernel density of the champion's *validation*
   residuals in bins of the true RUL (:class:`~twinflow.tasks.twin.RulErrorModel`, so the error of
   a model near the end of a life is not mixed with the error at the cap). Bayes' rule gives the
   posterior ``p(r | a, r_hat)``; ``P(failure within H) = sum_{r < H} p(r | a, r_hat)``.

   Where the model says nothing (its estimate is at the cap) the prior decides; where the prior
   is flat over the horizon the model does. Without a model the posterior is the prior.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel, Field

from twinflow.errors import TwinflowError


class WeibullFit(BaseModel):
    """A two-parameter Weibull lifetime model, fitted with right censoring."""

    shape: float = Field(gt=0)
    scale: float = Field(gt=0)
    n_failures: int = 0
    n_censored: int = 0
    time_unit: str = "cycle"

    def survival(self, t):
        """``S(t)``; 1 for ``t <= 0``."""
        t = np.maximum(np.asarray(t, dtype="float64"), 0.0)
        return np.exp(-((t / self.scale) ** self.shape))

    def log_survival(self, t):
        t = np.maximum(np.asarray(t, dtype="float64"), 0.0)
        return -((t / self.scale) ** self.shape)

    @property
    def mean(self) -> float:
        return self.scale * math.gamma(1.0 + 1.0 / self.shape)


def fit_weibull(durations, censored=None, time_unit: str = "cycle") -> WeibullFit:
    """Maximum-likelihood Weibull fit with right censoring (profile likelihood in the shape).

    For a given shape ``k`` the scale has a closed form, ``scale**k = sum(t**k) / n_failures``;
    the shape solves ``1/k + mean(log t | failed) - sum(t**k log t) / sum(t**k) = 0``, found by
    bisection (the left side decreases in ``k``).

    Args:
        durations: Lifetimes (failed) or ages at censoring, > 0.
        censored: True where a life did not end in a failure (default: none censored).
        time_unit: Unit of the durations (for reports).

    Raises:
        TwinflowError: fewer than 2 observed failures or non-positive durations.
    """
    t = np.asarray(durations, dtype="float64").reshape(-1)
    c = np.zeros(t.size, dtype=bool) if censored is None else np.asarray(censored, dtype=bool).reshape(-1)
    if t.size != c.size:
        raise TwinflowError("durations and censored flags differ in length")
    ok = np.isfinite(t) & (t > 0)
    t, c = t[ok], c[ok]
    failed = ~c
    n_f = int(failed.sum())
    if n_f < 2:
        raise TwinflowError(f"a lifetime model needs >= 2 observed failures, got {n_f}")
    logt = np.log(t)
    mean_log_failed = float(logt[failed].mean())
    # Scale the times for numerical range: t**k with k ~ 10 and t ~ 1e4 overflows otherwise.
    ref = float(np.exp(logt.mean()))
    x = t / ref
    logx = np.log(x)

    def score(k: float) -> float:
        w = x ** k
        return 1.0 / k + (mean_log_failed - math.log(ref)) - float(np.sum(w * logx) / np.sum(w))

    lo, hi = 0.05, 1.0
    while score(hi) > 0 and hi < 200:
        hi *= 2
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        if score(mid) > 0:
            lo = mid
        else:
            hi = mid
    k = 0.5 * (lo + hi)
    scale = ref * float((np.sum(x ** k) / n_f) ** (1.0 / k))
    return WeibullFit(shape=k, scale=scale, n_failures=n_f, n_censored=int(c.sum()), time_unit=time_unit)


@dataclass
class ErrorDensity:
    """Densities of the RUL model's error ``pred - true`` per true-RUL bin, tabulated on a grid."""

    bin_edges: np.ndarray  # interior edges on the true RUL
    grid: np.ndarray  # error values
    density: np.ndarray  # (bins, grid)

    @classmethod
    def from_residuals(cls, true_rul, pred_rul, n_bins: int = 5, min_per_bin: int = 30,
                       step: float = 0.5) -> "ErrorDensity":
        """Gaussian kernel densities (Silverman bandwidth) of the residuals in quantile bins of the truth."""
        from twinflow.tasks.twin import RulErrorModel

        em = RulErrorModel.from_residuals(true_rul, pred_rul, n_bins=n_bins, min_per_bin=min_per_bin,
                                          source="validation")
        res = [np.asarray(r, dtype="float64") for r in em.residuals]
        spread = max(float(np.max(np.abs(np.concatenate(res)))), 1.0)
        grid = np.arange(-3 * spread, 3 * spread + step, step)
        dens = []
        for r in res:
            sd = float(np.std(r)) or 1.0
            iqr = float(np.subtract(*np.percentile(r, [75, 25]))) / 1.349 or sd
            h = max(0.9 * min(sd, iqr) * r.size ** -0.2, step)
            d = np.zeros_like(grid)
            for chunk in np.array_split(r, max(1, r.size // 2000)):
                d += np.exp(-0.5 * ((grid[:, None] - chunk[None, :]) / h) ** 2).sum(axis=1)
            d /= d.sum() * step
            dens.append(d)
        return cls(np.asarray(em.bin_edges, dtype="float64"), grid, np.vstack(dens))

    def likelihood(self, observed_error: np.ndarray, true_rul: np.ndarray) -> np.ndarray:
        """Density of ``observed_error[i, g]`` given the true RUL of grid column ``g``."""
        bins = np.searchsorted(self.bin_edges, true_rul, side="right")
        out = np.empty_like(observed_error)
        floor = 1e-12  # errors beyond the tabulated range: tiny, not impossible
        # The grid's true RUL rises along the columns, so each bin is one run of columns: a slice,
        # not a masked copy in and a masked copy out (the same values).
        runs = np.flatnonzero(np.r_[True, bins[1:] != bins[:-1]]) if bins.size else np.zeros(0, np.int64)
        if bins.size and (np.diff(bins) >= 0).all():
            for lo, hi in zip(runs, np.r_[runs[1:], bins.size]):
                out[:, lo:hi] = np.interp(observed_error[:, lo:hi], self.grid, self.density[bins[lo]], left=floor,
                                          right=floor)
        else:
            for b in np.unique(bins):
                cols = bins == b
                out[:, cols] = np.interp(observed_error[:, cols], self.grid, self.density[b], left=floor, right=floor)
        return np.maximum(out, floor, out=out)


def remaining_life_posterior(ages, rul_hat, lifetime: WeibullFit, errors: ErrorDensity | None, *, cap: float | None,
                             grid_step: float = 1.0, grid_max: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Posterior probabilities of the remaining life on a grid, per asset.

    Args:
        ages: Age of each running asset (time since renewal, the lifetime's unit).
        rul_hat: The model's RUL estimate per asset (NaN: no estimate, the prior alone).
        lifetime: The fitted lifetime model.
        errors: The model's error densities (None: the prior alone).
        cap: The cap of the model's training labels (None: uncapped).
        grid_step: Resolution of the remaining-life grid.
        grid_max: Largest remaining life on the grid (default: where the unconditioned survival
            falls below 1e-6); the last cell holds all the mass beyond it.

    Returns:
        ``(grid, posterior)``: the left edges of the cells (``r``) and an (assets, cells) matrix
        whose rows sum to 1.
    """
    ages = np.asarray(ages, dtype="float64").reshape(-1)
    rul_hat = np.asarray(rul_hat, dtype="float64").reshape(-1)
    if grid_max is None:
        grid_max = default_grid_max(lifetime, rul_hat, cap)
    grid = np.arange(0.0, grid_max + grid_step, grid_step)
    # log S(a + r) - log S(a): the prior of the remaining life given survival to age a.
    log_s = lifetime.log_survival(ages[:, None] + grid[None, :]) - lifetime.log_survival(ages)[:, None]
    s = np.exp(log_s)
    prior = np.empty_like(s)
    prior[:, :-1] = s[:, :-1] - s[:, 1:]
    prior[:, -1] = s[:, -1]
    prior = np.maximum(prior, 0.0)
    # A prior of 0 everywhere (an asset far beyond every observed life): flat over the grid.
    dead = prior.sum(axis=1) <= 0
    prior[dead] = 1.0
    post = prior
    has = np.isfinite(rul_hat)
    if errors is not None and has.any():
        mid = grid + 0.5 * grid_step
        seen = np.minimum(mid, cap) if cap is not None else mid
        lik = errors.likelihood(rul_hat[has, None] - seen[None, :], np.broadcast_to(seen, grid.shape))
        post = prior.copy()
        post[has] = prior[has] * lik
    post = post / post.sum(axis=1, keepdims=True)
    return grid, post


def default_grid_max(lifetime: WeibullFit, rul_hat, cap: float | None) -> float:
    """Where :func:`remaining_life_posterior`'s grid ends by default: the unconditioned survival below
    1e-6, or 1.5x the largest estimate or the cap when that is farther."""
    grid_max = lifetime.scale * (-math.log(1e-6)) ** (1.0 / lifetime.shape)
    return max(grid_max, float(np.nanmax(np.asarray(rul_hat, dtype="float64"), initial=0.0)) * 1.5, (cap or 0.0) * 1.5)


def posterior_summary(ages, rul_hat, lifetime: WeibullFit, errors: ErrorDensity | None, *, cap: float | None,
                      horizons, qs, chunk: int = 256) -> tuple[np.ndarray, float, np.ndarray, np.ndarray]:
    """:func:`prob_within` each horizon and :func:`quantiles` of every asset's posterior, ``chunk`` assets at a time.

    The posterior is (assets x grid cells): for a large fleet tens of MB per temporary, each
    written and read again by the next step. A chunk's temporaries stay in the CPU's cache, and
    every step is row by row on one grid (``grid_max`` of the whole fleet), so the values are those
    of one call over every asset. One caveat, the BLAS: :func:`prob_within`'s matrix-vector
    product takes rows in blocks of 4 (OpenBLAS) and a leftover row another way, so ``chunk`` is
    rounded up to a multiple of 4 to keep every row in the block it has in one call
    (``tests/tasks/health/test_health_math.py`` holds the two to the same bits).

    Returns:
        ``(grid, grid_max, P (assets, horizons), quantiles (assets, qs))``.
    """
    ages = np.asarray(ages, dtype="float64").reshape(-1)
    rul_hat = np.asarray(rul_hat, dtype="float64").reshape(-1)
    grid_max = default_grid_max(lifetime, rul_hat, cap)
    chunk = -(-max(chunk, 1) // 4) * 4
    n = ages.size
    p = np.empty((n, len(horizons)))
    q = np.empty((n, len(qs)))
    grid = np.arange(0.0, grid_max + 1.0, 1.0)
    for lo in range(0, n, chunk):
        hi = min(n, lo + chunk)
        grid, post = remaining_life_posterior(ages[lo:hi], rul_hat[lo:hi], lifetime, errors, cap=cap, grid_max=grid_max)
        for j, h in enumerate(horizons):
            p[lo:hi, j] = prob_within(grid, post, h)
        q[lo:hi] = quantiles(grid, post, qs)
    return grid, grid_max, p, q


def prob_within(grid: np.ndarray, posterior: np.ndarray, horizon: float) -> np.ndarray:
    """``P(R < horizon)`` per asset (cells entirely below the horizon, plus the straddling share)."""
    step = grid[1] - grid[0] if grid.size > 1 else 1.0
    frac = np.clip((horizon - grid) / step, 0.0, 1.0)
    return posterior @ frac


def quantiles(grid: np.ndarray, posterior: np.ndarray, qs) -> np.ndarray:
    """Posterior quantiles of the remaining life, (assets, len(qs)), linear within a cell."""
    step = grid[1] - grid[0] if grid.size > 1 else 1.0
    cdf = np.cumsum(posterior, axis=1)
    out = np.empty((posterior.shape[0], len(qs)))
    for j, q in enumerate(qs):
        idx = np.argmax(cdf >= q, axis=1)
        prev = np.where(idx > 0, cdf[np.arange(len(idx)), np.maximum(idx - 1, 0)], 0.0)
        cell = posterior[np.arange(len(idx)), idx]
        within = np.where(cell > 0, (q - prev) / np.where(cell > 0, cell, 1.0), 0.0)
        out[:, j] = grid[idx] + np.clip(within, 0.0, 1.0) * step
    return out
