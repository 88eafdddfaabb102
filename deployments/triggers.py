"""Event triggers of the standard deployments: runs started by what happened, not by the clock.

- ``retrain-on-new-data`` on ``twinflow.stream.data.ready`` (any ``twinflow.dataset.*``) runs
  ``retrain-nightly`` (pipeline: ingest, features, train) on the event's dataset at the event's table
  version (``params.train_dataset`` / ``params.train_version`` from the event's payload).
- ``health-on-new-data`` on ``twinflow.stream.data.ready`` runs ``health-hourly`` on the event's dataset
  at the event's table version (``params.dataset`` / ``params.version``): the fleet's health table is
  current minutes after new data, not at the next hour.
- ``simulate-on-new-champion`` on ``twinflow.model.promoted`` (``twinflow.model.<registered model>``)
  runs ``simulate-weekly`` with its default parameters (the twin reads the new champion's error model
  from the registry).

"Features + train when >= N new cycles for >= M assets" is not a Prefect ``threshold``: a trigger
counts events, and one batch event can carry 1 or 5000 cycles of any assets. So the stream bridge
counts cycles per asset exactly (:class:`twinflow.tasks.bridge.events.ReadyTracker`, N and M in
``BridgeConfig.ready_min_cycles``/``ready_min_assets``) and emits one ``twinflow.stream.data.ready``
when the rule holds; the trigger fires on each such event (``threshold`` 1, evaluated per dataset:
``for_each`` the resource id). The retrain deployment's concurrency limit (1, enqueue) makes a
burst of events queue runs rather than overlap them.

:func:`deployment_triggers` gives the triggers of one deployment; :func:`twinflow.deployments.standard.build_deployments`
attaches them, so ``twinflow serve`` registers them with the deployments (as automations owned by the
deployment), and ``deployments/prefect.yaml`` lists the same under ``triggers:`` for ``prefect deploy``
(a test keeps the two in step).
"""

from __future__ import annotations

from typing import Any, Callable

from twinflow.events import DATA_READY, MODEL_PROMOTED
from twinflow.settings import Settings

__all__ = ["HEALTH_ON_NEW_DATA", "RETRAIN_ON_NEW_DATA", "SIMULATE_ON_NEW_CHAMPION", "TRIGGERS", "deployment_triggers",
           "retrain_on_new_data", "simulate_on_new_champion"]

RETRAIN_ON_NEW_DATA = "retrain-on-new-data"
SIMULATE_ON_NEW_CHAMPION = "simulate-on-new-champion"
HEALTH_ON_NEW_DATA = "health-on-new-data"

#: Templates the server renders from the triggering event (one-expression templates keep their type).
EVENT_DATASET = "{{ event.payload.dataset }}"
EVENT_VERSION = "{{ event.payload.version }}"


def retrain_parameters(settings: Settings) -> dict[str, Any]:
    """The retrain run's parameters: the pipeline's ingest → features → train on the event's data.

    A flow run's parameters replace the deployment's per top-level key, so ``params`` is given whole:
    the deployment's defaults with the dataset and table version taken from the event.
    """
    from twinflow.deployments.standard import default_parameters

    params = dict(default_parameters("retrain-nightly", settings)["params"])
    params.update({"stages": ["ingest", "features", "train"], "test_dataset": None,
                   "train_dataset": EVENT_DATASET, "train_version": EVENT_VERSION})
    return {"params": params}


def retrain_on_new_data(settings: Settings) -> Any:
    """``retrain-on-new-data``: a ``twinflow.stream.data.ready`` event runs features + train on its data."""
    from prefect.events import DeploymentEventTrigger

    return DeploymentEventTrigger(
        name=RETRAIN_ON_NEW_DATA,
        description="Retrain (ingest, features, train) on a dataset the stream bridge says has enough new "
                    "cycles (>= N for >= M assets), at the table version the event names.",
        expect={DATA_READY},
        match={"prefect.resource.id": "twinflow.dataset.*"},
        for_each={"prefect.resource.id"},
        posture="Reactive",
        threshold=1,
        within=0,
        parameters=retrain_parameters(settings),
    )


def health_parameters(settings: Settings) -> dict[str, Any]:
    """The health run's parameters: the deployment's defaults on the event's dataset and table version."""
    from twinflow.deployments.standard import default_parameters

    params = dict(default_parameters("health-hourly", settings)["params"])
    params.update({"dataset": EVENT_DATASET, "version": EVENT_VERSION})
    return {"params": params}


def health_on_new_data(settings: Settings) -> Any:
    """``health-on-new-data``: a ``twinflow.stream.data.ready`` event re-scores that dataset's running fleet."""
    from prefect.events import DeploymentEventTrigger

    return DeploymentEventTrigger(
        name=HEALTH_ON_NEW_DATA,
        description="Score the running fleet of a dataset the stream bridge says has enough new data, at the "
                    "table version the event names.",
        expect={DATA_READY},
        match={"prefect.resource.id": "twinflow.dataset.*"},
        for_each={"prefect.resource.id"},
        posture="Reactive",
        threshold=1,
        within=0,
        parameters=health_parameters(settings),
    )


def simulate_on_new_champion(settings: Settings) -> Any:
    """``simulate-on-new-champion``: a new champion of the configured model runs the twin's policy study."""
    from prefect.events import DeploymentEventTrigger

    return DeploymentEventTrigger(
        name=SIMULATE_ON_NEW_CHAMPION,
        description="Run the digital-twin maintenance-policy study when a new champion is promoted "
                    "(the study uses the champion's measured error model).",
        expect={MODEL_PROMOTED},
        match={"prefect.resource.id": f"twinflow.model.{settings.mlflow.registered_model}"},
        posture="Reactive",
        threshold=1,
        within=0,
    )


#: deployment name -> its trigger builders
TRIGGERS: dict[str, tuple[Callable[[Settings], Any], ...]] = {
    "retrain-nightly": (retrain_on_new_data,),
    "simulate-weekly": (simulate_on_new_champion,),
    "health-hourly": (health_on_new_data,),
}


def deployment_triggers(name: str, settings: Settings) -> list[Any]:
    """The ``DeploymentEventTrigger`` objects of the standard deployment ``name`` (often none)."""
    return [build(settings) for build in TRIGGERS.get(name, ())]
