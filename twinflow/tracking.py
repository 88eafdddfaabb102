"""MLflow helpers: one experiment per pipeline, a parent run per flow run, child runs per stage.

Runs opened here are always closed, with status FAILED when the body raised, so no run is left
active after an error.
"""

from __future__ import annotations

import logging
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping

from twinflow.errors import ServiceUnavailable
from twinflow.locks import hold
from twinflow.settings import Settings

if TYPE_CHECKING:  # annotations only: mlflow is slow to import, so it is imported where used
    import mlflow

log = logging.getLogger("twinflow.tracking")

PREFECT_RUN_TAG = "prefect.flow_run_id"
PREFECT_URL_TAG = "prefect.flow_run_url"
STAGE_TAG = "twinflow.stage"
# MLflow 3.x's UI opens an experiment by its kind tag; without one it may infer GenAI and open the
# traces overview. The values are the UI's ExperimentKind enum (mlflow/server/js: "genai_development",
# "custom_model_development", ...); twinflow trains classic models.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
# The kind tag alone does not decide the view: MLflow 3.17's UI reads the view from the URL's
# ``workflowType`` parameter first, then from the browser's localStorage (``mlflow.workflowType_v1``,
# initially "genai"), so a first visit could still land on the GenAI overview (mlflow/mlflow#24498).
# Every link twinflow prints or writes carries the parameter.
WORKFLOW_PARAM = "workflowType=machine_learning"
# The metrics a reviewer compares runs on (the simulate and pipeline runs use the same names, so a
# runs-table column shows them across stages).
HEADLINE_METRICS = ("eval_rmse", "eval_score", "eval_pi_coverage", "baseline_eval_rmse", "promoted",
                    "recommended_expected_cost", "saving_vs_fixed_interval")
# MLflow 3.17's runs table starts with the columns Source, Models and Dataset: its default UI state
# (ExperimentPageUIState.getDefaultSelectedColumns) is fixed in the UI, and a browser keeps a
# person's choice in its localStorage; no server-side setting changes it. What the UI does read from
# the server is a saved view: an experiment tag ``mlflow.sharedViewState.<id>`` holding the envelope
# ``{"name", "createdAt", "state"}`` (savedViewEnvelope.ts), listed under the runs table's *Views*
# and applied when the runs tab's URL names it (``#/experiments/<id>/runs?viewStateShareKey=<id>``,
# useSharedExperimentViewState). The key must be on the ``/runs`` route: the bare experiment route
# redirects there and drops the query, which is why a link to ``#/experiments/<id>?viewStateShareKey=``
# showed the default columns. Every experiment link twinflow prints opens this view.
HEADLINE_VIEW_ID = "twinflow-headline"
HEADLINE_VIEW_TAG = f"mlflow.sharedViewState.{HEADLINE_VIEW_ID}"
HEADLINE_VIEW_NAME = "twinflow: headline metrics"


def headline_view_state() -> dict:
    """The saved view's state: the UI's default columns plus the headline metrics, newest run first."""
    cols = ["attributes.`Source`", "attributes.`Models`", "attributes.`Dataset`",
            *(f"metrics.`{m}`" for m in HEADLINE_METRICS)]
    return {"selectedColumns": cols, "orderByKey": "attributes.start_time", "orderByAsc": False}


def headline_view_tag(created_at_ms: int) -> str:
    """The experiment tag value of the headline view (a saved-view envelope with a plain-JSON state)."""
    import json

    return json.dumps({"name": HEADLINE_VIEW_NAME, "createdAt": int(created_at_ms),
                       "state": json.dumps(headline_view_state(), sort_keys=True)})


def _headline_view_is_current(value: str | None) -> bool:
    import json

    try:
        env = json.loads(value or "")
        return env.get("name") == HEADLINE_VIEW_NAME and json.loads(env["state"]) == headline_view_state()
    except (ValueError, KeyError, TypeError, AttributeError):
        return False


