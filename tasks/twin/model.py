"""The twin's model and parameters, and the array-module helpers every twin kernel shares.

Pure functions over an array module ``xp`` (``numpy`` on CPU, ``cupy`` on a GPU worker).

Time is the fleet contract's clock: one simulation step is one unit of ``contract.clock.time_unit``
(a cycle for cycle clocks, e.g. an hour for a timestamp clock), and every age, lifetime, interval and
downtime of the twin is counted in that unit (``TwinModel.time_unit``).

Degradation model (the exponential damage propagation used to generate C-MAPSS): a unit installed
with initial wear ``d`` has health ``h(tau) = 1 - d - (exp(a * tau**b) - 1)`` at effective age
``tau`` (steps weighted by the severity of the operating regime of each step). Process noise
enters the damage growth multiplicatively, ``h = 1 - d - (exp(a * tau**b + process_noise * eps) - 1)``
with a fresh ``eps ~ N(0, 1)`` each step, and the unit fails at the first step with ``h <= 0``,
i.e. ``a * tau**b + process_noise * eps >= log(2 - d)``: a comparison that needs no
transcendental function per step, which keeps the kernels cheap. Per unit ``log a ~ N(log_a_mean, log_a_sd)``,
``b ~ N(b_mean, b_sd)``, ``d = d_scale * |N(0, 1)|``: only normals are drawn (and exponentiated)
because CuPy's ``random.Generator`` lacks e.g. ``lognormal``. The contract's ``sensor`` channels
are linear in damage ``D = 1 - h`` per regime: ``s_j = base[regime, j] + gain_j * D + noise_j * eps``;
its ``setting`` channels define the operating regimes (``regime_op`` per regime, plus ``op_noise``).
"""

from __future__ import annotations

import logging
import math
import re
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, computed_field, field_validator, model_validator

from twinflow.contract.model import ContractRef, FleetContract, unit_label  # noqa: F401 - re-exported
from twinflow.errors import ConfigError, TwinflowError

log = logging.getLogger("twinflow.twin")

_TINY_AGE = 1e-9


class NoRunToFailureData(TwinflowError, ValueError):
    """The lake snapshot holds no run-to-failure assets to calibrate the twin on."""


class DegenerateCalibration(TwinflowError, ValueError):
    """The run-to-failure data cannot determine the twin (no informative channel, non-finite fit)."""


# ---------------------------------------------------------------------------------------------
# Parameters
# ---------------------------------------------------------------------------------------------


