"""The health stage: score every running asset, say what to do and by when, and tell people.

Pure functions, one concept per module (the Prefect flow is :mod:`twinflow.flows.health`):

- :mod:`~twinflow.tasks.health.params`: ``HealthParams`` and the risk bands.
- :mod:`~twinflow.tasks.health.lifetime`: censored Weibull lifetimes and the Bayesian combination
  with the RUL model (P(failure within H), remaining-life quantiles).
- :mod:`~twinflow.tasks.health.anomaly`: label-free health index and anomaly score with evidence.
- :mod:`~twinflow.tasks.health.drift`: PSI/KS per channel and regime.
- :mod:`~twinflow.tasks.health.champion`: the champion and its training context (I/O).
- :mod:`~twinflow.tasks.health.score`: one row per asset (or a reason why not).
- :mod:`~twinflow.tasks.health.alerts`: at-risk announcements, once per band rise.
- :mod:`~twinflow.tasks.health.workorders`: CMMS export (CSV, JSON + JSON Schema).
- :mod:`~twinflow.tasks.health.report`: figures and the Markdown summary.
- :mod:`~twinflow.tasks.health.evaluate`: checks against known truth (tests, benchmarks).
"""

from __future__ import annotations

from twinflow.tasks.health.params import BANDS, HealthParams, band_of

__all__ = ["BANDS", "HealthParams", "band_of"]