def ui_link(base_url: str, *, experiment_id: str | None = None, run_id: str | None = None,
            model: str | None = None, version: str | int | None = None, view: str | None = HEADLINE_VIEW_ID) -> str:
    """An MLflow UI link that opens in the classic model-training view.

    The UI routes inside the URL fragment (``#/experiments/<id>/runs/<run>``), so the view parameter
    goes after the route, where the UI's router reads its query string.

    Args:
        base_url: The MLflow UI's root, e.g. ``http://127.0.0.1:5000``.
        experiment_id: Link to this experiment (its runs table), or with ``run_id`` to one run.
        run_id: The run (needs ``experiment_id``).
        model: A registered model's name; with ``version``, one of its versions.
        version: The model version.
        view: With ``experiment_id`` alone: the saved view the runs table opens with (default: the
            headline metrics view :func:`configure_mlflow` writes); None: the UI's default columns.

    Returns:
        The URL. With no experiment or model, the experiments list.
    """
    from urllib.parse import quote

    root = base_url.rstrip("/")
    if model is not None:
        route = f"/models/{quote(model, safe='')}" + (f"/versions/{version}" if version is not None else "")
    elif experiment_id is not None and run_id:
        route = f"/experiments/{experiment_id}/runs/{run_id}"
    elif experiment_id is not None:
        # The runs tab itself, not the experiment route: its redirect drops the view's key.
        route = f"/experiments/{experiment_id}/runs"
        if view:
            return f"{root}/#{route}?viewStateShareKey={quote(view, safe='')}&{WORKFLOW_PARAM}"
    else:
        route = "/experiments"
    return f"{root}/#{route}?{WORKFLOW_PARAM}"


def check_reachable(uri: str) -> None:
    """Raise :class:`ServiceUnavailable` when an HTTP tracking server does not answer ``/health``.

    File and SQLite stores (any non-HTTP URI) are not checked: there is nothing to reach.
    """
    if not uri.startswith(("http://", "https://")):
        return
    import httpx

    try:
        httpx.get(uri.rstrip("/") + "/health", timeout=5.0).raise_for_status()
    except httpx.HTTPError as exc:
        raise ServiceUnavailable(
            f"the MLflow tracking server at {uri} does not answer ({exc.__class__.__name__}); "
            "start it or unset TWINFLOW_MLFLOW__TRACKING_URI"
        ) from None


_DB_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")
# Database stores this process has created or checked under the lock (each is done once).
_INITIALISED: set[str] = set()
# Longer than MLflow's full chain of migrations on a fresh SQLite file (seconds, on a slow disk).
_INIT_LOCK_TIMEOUT_S = 300.0


def _init_lock_path(settings: Settings, uri: str) -> Path | None:
    """The lock serialising the first connection to a database store; None when none is needed."""
    scheme = uri.split(":", 1)[0].split("+", 1)[0].lower()
    if scheme not in _DB_SCHEMES:
        return None  # a tracking server (http) or file store creates its own schema
    if scheme == "sqlite":
        path = uri[len("sqlite:///"):].split("?", 1)[0] if uri.startswith("sqlite:///") else ""
        if not path or path == ":memory:":
            return None  # in memory: private to this process
        db = Path(path).absolute()
        # Beside the file: every home (and process) that points at this database takes this lock.
        return db.parent / f"{db.name}.init.lock"
    # A server database may be shared beyond this machine, where no file lock reaches; this at
    # least serialises the commands of this home.
    return settings.home / "mlflow-init.lock"


