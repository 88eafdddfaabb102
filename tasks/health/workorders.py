"""Work-order export for a CMMS: CSV and JSON, with a documented JSON Schema.

One work order per asset whose recommended action is maintenance (``maintain …`` or ``schedule
maintenance …``). The JSON file is ``{"schema": ..., "generated_at", "dataset", "model", "work_orders":
[...]}``; :data:`WORK_ORDER_SCHEMA` describes one work order and :func:`validate` checks a file's
work orders against it (the tests do; a CMMS importer can use the same schema).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd

SCHEMA_ID = "https://twinflow.dev/schemas/work-order-v1.json"

WORK_ORDER_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$id": SCHEMA_ID,
    "title": "twinflow work order",
    "type": "object",
    "additionalProperties": False,
    "required": ["work_order_id", "asset", "action", "due_by", "due_in", "time_unit", "priority", "reason",
                 "p_failure", "horizon", "evidence", "links"],
    "properties": {
        "work_order_id": {"type": "string", "description": "Stable id: dataset, asset and health run."},
        "asset": {"type": "string"},
        "action": {"type": "string", "description": "e.g. 'maintain within 12' (time units of the clock)."},
        "due_by": {"type": "string", "description": "ISO time (timestamp clocks) or 'cycle N' (cycle clocks)."},
        "due_in": {"type": "number", "minimum": 0},
        "time_unit": {"type": "string"},
        "priority": {"enum": ["low", "elevated", "high", "critical"]},
        "reason": {"type": "string"},
        "p_failure": {"type": ["number", "null"], "minimum": 0, "maximum": 1,
                      "description": "P(failure within horizon)."},
        "horizon": {"type": "number", "exclusiveMinimum": 0},
        "rul_estimate": {"type": ["number", "null"]},
        "rul_interval": {"type": ["array", "null"], "items": {"type": "number"}, "minItems": 2, "maxItems": 2},
        "health_index": {"type": ["number", "null"]},
        "expected_cost": {"type": ["number", "null"]},
        "evidence": {"type": "array", "items": {"type": "string"},
                     "description": "Top contributing channels with their share of the anomaly."},
        "links": {"type": "object", "additionalProperties": {"type": "string"},
                  "description": "Evidence: MLflow health run, Prefect flow run, lake table."},
    },
}


def is_work_order(action: str) -> bool:
    return action.startswith(("maintain", "schedule maintenance"))


def work_orders(table: pd.DataFrame, *, dataset: str, run_key: str, links: dict[str, str]) -> list[dict[str, Any]]:
    """Work orders for the rows whose action is maintenance, riskiest first."""
    out = []
    for r in table.itertuples(index=False):
        if not is_work_order(r.action):
            continue
        p = None if pd.isna(r.p_fail) else float(r.p_fail)
        reason = (f"P(failure within {r.alert_horizon:g} {r.time_unit}) = {p:.0%}" if p is not None else "")
        if not pd.isna(r.rul_estimate):
            reason += f"; RUL estimate {r.rul_estimate:.0f} ({r.rul_low:.0f}-{r.rul_high:.0f}) {r.time_unit}"
        if r.evidence:
            reason += f"; anomaly {r.anomaly_score:.1f} driven by {r.evidence}"
        out.append({
            "work_order_id": f"{dataset}:{r.asset_id}:{run_key}",
            "asset": str(r.asset_id), "action": r.action, "due_by": r.due_by, "due_in": float(max(r.due_in, 0.0)),
            "time_unit": r.time_unit, "priority": r.risk_band, "reason": reason.strip("; "),
            "p_failure": p, "horizon": float(r.alert_horizon),
            "rul_estimate": None if pd.isna(r.rul_estimate) else float(r.rul_estimate),
            "rul_interval": None if pd.isna(r.rul_estimate) else [float(r.rul_low), float(r.rul_high)],
            "health_index": None if pd.isna(r.health_index) else float(r.health_index),
            "expected_cost": None if pd.isna(r.expected_cost) else float(r.expected_cost),
            "evidence": [e.strip() for e in r.evidence.split(",") if e.strip()] if r.evidence else [],
            "links": dict(links),
        })
    return out


def validate(orders: list[dict[str, Any]]) -> list[str]:
    """Errors of work orders against :data:`WORK_ORDER_SCHEMA` (empty: valid).

    Uses ``jsonschema`` when installed, else a check of the schema's required keys, types and enums.
    """
    try:
        import jsonschema
    except ImportError:
        jsonschema = None
    errors: list[str] = []
    if jsonschema is not None:
        v = jsonschema.Draft202012Validator(WORK_ORDER_SCHEMA)
        for i, o in enumerate(orders):
            errors += [f"work order {i}: {e.message}" for e in v.iter_errors(o)]
        return errors
    types = {"string": str, "number": (int, float), "array": list, "object": dict, "null": type(None)}
    props = WORK_ORDER_SCHEMA["properties"]
    for i, o in enumerate(orders):
        for k in WORK_ORDER_SCHEMA["required"]:
            if k not in o:
                errors.append(f"work order {i}: missing {k!r}")
        for k, v in o.items():
            spec = props.get(k)
            if spec is None:
                errors.append(f"work order {i}: unexpected {k!r}")
                continue
            if "enum" in spec and v not in spec["enum"]:
                errors.append(f"work order {i}: {k}={v!r} not in {spec['enum']}")
            if "type" in spec:
                allowed = spec["type"] if isinstance(spec["type"], list) else [spec["type"]]
                if not any(isinstance(v, types[t]) and not (t == "number" and isinstance(v, bool)) for t in allowed):
                    errors.append(f"work order {i}: {k} has type {type(v).__name__}, expected {allowed}")
    return errors


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)  # never a half-written file under the final name


def export(orders: list[dict[str, Any]], folder: Path, *, meta: dict[str, Any]) -> tuple[Path, Path]:
    """Write ``work_orders.json`` and ``work_orders.csv`` (atomically) into ``folder``."""
    folder = Path(folder)
    doc = {"schema": SCHEMA_ID, **meta, "work_orders": orders}
    jpath, cpath = folder / "work_orders.json", folder / "work_orders.csv"
    _atomic_write(jpath, json.dumps(doc, indent=1, default=str))
    flat = pd.DataFrame([{**{k: v for k, v in o.items() if k not in ("links", "evidence", "rul_interval")},
                          "evidence": "; ".join(o["evidence"]),
                          **{f"link_{k}": v for k, v in o["links"].items()}} for o in orders],
                        columns=["work_order_id", "asset", "action", "due_by", "due_in", "time_unit", "priority",
                                 "reason", "p_failure", "horizon", "rul_estimate", "health_index", "expected_cost",
                                 "evidence"] + sorted({f"link_{k}" for o in orders for k in o["links"]}))
    _atomic_write(cpath, flat.to_csv(index=False))
    _atomic_write(folder / "work_order.schema.json", json.dumps(WORK_ORDER_SCHEMA, indent=1))
    return jpath, cpath
