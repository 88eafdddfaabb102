"""Reading back what a test's flow runs left in the Prefect API."""

from __future__ import annotations


def task_run_names(flow_run_id: str) -> set[str]:
    """Names of the task runs of one flow run, read back from the Prefect API."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {r.name for r in runs}