def _initialise_stores(settings: Settings, uri: str, registry_uri: str | None) -> None:
    """Create the MLflow database schema of a fresh store once, under a lock.

    MLflow's SQLAlchemy stores create the tables and run every Alembic migration on first connect
    when the tables are missing (``SqlAlchemyStore.__init__`` -> ``_initialize_tables``), without a
    lock: two commands starting together on a fresh home race through the migrations and fail
    (``table alembic_version already exists``, ``Online migration expected to match one row``).
    The first command through the lock builds the schema; the others then find it complete.
    """
    import mlflow

    for kind, target in (("tracking", uri), ("registry", registry_uri)):
        if not target or target in _INITIALISED:
            continue
        lock = _init_lock_path(settings, target)
        if lock is None:
            continue
        if target.startswith("sqlite:///"):
            Path(target[len("sqlite:///"):].split("?", 1)[0]).absolute().parent.mkdir(parents=True, exist_ok=True)
        with hold(lock, timeout_s=_INIT_LOCK_TIMEOUT_S, what="twinflow command (creating the MLflow database)"):
            if kind == "tracking":
                mlflow.MlflowClient(tracking_uri=target).search_experiments(max_results=1)
            else:
                mlflow.MlflowClient(tracking_uri=uri, registry_uri=target).search_registered_models(max_results=1)
        _INITIALISED.add(target)


