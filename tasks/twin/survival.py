"""Lifetimes with suspensions: Weibull maximum likelihood with right censoring, and Kaplan–Meier.

Real fleets have few failures and many suspensions (assets replaced preventively, assets still
running). A suspended life says "it lasted *at least* this long"; treating it as a failure biases the
lifetime model towards short lives, and dropping it throws away most of the evidence. The standard
reliability-engineering answer, used here:

* :func:`weibull_fit`: the two-parameter Weibull fitted by maximum likelihood where failures contribute
  the density and suspensions the survival function, with Wald confidence intervals on the log
  parameters from the observed information (exact for this model's parametrisation up to O(1/n)).
* :func:`kaplan_meier`: the non-parametric survival estimate with Greenwood's variance and log-log
  confidence bands, which stay inside [0, 1].
* :func:`km_check`: whether the fitted Weibull survival curve stays inside the Kaplan–Meier bands —
  the goodness-of-fit check that remains valid under censoring (a KS test on complete lifetimes
  does not).
* :func:`lognormal_fit`: the lognormal fitted the same way. The twin's lifetimes are lognormal by
  construction (its log degradation rate is normal), so this is the fit the twin is matched to when
  some lives are suspended: the failures alone are biased short, because the lives that would have
  lasted longest are the ones a renewal or the end of the records cut first.

Durations are in the fleet contract's clock unit (cycles, or hours/days for timestamp clocks). All
functions are pure numpy/scipy (no survival library needed for two closed-form likelihoods).
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
from pydantic import BaseModel

__all__ = ["KaplanMeier", "KmCheck", "LognormalFit", "WeibullFit", "kaplan_meier", "km_check", "lognormal_fit",
           "weibull_fit"]

_Z95 = 1.959963984540054


class WeibullFit(BaseModel):
    """A Weibull lifetime model fitted with suspensions.

    Attributes:
        shape: Shape β (>1: wear-out; <1: infant mortality).
        scale: Scale η, in the clock's unit (63.2 % of lives end before it).
        shape_ci: 95 % confidence interval of β.
        scale_ci: 95 % confidence interval of η.
        n: Lives used.
        failures: Lives that ended in an observed failure (the rest are suspensions).
        loglik: Log-likelihood at the optimum.
        location: Failure-free period γ (three-parameter Weibull; 0 for two). The intervals of β and η
            are conditional on it.
    """

    shape: float
    scale: float
    shape_ci: tuple[float, float]
    scale_ci: tuple[float, float]
    n: int
    failures: int
    loglik: float
    location: float = 0.0

    def survival(self, t: np.ndarray | float) -> np.ndarray:
        """P(life > t)."""
        z = np.maximum(np.asarray(t, float) - self.location, 0.0) / self.scale
        return np.exp(-np.power(z, self.shape))

    def conditional_failure(self, age: np.ndarray | float, horizon: float) -> np.ndarray:
        """P(failure within ``horizon`` | survived to ``age``)."""
        age = np.asarray(age, float)
        s0 = self.survival(age)
        return np.where(s0 > 0, 1.0 - self.survival(age + horizon) / np.maximum(s0, 1e-300), 1.0)

    @property
    def mean(self) -> float:
        return float(self.location + self.scale * math.gamma(1.0 + 1.0 / self.shape))


def _check(durations: Sequence[float], observed: Sequence[bool]) -> tuple[np.ndarray, np.ndarray]:
    t = np.asarray(durations, float)
    d = np.asarray(observed, bool)
    if t.shape != d.shape or t.ndim != 1:
        raise ValueError("durations and observed must be 1-D and of equal length")
    if not np.all(np.isfinite(t)) or np.any(t <= 0):
        raise ValueError("durations must be finite and positive")
    return t, d


def weibull_fit(durations: Sequence[float], observed: Sequence[bool], location: bool = False) -> WeibullFit:
    """Fit a Weibull by maximum likelihood with right censoring.

    Args:
        durations: Each life's length: to the failure, or to the suspension (renewal without failure,
            or the last reading of a running asset).
        observed: True where the life ended in a failure, False for a suspension.
        location: Also fit a failure-free period γ (three-parameter Weibull), by profiling the
            likelihood over γ in [0, 0.99·shortest life). Wear-out fleets often have one: no C-MAPSS
            FD001 engine fails before cycle 128, which a two-parameter Weibull cannot express.

    Returns:
        The fit with 95 % Wald intervals (on log β and log η, transformed back, so they stay positive).

    Raises:
        ValueError: with fewer than 2 failures (the shape is not identifiable), or bad durations.
    """
    if location:
        from scipy.optimize import minimize_scalar

        t, d = _check(durations, observed)
        _fit2(t, d)  # the same errors as without a location
        best = minimize_scalar(lambda g: -_fit2(t - g, d).loglik, bounds=(0.0, 0.99 * float(t.min())),
                               method="bounded", options={"xatol": 1e-6 * float(t.min())})
        gamma = float(best.x)
        base = _fit2(t, d)
        if base.loglik >= -best.fun:
            return base
        return _fit2(t - gamma, d).model_copy(update={"location": gamma})
    return _fit2(*_check(durations, observed))


def _fit2(t: np.ndarray, d: np.ndarray) -> WeibullFit:
    """Two-parameter censored Weibull MLE on checked arrays."""
    from scipy.optimize import brentq

    r = int(d.sum())
    if r < 2:
        raise ValueError(f"a Weibull fit needs at least 2 observed failures, got {r} (of {len(t)} lives)")
    # Scale lengths to ~1 for numerical stability; η scales back exactly, β is scale-free.
    unit = float(np.median(t))
    x = t / unit
    lx = np.log(x)
    sum_lx_failed = float(lx[d].sum())

    # Profile likelihood: for a given β, η^β = Σ x^β / r; β solves the classic score equation
    # Σ x^β ln x / Σ x^β - 1/β - Σ_failed ln x / r = 0 (monotone in β, one root).
    def score(beta: float) -> float:
        w = np.exp(beta * lx - np.max(beta * lx))
        return float((w * lx).sum() / w.sum() - 1.0 / beta - sum_lx_failed / r)

    lo, hi = 1e-3, 1.0
    while score(hi) < 0 and hi < 1e3:
        hi *= 2.0
    beta = brentq(score, lo, hi, xtol=1e-12) if score(hi) >= 0 else hi
    eta = float((np.power(x, beta).sum() / r) ** (1.0 / beta))

    # Observed information in (log β, log η) by central differences of the log-likelihood.
    def loglik(lb: float, le: float) -> float:
        b, e = math.exp(lb), math.exp(le)
        z = x / e
        return float(r * (math.log(b) - math.log(e)) + (b - 1.0) * np.log(z[d]).sum() - np.power(z, b).sum())

    p = np.array([math.log(beta), math.log(eta)])
    h = 1e-4
    hess = np.zeros((2, 2))
    for i in range(2):
        for j in range(2):
            ei, ej = np.eye(2)[i] * h, np.eye(2)[j] * h
            hess[i, j] = (loglik(*(p + ei + ej)) - loglik(*(p + ei - ej)) - loglik(*(p - ei + ej))
                          + loglik(*(p - ei - ej))) / (4 * h * h)
    cov = np.linalg.inv(-hess)
    se = np.sqrt(np.maximum(np.diag(cov), 0.0))
    shape_ci = (float(beta * math.exp(-_Z95 * se[0])), float(beta * math.exp(_Z95 * se[0])))
    scale_ci = (float(eta * unit * math.exp(-_Z95 * se[1])), float(eta * unit * math.exp(_Z95 * se[1])))
    return WeibullFit(shape=float(beta), scale=eta * unit, shape_ci=shape_ci, scale_ci=scale_ci, n=len(t),
                      failures=r, loglik=loglik(*p) - r * math.log(unit))


class LognormalFit(BaseModel):
    """A lognormal lifetime model fitted with suspensions: ``log(life) ~ N(mu, sigma)``.

    Attributes:
        mu: Mean of the log lifetime (``exp(mu)`` is the median life, in the clock's unit).
        sigma: Standard deviation of the log lifetime.
        n: Lives used.
        failures: Lives that ended in an observed failure (the rest are suspensions).
        loglik: Log-likelihood of the log lifetimes at the optimum.
    """

    mu: float
    sigma: float
    n: int
    failures: int
    loglik: float

    @property
    def median(self) -> float:
        return float(math.exp(self.mu))

    def survival(self, t: np.ndarray | float) -> np.ndarray:
        """P(life > t)."""
        from scipy.stats import norm

        t = np.asarray(t, float)
        return norm.sf((np.log(np.maximum(t, 1e-300)) - self.mu) / self.sigma)


def lognormal_fit(durations: Sequence[float], observed: Sequence[bool]) -> LognormalFit:
    """Fit a lognormal by maximum likelihood with right censoring.

    Failures contribute the normal density of their log lifetime, suspensions its survival function.
    Without suspensions this is the sample mean and (``ddof=0``) standard deviation of the log lives.

    Args:
        durations: Each life's length (to the failure or to the suspension), positive.
        observed: True where the life ended in a failure.

    Raises:
        ValueError: with fewer than 2 failures, failures of one single length, or bad durations.
    """
    from scipy.optimize import minimize
    from scipy.stats import norm

    t, d = _check(durations, observed)
    r = int(d.sum())
    if r < 2:
        raise ValueError(f"a lognormal fit needs at least 2 observed failures, got {r} (of {len(t)} lives)")
    x = np.log(t)
    if np.ptp(x[d]) == 0:
        raise ValueError("a lognormal fit needs failures of different lengths")
    xf, xs = x[d], x[~d]

    def nll(p: np.ndarray) -> float:
        mu, sigma = p[0], math.exp(p[1])
        return -float(norm.logpdf(xf, mu, sigma).sum() + norm.logsf(xs, mu, sigma).sum())

    # From the failures alone (biased short with suspensions, but the right scale to start from).
    start = np.array([xf.mean(), math.log(xf.std())])
    if xs.size == 0:
        best = start
    else:
        res = minimize(nll, start, method="Nelder-Mead", options={"xatol": 1e-8, "fatol": 1e-10, "maxiter": 4000})
        if not res.success or not np.all(np.isfinite(res.x)):
            raise ValueError(f"the censored lognormal fit did not converge: {res.message}")
        best = res.x
    return LognormalFit(mu=float(best[0]), sigma=float(math.exp(best[1])), n=len(t), failures=r,
                        loglik=-nll(best))


class KaplanMeier(BaseModel):
    """The Kaplan–Meier estimate at each distinct failure time, with 95 % log-log bands."""

    times: list[float]
    survival: list[float]
    lower: list[float]
    upper: list[float]
    at_risk: list[int]


def kaplan_meier(durations: Sequence[float], observed: Sequence[bool]) -> KaplanMeier:
    """Kaplan–Meier survival with Greenwood variance and log-log confidence bands.

    Suspensions at a failure time count as at risk at that time (the usual convention).
    """
    t, d = _check(durations, observed)
    times = np.unique(t[d])
    s, var_sum = 1.0, 0.0
    out_s, lo, up, risk = [], [], [], []
    for u in times:
        n = int((t >= u).sum())
        k = int(((t == u) & d).sum())
        s *= 1.0 - k / n
        if n > k:
            var_sum += k / (n * (n - k))
        out_s.append(s)
        risk.append(n)
        if 0.0 < s < 1.0 and var_sum > 0:
            # Bands on log(-log S): they stay in (0, 1) where the plain Greenwood band would not.
            se = math.sqrt(var_sum) / abs(math.log(s))
            c = _Z95 * se
            lo.append(s ** math.exp(c))
            up.append(s ** math.exp(-c))
        else:
            lo.append(0.0 if s <= 0.0 else s)
            up.append(1.0 if s >= 1.0 else s)
    return KaplanMeier(times=times.tolist(), survival=out_s, lower=lo, upper=up, at_risk=risk)


class KmCheck(BaseModel):
    """How well a Weibull fit follows the Kaplan–Meier estimate."""

    inside_share: float
    max_gap: float
    passed: bool
    threshold: float


def km_check(fit: "WeibullFit | Callable[[np.ndarray], np.ndarray]", km: KaplanMeier, threshold: float = 0.9,
             min_at_risk: int = 5) -> KmCheck:
    """Share of failure times at which a model's survival (a Weibull fit, or any survival function of
    time) lies inside the KM 95 % band.

    The tail where fewer than ``min_at_risk`` lives remain is left out: its bands are too wide to say
    anything and too few lives to judge a fit by. ``passed`` when the share is at least ``threshold``.
    """
    times = np.asarray(km.times)
    keep = np.asarray(km.at_risk) >= min_at_risk
    if not keep.any():
        raise ValueError("no failure time has enough lives at risk for a Kaplan-Meier check")
    model = np.asarray(fit.survival(times[keep]) if isinstance(fit, WeibullFit) else fit(times[keep]), float)
    lo, up = np.asarray(km.lower)[keep], np.asarray(km.upper)[keep]
    inside = (model >= lo - 1e-12) & (model <= up + 1e-12)
    share = float(inside.mean())
    gap = float(np.max(np.abs(model - np.asarray(km.survival)[keep])))
    return KmCheck(inside_share=share, max_gap=gap, passed=share >= threshold, threshold=threshold)
