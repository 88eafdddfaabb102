"""Features at each asset's last reading only: what scoring a running fleet needs.

:func:`twinflow.tasks.features.compute_features` computes every row's features, as training needs
them; scoring "now" needs one row per asset, its last. Computing every row of a 131-row tail to keep
one is ~100x the work, and the (features x rows) output it fills is most of the memory traffic. Here:

- each window statistic is computed at the last row only, over that window's rows (``w`` rows, or
  the rows of a time window), in one pass that gives count, sums, extremes;
- each EWM runs its recurrence over the rows its memory reaches (the rows given, which the caller
  cuts to what the EWM can see) and writes only its last value;
- only the features asked for are computed, and only their channels are read and normalised.

Definitions and NaN rules are those of ``compute_features`` (pandas ``rolling`` semantics, windows
clipped at the asset's first row, ``min_periods`` valid readings, sample std, least-squares slope
against the clock's time, ``ewm(adjust=True)``); the EWM is the same recurrence in the same order,
so its values are the same bits. Window sums are taken directly over the window instead of sliding
along the tail, so they differ from the full pass by float64 rounding (below float32's, in which
features are stored): ``tests/tasks/features/test_latest.py`` holds the two together.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numba import njit

from twinflow.contract.model import Clock
from twinflow.tasks.features.cpu import window_sums
from twinflow.tasks.features.fit import assign_regimes, compiled_kernels
from twinflow.tasks.features.params import REGIME, FeatureParams, FitStats
from twinflow.tasks.features.transform import feature_names

__all__ = ["FeaturePlan", "feature_plan", "latest_features"]

_STATS = ("mean", "std", "min", "max", "slope")
# Plan entry kinds, in feature_names order.
_SINCE, _REGIME, _VALUE, _ROWS, _TIME, _EWM = range(6)


@dataclass
class FeaturePlan:
    """Which features to compute and where each goes: one entry per wanted feature.

    ``kind`` is a ``_SINCE`` .. ``_EWM`` code, ``param`` the window (rows), time window length
    (clock unit) or span, ``stat`` an index of :data:`_STATS` (-1 where none), ``channel`` an index
    into :attr:`channels`, ``row`` the output row.
    """

    names: list[str]
    kind: np.ndarray
    param: np.ndarray
    stat: np.ndarray
    channel: np.ndarray
    channels: list[str]  # the fit's channels the wanted features read, in the fit's order
    needs_regime: bool


def feature_plan(fit: FitStats, params: FeatureParams, wanted: list[str] | None = None,
                 clock: Clock | None = None) -> FeaturePlan:
    """The plan for ``wanted`` feature names (default: all of :func:`feature_names`), in ``wanted`` order.

    Names that are not features of ``fit`` and ``params`` are left out (the caller reports them).
    """
    from twinflow.tasks.features.params import since_start_name

    clock = clock or Clock()
    entries: list[tuple[str, int, float, int, str | None]] = [(since_start_name(clock.kind), _SINCE, 0.0, -1, None)]
    if fit.n_regimes > 1:
        entries.append((REGIME, _REGIME, 0.0, -1, None))
    suffix = "_norm" if fit.normalised else ""
    entries.extend((f"{ch}{suffix}", _VALUE, 0.0, -1, ch) for ch in fit.kept)
    lengths = params.time_window_lengths(clock.unit_seconds)
    for kind, windows, values in ((_ROWS, params.windows, params.windows), (_TIME, params.time_windows, lengths)):
        for w, v in zip(windows, values):
            for s in params.stats:
                entries.extend((f"{ch}_{s}_{w}", kind, float(v), _STATS.index(s), ch) for ch in fit.kept)
    for span in params.ewm_spans:
        entries.extend((f"{ch}_ewm_{span}", _EWM, float(span), -1, ch) for ch in fit.kept)
    # The one naming rule: the plan's names must be feature_names', in its order.
    assert [e[0] for e in entries] == feature_names(fit, params, clock)
    by_name = {e[0]: e for e in entries}
    picked = [by_name[n] for n in (wanted if wanted is not None else list(by_name)) if n in by_name]
    used = {e[4] for e in picked if e[4] is not None}
    channels = [c for c in fit.kept if c in used]
    index = {c: i for i, c in enumerate(channels)}
    return FeaturePlan(
        names=[e[0] for e in picked], kind=np.array([e[1] for e in picked], np.int64),
        param=np.array([e[2] for e in picked], np.float64), stat=np.array([e[3] for e in picked], np.int64),
        channel=np.array([index[e[4]] if e[4] is not None else -1 for e in picked], np.int64), channels=channels,
        needs_regime=fit.n_regimes > 1 and (fit.normalised and bool(channels) or any(e[1] == _REGIME for e in picked)))


@njit(cache=True, nogil=True)
def _window_stats(y, t, c, lo, hi, mp, res):
    """Mean, std, min, max and slope over rows ``lo..hi-1`` of channel ``c`` (NaNs skipped) into
    ``res[0..4]``, as the full pass defines them (NaN below ``min_periods``; std and slope need 2)."""
    ys = np.nan
    mn = np.inf
    mx = -np.inf
    for j in range(lo, hi):
        v = y[c, j]
        if v == v:
            if ys != ys:
                ys = v  # sums around the first valid value: small terms, and a constant channel's std is 0
            mn = min(mn, v)
            mx = max(mx, v)
    ts = t[lo] if hi > lo else 0.0
    # The full pass's own accumulation (cpu.window_sums), so both passes define the sums the same way.
    cnt, sy, syy, st, stt, sty = window_sums(y, t, c, lo, hi, ys, ts)
    res[:] = np.nan
    if cnt < mp or cnt == 0.0:
        return
    res[0] = sy / cnt + ys
    res[2] = mn
    res[3] = mx
    if cnt < 2.0:
        return
    var = (syy - sy * sy / cnt) / (cnt - 1.0)
    res[1] = math.sqrt(var) if var > 0.0 else 0.0
    den = cnt * stt - st * st
    if den > 1e-12 * max(cnt * stt, 1.0):
        res[4] = (cnt * sty - st * sy) / den


@njit(cache=True, nogil=True)
def _latest_into(y, t, regime, starts, kind, param, stat, channel, group, g_kind, g_param, g_channel,
                 e_span, e_first, e_rows, mp, out):
    """Every planned feature at each asset's last row: ``out[f, a]`` (float32).

    ``y``: (channels, n) normalised values, rows of each asset contiguous and in time order;
    ``t``: (n,) time relative to each asset's first row; ``starts``: (assets + 1,) first rows, then n.
    Window features are grouped by (kind, window, channel): one pass per group gives all five
    statistics, whichever of them are planned. EWM features are grouped by span (``e_span``; plan
    entries ``e_rows[e_first[p]:e_first[p + 1]]``): one pass over the rows runs every channel's
    recurrence, as ``ewm_into`` does (one channel's chain of multiply-adds waits on its latency;
    the channels' chains overlap), each channel's operations in the same order.
    """
    stats = np.empty((g_kind.shape[0], 5))
    n_e = e_rows.shape[0]
    num = np.empty(n_e)
    den = np.empty(n_e)
    seen = np.empty(n_e, np.int64)
    for a in range(starts.shape[0] - 1):
        a0 = starts[a]
        i = starts[a + 1] - 1
        if i < a0:
            continue
        for g in range(g_kind.shape[0]):
            c = g_channel[g]
            if g_kind[g] == 3:
                lo = max(a0, i + 1 - int(g_param[g]))
            else:
                # Rows j <= i with t[j] in (t[i] - length, t[i]], as the full pass's time bounds.
                lo = i
                while lo > a0 and not (t[lo - 1] <= t[i] - g_param[g]):
                    lo -= 1
            _window_stats(y, t, c, lo, i + 1, mp, stats[g])
        for f in range(kind.shape[0]):
            k = kind[f]
            c = channel[f]
            if k == 0:
                out[f, a] = t[i]
            elif k == 1:
                out[f, a] = regime[i]
            elif k == 2:
                out[f, a] = y[c, i]
            elif k == 3 or k == 4:
                out[f, a] = stats[group[f], stat[f]]
        # pandas ewm(span, adjust=True): the full pass's recurrence from the asset's first row given.
        for p in range(e_span.shape[0]):
            beta = 1.0 - 2.0 / (e_span[p] + 1.0)
            e0 = e_first[p]
            e1 = e_first[p + 1]
            num[e0:e1] = 0.0
            den[e0:e1] = 0.0
            seen[e0:e1] = 0
            for j in range(a0, i + 1):
                for e in range(e0, e1):
                    v = y[channel[e_rows[e]], j]
                    nu = num[e] * beta
                    de = den[e] * beta
                    if v == v:
                        nu += v
                        de += 1.0
                        seen[e] += 1
                    num[e] = nu
                    den[e] = de
            for e in range(e0, e1):
                out[e_rows[e], a] = np.nan if den[e] == 0.0 or seen[e] < mp else num[e] / den[e]
    return out


def latest_features(y: np.ndarray, ops: np.ndarray, t: np.ndarray, starts: np.ndarray, fit: FitStats,
                    plan: FeaturePlan, min_periods: int) -> np.ndarray:
    """The planned features at each asset's last row.

    Args:
        y: (len(plan.channels), rows) float64 raw readings of the plan's channels (NaN: missing),
            each asset's rows contiguous and in time order (whole histories, or tails long enough
            for the windows and EWMs).
        ops: (rows, settings) float64 operating settings of the fit (read when ``plan.needs_regime``).
        t: (rows,) float64 time in the clock's unit, relative to each asset's first row.
        starts: (assets + 1,) int64 first row of each asset, then ``rows``.
        fit: The training fit (regimes and normalisation).
        plan: :func:`feature_plan`.
        min_periods: The feature params' ``min_periods``.

    Returns:
        (features, assets) float32, rows in ``plan.names`` order.
    """
    n = y.shape[1]
    # Normalised in place: then on a private copy.
    y = np.array(y, dtype=np.float64, order="C") if fit.normalised else np.ascontiguousarray(y, dtype=np.float64)
    regime = np.zeros(n, np.int64)
    compiled = compiled_kernels()
    if plan.needs_regime:
        regime = np.asarray(assign_regimes(np.ascontiguousarray(ops, dtype=np.float64), fit.op_mean, fit.op_scale,
                                           fit.centroids, np, compiled), np.int64)
    if fit.normalised and plan.channels:
        idx = [fit.kept.index(c) for c in plan.channels]
        mu = np.ascontiguousarray(np.asarray(fit.mean, dtype=np.float64)[:, idx])
        sd = np.asarray(fit.std, dtype=np.float64)[:, idx]
        sd = np.ascontiguousarray(np.where(sd > 0, sd, 1.0))
        if compiled is not None:
            compiled.normalise_(y, regime, mu, sd)
        else:
            y = np.ascontiguousarray((y - mu.T[:, regime]) / sd.T[:, regime])
    out = np.empty((len(plan.names), len(starts) - 1), np.float32)
    windowed = (plan.kind == _ROWS) | (plan.kind == _TIME)
    keys = list(dict.fromkeys(zip(plan.kind[windowed].tolist(), plan.param[windowed].tolist(),
                                  plan.channel[windowed].tolist())))
    index = {k: g for g, k in enumerate(keys)}
    group = np.array([index.get((k, p, c), -1) for k, p, c in zip(plan.kind.tolist(), plan.param.tolist(),
                                                                   plan.channel.tolist())], np.int64)
    g_kind, g_param, g_channel = (np.array([k[j] for k in keys], dt).reshape(-1)
                                  for j, dt in enumerate((np.int64, np.float64, np.int64)))
    ewm = np.flatnonzero(plan.kind == _EWM)
    e_span = np.unique(plan.param[ewm])
    e_rows = np.concatenate([ewm[plan.param[ewm] == sp] for sp in e_span]).astype(np.int64) if ewm.size \
        else np.zeros(0, np.int64)
    e_first = np.r_[0, np.cumsum([(plan.param[ewm] == sp).sum() for sp in e_span])].astype(np.int64)
    return _latest_into(y, np.ascontiguousarray(t, dtype=np.float64), regime, np.asarray(starts, np.int64),
                        plan.kind, plan.param, plan.stat, plan.channel, group, g_kind, g_param, g_channel,
                        e_span.astype(np.float64), e_first, e_rows, float(min_periods), out)
