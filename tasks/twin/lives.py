"""The lives of a fleet's assets, from its life segments: which lives count, their durations and
failures, the lifetime check that stays valid with suspensions (Weibull and Kaplan–Meier), and each
failure mode's lives as competing risks.

Separate from :mod:`.calibration`, which fits the twin's degradation model and uses these lives to
match and check its lifetimes.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from pydantic import BaseModel, Field

from twinflow.contract.model import FleetContract
from twinflow.contracts import ASSET
from twinflow.tasks.twin.survival import KmCheck, WeibullFit, kaplan_meier, km_check, weibull_fit

__all__ = ["MIN_MODE_FAILURES", "LifeCheck", "ModeLives", "life_check", "life_sample", "mode_lives",
           "observed_lives", "select_failure_lives"]


# Failures of one mode below this count get a share but no Weibull of their own (too few to fit).
MIN_MODE_FAILURES = 5


class ModeLives(BaseModel):
    """One failure mode's lives, as competing risks: a life that ended in another mode's failure, a
    renewal or still running is a suspension for this mode.

    Attributes:
        failures: Lives this mode ended.
        share: Its share of all failures (what a failure of the fleet costs is priced by).
        weibull: Its Weibull with suspensions, where it has at least ``MIN_MODE_FAILURES`` failures.
        weibull_km: How that Weibull follows this mode's Kaplan–Meier bands.
    """

    failures: int
    share: float
    weibull: WeibullFit | None = None
    weibull_km: KmCheck | None = None


class LifeCheck(BaseModel):
    """The lifetime check that stays valid with suspensions (see :mod:`twinflow.tasks.twin.survival`).

    Attributes:
        failures: Lives that ended in a failure.
        suspensions: Lives censored by a renewal, or still running.
        weibull: The Weibull fitted with suspensions (with a failure-free period).
        weibull_km: How the Weibull follows the Kaplan–Meier bands.
        twin_km: How the twin's simulated lifetimes follow the same bands (replaces the KS test, which
            compares complete lifetimes only and is biased when lives are censored).
        unobserved_start: Lives left out because they began before the records (``life_start: unknown``).
        by_mode: Each failure mode's lives as competing risks (:class:`ModeLives`), where the segments
            record more than one mode.
    """

    failures: int
    suspensions: int
    weibull: WeibullFit | None = None
    weibull_km: KmCheck | None = None
    unobserved_start: int = 0
    twin_km: KmCheck | None = None
    # Per failure mode, where the segments name more than one (else empty).
    by_mode: dict[str, ModeLives] = Field(default_factory=dict)

    @property
    def mode_shares(self) -> dict[str, float]:
        """Each failure mode's share of the failures (empty where fewer than two modes are recorded)."""
        return {mode: lives.share for mode, lives in self.by_mode.items()}



def observed_lives(seg, contract: FleetContract, dataset: str | None) -> np.ndarray:
    """Which segments' starts were observed: every life after an event, and an asset's first life
    unless the dataset's rule says its records began mid-life (``life_start: unknown``)."""
    first = seg["segment"].to_numpy() == 0
    if dataset is None or contract.first_life_observed(dataset):
        return np.ones(len(seg), bool)
    return ~first


def select_failure_lives(frame, segments, contract: FleetContract, min_lifetime: float,
                         dataset: str | None = None):
    """Rows of the lives that ended in an observed failure, each life its own asset.

    Life segments (``<dataset>__segments``: failure, censored, running) come from the event log or the
    dataset rule's ``life_end``; only failure-ended lives show a whole degradation path. An asset with
    several lives (renewed after a failure) contributes each as ``<asset>#<segment>``.

    A life whose start was not observed (:func:`observed_lives`) shows only the end of its degradation
    path; calibrated as a whole life it would make the twin's lives too short, so it is left out.

    Returns:
        ``(frame of kept rows, number of lives excluded: censored, running, shorter than
        ``min_lifetime`` or of unobserved start)``.
    """
    from twinflow.tasks.ingest.events import rows_in_lives

    seg = segments.to_pandas()
    failed = (seg["end_reason"] == "failure") & (seg["duration"] >= min_lifetime) & \
        observed_lives(seg, contract, dataset)
    excluded = int(len(seg) - failed.sum())
    if frame.empty or not failed.any():
        return frame.iloc[0:0], excluded
    multi = seg.groupby(ASSET)["segment"].transform("size") > 1
    seg_names = np.where(multi, seg[ASSET].astype(str) + "#" + seg["segment"].astype(str), seg[ASSET].astype(str))
    names = {k: v for k, v, ok in zip(zip(seg[ASSET].astype(str), seg["segment"].astype(int)), seg_names, failed)
             if ok}
    where = rows_in_lives(frame, segments, contract.clock)
    life = [names.get((str(a), int(k))) for a, k in zip(frame[ASSET], where["segment"])]
    inside = np.array([n is not None for n in life], bool)
    kept = frame.loc[inside].copy()
    kept[ASSET] = [n for n in life if n is not None]
    return kept.sort_values([ASSET, contract.key], kind="stable"), excluded


