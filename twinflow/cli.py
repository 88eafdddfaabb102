"""The ``twinflow`` command line (Typer + rich).

Errors that a user can fix are printed as one line; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from twinflow.errors import ConfigError, TwinflowError

app = typer.Typer(
    name="twinflow",
    help="Orchestration for industrial AI: Prefect flows on Dask, tracked in MLflow.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=False)
_STATE: dict = {"debug": False, "config_block": None}


def _settings():
    """Settings from the environment, or from a saved ``twinflow-config`` block (``--config-block``)."""
    from twinflow.settings import get_settings

    name = _STATE.get("config_block")
    if not name:
        return get_settings()
    from twinflow.blocks import settings_from_block

    return settings_from_block(name)


@app.callback()
def _main(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks and debug logs."),
    home: Optional[Path] = typer.Option(None, "--home", help="twinflow home (default: TWINFLOW_HOME or ./.twinflow)."),
    config_block: Optional[str] = typer.Option(
        None, "--config-block", help="Take settings from a saved twinflow-config Prefect block (see `twinflow blocks`)."),
) -> None:
    _STATE["debug"] = debug
    _STATE["config_block"] = config_block
    if home is not None:
        os.environ["TWINFLOW_HOME"] = str(home)
    _configure_logging(debug)


def _configure_logging(debug: bool) -> None:
    from rich.logging import RichHandler

    level = logging.DEBUG if debug else logging.INFO
    handler = RichHandler(console=Console(stderr=True), show_path=False, rich_tracebacks=debug)
    root = logging.getLogger("twinflow")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
    for noisy in ("httpx", "distributed", "mlflow", "alembic", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if debug else logging.WARNING)


def _parse_params(items: List[str]) -> dict:
    """Turn ``--param a.b=1`` pairs into a nested dict (values parsed as JSON when possible)."""
    import json

    out: dict = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--param expects key=value, got {item!r}")
        key, raw = item.split("=", 1)
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out


def _param_error(exc, stage: str) -> ConfigError:
    """One line for a parameters model's first error: the ``--param`` name, the rule, the value."""
    err = exc.errors(include_url=False)[0]
    name = ".".join(str(p) for p in err.get("loc", ())) or "?"
    msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
    if err.get("type") == "extra_forbidden":
        # Top-level names only: a nested one's model is not the one the error is titled with.
        known = sorted(_model_fields(exc.title)) if len(err.get("loc", ())) == 1 else []
        msg = f"not a parameter of {stage}" + (f" (known: {', '.join(known)})" if known else "")
    elif err.get("type") == "missing":
        return ConfigError(f"--param {name}: required by {stage}")
    return ConfigError(f"--param {name}: {msg} (got {err.get('input')!r})")


def _model_fields(title: str) -> list[str]:
    # The error only names the model; the stage models are all in the pipeline module.
    from twinflow.flows import pipeline

    model = getattr(pipeline, title, None)
    return list(getattr(model, "model_fields", {}))


@app.command()
def demo(
    stages: Optional[List[str]] = typer.Option(None, "--stage", help="Run only these stages (repeatable)."),
    fleet: str = typer.Option("cmapss", "--fleet", help="Example fleet: cmapss (NASA turbofans, bundled) or "
                              "pumps (a generated pump fleet with a maintenance log)."),
) -> None:
    """Run the whole pipeline on the embedded defaults over a bundled example fleet (default: NASA
    C-MAPSS FD001; ``--fleet pumps``: a generated pump fleet, timestamped, with its maintenance log).

    Starts a local Prefect server (SQLite), a Dask LocalCluster (or LocalCUDACluster on a GPU
    machine) and MLflow on SQLite, all under the twinflow home; prints progress per stage and,
    at the end, where to look.
    """
    from twinflow import runtime
    from twinflow.flows.pipeline import PipelineParams, demo_params, pipeline
    from twinflow.locks import exclusive

    settings = _settings()
    with exclusive(settings.home / "demo.lock", "twinflow demo"):
        params: PipelineParams = demo_params(settings, stages=stages or None, fleet=fleet)
        console.rule("[bold]twinflow demo")
        console.print(f"home: {settings.home}")
        with runtime.start(settings) as rt:
            console.print(f"Prefect API: {rt.prefect_url}  |  Dask: {rt.cluster.mode} "
                          f"({rt.cluster.n_workers} workers, dashboard {rt.cluster.dashboard_link})  |  "
                          f"MLflow: {settings.mlflow_tracking_uri}")
            result = pipeline(params)
        _print_result(result)
        console.rule("[bold green]done")
        console.print(f"lake:        {settings.lake_path}")
        console.print(f"MLflow:      experiment '{settings.mlflow.experiment}' in {settings.mlflow_tracking_uri}")
        console.print("Browse both: [bold]twinflow server[/] (Prefect UI + MLflow UI on 127.0.0.1)")