class TwinModel(BaseModel):
    """Parameter distributions of the fleet twin (see the module docstring for the model).

    The twin is shaped by the fleet contract it was calibrated on: ``settings`` and ``sensors`` are the
    contract's channels it models (in contract order; ``regime_op``/``op_noise`` and the ``sensor_*``
    vectors follow them), ``time_unit`` is the unit of its ages and lifetimes, and ``contract`` (with
    its ``contract_ref``: name, version, digest) lets it generate rows of the same shape.
    """

    model_config = ConfigDict(extra="forbid")

    log_a_mean: float
    log_a_sd: float = Field(ge=0)
    b_mean: float = Field(gt=0)
    b_sd: float = Field(0.0, ge=0)
    d_scale: float = Field(0.0, ge=0, le=0.5)
    process_noise: float = Field(0.005, ge=0)
    regime_probs: list[float] = Field(default_factory=lambda: [1.0])
    regime_severity: list[float] = Field(default_factory=lambda: [1.0])
    settings: list[str] = Field(default_factory=list, description="Setting channels modelled (regimes).")
    sensors: list[str] = Field(default_factory=list, description="Sensor channels modelled.")
    regime_op: list[list[float]] = Field(default_factory=lambda: [[]])
    op_noise: list[float] = Field(default_factory=list)
    sensor_base: list[list[float]] = Field(default_factory=lambda: [[]])
    sensor_gain: list[float] = Field(default_factory=list)
    sensor_noise: list[float] = Field(default_factory=list)
    time_unit: Literal["cycle", "s", "min", "h", "d"] = Field(
        "cycle", description="Unit of ages, lifetimes and one simulation step (the contract clock's unit).")
    contract: FleetContract | None = Field(None, description="The fleet contract the twin was calibrated on.")
    source: str = "default"

    @model_validator(mode="before")
    @classmethod
    def _check_ref(cls, data: Any) -> Any:
        # contract_ref is derived from the contract; a dumped model carries it for readers.
        if isinstance(data, dict) and "contract_ref" in data:
            data = dict(data)
            ref = data.pop("contract_ref")
            contract = data.get("contract")
            if ref is not None and contract is not None:
                c = contract if isinstance(contract, FleetContract) else FleetContract.model_validate(contract)
                if ContractRef.model_validate(ref) != c.ref:
                    raise ValueError(f"contract_ref {ref} does not match the embedded contract ({c.ref})")
        return data

    @model_validator(mode="after")
    def _shapes(self) -> "TwinModel":
        k, n_set, n_sen = len(self.regime_probs), len(self.settings), len(self.sensors)
        if k == 0 or abs(sum(self.regime_probs) - 1.0) > 1e-6 or min(self.regime_probs) < 0:
            raise ValueError("regime_probs must be non-negative and sum to 1")
        if len(self.regime_severity) != k or min(self.regime_severity) <= 0:
            raise ValueError("regime_severity needs one positive value per regime")
        if len(self.regime_op) != k or any(len(r) != n_set for r in self.regime_op):
            raise ValueError(f"regime_op needs {n_set} operating settings ({self.settings}) per regime")
        if len(self.sensor_base) != k or any(len(r) != n_sen for r in self.sensor_base):
            raise ValueError(f"sensor_base needs {n_sen} values ({self.sensors}) per regime")
        if len(self.sensor_gain) != n_sen or len(self.sensor_noise) != n_sen:
            raise ValueError(f"sensor_gain and sensor_noise need {n_sen} values ({self.sensors})")
        if len(self.op_noise) != n_set:
            raise ValueError(f"op_noise needs {n_set} values ({self.settings})")
        if len(set(self.settings + self.sensors)) != n_set + n_sen:
            raise ValueError("a channel is listed twice in settings/sensors")
        if self.contract is not None:
            c = self.contract
            settings, sensors = set(c.settings), set(c.sensors)
            wrong = [s for s in self.settings if s not in settings] + [s for s in self.sensors if s not in sensors]
            if wrong:
                raise ValueError(f"channels {wrong} are not declared with that kind (setting/sensor) by "
                                 f"contract {c.name!r} v{c.version}")
            if self.time_unit != c.time_unit:
                raise ValueError(f"time_unit {self.time_unit!r} differs from contract {c.name!r}'s "
                                 f"clock unit {c.time_unit!r}")
        return self

    @computed_field  # type: ignore[prop-decorator]
    @property
    def contract_ref(self) -> ContractRef | None:
        """Name, version and digest of the contract (recorded in ``twin/model.json``)."""
        return None if self.contract is None else self.contract.ref

    @property
    def n_regimes(self) -> int:
        return len(self.regime_probs)

    @property
    def mean_severity(self) -> float:
        return float(np.dot(self.regime_probs, self.regime_severity))


class CostModel(BaseModel):
    """Costs and downtimes of maintenance events, in ``currency``."""

    model_config = ConfigDict(extra="forbid")

    currency: str = Field("EUR", min_length=1, max_length=8, description="Currency of every cost (shown with them).")

    failure: float = Field(100_000.0, ge=0, description="Cost of one unplanned failure (repair).")
    planned: float = Field(20_000.0, ge=0, description="Cost of one planned maintenance.")
    downtime_per_cycle: float = Field(2_000.0, ge=0, description="Cost of one asset down for one clock unit "
                                      "(a cycle, or e.g. an hour for a timestamp clock).")
    failure_downtime: int = Field(20, ge=0, description="Clock units (cycles, h, ...) down after a failure.")
    planned_downtime: int = Field(5, ge=0, description="Clock units down for a planned maintenance.")
    failure_by_mode: dict[str, float] = Field(
        default_factory=dict, description="Cost of a failure per failure mode (as the event log names modes, "
        "e.g. {bearing: 150000, seal: 40000}); a mode not listed costs `failure`. The twin simulates one "
        "degradation process, so a simulated failure costs the modes' costs weighted by their share of "
        "the fleet's recorded failures (the calibration's lives).")

    def priced_by_mode(self, shares: dict[str, float]) -> tuple["CostModel", str | None]:
        """These costs with ``failure`` set to the expected cost of one failure under the fleet's mix of
        failure modes (``shares``: each mode's share of the recorded failures), and a sentence saying
        so; unchanged (and None) where no mode cost is declared.
        """
        if not self.failure_by_mode:
            return self, None
        if not shares:
            return self, (f"failure costs per mode are declared ({', '.join(sorted(self.failure_by_mode))}) but "
                          "the lives record fewer than two failure modes: a failure costs "
                          f"{self.failure:,.0f} {self.currency}")
        total = sum(shares.values())
        parts = sorted(shares.items(), key=lambda kv: -kv[1])
        cost = sum(share / total * self.failure_by_mode.get(mode, self.failure) for mode, share in parts)
        terms = " + ".join(f"{mode} {share / total:.0%} x {self.failure_by_mode.get(mode, self.failure):,.0f}"
                           for mode, share in parts)
        return self.model_copy(update={"failure": cost}), \
            f"a failure costs {cost:,.0f} {self.currency}: the recorded failure modes' mix ({terms})"