def configure_mlflow(settings: Settings, experiment: str | None = None) -> str:
    """Point MLflow at the configured backend and make sure the experiment exists.

    The URI is also exported as ``MLFLOW_TRACKING_URI`` so that Dask workers started afterwards,
    and processes spawned by Prefect, log to the same place.

    A database store is created (schema and migrations) under a lock the first time any command
    connects to it, so commands starting together on a fresh home do not race.

    Returns:
        The experiment id.

    Raises:
        ServiceUnavailable: a remote tracking server does not answer.
        AlreadyRunning: another command kept the store's creation lock for minutes.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    uri = settings.mlflow_tracking_uri
    check_reachable(uri)
    if uri.startswith("sqlite:///"):
        settings.home.mkdir(parents=True, exist_ok=True)
    if settings.mlflow.username:
        os.environ["MLFLOW_TRACKING_USERNAME"] = settings.mlflow.username
    if settings.mlflow.password is not None:
        os.environ["MLFLOW_TRACKING_PASSWORD"] = settings.mlflow.password.get_secret_value()
    os.environ["MLFLOW_TRACKING_URI"] = uri
    mlflow.set_tracking_uri(uri)
    if settings.mlflow.registry_uri:
        mlflow.set_registry_uri(settings.mlflow.registry_uri)
    _initialise_stores(settings, uri, settings.mlflow.registry_uri)
    name = experiment or settings.mlflow.experiment
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            exp_id = client.create_experiment(name, artifact_location=_artifact_location(settings, uri))
        except MlflowException:
            # Another process created it between our lookup and create.
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
            exp_id = exp.experiment_id
    else:
        exp_id = exp.experiment_id
    tags = {} if exp is None else (exp.tags or {})
    if EXPERIMENT_KIND_TAG not in tags:
        # An explicit kind a user set in the UI is kept; only a missing one is written.
        retry_store(client.set_experiment_tag, exp_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    if not _headline_view_is_current(tags.get(HEADLINE_VIEW_TAG)):
        retry_store(client.set_experiment_tag, exp_id, HEADLINE_VIEW_TAG, headline_view_tag(time.time() * 1000))
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


def _artifact_location(settings: Settings, uri: str) -> str | None:
    # A remote server chooses its own artifact root unless one is configured explicitly.
    if settings.mlflow.artifact_location:
        return settings.mlflow.artifact_location
    if uri.startswith(("http://", "https://")):
        return None
    return settings.mlflow_artifact_location


def prefect_tags() -> dict[str, str]:
    """Tags linking an MLflow run to the current Prefect flow run (empty outside a flow run)."""
    try:
        from prefect.runtime import flow_run
    except ImportError:  # pragma: no cover - prefect is a dependency
        return {}
    tags = {}
    run_id = flow_run.get_id()
    if run_id:
        tags[PREFECT_RUN_TAG] = str(run_id)
        url = flow_run.get_flow_run_ui_url() if hasattr(flow_run, "get_flow_run_ui_url") else None
        if url:
            tags[PREFECT_URL_TAG] = str(url)
    return tags


def flatten_params(params: Mapping[str, Any] | Any, prefix: str = "") -> dict[str, str]:
    """Flatten a (nested) params model or mapping into MLflow params ``a.b=value``.

    Secrets (pydantic ``SecretStr``) are never logged.
    """
    from pydantic import BaseModel, SecretStr

    if isinstance(params, BaseModel):
        params = {k: getattr(params, k) for k in type(params).model_fields}
    out: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, SecretStr):
            continue
        if isinstance(value, (BaseModel, Mapping)):
            out.update(flatten_params(value, prefix=f"{name}."))
        else:
            out[name] = str(value)[:6000]
    return out


@contextmanager
def tracked_run(
    name: str,
    *,
    stage: str | None = None,
    parent_run_id: str | None = None,
    params: Mapping[str, Any] | Any | None = None,
    tags: Mapping[str, str] | None = None,
) -> Iterator["mlflow.ActiveRun"]:
    """Open an MLflow run (nested under the active run or ``parent_run_id``) and always close it.

    Args:
        name: Run name shown in the MLflow UI.
        stage: Stage name, stored as the ``twinflow.stage`` tag.
        parent_run_id: Parent run for a child run opened where no run is active (e.g. a worker).
        params: Params model or mapping, logged flattened.
        tags: Extra tags.
    """
    import mlflow

    all_tags = {**prefect_tags(), **(tags or {})}
    if stage:
        all_tags[STAGE_TAG] = stage
    active = mlflow.active_run()
    kwargs: dict[str, Any] = {"run_name": name, "tags": all_tags}
    if active is not None:
        kwargs["nested"] = True
    elif parent_run_id:
        kwargs["parent_run_id"] = parent_run_id
    run = mlflow.start_run(**kwargs)
    try:
        if params is not None:
            mlflow.log_params(flatten_params(params))
        yield run
    except BaseException as exc:
        try:
            mlflow.end_run(status="FAILED")
        except Exception as close_exc:  # e.g. the tracking server died: keep the original error first
            # (end_run pops the run off the active stack before it calls the server, so none is left active)
            log.warning("could not mark MLflow run %s FAILED (%s); the stage's own error follows",
                        run.info.run_id, str(close_exc).splitlines()[0][:200] if str(close_exc) else close_exc)
        raise exc
    else:
        mlflow.end_run(status="FINISHED")


def retry_store(fn: Callable[..., Any], *args: Any, attempts: int = 6, **kwargs: Any) -> Any:
    """Call an MLflow store write, retrying the races of concurrent writers on one SQLite file.

    MLflow inserts a logged dataset or a registry alias after checking that it does not exist
    yet, so two runs doing it at once can collide on the unique key ("UNIQUE constraint failed");
    a retry finds the row and links to (or moves) it. "database is locked" beyond SQLite's busy
    timeout is retried too. Only idempotent writes may be wrapped.
    """
    import random
    import time

    from mlflow.exceptions import MlflowException

    for attempt in range(attempts):
        try:
            return fn(*args, **kwargs)
        except MlflowException as exc:
            msg = str(exc)
            if attempt == attempts - 1 or not ("UNIQUE constraint failed" in msg or "database is locked" in msg):
                raise
            log.info("retrying %s after a concurrent-writer conflict: %s", getattr(fn, "__name__", fn), msg[:120])
            time.sleep(0.2 * (attempt + 1) + random.random() * 0.3)


def log_lake_input(snap: LakeSnapshot, context: str) -> None:
    """Log a lake dataset snapshot as an MLflow dataset input of the active run (path, digest, rows)."""
    import warnings

    import mlflow
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            source = resolve_dataset_source(snap.dataset_path)
    except Exception as exc:  # noqa: BLE001 - lineage is informative; an unknown URI scheme must not fail the run
        log.warning("lake dataset %s not logged as an MLflow input: %s", snap.dataset_path, exc)
        return
    retry_store(mlflow.log_input, MetaDataset(source, name=f"lake/{snap.dataset}", digest=snap.digest),
                context=context, tags={"rows": str(snap.rows), "batch_id": snap.batch_id,
                                       "table_version": str(snap.version)})