def _print_result(result) -> None:
    table = Table(title="pipeline stages")
    table.add_column("stage")
    table.add_column("result")
    for stage, summary in result.summaries().items():
        table.add_row(stage, summary)
    console.print(table)


@app.command()
def run(
    stage: str = typer.Argument(..., help="ingest | features | train | simulate | health | pipeline"),
    param: List[str] = typer.Option([], "--param", "-p", help="Stage parameter key=value (dots for nesting)."),
    landing: Optional[str] = typer.Option(None, "--landing", help="Landing folder/URL (ingest, pipeline)."),
    generate: bool = typer.Option(False, "--generate", help="simulate: generate a synthetic fleet into the lake."),
    contract: Optional[str] = typer.Option(
        None, "--contract", help="Fleet contract (YAML path or bundled name: cmapss, pumps) of the landing files "
                                 "(ingest, pipeline); default: the setting TWINFLOW_CONTRACT."),
) -> None:
    """Run one stage (or the pipeline) with parameters, on the configured runtime.

    An ingest in which every row of a file, or of the run, is quarantined exits non-zero, naming the
    top reasons (``--param fail_on_all_quarantined=false`` only warns).
    """
    from pydantic import ValidationError

    from twinflow import runtime
    from twinflow.flows.pipeline import STAGES
    from twinflow.flows.stages import run_stage, stage_params

    if stage not in (*STAGES, "health", "pipeline"):
        raise ConfigError(f"unknown stage {stage!r}; choose one of: {', '.join((*STAGES, 'health', 'pipeline'))}")
    settings = _settings()
    overrides = _parse_params(param)
    if landing:
        overrides["landing"] = landing
    if generate:
        overrides["generate"] = True
    if contract:
        if stage == "ingest":
            overrides["contract"] = contract
        elif stage == "pipeline":
            overrides.setdefault("ingest", {})["contract"] = contract
        else:
            raise ConfigError(f"--contract applies to ingest and pipeline; {stage} reads the contract stored "
                              "with its input data")
    # Validated before anything starts: a typo costs a second, not the servers' start-up.
    try:
        call = stage_params(stage, overrides, settings)
    except ValidationError as exc:
        raise _param_error(exc, stage) from None
    with runtime.start(settings):
        out = run_stage(stage, call, settings)
    console.print_json(out.model_dump_json() if hasattr(out, "model_dump_json") else str(out))


@app.command("health")
def health_cmd(
    dataset: Optional[str] = typer.Option(None, "--dataset", "-d",
                                          help="Lake dataset of the running fleet (default: the lake's only fleet)."),
    param: List[str] = typer.Option([], "--param", "-p", help="Health parameter key=value (dots for nesting)."),
    latest: bool = typer.Option(False, "--latest", help="Show the latest stored scores; run nothing."),
    top: int = typer.Option(25, "--top", help="Rows to print."),
) -> None:
    """Which running machines need maintenance, and by when: score the fleet now and print the ranking."""
    from pydantic import ValidationError

    from twinflow.tasks.health.console import health_table, latest_rows

    settings = _settings()
    if dataset is None:
        from twinflow.flows.health import only_fleet

        dataset = only_fleet(settings.lake_path)  # as the flow does; several or none: a clear error
    if latest:
        rows = latest_rows(settings.lake_path, dataset)
        if rows is None:
            raise ConfigError(f"dataset {dataset!r} has no health scores yet; run `twinflow health -d {dataset}`")
        console.print(health_table(rows, f"fleet health of {dataset} ({rows.run_key.iloc[0]}, scored "
                                         f"{rows.scored_at.iloc[0]})", top))
        return
    from twinflow import runtime
    from twinflow.flows.stages import run_stage, stage_params

    try:
        call = stage_params("health", {**_parse_params(param), "dataset": dataset}, settings)
    except ValidationError as exc:
        raise _param_error(exc, "health") from None
    with runtime.start(settings):
        result = run_stage("health", call, settings)
    console.print(health_table(latest_rows(settings.lake_path, dataset), f"fleet health of {dataset} ({result.run_key})",
                               top))
    console.print(f"{result.assets} assets; bands: " + ", ".join(f"{b} {n}" for b, n in result.bands.items())
                  + f"; work orders: {result.work_orders} -> {result.work_orders_json}; announced: "
                  + (", ".join(result.announced) or "none") + f"; MLflow run {result.mlflow_run_id}")