class TwinParams(BaseModel):
    """Parameters of the ``simulate`` stage (validated before any cluster work).

    Durations (``horizon``, ``intervals``, ``inspect_every``, ``min_lifetime``, downtimes, RUL
    thresholds) are in the clock unit of the twin's contract: cycles for C-MAPSS, e.g. hours for a
    timestamped fleet.
    """

    model_config = ConfigDict(extra="forbid")

    n_scenarios: int = Field(100, gt=0, description="Monte-Carlo scenarios per policy.")
    n_assets: int = Field(100, gt=0, description="Assets in the simulated fleet.")
    horizon: int = Field(1000, gt=0, description="Simulated clock units per scenario.")
    seed: int = Field(0, ge=0, description="Root seed; batches get SeedSequence(seed).spawn(n).")
    batch_scenarios: int = Field(10, gt=0, description="Scenarios per Dask batch (fixed split, so "
                                 "results do not depend on the number of workers).")
    intervals: list[int] = Field(default_factory=lambda: [75, 100, 125, 150, 175],
                                 description="Fixed-interval policies: maintain every k clock units.")
    thresholds: list[float] = Field(default_factory=lambda: [10.0, 20.0, 30.0, 45.0, 60.0],
                                    description="Predictive policies: maintain at RUL estimate <= x.")
    inspect_every: int = Field(10, gt=0, description="Clock units between RUL estimates.")
    costs: CostModel = Field(default_factory=CostModel)
    process_noise: float = Field(0.005, ge=0, description="Sd of the per-step shock on log(1 + damage).")
    rul_error_sd: float = Field(20.0, gt=0, description="Sd of the fallback Gaussian RUL error.")
    backend: Literal["auto", "numpy", "cupy"] = "auto"
    on_no_run_to_failure: Literal["error", "defaults"] = "error"
    truncated_sources: str = Field(r"^test_", description="Regex searched in the base name of each "
                                   "source file; matching files' assets are truncated (not run to "
                                   "failure), e.g. C-MAPSS test_FD001.txt.")
    min_lifetime: int = Field(20, gt=0, description="Assets with shorter lives (clock "
                              "units) are not calibrated on.")
    fan_units: int = Field(300, gt=0, description="Units in the health fan chart.")

    @field_validator("intervals")
    @classmethod
    def _positive_intervals(cls, v: list[int]) -> list[int]:
        if any(k <= 0 for k in v):
            raise ValueError("intervals must be positive durations (clock units)")
        return sorted(set(v))

    @field_validator("thresholds")
    @classmethod
    def _non_negative_thresholds(cls, v: list[float]) -> list[float]:
        if any(not math.isfinite(x) or x < 0 for x in v):
            raise ValueError("thresholds must be finite and >= 0")
        return sorted(set(v))

    @field_validator("truncated_sources")
    @classmethod
    def _regex(cls, v: str) -> str:
        try:
            re.compile(v)
        except re.error as exc:
            raise ValueError(f"truncated_sources is not a valid regex: {exc}") from None
        return v


class GenerateParams(BaseModel):
    """Parameters of the ``generate`` flow (synthetic run-to-failure fleet)."""

    model_config = ConfigDict(extra="forbid")

    n_assets: int = Field(100, gt=0)
    seed: int = Field(0, ge=0)
    dataset: str = Field("synthetic", pattern=r"^[a-z0-9][a-z0-9_-]*$",
                         description="Lake dataset name (lower-case, as the ingest stage names them).")
    target: Literal["lake", "landing"] = "lake"
    chunk_assets: int = Field(2000, gt=0, description="Assets per Dask task (fixed split).")
    batch_id: str | None = Field(None, pattern=r"^[A-Za-z0-9_.-]+$")
    asset_prefix: str = Field("syn-", pattern=r"^[A-Za-z0-9_.-]*$")


