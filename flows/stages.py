"""Run one stage (or the pipeline) from flat CLI overrides: what ``twinflow run`` and ``twinflow
health`` call.

The stage's parameters are validated (:func:`stage_params`) before any server or cluster starts;
:func:`run_stage` then finds the stage's input (the latest lake snapshot or feature set of a dataset)
and runs its flow.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from twinflow.errors import ConfigError
from twinflow.flows.features import features
from twinflow.flows.health import health, only_fleet
from twinflow.flows.ingest import ingest
from twinflow.flows.pipeline import STAGES, PipelineParams, demo_params, pipeline
from twinflow.flows.simulate import generate, simulate
from twinflow.flows.train import train
from twinflow.refs import FeatureSetRef, LakeSnapshot
from twinflow.settings import Settings, get_settings
from twinflow.tasks.features import FeatureParams
from twinflow.tasks.health import HealthParams
from twinflow.tasks.ingest import IngestParams
from twinflow.tasks.train import TrainParams
from twinflow.tasks.twin import GenerateParams, TwinParams

__all__ = ["StageCall", "run_stage", "stage_params"]


def _latest_features(settings: Settings, dataset: str) -> FeatureSetRef:
    root = Path(settings.features_path) / dataset
    manifests = sorted(root.glob("*/_manifest.json"), key=lambda p: p.stat().st_mtime)
    if not manifests:
        raise ConfigError(f"no feature dataset for {dataset!r} under {root}; run `twinflow run features "
                          f"--param dataset={dataset}` first")
    return FeatureSetRef.model_validate(json.loads(manifests[-1].read_text())["ref"])


def _only_feature_set(settings: Settings) -> str:
    """The features store's only dataset: what ``twinflow run train`` reads when none is named."""
    root = Path(settings.features_path)
    sets = sorted(p.name for p in root.iterdir() if any(p.glob("*/_manifest.json"))) if root.is_dir() else []
    if len(sets) != 1:
        held = f" (feature sets: {', '.join(sets)})" if sets else " (no feature set yet: run `twinflow run features`)"
        raise ConfigError(f"train needs a dataset: --param dataset=<name>{held}")
    return sets[0]


def _lake_snapshot(settings: Settings, dataset: str) -> LakeSnapshot:
    from twinflow.lake import latest_snapshot

    # Ingested data has a ledger snapshot (file hashes); generated data one of its table version.
    snap = latest_snapshot(settings.lake_path, dataset)
    if snap is None:
        raise ConfigError(f"dataset {dataset!r} is not in the lake at {settings.lake_path}; run "
                          "`twinflow run ingest --landing PATH` first")
    return snap


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


@dataclass
class StageCall:
    """A stage with its validated parameters, ready to run (see :func:`stage_params`).

    Attributes:
        stage: The stage name, or ``pipeline``.
        params: The stage's validated parameters model.
        dataset: The lake/features dataset a ``features``, ``train`` or ``simulate`` run reads.
        generate: ``simulate`` writes a synthetic fleet instead of simulating.
    """

    stage: str
    params: BaseModel
    dataset: str | None = None
    generate: bool = False


def _dataset_arg(value: Any) -> str:
    # The lake's dataset-name rule is IngestParams.dataset's (a name becomes a folder of the lake):
    # checking it here refuses '../../x' before it is joined to a path.
    return IngestParams.model_validate({"landing": ".", "dataset": value}).dataset


def stage_params(stage: str, overrides: dict[str, Any], settings: Settings | None = None) -> StageCall:
    """Build and validate a stage's parameters from flat CLI overrides, without running anything.

    ``twinflow run`` calls this before it starts any server or cluster, so a bad ``--param`` fails
    at once.

    Raises:
        pydantic.ValidationError: a parameter is unknown or invalid (its ``loc`` names it).
        ConfigError: the stage is unknown.
    """
    settings = settings or get_settings()
    overrides = dict(overrides)
    if stage == "pipeline":
        landing = overrides.pop("landing", None)
        base = demo_params(settings).model_dump() if not landing else {"ingest": {"landing": landing}}
        return StageCall(stage, PipelineParams.model_validate(_merge(base, overrides)))
    if stage == "ingest":
        if "landing" not in overrides:
            overrides["landing"] = settings.landing_path
        return StageCall(stage, IngestParams.model_validate(overrides))
    if stage in ("features", "train"):
        # No dataset: the lake's only fleet (features) or the only feature set (train), found when run.
        dataset = overrides.pop("dataset", None)
        model = FeatureParams if stage == "features" else TrainParams
        return StageCall(stage, model.model_validate(overrides),
                         dataset=_dataset_arg(dataset) if dataset is not None else None)
    if stage == "health":
        return StageCall(stage, HealthParams.model_validate(overrides), dataset=overrides.get("dataset"))
    if stage == "simulate":
        if overrides.pop("generate", False):
            return StageCall(stage, GenerateParams.model_validate(overrides), generate=True)
        dataset = overrides.pop("dataset", None)
        return StageCall(stage, TwinParams.model_validate(overrides),
                         dataset=_dataset_arg(dataset) if dataset is not None else None)
    raise ConfigError(f"unknown stage {stage!r}; choose one of: {', '.join((*STAGES, 'pipeline'))}")


def run_stage(stage: str, overrides: dict[str, Any] | StageCall, settings: Settings | None = None) -> BaseModel:
    """Run one stage (or the pipeline) from flat CLI overrides; used by ``twinflow run``.

    ``features``, ``train`` and ``simulate`` take ``dataset=<name>`` to find their input in the
    lake or the features store; ``simulate`` with ``generate=true`` writes a synthetic fleet instead.
    ``overrides`` may also be the :class:`StageCall` that :func:`stage_params` validated already.
    """
    settings = settings or get_settings()
    call = overrides if isinstance(overrides, StageCall) else stage_params(stage, overrides, settings)
    if call.stage == "pipeline":
        return pipeline(call.params)
    if call.stage == "ingest":
        return ingest(call.params)
    if call.stage == "features":
        dataset = call.dataset or only_fleet(settings.lake_path, "features", "--param dataset=<name>")
        return features(_lake_snapshot(settings, dataset), call.params)
    if call.stage == "train":
        return train(_latest_features(settings, call.dataset or _only_feature_set(settings)), call.params)
    if call.stage == "health":
        return health(call.params)
    if call.generate:
        return generate(call.params)
    snap = _lake_snapshot(settings, call.dataset) if call.dataset else None
    return simulate(call.params, snapshot=snap)