def _mlflow_workers() -> int:
    # One web worker per two cores (at most 4, MLflow's default): 4 workers on 2 shared cores made
    # the UI answer ~40 s after start, and a reviewer is one user.
    return max(1, min(4, (os.cpu_count() or 1) // 2))


def _wait_until_answers(url: str, proc: subprocess.Popen, timeout_s: float) -> bool:
    import time

    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(url, timeout=2.0).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    return False


def _experiment_link(ml_url: str, name: str) -> str | None:
    """The experiment's page in the classic view, found through the MLflow UI's REST API (None if absent)."""
    import httpx

    from twinflow.tracking import ui_link

    try:
        r = httpx.get(f"{ml_url}/api/2.0/mlflow/experiments/get-by-name", params={"experiment_name": name},
                      timeout=10)
    except httpx.HTTPError:
        return None
    if r.status_code != 200:
        return None  # no such experiment yet: nothing has run on this home
    from twinflow.tracking import HEADLINE_VIEW_TAG

    exp = r.json()["experiment"]
    # A home last run before the headline view existed has no such tag: a key the UI cannot find
    # would end on an error notice, so the link then opens the plain runs table.
    has_view = any(t.get("key") == HEADLINE_VIEW_TAG for t in exp.get("tags", []))
    return ui_link(ml_url, experiment_id=exp["experiment_id"], **({} if has_view else {"view": None}))


@app.command()
def server(
    prefect_port: int = typer.Option(
        0, help="Prefect UI/API port; 0: this home's own port (picked once, so MLflow's Prefect links keep working)."),
    mlflow_port: int = typer.Option(5000, help="MLflow UI port (0 picks a free one)."),
) -> None:
    """Start the local Prefect server and the MLflow UI in the foreground, to browse results.

    Each URL is printed once it answers. The Prefect server is the home's (the one the demo's
    runs link to); Ctrl-C stops both within seconds.
    """
    import signal
    import time

    from twinflow.prefect_server import (
        STOP_GRACE_S,
        acquire_server,
        release_server,
        set_offline_env,
        terminate_group,
    )
    from twinflow.settings import get_settings

    set_offline_env()
    settings = get_settings(prefect={"port": prefect_port})
    settings.home.mkdir(parents=True, exist_ok=True)
    if mlflow_port == 0:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            mlflow_port = s.getsockname()[1]
    # MLflow starts while the Prefect server does: the two start-ups overlap.
    mlflow_cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", settings.mlflow_tracking_uri,
                  "--default-artifact-root", settings.mlflow_artifact_location,
                  "--host", "127.0.0.1", "--port", str(mlflow_port), "--workers", str(_mlflow_workers())]
    # Its own process group: stopping it also stops the web workers it forks.
    # Its output goes to a log file of the home: the terminal shows the two URLs, not its start-up.
    with open(settings.home / "mlflow-ui.log", "ab") as ml_log:
        # MLflow's background job runner (GenAI scorers, trace jobs) is of no use to a reviewer of
        # training runs; its start competes with the UI for the CPU (first answer 44.7 s with it, 17.0 s
        # without, on 2 loaded cores; 6.1 s and 5.8 s on idle ones).
        ml_env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": os.environ.get(
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")}
        from twinflow.procguard import guarded

        # Under a guard that stops the UI's process group when this process dies, even by kill -9
        # (nothing here can clean up then; the UI and its workers used to keep running).
        ml = subprocess.Popen(guarded(mlflow_cmd), start_new_session=True, stdout=ml_log, stderr=subprocess.STDOUT,
                              stdin=subprocess.DEVNULL, env=ml_env)
    srv = None
    try:  # entered right after the processes exist: a SIGTERM from here on still stops them
        srv = acquire_server(settings)
        console.print(f"Prefect UI: {srv.url.removesuffix('/api')}")
        ml_url = f"http://127.0.0.1:{mlflow_port}"
        if not _wait_until_answers(f"{ml_url}/health", ml, timeout_s=300):
            raise TwinflowError(f"the MLflow UI did not answer on {ml_url} (exit code {ml.poll()}; port "
                                f"{mlflow_port} in use? log: {settings.home / 'mlflow-ui.log'})")
        console.print(f"MLflow UI:  {ml_url}   (Ctrl-C stops)")
        experiment = _experiment_link(ml_url, settings.mlflow.experiment)
        if experiment:
            # soft_wrap: a URL longer than the console is printed whole, never folded over lines.
            console.print(f"Runs:       {experiment}", soft_wrap=True)
        while ml.poll() is None:
            time.sleep(0.5)
        raise TwinflowError(f"the MLflow UI exited with code {ml.returncode} (port {mlflow_port} in use?)")
    except KeyboardInterrupt:
        pass
    finally:
        # Both are told to stop at once and share one deadline: the stop takes one grace period, not
        # two (measured 3.8 s with a grace period each).
        deadline = time.monotonic() + STOP_GRACE_S
        try:
            os.killpg(ml.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            if srv is not None:
                release_server(settings, srv)
        finally:
            terminate_group(ml.pid, timeout=max(0.1, deadline - time.monotonic()))


@app.command()
def doctor() -> None:
    """Print versions, GPU/dask-cuda availability, the cluster mode that would be chosen, and URLs."""
    import importlib.metadata as md
    import platform

    from twinflow.cluster import gpu_count, has_dask_cuda, resolve_mode
    from twinflow.prefect_server import read_server_state

    settings = _settings()
    table = Table(title="twinflow doctor", show_header=False)
    table.add_row("python", platform.python_version())
    for pkg in ("twinflow", "prefect", "prefect-dask", "dask", "distributed", "mlflow", "pyarrow",
                "pandas", "numpy", "scikit-learn", "dask-cuda", "cupy-cuda12x", "torch"):
        try:
            table.add_row(pkg, md.version(pkg))
        except md.PackageNotFoundError:
            table.add_row(pkg, "[dim]not installed[/]")
    table.add_row("GPUs", str(gpu_count()))
    table.add_row("dask-cuda + cupy", "yes" if has_dask_cuda() else "no")
    try:
        mode, reason = resolve_mode(settings)
        table.add_row("cluster mode", f"{mode} ({reason})")
    except ConfigError as exc:
        table.add_row("cluster mode", f"[red]{exc}[/]")
    api = settings.prefect.api_url or os.environ.get("PREFECT_API_URL")
    state = read_server_state(settings)
    table.add_row("Prefect API", api or (f"local server running at {state['url']}" if state else
                                         "local server, started on demand (127.0.0.1)"))
    table.add_row("MLflow tracking", settings.mlflow_tracking_uri)
    table.add_row("MLflow artifacts", settings.mlflow_artifact_location)
    table.add_row("home", str(settings.home))
    table.add_row("lake", settings.lake_path)
    console.print(table)


# --- twinflow contract: onboarding a fleet -------------------------------------------------------------
# One group for the contract commands (`init` here; `check` and others join it with
# @contract_app.command).
contract_app = typer.Typer(help="Fleet contracts: describe your own machines' data (draft, check).",
                           no_args_is_help=True)
app.add_typer(contract_app, name="contract")


@contract_app.command("init")
def contract_init(
    files: List[Path] = typer.Argument(..., help="Sample files (CSV, CSV.gz, Parquet, header-less text) or folders."),
    output: Path = typer.Option(..., "--output", "-o", help="Where to write the drafted contract (YAML)."),
    name: Optional[str] = typer.Option(None, "--name", "-n", help="Contract name (default: from the file names)."),
    asset: Optional[str] = typer.Option(None, "--asset", help="The asset-id column, if the guess is wrong."),
    time: Optional[str] = typer.Option(None, "--time", help="The clock column, if the guess is wrong."),
    margin: float = typer.Option(0.5, "--margin", min=0.0, help="Range margin beyond the 0.1/99.9 % quantiles, "
                                                                 "as a share of their span."),
    force: bool = typer.Option(False, "--force", "-f", help="Overwrite an existing output file."),
    events: Optional[List[Path]] = typer.Option(
        None, "--events", "-e", help="A sample maintenance/failure event log (CSV): drafts the contract's events "
                                     "section (columns, each event type with a proposed meaning). Repeatable."),
) -> None:
    """Draft a fleet contract from sample files, for you to review before any run uses it."""
    from twinflow.contract.draft import draft_contract, draft_yaml

    if output.exists() and not force:
        raise ConfigError(f"{output} exists; pass --force to overwrite it")
    for log in events or []:
        if not log.is_file():
            raise ConfigError(f"--events {log}: no such file")
    draft = draft_contract(list(files), name=name, asset=asset, time=time, margin=margin, events=events or None)
    text = draft_yaml(draft)
    _write_text_atomic(output, text)
    c = draft.contract
    console.print(f"wrote {output}: {c.summary()}")
    for note in draft.notes:
        console.print(f"  - {note}", markup=False, highlight=False)
    console.print("Review it (units, ranges, setting vs sensor), then use it with --contract or "
                  "TWINFLOW_CONTRACT.")


def _write_text_atomic(path: Path, text: str) -> None:
    import tempfile

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# --- twinflow generate: example fleets as files -------------------------------------------------------
generate_app = typer.Typer(help="Generate example fleets into a landing folder, as a plant would export them.",
                           no_args_is_help=True)
app.add_typer(generate_app, name="generate")


@generate_app.command("pumps")
def generate_pumps_cmd(
    landing: Path = typer.Option(..., "--landing", help="Folder the files are written to."),
    pumps: int = typer.Option(20, "--pumps", help="Number of pumps."),
    days: int = typer.Option(120, "--days", help="Days of 10-minute readings."),
    seed: int = typer.Option(0, "--seed", help="Random seed (same seed, same files)."),
    param: List[str] = typer.Option([], "--param", "-p", help="Other generator parameter key=value "
                                                              "(see twinflow.fleets.PumpFleetParams)."),
    truth: Optional[Path] = typer.Option(None, "--truth", help="Ground-truth JSON path "
                                                               "(default <landing>/ground_truth.json)."),
) -> None:
    """A centrifugal-pump fleet (contract `pumps`): daily CSVs, events.csv and the ground truth."""
    from pydantic import ValidationError

    from twinflow.fleets.pumps import PumpFleetParams, generate_pumps, write_pumps

    try:
        params = PumpFleetParams(**{**_parse_params(param), "n_pumps": pumps, "days": days, "seed": seed})
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        key = ".".join(str(x) for x in err.get("loc", ())) or "?"
        if err.get("type") == "extra_forbidden":
            raise ConfigError(f"--param {key}: not a parameter of the pump generator (known: "
                              f"{', '.join(PumpFleetParams.model_fields)})") from None
        raise ConfigError(f"{key}: {str(err.get('msg')).removeprefix('Value error, ')} "
                          f"(got {err.get('input')!r})") from None
    fleet = generate_pumps(params)
    paths = write_pumps(fleet, landing, truth)
    ends: dict[str, int] = {}
    for life in fleet.lives:
        ends[life["end_reason"]] = ends.get(life["end_reason"], 0) + 1
    console.print(f"wrote {len(paths) - 2} daily files, {paths[-2].name} ({fleet.events.num_rows} events) and "
                  f"{paths[-1]} to {landing}: {fleet.readings.num_rows} readings of {params.n_pumps} pumps, "
                  f"{len(fleet.lives)} lives ({', '.join(f'{v} {k}' for k, v in sorted(ends.items()))})")


def _contract_group() -> typer.Typer:
    """The ``twinflow contract`` command group: the one already registered, else a new one."""
    for info in app.registered_groups:
        if info.name == "contract":
            return info.typer_instance
    group = typer.Typer(help="Fleet contracts: what a fleet's data is (see twinflow/contract/).",
                        no_args_is_help=True)
    app.add_typer(group, name="contract")
    return group


def contract_check(
    contract: str = typer.Argument(..., help="Fleet contract: YAML path or bundled name (cmapss, pumps)."),
    files: List[Path] = typer.Argument(..., help="Files or folders to check, as a landing folder is read."),
    param: List[str] = typer.Option([], "--param", "-p", help="Ingest parameter key=value overriding the "
                                                            "contract's file rules (dataset, format, columns...)."),
) -> None:
    """Dry-run the ingest's parsing and validation of FILES against CONTRACT; writes nothing.

    Prints per file the rows that would reach the lake and those that would be quarantined, then the
    quarantined rows per reason over all files. Exits 1 when some telemetry file would keep no row.
    Duplicate keys across files or against the lake are not checked (they need the lake).
    """
    from pydantic import ValidationError

    from twinflow.contract import load_contract
    from twinflow.tasks.ingest.check import check_files, reason_totals

    fleet = load_contract(contract)
    try:
        checks = check_files([str(f) for f in files], fleet, **_parse_params(param))
    except ValidationError as exc:
        raise _param_error(exc, "contract check") from None
    console.print(f"contract {fleet.summary()}")
    table = Table(title="files")
    for col in ("file", "dataset", "rows", "kept", "quarantined", "top reasons / why skipped"):
        table.add_column(col, overflow="fold")
    for c in checks:
        name = Path(c.path).name
        if c.kind != "telemetry":
            table.add_row(name, "-", "-", "-", "-", f"[dim]skipped: {c.note}[/]")
            continue
        top = "; ".join(f"{k} x{v}" for k, v in sorted(c.reasons.items(), key=lambda kv: -kv[1])[:3])
        style = "[red]" if c.nothing_kept else ""
        table.add_row(name, c.dataset, str(c.rows_read), f"{style}{c.rows_ok}", str(c.rows_quarantined),
                      c.file_error or top)
    console.print(table)
    totals = reason_totals(checks)
    if totals:
        reasons = Table(title="quarantined rows per reason")
        reasons.add_column("reason", overflow="fold")
        reasons.add_column("rows", justify="right")
        for k, v in totals.items():
            reasons.add_row(k, str(v))
        console.print(reasons)
    read = sum(c.rows_read for c in checks)
    kept = sum(c.rows_ok for c in checks)
    console.print(f"{sum(c.kind == 'telemetry' for c in checks)} telemetry file(s), {read} rows: {kept} would "
                  f"reach the lake, {read - kept} would be quarantined; "
                  f"{sum(c.kind != 'telemetry' for c in checks)} file(s) skipped")
    empty = [Path(c.path).name for c in checks if c.nothing_kept]
    if empty:
        raise TwinflowError(f"{len(empty)} file(s) would keep no row: {', '.join(empty[:5])}"
                            + (" ..." if len(empty) > 5 else ""))


def _register_extensions() -> None:
    # Commands owned by other subpackages (serve, backfill, blocks, stream) register themselves here.
    from twinflow.tasks.bridge.cli import register_commands as register_stream

    register_stream(app)
    group = _contract_group()
    if not any(c.name == "check" for c in group.registered_commands):
        group.command("check")(contract_check)
    try:
        from twinflow.deployments.cli import register_commands
    except ImportError:
        return
    register_commands(app)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: Optional[List[str]] = None) -> None:
    """Entry point: run the app and turn user errors into one line (traceback with --debug)."""
    import click

    import signal

    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    # SIGTERM (a scheduler's kill, `timeout`) unwinds like Ctrl-C, so the Prefect server and the
    # Dask cluster this command started are stopped instead of being orphaned.
    signal.signal(signal.SIGTERM, _interrupt)
    _register_extensions()
    try:
        app(args=argv, prog_name="twinflow", standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except (click.exceptions.Abort, KeyboardInterrupt):
        console.print("[yellow]aborted[/]")
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001 - the point is to print every failure as one line
        if debug:
            console.print_exception()
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        if len(msg) > 400 and not debug:
            msg = msg[:400] + " ..."
        kind = "error" if isinstance(exc, TwinflowError) else f"error ({exc.__class__.__name__})"
        Console(stderr=True).print(f"[bold red]{kind}:[/] {msg}" + ("" if debug else "  [dim](--debug for details)[/]"))
        sys.exit(2 if isinstance(exc, ConfigError) else 1)


if __name__ == "__main__":
    main()