# ---------------------------------------------------------------------------------------------
# Array-module helpers
# ---------------------------------------------------------------------------------------------


def array_module(backend: str = "numpy"):
    """Return ``numpy`` or ``cupy`` for ``backend`` (``auto``: CuPy when a GPU is visible)."""
    if backend == "numpy":
        return np
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() > 0:
            return cupy
    except Exception as exc:  # noqa: BLE001 - no CUDA driver, no cupy, ...
        if backend == "cupy":
            raise ConfigError(f"backend 'cupy' needs CuPy and a CUDA GPU on the worker ({exc})") from None
    if backend == "cupy":
        raise ConfigError("backend 'cupy' needs a CUDA GPU on the worker")
    return np


def to_numpy(a):
    """A host (NumPy) array from a NumPy or CuPy array."""
    return a.get() if hasattr(a, "get") else np.asarray(a)


def seed_sequence(seed: int | np.random.SeedSequence) -> np.random.SeedSequence:
    """``seed`` as a ``SeedSequence`` (a sequence passes through)."""
    return seed if isinstance(seed, np.random.SeedSequence) else np.random.SeedSequence(seed)


def child_seed(ss: np.random.SeedSequence, i: int) -> np.random.SeedSequence:
    """The ``i``-th child stream of ``ss``: each random draw of the twin has its own index."""
    # Independent of how often ss.spawn() was called before: a pure function of (ss, i).
    return np.random.SeedSequence(entropy=ss.entropy, spawn_key=tuple(ss.spawn_key) + (i,))


def make_rng(xp, ss: np.random.SeedSequence):
    """A random generator of array module ``xp`` seeded from ``ss``."""
    if xp is np:
        return np.random.Generator(np.random.PCG64(ss))
    return xp.random.default_rng(int(ss.generate_state(1, np.uint64)[0]))


def model_arrays(model: TwinModel, xp) -> dict[str, Any]:
    """The model's regime and sensor parameters as ``xp`` float64 arrays."""
    f = xp.float64
    return {
        "cum_probs": xp.asarray(np.cumsum(model.regime_probs)[:-1], dtype=f),
        "severity": xp.asarray(model.regime_severity, dtype=f),
        "op": xp.asarray(model.regime_op, dtype=f),
        "op_noise": xp.asarray(model.op_noise, dtype=f),
        "base": xp.asarray(model.sensor_base, dtype=f),
        "gain": xp.asarray(model.sensor_gain, dtype=f),
        "noise": xp.asarray(model.sensor_noise, dtype=f),
    }


def failure_age(d, log_a, b, xp=np):
    """Deterministic effective age at which ``h`` reaches 0: ``(log(2 - d) / a) ** (1 / b)``."""
    return xp.exp((xp.log(xp.log(2.0 - d)) - log_a) / b)


def draw_units(model: TwinModel, rng, n: int | tuple[int, ...], xp=np) -> dict[str, Any]:
    """Draw units' parameters: ``d``, ``log_a``, ``a``, ``b``, ``c = log(2 - d)`` (failure level of
    ``a * tau**b``) and ``tau_f``, the deterministic failure age."""
    shape = (n,) if isinstance(n, int) else tuple(n)
    z = rng.standard_normal((3, *shape))
    log_a = model.log_a_mean + model.log_a_sd * z[0]
    b = xp.clip(model.b_mean + model.b_sd * z[1], 0.3, 6.0)
    d = xp.minimum(model.d_scale * xp.abs(z[2]), 0.9)
    return {"d": d, "log_a": log_a, "a": xp.exp(log_a), "b": b, "c": xp.log(2.0 - d),
            "tau_f": failure_age(d, log_a, b, xp)}


def damage_growth(log_a, b, tau, xp):
    """The damage exponent ``a * tau**b`` (0 at age 0)."""
    x = xp.log(xp.maximum(tau, _TINY_AGE))
    x *= b
    x += log_a
    xp.exp(x, out=x)
    return x
