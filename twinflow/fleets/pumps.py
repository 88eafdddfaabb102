"""A generated fleet of centrifugal pumps: the bundled ``pumps`` contract's data, as a plant exports it.

Each pump runs a sequence of lives. A life degrades along one hidden failure mode and ends in a
failure, in a preventive replacement or overhaul (a censored life), or is still running when the
export ends. The two failure modes leave different signatures:

* **bearing wear**: vibration rises (quadratically in the damage), the bearing temperature climbs,
  the motor draws a little more current;
* **seal wear**: internal leakage lowers discharge pressure and flow, and the casing and outlet
  temperatures rise.

Pumps switch between operating regimes (speed and load setpoints of the drive), so a reading is only
high or low relative to its regime. Readings come every ``interval`` with jitter, stop during
communication outages and repairs, and carry the sensor faults of real loggers: blanks, sentinel
values (``-999``), stuck values and out-of-range spikes.

:func:`generate_pumps` builds the fleet in memory (pure, seeded: the same parameters give the same
bytes); :func:`write_pumps` writes it the way a plant's historian would: one CSV per day
(``pumps_<YYYY-MM-DD>.csv``, every pump's rows of that day, plant-style headers such as
``casing_temp [degC]``), a maintenance log ``events.csv`` and, for tests, ``ground_truth.json``
(every life's start, end, end reason and failure mode). Pump ``i`` gets its own random stream, so it
is the same pump whatever ``n_pumps`` is.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass
from datetime import date, datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, field_validator

from twinflow.contract import FleetContract, load_contract, parse_duration

__all__ = ["EVENT_TYPES", "PLANT_HEADERS", "PumpFleet", "PumpFleetParams", "generate_pumps", "write_pumps"]

DAY_S = 86400
# Rated speed of the drive: speeds are expressed relative to it.
RATED_RPM = 2950.0
# Operating regimes (speed setpoint rpm, load setpoint %, share of the time).
REGIMES = np.array([(2950.0, 100.0, 0.35), (2950.0, 85.0, 0.30), (2200.0, 70.0, 0.20), (1500.0, 50.0, 0.15)])
# Header each channel gets in the plant's export: a mix of bare names and "name [unit]", as found in
# real historian exports. Every one is the channel's name or one of its aliases in pumps.yaml.
PLANT_HEADERS = {
    "speed_rpm": "speed_rpm",
    "load_pct": "load_pct",
    "inlet_temp_c": "inlet_temp_c",
    "outlet_temp_c": "outlet_temp_c",
    "casing_temp_c": "casing_temp [degC]",
    "bearing_temp_c": "bearing_temp [degC]",
    "discharge_pressure_bar": "discharge_pressure_bar",
    "flow_m3h": "flow [m3/h]",
    "vibration_mm_s": "vibration [mm/s]",
    "motor_current_a": "motor_current [A]",
}
EVENT_TYPES = ("failure_bearing", "failure_seal", "replacement", "overhaul", "inspection", "lubrication")
_TEXT = {
    "failure_bearing": ["Pump tripped on high vibration; DE bearing found damaged, bearing set replaced",
                        "Bearing seized, noise and heat at DE housing; bearings renewed",
                        "Vibration alarm HH, shutdown; bearing outer race spalled, replaced"],
    "failure_seal": ["Mechanical seal leaking heavily, low discharge pressure; seal replaced",
                     "Seal failure, product on baseplate; mechanical seal renewed",
                     "Low flow and hot casing, seal faces worn through; seal cartridge replaced"],
    "replacement": ["Planned replacement of rotating assembly (condition based)",
                    "Preventive exchange of pump cartridge"],
    "overhaul": ["Scheduled overhaul: bearings and mechanical seal renewed",
                 "Workshop overhaul, impeller clearance reset, bearings and seal new"],
    "inspection": ["Routine inspection, no findings", "Walkdown inspection: ok",
                   "Inspection, slight noise noted, keep monitoring"],
    "lubrication": ["Bearings regreased", "Lubrication round: grease added DE/NDE"],
}


class PumpFleetParams(BaseModel):
    """Parameters of a generated pump fleet.

    Attributes:
        n_pumps: Number of pumps (``P-101``, ``P-102``, ...).
        days: Days of readings, starting at ``start`` (UTC midnight).
        seed: Seed of every random draw: the same parameters give the same files.
        start: First day.
        interval: Nominal sampling interval (the contract's ``clock.interval``).
        jitter_s: Standard deviation of a reading's time around its nominal slot (kept within half
            the contract's clock tolerance, so jitter never reads as a gap).
        mean_life_days: Mean time to failure of a new pump (Weibull).
        weibull_shape: Shape of the time-to-failure distribution (>1: wear-out).
        initial_age_max: The pumps are not new when the export starts: the first life has used a
            uniform share in ``[0, initial_age_max]`` of its time to failure.
        seal_share: Probability that a life wears along the seal mode (else bearings).
        p_preventive: Probability that a life ends in a planned replacement/overhaul before failing.
        gap_rate_per_day: Communication outages per pump and day (rows missing, the pump runs on).
        gap_mean_hours: Mean outage length.
        dropout_rate: Share of values written blank.
        sentinel_rate: Share of values written as a logger sentinel (``-999``, ``-9999``).
        spike_rate: Share of sensor values replaced by an out-of-range spike.
        stuck_rate_per_week: Stuck-sensor episodes per pump, sensor channel and week.
        plant_headers: Write plant-style headers (``casing_temp [degC]``); False: the channel names.
    """

    model_config = ConfigDict(extra="forbid")

    n_pumps: int = Field(20, ge=1, le=100_000)
    days: int = Field(120, ge=1, le=3660)
    seed: int = Field(0, ge=0)
    start: date = date(2026, 1, 1)
    interval: str = "10min"
    jitter_s: float = Field(40.0, ge=0)
    mean_life_days: float = Field(40.0, gt=0)
    weibull_shape: float = Field(3.0, gt=0)
    initial_age_max: float = Field(0.6, ge=0, lt=1)
    seal_share: float = Field(0.45, ge=0, le=1)
    p_preventive: float = Field(0.25, ge=0, le=1)
    gap_rate_per_day: float = Field(0.08, ge=0)
    gap_mean_hours: float = Field(3.0, gt=0)
    dropout_rate: float = Field(0.002, ge=0, le=0.5)
    sentinel_rate: float = Field(0.0005, ge=0, le=0.5)
    spike_rate: float = Field(0.0002, ge=0, le=0.5)
    stuck_rate_per_week: float = Field(0.05, ge=0)
    plant_headers: bool = True

    @field_validator("interval")
    @classmethod
    def _interval(cls, v: str) -> str:
        s = parse_duration(v).total_seconds()
        if not 1 <= s <= DAY_S or DAY_S % s:
            raise ValueError(f"interval {v!r} must divide a day into whole slots (e.g. '10min', '1min', '1h')")
        return v

    @property
    def interval_s(self) -> int:
        return int(parse_duration(self.interval).total_seconds())


@dataclass(frozen=True)
class PumpFleet:
    """A generated fleet, in memory.

    Attributes:
        params: The parameters it was generated from.
        contract: The contract its data follows (bundled ``pumps``).
        readings: One row per reading as written (faults included): ``machine``, ``ts`` (UTC,
            seconds) and every channel (canonical names), plus the hidden truth the files do not carry:
            ``life`` (index into ``lives``), ``health`` (damage 0..1 of the life's mode),
            ``rul_h`` (hours to the life's failure; NaN when the life does not end in a failure)
            and ``fault`` (the last fault injected into the row: 0 none, 1 blank, 2 sentinel,
            3 spike, 4 stuck).
        events: The maintenance log (``machine, ts, event, work_order, text``).
        lives: One dict per life: ``machine, life, start, end, end_reason`` (``failure``,
            ``replacement``, ``overhaul``, ``censored``), ``failure_mode`` (``bearing``/``seal`` or
            None), ``mode`` (the hidden wear mode), ``initial_age_h``, ``time_to_failure_h``.
    """

    params: PumpFleetParams
    contract: FleetContract
    readings: pa.Table
    events: pa.Table
    lives: list[dict]


def _iso(t0: np.datetime64, seconds: float) -> str:
    return str((t0 + np.timedelta64(int(round(seconds)), "s")).astype("datetime64[s]")).replace("T", " ")


def _lives(rng: np.random.Generator, p: PumpFleetParams, horizon_s: float) -> list[dict]:
    """The pump's lives in seconds from the start: start, end, end reason, mode, ages."""
    scale_s = p.mean_life_days * DAY_S / math.gamma(1 + 1 / p.weibull_shape)
    out, t, first = [], 0.0, True
    while t < horizon_s:
        mode = "seal" if rng.random() < p.seal_share else "bearing"
        ttf = max(scale_s * rng.weibull(p.weibull_shape), 2 * DAY_S)
        age0 = rng.uniform(0, p.initial_age_max) * ttf if first else 0.0
        # Steeper damage curves for some lives: the same mode does not always look the same.
        power = rng.uniform(1.6, 2.6)
        end, reason = t + (ttf - age0), "failure"
        if rng.random() < p.p_preventive:
            # A planned replacement is due at an age set by the maintenance plan (a share of the fleet's
            # characteristic life), not by this pump's own time to failure, which nobody knows: so it
            # only censors the lives that would have lasted longer. Tied to the life's own failure time,
            # the censoring was informative and biased every censored-lifetime estimate (KM, Weibull).
            at = rng.uniform(0.35, 0.9) * scale_s
            if age0 + 3600 < at < ttf:
                end, reason = t + (at - age0), ("overhaul" if rng.random() < 0.3 else "replacement")
        end = float(np.round(end))
        if end >= horizon_s:
            end, reason = horizon_s, "censored"
        out.append(dict(start=t, end=end, reason=reason, mode=mode, ttf=ttf, age0=age0, power=power))
        if reason == "failure":
            t = end + rng.uniform(6, 48) * 3600  # repair: the pump is down, no readings
        else:
            t = end + rng.uniform(2, 8) * 3600
        t = float(np.round(t))
        first = False
    return out


def _pump(index: int, rng: np.random.Generator, p: PumpFleetParams, contract: FleetContract) -> dict:
    """One pump's readings (arrays), lives and events."""
    dt = p.interval_s
    horizon = p.days * DAY_S
    slots = np.arange(0, horizon, dt, dtype=np.float64)
    lives = _lives(rng, p, horizon)
    starts = np.array([lf["start"] for lf in lives])
    ends = np.array([lf["end"] for lf in lives])
    life = np.searchsorted(starts, slots, side="right") - 1
    running = slots < ends[life]

    # Communication outages: the pump runs, the historian gets nothing.
    n_gaps = rng.poisson(p.gap_rate_per_day * p.days)
    gap_start = rng.uniform(0, horizon, n_gaps)
    gap_len = np.maximum(rng.exponential(p.gap_mean_hours * 3600, n_gaps), 2 * dt)
    seen = running.copy()
    for a, length in zip(gap_start, gap_len):
        seen[(slots >= a) & (slots < a + length)] = False

    # Regimes: piecewise-constant setpoints, switching every ~16 h (at least an hour apart).
    n_seg = int(horizon / 3600) + 2
    seg_end = np.cumsum(np.maximum(rng.exponential(16 * 3600, n_seg), 3600))
    seg_regime = rng.choice(len(REGIMES), size=n_seg, p=REGIMES[:, 2] / REGIMES[:, 2].sum())
    regime = seg_regime[np.minimum(np.searchsorted(seg_end, slots, side="right"), n_seg - 1)]

    t = slots[seen]
    life = life[seen]
    regime = regime[seen]
    n = t.size
    age = np.array([lf["age0"] for lf in lives])[life] + (t - starts[life])
    ttf = np.array([lf["ttf"] for lf in lives])[life]
    power = np.array([lf["power"] for lf in lives])[life]
    # Damage grows from the start (a slow linear part: clearances open, grease ages) and accelerates
    # towards the end; so the early life is not silent, but a small drift under the noise.
    wear = np.clip(age / ttf, 0, 1)
    health = 0.3 * wear + 0.7 * wear ** power
    is_seal = np.array([lf["mode"] == "seal" for lf in lives])[life]
    hb = np.where(is_seal, 0.0, health)
    hs = np.where(is_seal, health, 0.0)
    failed = np.array([lf["reason"] == "failure" for lf in lives])[life]
    rul_h = np.where(failed, (ends[life] - t) / 3600.0, np.nan)

    # One pump model across the fleet, but no two units read alike at the same state (manufacturing
    # tolerance, piping, sensor placement).
    q_rated, p_rated = rng.uniform(290, 350), rng.uniform(10, 11.5)
    i_rated, vib0 = rng.uniform(175, 205), rng.uniform(1.4, 2.0)
    inlet0, bearing0 = rng.uniform(12, 24), rng.uniform(-2, 2)

    speed = REGIMES[regime, 0]
    load = REGIMES[regime, 1]
    s, ld = speed / RATED_RPM, load / 100.0
    days = t / DAY_S
    noise = rng.standard_normal((8, n))
    inlet = inlet0 + 3 * np.sin(2 * np.pi * (days - 0.375)) + 4 * np.sin(2 * np.pi * days / 365) + 0.3 * noise[0]
    outlet = inlet + 0.8 + 1.2 * ld + 2.5 * hs + 0.3 * noise[1]
    casing = inlet + 10 + 6 * ld + 18 * hs ** 1.5 + 4 * hb + 0.6 * noise[2]
    bearing = inlet + 22 + bearing0 + 12 * s + 35 * hb ** 1.5 + 2 * hs + 0.8 * noise[3]
    pressure = p_rated * s ** 2 * (1.15 - 0.15 * ld) * (1 - 0.28 * hs) + 0.12 * noise[4]
    flow = q_rated * ld * (0.7 + 0.3 * s) * (1 - 0.22 * hs) + 4 * noise[5]
    vib = (vib0 * (0.4 + 0.6 * s ** 2) + 9 * hb ** 2 + 0.8 * hb + 0.6 * hs) * np.exp(0.08 * noise[6])
    current = i_rated * (0.3 + 0.7 * ld * s ** 1.5) * (1 + 0.08 * hb - 0.03 * hs) + 2 * noise[7]
    values = {"speed_rpm": speed, "load_pct": load, "inlet_temp_c": inlet, "outlet_temp_c": outlet,
              "casing_temp_c": casing, "bearing_temp_c": bearing, "discharge_pressure_bar": pressure,
              "flow_m3h": flow, "vibration_mm_s": vib, "motor_current_a": current}
    decimals = {"speed_rpm": 0, "load_pct": 0, "flow_m3h": 1, "motor_current_a": 1}
    cols = {}
    fault = np.zeros(n, np.int8)
    sentinels = np.array(contract.sentinels[:2] or [-999.0])
    for ch in contract.channels:
        v = np.round(np.clip(values[ch.name], ch.low, ch.high), decimals.get(ch.name, 2))
        if ch.kind == "sensor" and n:
            # Stuck: the logger repeats one value for hours (longer than the contract's stuck window).
            for _ in range(rng.poisson(p.stuck_rate_per_week * p.days / 7)):
                a = int(rng.integers(0, n))
                b = min(n, a + int(rng.integers(2 * contract.stuck_window, 2 * DAY_S // dt)))
                v[a:b] = v[a]
                fault[a:b] = 4
            spike = rng.random(n) < p.spike_rate
            width = ch.high - ch.low
            v[spike] = np.where(rng.random(spike.sum()) < 0.5, ch.high + width * rng.uniform(0.2, 1, spike.sum()),
                                ch.low - width * rng.uniform(0.2, 1, spike.sum()))
            v[spike] = np.round(v[spike], 1)
            fault[spike] = 3
        sentinel = rng.random(n) < p.sentinel_rate
        v[sentinel] = sentinels[rng.integers(0, sentinels.size, sentinel.sum())]
        fault[sentinel] = 2
        blank = rng.random(n) < p.dropout_rate
        v[blank] = np.nan
        fault[blank] = 1
        cols[ch.name] = v

    # Each reading strays at most half the contract's tolerance, so two neighbours are never further
    # apart than interval + tolerance: jitter never reads as a gap.
    bound = min(dt / 4, contract.clock.tolerance_s / 2) if contract.clock.kind == "timestamp" else dt / 4
    jitter = np.clip(rng.normal(0, p.jitter_s, n), -bound, bound) if p.jitter_s else np.zeros(n)
    ts = np.round(t + jitter).astype(np.int64)
    ts = np.maximum(ts, 0)

    machine = f"P-{101 + index}"
    events = _events(rng, machine, lives, horizon)
    return dict(machine=machine, ts=ts, life=life, health=health, rul_h=rul_h, fault=fault, cols=cols,
                lives=lives, events=events)


def _events(rng: np.random.Generator, machine: str, lives: list[dict], horizon: float) -> list[tuple]:
    out = []
    for lf in lives:
        if lf["reason"] == "failure":
            out.append((lf["end"], f"failure_{lf['mode']}"))
        elif lf["reason"] in ("replacement", "overhaul"):
            out.append((lf["end"], lf["reason"]))
    # Routine work: inspections about monthly, lubrication about every two weeks, while running.
    for kind, every in (("inspection", 30.0), ("lubrication", 14.0)):
        at = rng.uniform(0, every) * DAY_S
        while at < horizon:
            up = any(lf["start"] <= at < lf["end"] for lf in lives)
            if up:
                out.append((float(np.round(at)), kind))
            at += rng.uniform(0.8, 1.2) * every * DAY_S
    return [(machine, t, kind, _TEXT[kind][int(rng.integers(0, len(_TEXT[kind])))]) for t, kind in out]


def generate_pumps(params: PumpFleetParams | None = None, contract: FleetContract | None = None) -> PumpFleet:
    """Generate a pump fleet in memory (deterministic for given parameters).

    Args:
        params: Fleet parameters (defaults: 20 pumps, 120 days, seed 0).
        contract: The contract to follow; default the bundled ``pumps`` one. Its channels must be the
            ten pump channels (units and ranges may differ: values are clipped into its ranges
            before faults are injected).

    Raises:
        ValueError: when the contract declares channels this generator does not model.
    """
    params = params or PumpFleetParams()
    contract = contract or load_contract("pumps")
    unknown = [c for c in contract.channel_names if c not in PLANT_HEADERS]
    if unknown:
        raise ValueError(f"contract {contract.name!r} declares channels the pump generator does not model: {unknown}")
    seqs = np.random.SeedSequence(params.seed).spawn(params.n_pumps)
    pumps = [_pump(i, np.random.default_rng(seq), params, contract) for i, seq in enumerate(seqs)]
    t0 = np.datetime64(params.start.isoformat(), "s")

    life_offset = np.cumsum([0] + [len(pm["lives"]) for pm in pumps])[:-1]
    ts = np.concatenate([pm["ts"] for pm in pumps])
    machine_idx = np.concatenate([np.full(pm["ts"].size, i, np.int32) for i, pm in enumerate(pumps)])
    order = np.lexsort((machine_idx, ts))
    machines = pa.array([pm["machine"] for pm in pumps], pa.string())
    cols = {
        "machine": pa.DictionaryArray.from_arrays(pa.array(machine_idx[order]), machines).cast(pa.string()),
        "ts": pa.array((ts[order] + t0.astype(np.int64)).astype("datetime64[s]"), pa.timestamp("s", tz="UTC")),
    }
    for ch in contract.channel_names:
        v = np.concatenate([pm["cols"][ch] for pm in pumps])[order]
        cols[ch] = pa.array(v, pa.float64(), mask=np.isnan(v))
    cols["life"] = pa.array(np.concatenate([pm["life"] + off for pm, off in zip(pumps, life_offset)])[order], pa.int32())
    cols["health"] = pa.array(np.concatenate([pm["health"] for pm in pumps])[order])
    cols["rul_h"] = pa.array(np.concatenate([pm["rul_h"] for pm in pumps])[order])
    cols["fault"] = pa.array(np.concatenate([pm["fault"] for pm in pumps])[order])
    readings = pa.table(cols)

    lives = []
    for pm in pumps:
        for k, lf in enumerate(pm["lives"]):
            lives.append(dict(machine=pm["machine"], life=len(lives), index=k, start=_iso(t0, lf["start"]),
                              end=_iso(t0, lf["end"]), end_reason=lf["reason"],
                              failure_mode=lf["mode"] if lf["reason"] == "failure" else None, mode=lf["mode"],
                              initial_age_h=round(lf["age0"] / 3600, 3),
                              time_to_failure_h=round(lf["ttf"] / 3600, 3)))
    ev = sorted((t, m, kind, text) for pm in pumps for (m, t, kind, text) in pm["events"])
    year = params.start.year
    events = pa.table({
        "machine": pa.array([e[1] for e in ev], pa.string()),
        "ts": pa.array([_iso(t0, e[0]) for e in ev], pa.string()),
        "event": pa.array([e[2] for e in ev], pa.string()),
        "work_order": pa.array([f"WO-{year}-{i + 1:05d}" for i in range(len(ev))], pa.string()),
        "text": pa.array([e[3] for e in ev], pa.string()),
    })
    return PumpFleet(params=params, contract=contract, readings=readings, events=events, lives=lives)


def _write_atomic(path: Path, write) -> None:
    # A reader (ingest watching the folder) never sees half a file.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _csv(table: pa.Table, path: str, header: bytes) -> None:
    import pyarrow.csv as pacsv

    # Unquoted, as historians write them (pyarrow would quote the header): no header or value of this
    # fleet holds a comma or a quote.
    with open(path, "wb") as fh:
        fh.write(header)
        pacsv.write_csv(table, fh, write_options=pacsv.WriteOptions(include_header=False, quoting_style="none"))


def write_pumps(fleet: PumpFleet, landing: str | Path, truth: str | Path | None = None) -> list[Path]:
    """Write the fleet as a plant would: daily telemetry CSVs, ``events.csv`` and the ground truth.

    Args:
        fleet: From :func:`generate_pumps`.
        landing: Folder the files go to (created if missing).
        truth: Path of the ground-truth JSON; default ``<landing>/ground_truth.json`` (no dataset rule
            of the ``pumps`` contract matches it, so ingest leaves it alone).

    Returns:
        The written paths: the daily files in date order, then ``events.csv`` and the ground truth.
    """
    import pyarrow.csv as pacsv

    landing = Path(landing)
    landing.mkdir(parents=True, exist_ok=True)
    contract, p = fleet.contract, fleet.params
    r = fleet.readings
    headers = [PLANT_HEADERS[c] if p.plant_headers else c for c in contract.channel_names]
    clock = contract.clock.column or "ts"
    asset = contract.asset.column
    out = pa.table([r["ts"].cast(pa.timestamp("s")).cast(pa.string()), r["machine"], *[r[c] for c in contract.channel_names]],
                   names=[clock, asset, *headers])
    secs = r["ts"].cast(pa.int64()).to_numpy()
    day = secs // DAY_S
    cut = np.flatnonzero(np.diff(day)) + 1
    bounds = np.concatenate([[0], cut, [len(day)]]).astype(int)
    header = (",".join(out.column_names) + "\n").encode()
    written = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        if b <= a:
            continue
        d = datetime.fromtimestamp(int(day[a]) * DAY_S, tz=timezone.utc).date()
        path = landing / f"pumps_{d.isoformat()}.csv"
        _write_atomic(path, lambda tmp, t=out.slice(a, b - a): _csv(t, tmp, header))
        written.append(path)
    spec = fleet.contract.events
    ev = fleet.events.rename_columns([spec.asset, spec.time, spec.type, "work_order", "text"] if spec
                                     else fleet.events.column_names)
    events_path = landing / "events.csv"
    _write_atomic(events_path, lambda tmp: pacsv.write_csv(ev, tmp, write_options=pacsv.WriteOptions(
        quoting_style="needed")))
    written.append(events_path)
    truth_path = Path(truth) if truth else landing / "ground_truth.json"
    doc = {"generator": "twinflow.fleets.pumps", "params": json.loads(p.model_dump_json()),
           "contract": fleet.contract.ref.model_dump(), "lives": fleet.lives}

    def _json(tmp: str) -> None:
        Path(tmp).write_text(json.dumps(doc, indent=1))

    truth_path.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(truth_path, _json)
    written.append(truth_path)
    return written
