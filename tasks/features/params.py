"""What the features stage computes: its parameters, the fitted normalisation it reuses, file names.

Kept apart from the stage's code so that the regime fit (:mod:`twinflow.tasks.features.fit`), the
transform and the drivers (:mod:`twinflow.tasks.features`) share one definition without importing
each other. Everything here is re-exported by :mod:`twinflow.tasks.features`.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, field_validator, model_validator

__all__ = ["STATS", "Stat", "EXECUTION_FIELDS", "FIT_FILE", "MANIFEST_FILE", "SINCE_START", "TIME_SINCE_START",
           "REGIME", "LABEL", "FeatureParams", "FitStats", "since_start_name"]

STATS = ("mean", "std", "min", "max", "slope")
Stat = Literal["mean", "std", "min", "max", "slope"]
# Parameters that change how the stage runs, not what it computes: excluded from the cache digest.
EXECUTION_FIELDS = frozenset({"partition_bytes", "backend", "compression"})
FIT_FILE = "_fit.json"
MANIFEST_FILE = "_manifest.json"
SINCE_START = "cycle_since_start"
# Its name for a timestamp clock: time since the asset's first row, in the clock's unit (e.g. hours).
TIME_SINCE_START = "time_since_start"
REGIME = "regime"
LABEL = "rul"
#: Beside the label when life segments are known: the least remaining life each row is known to have
#: had (its life's end minus its time, capped). Equal to the label in failure-ended lives; in censored
#: or running lives it is what a censored objective (``TrainParams.censored="aft"``) learns from.
LOWER = "rul_lower"
_WINDOW_NAME = re.compile(r"\d+(?:\.\d+)?[a-z]+")


class FeatureParams(BaseModel):
    """What the features stage computes, validated before any work.

    The fleet contract of the data says what the channels are: sensors (``kind: sensor``) become
    features, settings (``kind: setting``) define the operating regimes, and its clock says what a
    window of time and the label's unit are.

    Attributes:
        windows: Rolling window lengths in rows (cycles, or readings of a timestamp clock), each > 0;
            may be empty when ``time_windows`` is not.
        time_windows: Rolling windows of time (timestamp clocks only), e.g. ``["1h", "6h"]``: a row's
            window holds the readings of its asset with a time in ``(t - window, t]``, so over a gap
            in the data it holds fewer rows (none are invented) and with irregular sampling the
            count varies; ``min_periods`` valid readings are still needed for a value.
        stats: Rolling statistics per window and channel (``slope`` is per unit of the clock).
        channels: Channels to use; None means every sensor channel of the contract present.
        ewm_spans: Spans of exponentially-weighted means in rows (pandas ``ewm(span=...)``, adjust=True).
        min_periods: Valid rows a window needs for a value (std and slope need 2); at most the
            smallest row window. With 1, the first rows of an asset get partial-window features.
        regimes: Number of operating regimes (k-means on the contract's setting channels), or ``"auto"``.
        max_regimes: Largest k tried by ``auto``.
        regime_tol: ``auto`` picks the smallest k whose k-means inertia is below this fraction
            of the one-cluster inertia (discrete set points collapse to ~0; noise never does).
        normalise: Standardise channels per regime (mean/std of the fit) before windowing.
        drop_constant: Drop channels that are constant (within every regime) or all NaN.
        constant_tol: Relative std below which a channel counts as constant.
        label: Add the RUL label (run-to-failure data only; False e.g. for C-MAPSS test files).
        rul_cap: Piecewise-linear cap of the label, in the clock's unit (cycles, or e.g. hours);
            None for no cap.
        sample_rows: Rows of operating settings sampled to fit the regimes.
        sample_files: Lake files (a random subset, by ``seed``) that sample is drawn from; all
            of them when there are fewer. Saves a full pass over a large lake.
        seed: Seed of the sampling and k-means.
        partition_bytes: Target Parquet bytes per partition (whole assets are never split).
        backend: Array module: ``auto`` (CuPy when the cluster mode is cuda), ``numpy``, ``cupy``.
        compression: Parquet codec of the feature files. Measured on a 190k-row partition of
            170 float32 features: ``snappy`` (default) files are ~26% smaller than ``none``,
            which writes ~30% faster (the write is up to half of the transform on a 2-worker
            cluster), worth it for a feature set on a fast local disk; ``zstd`` (level 1) files
            are ~14% smaller than snappy's and ~1.5x slower to write. Like ``partition_bytes``
            and ``backend`` it does not change the values, so it is not part of the cache key.
    """

    model_config = ConfigDict(extra="forbid")

    windows: list[PositiveInt] = Field(default_factory=lambda: [5, 10, 20, 30])
    time_windows: list[str] = Field(default_factory=list)
    stats: list[Stat] = Field(default_factory=lambda: list(STATS))
    channels: list[str] | None = None
    ewm_spans: list[PositiveInt] = Field(default_factory=lambda: [10])
    min_periods: PositiveInt = 1
    regimes: PositiveInt | Literal["auto"] = "auto"
    max_regimes: PositiveInt = 8
    regime_tol: float = Field(1e-3, gt=0, lt=1)
    normalise: bool = True
    drop_constant: bool = True
    constant_tol: float = Field(1e-6, ge=0)
    label: bool = True
    rul_cap: PositiveInt | PositiveFloat | None = 125
    sample_rows: PositiveInt = 50_000
    sample_files: PositiveInt = 256
    seed: int = 0
    partition_bytes: PositiveInt = 32 * 2**20
    backend: Literal["auto", "numpy", "cupy"] = "auto"
    compression: Literal["snappy", "lz4", "zstd", "none"] = "snappy"

    @field_validator("windows", "ewm_spans", "stats")
    @classmethod
    def _sorted_unique(cls, v: list) -> list:
        return sorted(set(v), key=v.index) if v and isinstance(v[0], str) else sorted(set(v))

    @field_validator("time_windows")
    @classmethod
    def _time_windows(cls, v: list[str]) -> list[str]:
        from twinflow.contract.model import parse_duration

        seen: dict[float, str] = {}
        for w in v:
            try:
                seconds = parse_duration(w).total_seconds()
            except ValueError as exc:
                raise ValueError(f"time window {w!r}: {exc}") from None
            if seconds <= 0:
                raise ValueError(f"time window {w!r} must be positive")
            if not _WINDOW_NAME.fullmatch(w):
                raise ValueError(f"time window {w!r}: write it as a number and a unit without spaces, e.g. '6h'")
            seen.setdefault(seconds, w)
        return [seen[s] for s in sorted(seen)]

    @field_validator("channels")
    @classmethod
    def _channels(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and not v:
            raise ValueError("channels must name at least one channel (or be null for all)")
        return v if v is None else list(dict.fromkeys(v))

    @model_validator(mode="after")
    def _min_periods_fit(self) -> "FeatureParams":
        if not self.windows and not self.time_windows:
            raise ValueError("name at least one window: windows (rows) or time_windows (e.g. ['1h'])")
        if self.windows and self.min_periods > min(self.windows):
            raise ValueError(f"min_periods={self.min_periods} exceeds the smallest window "
                             f"{min(self.windows)}")
        return self

    def digest_payload(self) -> dict[str, Any]:
        """The parameters that determine the output (execution-only fields excluded)."""
        payload = self.model_dump(mode="json", exclude=set(EXECUTION_FIELDS))
        if not payload["time_windows"]:  # keeps the cache keys of feature sets made before time windows
            del payload["time_windows"]
        return payload

    def time_window_lengths(self, unit_seconds: float) -> list[float]:
        """``time_windows`` in the clock's unit (``unit_seconds`` seconds each), in order."""
        from twinflow.contract.model import parse_duration

        return [parse_duration(w).total_seconds() / unit_seconds for w in self.time_windows]


def since_start_name(clock_kind: str) -> str:
    """The time-since-start feature's name: ``cycle_since_start`` or ``time_since_start``."""
    return SINCE_START if clock_kind == "cycle" else TIME_SINCE_START


class FitStats(BaseModel):
    """Normalisation statistics of a training feature set, reused to transform other data.

    Attributes:
        channels: Channels considered (before dropping).
        kept: Channels that become features, in order.
        dropped: Dropped channel -> reason (``constant`` or ``all-NaN``).
        op_columns: Operating settings used for regimes (constant ones are left out).
        op_mean, op_scale: Standardisation of ``op_columns`` before clustering.
        centroids: k-means centroids in standardised space; empty for a single regime.
        mean, std: Per regime (outer) and kept channel (inner).
        rows: Rows seen by the fit.
    """

    channels: list[str]
    kept: list[str]
    dropped: dict[str, str] = Field(default_factory=dict)
    op_columns: list[str] = Field(default_factory=list)
    op_mean: list[float] = Field(default_factory=list)
    op_scale: list[float] = Field(default_factory=list)
    centroids: list[list[float]] = Field(default_factory=list)
    mean: list[list[float]] = Field(default_factory=list)
    std: list[list[float]] = Field(default_factory=list)
    normalised: bool = True
    rows: int = 0

    @property
    def n_regimes(self) -> int:
        return max(1, len(self.centroids))
