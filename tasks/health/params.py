"""Parameters of the health stage (validated before any work)."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from twinflow.tasks.twin.model import CostModel

BANDS = ("low", "elevated", "high", "critical")


class HealthParams(BaseModel):
    """What the health stage scores and how it decides.

    Attributes:
        dataset: Lake dataset of the running fleet (each asset's last reading is "now"); None: the
            snapshot the flow is given (the pipeline passes the running fleet's, as to every stage).
        version: Delta table version to score (None: the latest).
        horizons: Horizons H (the clock's time unit) at which P(failure within H) is reported.
        alert_horizon: The horizon whose probability sets the risk band, flags and alerts.
        flag_probability: An asset is flagged "fails within the alert horizon" at P >= this.
        band_thresholds: P(failure within the alert horizon) at which the bands elevated, high,
            critical start.
        alert_band: Lowest band announced by a ``twinflow.asset.at_risk`` event.
        interval_level: Level of the RUL prediction interval (None: the champion's training level).
        window: Readings per recent window (anomaly score, drift sample).
        baseline_fraction: Share of each asset's first readings taken as its healthy baseline.
        min_readings: Assets with fewer readings get a reason row instead of a score.
        max_staleness: Timestamp clocks: an asset whose last reading is older than this (relative
            to the fleet's newest reading, e.g. ``"6h"``) gets "no recent data".
        top_channels: Channels named as evidence per asset.
        costs: Costs and downtimes (the twin's cost model; downtime per time unit of the clock).
        next_run: Time until the next health run (time units): actions due later wait for it.
        drift_psi: PSI above which a channel counts as drifted (``twinflow.model.drift``).
        drift_ks: Optional KS threshold (either exceeded counts).
        use_champion: Use the registered champion (False: label-free scores only).
        fan_assets: Riskiest assets drawn in the RUL fan chart.
        export_dir: Folder of the work-order files (default ``<home>/health/<dataset>/``).
        true_rul_path: Optional truth (C-MAPSS ``RUL_FD00x.txt``: one remaining life per asset, in
            natural order of the ids; or a fleet generator's ``ground_truth.json``: the running
            lives' hidden failure times): flags, interval coverage and the anomaly ranking are then
            checked against it and logged (``health_*`` metrics).
    """

    model_config = ConfigDict(extra="forbid")

    dataset: str | None = None
    version: int | None = Field(None, ge=0)
    horizons: list[float] = Field(default_factory=lambda: [10.0, 30.0, 50.0], min_length=1)
    alert_horizon: float = Field(30.0, gt=0)
    flag_probability: float = Field(0.5, gt=0, lt=1)
    band_thresholds: tuple[float, float, float] = (0.1, 0.3, 0.6)
    alert_band: Literal["elevated", "high", "critical"] = "high"
    interval_level: float | None = Field(None, gt=0, lt=1)
    window: int = Field(10, ge=1)
    baseline_fraction: float = Field(0.25, gt=0, le=1)
    min_readings: int = Field(2, ge=1)
    max_staleness: str | None = None
    top_channels: int = Field(3, ge=1)
    costs: CostModel = Field(default_factory=CostModel)
    next_run: float = Field(10.0, gt=0)
    drift_psi: float = Field(0.25, gt=0)
    drift_ks: float | None = Field(None, gt=0, le=1)
    use_champion: bool = True
    fan_assets: int = Field(6, ge=0)
    export_dir: str | None = None
    true_rul_path: str | None = None

    @field_validator("horizons")
    @classmethod
    def _horizons(cls, v: list[float]) -> list[float]:
        if any(not math.isfinite(h) or h <= 0 for h in v):
            raise ValueError("horizons must be positive")
        return sorted(set(v))

    @field_validator("band_thresholds")
    @classmethod
    def _bands(cls, v: tuple[float, float, float]) -> tuple[float, float, float]:
        if not (0 < v[0] < v[1] < v[2] < 1):
            raise ValueError("band_thresholds must increase strictly within (0, 1)")
        return v

    @model_validator(mode="after")
    def _alert_in_horizons(self) -> "HealthParams":
        if self.alert_horizon not in self.horizons:
            self.horizons = sorted({*self.horizons, self.alert_horizon})
        return self


def band_of(p: float, thresholds: tuple[float, float, float]) -> int:
    """Band index (0 low .. 3 critical) of a failure probability; NaN is low."""
    if not math.isfinite(p):
        return 0
    return sum(p >= t for t in thresholds)


def bands_of(p, thresholds: tuple[float, float, float]):
    """:func:`band_of` of every probability of an array at once (NaN is low)."""
    import numpy as np

    p = np.asarray(p, dtype="float64")
    return np.where(np.isfinite(p), (p[:, None] >= np.asarray(thresholds)[None, :]).sum(axis=1), 0).astype(int)