def life_sample(segments, contract: FleetContract | None = None, dataset: str | None = None
                ) -> tuple[np.ndarray, np.ndarray, int]:
    """Every life whose start was observed: its duration and whether it ended in a failure.

    A life that began before the records did (``life_start: unknown``) is left out: its length from
    the first reading is a residual life, not a lifetime, and the age it had then is unknown (left
    truncation without an entry age, which no likelihood can correct). So are lives of no duration.

    Returns:
        ``(durations, failed, unobserved_start)``: durations in the clock's unit, failure flags, and the
        number of lives left out for their unobserved start.
    """
    seg, keep, unobserved = _sampled(segments, contract, dataset)
    return seg["duration"].to_numpy(float)[keep], (seg["end_reason"] == "failure").to_numpy()[keep], unobserved


def _sampled(segments, contract: FleetContract | None, dataset: str | None):
    """(segments as pandas, which lives :func:`life_sample` keeps, lives of unobserved start)."""
    seg = segments.to_pandas() if hasattr(segments, "to_pandas") else segments
    durations = seg["duration"].to_numpy(float)
    started = observed_lives(seg, contract, dataset) if contract is not None else np.ones(len(seg), bool)
    return seg, (durations > 0) & started, int((~started).sum())


def mode_lives(segments, contract: FleetContract | None = None, dataset: str | None = None) -> dict[str, ModeLives]:
    """Each failure mode's lives as competing risks (the lives :func:`life_sample` keeps), where the
    segments record more than one mode; empty otherwise (one mode is the whole-life check itself)."""
    seg, keep, _ = _sampled(segments, contract, dataset)
    if "failure_mode" not in seg.columns:
        return {}
    durations = seg["duration"].to_numpy(float)[keep]
    failed = (seg["end_reason"] == "failure").to_numpy()[keep]
    modes = seg["failure_mode"].to_numpy(dtype=object)[keep]
    named = sorted({str(m) for m, f in zip(modes, failed) if f and m is not None and m == m})
    if len(named) < 2:
        return {}
    total = int(failed.sum())
    out: dict[str, ModeLives] = {}
    for mode in named:
        observed = failed & np.array([m == mode for m in modes], bool)
        lives = ModeLives(failures=int(observed.sum()), share=float(observed.sum()) / total)
        if lives.failures >= MIN_MODE_FAILURES:
            try:
                lives.weibull = weibull_fit(durations, observed)
                lives.weibull_km = km_check(lives.weibull, kaplan_meier(durations, observed))
            except ValueError:  # a degenerate fit or too few lives at risk: the share still counts
                pass
        out[mode] = lives
    return out


def life_check(segments, simulated_lifetimes: Sequence[float], contract: FleetContract | None = None,
               dataset: str | None = None) -> LifeCheck:
    """Weibull with suspensions and Kaplan–Meier over every life whose start was observed
    (:func:`life_sample`), and the twin's lifetimes against it."""
    durations, observed, unobserved = life_sample(segments, contract, dataset)
    check = LifeCheck(failures=int(observed.sum()), suspensions=int((~observed).sum()),
                      unobserved_start=unobserved, by_mode=mode_lives(segments, contract, dataset))
    if check.failures < 2:
        return check
    km = kaplan_meier(durations, observed)
    try:
        check.weibull = weibull_fit(durations, observed, location=True)
        check.weibull_km = km_check(check.weibull, km)
    except ValueError:
        pass
    sim = np.sort(np.asarray(simulated_lifetimes, float))
    if len(sim):
        def twin_survival(t: np.ndarray) -> np.ndarray:
            return 1.0 - np.searchsorted(sim, t, side="right") / len(sim)

        try:
            check.twin_km = km_check(twin_survival, km)
        except ValueError:
            pass
    return check
