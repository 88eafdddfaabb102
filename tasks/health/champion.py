"""The champion's context for scoring: model, feature fit, error model, interval and lifetime model.

Everything is read from the registry and the champion's own training run, so scoring uses exactly
what the model was trained with: the feature set named in the run's ``data/lineage.json`` gives the
feature parameters (its ``_manifest.json``) and the fit (``_fit.json``: regimes, normalisation,
channels) that live features are computed with; the run's ``rul_cap``, ``val_fraction`` and
``interval_level`` give the label cap and the validation assets. The model's error distribution and
its conformal interval come from those *validation* assets (re-scored here), never from the
evaluation set, which may be the very fleet being scored (C-MAPSS test units).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from twinflow.errors import ConfigError
from twinflow.refs import FeatureSetRef
from twinflow.tasks.health.lifetime import ErrorDensity, WeibullFit, fit_weibull

log = logging.getLogger("twinflow.health")


@dataclass
class Champion:
    """A loaded champion and what scoring needs from its training run."""

    name: str
    version: str
    run_id: str
    model_uri: str
    model: Any
    input_names: list[str]
    features: FeatureSetRef
    feature_params: Any
    fit: Any
    rul_cap: float | None
    interval_level: float
    half_width: float
    errors: ErrorDensity
    lifetime: WeibullFit
    val_true: np.ndarray
    val_pred: np.ndarray
    notes: list[str] = field(default_factory=list)

    @property
    def needs_history(self) -> bool:
        """Sequence models take keys plus whole histories (their signature names the asset)."""
        return "asset_id" in self.input_names

    def predict(self, frame: pd.DataFrame) -> np.ndarray:
        return np.asarray(self.model.predict(frame[self.input_names]), dtype="float64").reshape(-1)


def lifetimes_from_keys(frame: pd.DataFrame, asset: str, time: str, step: float = 1.0) -> np.ndarray:
    """Each asset's life length: last - first time + one step (C-MAPSS: the last cycle)."""
    g = frame.groupby(asset, sort=False)[time]
    return (g.max() - g.min()).to_numpy(dtype="float64") + step


def _lifetime_from_segments(snapshot: Any) -> WeibullFit | None:
    """The censored Weibull of the training data's life segments (``<dataset>__segments``), or None
    when the snapshot names none (run-to-failure data: each asset's history is one life)."""
    from twinflow import lake

    if snapshot is None or snapshot.segments is None:
        return None
    t = lake.read_table(snapshot.lake_path, lake.derived_name(snapshot.dataset, "segments"), version=snapshot.segments)
    if t is None or t.num_rows == 0:
        return None
    seg = t.to_pandas()
    unit = snapshot.contract.time_unit if snapshot.contract is not None else "cycle"
    return fit_weibull(seg["duration"].to_numpy(dtype="float64"), (seg["end_reason"] != "failure").to_numpy(),
                       time_unit=unit)


def load_champion(settings: Any, interval_level: float | None = None, alias: str = "champion") -> Champion | None:
    """Load ``models:/<registered>@champion`` and its training context; None when there is none.

    Raises:
        ConfigError: the champion's run lacks its lineage or feature set (e.g. a model registered by
            hand): the message says what is missing.
    """
    import mlflow
    from mlflow.artifacts import download_artifacts

    from twinflow.tasks import features as ft
    from twinflow.tasks.prognostics import conformal_half_width
    from twinflow.tasks.registry import champion_version
    from twinflow.tasks.train.data import check_frame, read_feature_frame, spec_for, split_by_asset
    from twinflow.tasks.train.trainers import model_io_lock
    from twinflow.tracking import check_reachable

    uri = settings.mlflow_tracking_uri
    check_reachable(uri)
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=settings.mlflow.registry_uri or uri)
    name = settings.mlflow.registered_model
    mv = champion_version(client, name, alias)
    if mv is None:
        return None
    run = client.get_run(mv.run_id)
    p = run.data.params
    try:
        lineage = json.loads(Path(download_artifacts(run_id=mv.run_id, artifact_path="data/lineage.json",
                                                     tracking_uri=uri)).read_text())
    except Exception as exc:  # noqa: BLE001 - any MLflow/IO error: say what is missing
        raise ConfigError(f"champion {name} v{mv.version} has no data/lineage.json in run {mv.run_id}: {exc}") from None
    feats = FeatureSetRef.model_validate(lineage["features"])
    manifest = Path(feats.path) / ft.MANIFEST_FILE
    if not manifest.exists():
        raise ConfigError(f"champion {name} v{mv.version} was trained on {feats.path}, which is gone; "
                          "retrain or recompute its features")
    feature_params = ft.FeatureParams.model_validate(json.loads(manifest.read_text())["params"])
    fit = ft.load_fit(feats.path)
    model_uri = f"models:/{name}@{alias}"
    with model_io_lock():
        model = mlflow.pyfunc.load_model(model_uri)
    sig = model.metadata.get_input_schema()
    inputs = sig.input_names() if sig is not None else list(feats.feature_columns)

    rul_cap = float(p["rul_cap"]) if p.get("rul_cap") not in (None, "None") else None
    level = interval_level or float(p.get("interval_level", 0.9))
    val_fraction = float(p.get("val_fraction", 0.2))
    spec = spec_for(feats)
    frame = check_frame(read_feature_frame(feats), spec, nan_policy="drop", min_assets=2)
    lifetime = _lifetime_from_segments(feats.snapshot)
    from_segments = lifetime is not None
    if lifetime is None:
        lifetime = fit_weibull(lifetimes_from_keys(frame, spec.asset, spec.cycle))
    _, val = split_by_asset(frame, spec, val_fraction)
    val = val.rename(columns={spec.asset: "asset_id", spec.cycle: "cycle"})
    with model_io_lock():
        val_pred = np.asarray(model.predict(val[inputs]), dtype="float64").reshape(-1)
    val_true = val[spec.label].to_numpy(dtype="float64")
    if rul_cap is not None:
        val_true = np.minimum(val_true, rul_cap)
    notes = [f"error model and interval from {val['asset_id'].nunique()} validation assets "
             f"({len(val)} rows) of the champion's training features",
             "lifetime model: Weibull fitted to the training data's life segments (failures, and "
             "censored or running lives as suspensions)" if from_segments else "lifetime model: Weibull fitted to the training assets' lives (all run to failure)"]
    return Champion(
        name=name, version=str(mv.version), run_id=mv.run_id, model_uri=model_uri, model=model, input_names=inputs,
        features=feats, feature_params=feature_params, fit=fit, rul_cap=rul_cap, interval_level=level,
        half_width=conformal_half_width(val_true, val_pred, level),
        errors=ErrorDensity.from_residuals(val_true, val_pred), lifetime=lifetime,
        val_true=val_true, val_pred=val_pred, notes=notes)
