"""``healthcheck``: a small flow that proves a deployment can reach everything a stage needs.

Operators run it (on demand, or from the ``healthcheck`` deployment) after configuring blocks or
servers, before trusting the hourly/nightly schedules: it touches the Prefect API, every Dask
worker, the lake (write + read back through fsspec) and the MLflow tracking server. It is also the
flow the deployment and scale-out tests run, because it exercises the same machinery as the stages
in seconds.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid

from prefect import flow, task
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import BaseModel, ConfigDict, Field

from twinflow.deployments.ops import IO_TASK_OPTIONS, on_failure, stage_timeout

__all__ = ["HealthcheckParams", "HealthReport", "healthcheck", "probe_partition"]


class HealthcheckParams(BaseModel):
    """Parameters of :func:`healthcheck`."""

    model_config = ConfigDict(extra="forbid")

    partitions: int = Field(4, ge=1, le=64, description="Prefect tasks sent to the Dask cluster.")
    log_to_mlflow: bool = True
    fail: bool = Field(False, description="Fail on purpose after all checks, to test alerting end to end.")


class HealthReport(BaseModel):
    """What the health check reached."""

    rows: int
    units: int
    workers: list[str]
    hosts: list[str]
    lake_probe: str
    mlflow_run_id: str | None = None
    prefect_flow_run_id: str | None = None


def probe_partition(path: str, part: int, parts: int) -> dict:
    """Count the C-MAPSS rows and units of one partition (units ``u % parts == part``).

    Pure: reads the bundled file, returns counts plus where it ran.
    """
    import pandas as pd

    frame = pd.read_csv(path, sep=r"\s+", header=None, usecols=[0, 1])
    mine = frame[frame[0] % parts == part]
    try:
        from distributed import get_worker

        where = get_worker().address
    except ValueError:
        where = "local"
    return {"rows": int(len(mine)), "units": int(mine[0].nunique()), "worker": where,
            "host": socket.gethostname(), "pid": os.getpid()}


@task(name="probe-workers")
def _probe(path: str, parts: int) -> list[dict]:
    # One Dask task per partition, from this task in the flow process: what every stage does.
    from twinflow import runtime

    with runtime.using_dask() as client:
        return client.gather(client.map(probe_partition, [path] * parts, range(parts), [parts] * parts,
                                        pure=False))


@task(name="lake-probe", **IO_TASK_OPTIONS)
def _lake_probe(root: str, options: dict, run_id: str) -> str:
    # Written under a temp name and renamed, like every lake write, then read back.
    from twinflow import lake

    # The lake's options are in delta-rs' keys (AWS_*): lake.filesystem translates them for s3fs.
    fs, base = lake.filesystem(root, options or None)
    folder = f"{base.rstrip('/')}/_healthcheck"
    fs.makedirs(folder, exist_ok=True)
    final = f"{folder}/{run_id}.json"
    tmp = f"{folder}/.{run_id}.json.tmp"
    payload = json.dumps({"run": run_id, "time": time.time()})
    with fs.open(tmp, "w") as fh:
        fh.write(payload)
    fs.mv(tmp, final)
    with fs.open(final, "r") as fh:
        if json.loads(fh.read())["run"] != run_id:
            raise OSError(f"lake probe {final} read back different content")
    return final


@flow(name="healthcheck", task_runner=ThreadPoolTaskRunner(), timeout_seconds=stage_timeout("healthcheck"),
      on_failure=[on_failure], on_crashed=[on_failure])
def healthcheck(params: HealthcheckParams = HealthcheckParams()) -> HealthReport:
    """Check that this deployment reaches the Prefect API, every Dask worker, the lake and MLflow.

    Steps:
        1. Validate parameters (before any cluster work) and get the runtime (``runtime.ensure``).
        2. ``probe-workers``: send ``partitions`` Dask tasks to the cluster; each counts the rows of
           a slice of the bundled C-MAPSS FD001 file and reports the worker it ran on.
        3. Write a probe file to the lake through fsspec (temp name + rename) and read it back.
        4. Log parameters and counts to an MLflow run tagged with the Prefect flow-run id.
        5. Fail on purpose when ``params.fail`` (to test failure hooks and notifications).
    """
    from prefect.runtime import flow_run

    from twinflow import runtime
    from twinflow.data import cmapss_path

    params = HealthcheckParams.model_validate(params)
    run_id = str(flow_run.get_id() or uuid.uuid4())
    with runtime.ensure() as rt:
        settings = rt.settings
        path = str(cmapss_path("train_FD001.txt.gz"))
        parts = _probe(path, params.partitions)
        probe = _lake_probe(settings.lake_path, settings.lake.fsspec_options(), run_id)
        report = HealthReport(rows=sum(p["rows"] for p in parts), units=sum(p["units"] for p in parts),
                              workers=sorted({p["worker"] for p in parts}),
                              hosts=sorted({p["host"] for p in parts}), lake_probe=probe,
                              prefect_flow_run_id=run_id if flow_run.get_id() else None)
        if params.log_to_mlflow:
            import mlflow

            from twinflow.tracking import tracked_run

            with tracked_run("healthcheck", stage="healthcheck", params=params) as run:
                mlflow.log_metrics({"rows": report.rows, "units": report.units,
                                    "workers": len(report.workers)})
                report.mlflow_run_id = run.info.run_id
    if params.fail:
        raise RuntimeError("healthcheck failed on purpose (params.fail=True)")
    return report
