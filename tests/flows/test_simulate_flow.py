"""The simulate and generate flows on a real Prefect server, Dask cluster and MLflow store."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import pytest

from prefect_helpers import task_run_names
from twin_fixtures import pump_fleet
from twinflow.contract import load_contract
from twinflow.refs import LakeSnapshot, SimulationResult
from twinflow.tasks import twin

pytestmark = pytest.mark.integration

SMALL = dict(n_scenarios=8, batch_scenarios=3, n_assets=10, horizon=300, intervals=[100, 150],
             thresholds=[20.0, 40.0], fan_units=50)


def test_simulate_flow_reports_to_mlflow_and_prefect(runtime):
    import mlflow
    from prefect.client.orchestration import get_client

    from twinflow.flows.simulate import ARTIFACT_KEY, simulate

    params = twin.TwinParams(**SMALL)
    result = simulate(params)
    assert isinstance(result, SimulationResult)
    names = [r["policy"] for r in result.policies]
    assert names == ["run_to_failure", "fixed_k100", "fixed_k150", "predictive_rul20", "predictive_rul40"]
    best = min(result.policies, key=lambda r: r["expected_cost"])
    assert result.recommended_policy == best["policy"]
    assert result.expected_cost == best["expected_cost"]
    run = mlflow.get_run(result.run_id)
    # No champion model in this fresh MLflow store: the stated Gaussian fallback error model.
    assert run.data.tags["twinflow.rul_error_model"].startswith("gaussian: fallback")
    assert run.data.tags["twinflow.recommended_policy"] == result.recommended_policy
    assert run.data.metrics["calibration_ks"] <= 0.15
    assert run.data.metrics["recommended_expected_cost"] == pytest.approx(best["expected_cost"])
    # Headline metrics only; every policy's numbers are in the table artifact.
    assert not any("." in k for k in run.data.metrics)
    table = json.loads(mlflow.artifacts.load_text(f"runs:/{result.run_id}/twin/policies_table.json"))
    assert len(table["data"]) == len(result.policies)
    for r in result.policies:  # counts and shares keep their CIs inside their range
        assert 0 <= r["failures_ci_low"] <= r["failures"] and 0 <= r["p_best_ci_low"] <= r["p_best_ci_high"] <= 1
        assert 0 <= r["availability_ci_low"] <= r["availability_ci_high"] <= 1
    desc = run.data.tags["mlflow.note.content"]
    assert f"`{result.recommended_policy}`" in desc and "EUR" in desc and "fixed-interval" in desc
    assert run.data.params["n_scenarios"] == "8"
    # The run says which fleet contract the twin was calibrated on, and in which clock unit.
    cmapss = load_contract("cmapss")
    assert {k: v for k, v in run.data.tags.items() if k.startswith("twinflow.contract.")} == {
        "twinflow.contract.name": "cmapss", "twinflow.contract.version": str(cmapss.version),
        "twinflow.contract.digest": cmapss.digest, "twinflow.contract.time_unit": "cycle"}
    arts = {a.path for d in ("plots", "twin") for a in mlflow.MlflowClient().list_artifacts(result.run_id, d)}
    assert {"plots/calibration_lifetimes.png", "plots/cost_vs_threshold.png", "plots/health_fan.png",
            "twin/model.json", "twin/policies.json"} <= arts

    async def read_artifacts():
        async with get_client() as client:
            return await client.read_artifacts()

    artifacts = [a for a in asyncio.run(read_artifacts()) if a.key == ARTIFACT_KEY]
    assert artifacts and f"Recommended policy: `{result.recommended_policy}`" in artifacts[-1].data
    # Task runs are named from their parameters, not ``calibrate-twin-a24``.
    assert task_run_names(run.data.tags["prefect.flow_run_id"]) == {
        "calibrate-twin-bundled_fd001", "load-rul-error-model", "simulate-policies-8x10x300"}


def test_results_identical_for_one_and_two_workers(runtime):
    from distributed import Client, LocalCluster

    model = twin.default_model()
    params = twin.TwinParams(**SMALL)
    pols = twin.build_policies(params.intervals, params.thresholds)
    err = twin.RulErrorModel.gaussian(20.0)
    two = twin.run_batches(runtime.cluster.client, model, pols, params, err)
    assert len(runtime.cluster.client.scheduler_info(n_workers=-1)["workers"]) == 2
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0") as cluster, \
            Client(cluster) as client:
        one = twin.run_batches(client, model, pols, params, err)
    assert one.keys() == two.keys()
    for k in one:
        assert one[k].shape == (len(pols), params.n_scenarios)
        assert np.array_equal(one[k], two[k]), k


def test_generate_to_lake_and_calibrate_from_snapshot(runtime):
    from twinflow.flows.simulate import calibrate_twin, generate
    from twinflow.tasks.ingest import read_lake

    snap = generate(twin.GenerateParams(n_assets=45, seed=2, dataset="fleet", chunk_assets=20))
    assert isinstance(snap, LakeSnapshot) and len(snap.files) == 3
    table = read_lake(snap)
    assert table.num_rows == snap.rows
    assert table.column("asset_id").unique().to_pylist() == [f"syn-{i:07d}" for i in range(45)]
    # The same fleet, whatever the number of chunks per worker: chunking is fixed by chunk_assets.
    direct = twin.generate_fleet(20, np.random.SeedSequence(2).spawn(3)[1], twin.default_model(), asset_offset=20)
    got = table.to_pandas()
    got = got[got.asset_id.isin(direct.column("asset_id").unique().to_pylist())].reset_index(drop=True)
    assert np.allclose(got["s11"].to_numpy(), direct.column("s11").to_numpy())

    model, report = calibrate_twin.fn(twin.TwinParams(), snap)
    assert report.n_assets == 45 and not report.fallback
    assert report.ks_statistic <= 0.25


def test_no_run_to_failure_assets_error_or_fallback(runtime, tmp_path):
    from twinflow.flows.simulate import calibrate_twin
    from twinflow.tasks.ingest import write_lake_table

    table = twin.generate_fleet(5, seed=1, source_file="landing/test_FD001.txt")
    snap = write_lake_table(table, runtime.settings.lake_path, "test_fd001", "b1")
    with pytest.raises(twin.NoRunToFailureData, match="no run-to-failure assets"):
        calibrate_twin.fn(twin.TwinParams(), snap)
    with pytest.warns(UserWarning, match="default parameters"):
        model, report = calibrate_twin.fn(twin.TwinParams(on_no_run_to_failure="defaults"), snap)
    assert report.fallback and report.excluded_assets == 5
    assert model.source.startswith("default")


def test_bad_params_fail_before_any_task_runs(runtime):
    from prefect.exceptions import ParameterTypeError

    from twinflow.flows.simulate import simulate

    with pytest.raises(ParameterTypeError):
        simulate(params={"n_scenarios": 0})
    with pytest.raises(ParameterTypeError):
        simulate(params={"costs": {"failure": -1}})


def test_generated_landing_files_pass_ingest(runtime):
    from twinflow.flows.ingest import ingest
    from twinflow.flows.simulate import calibrate_twin, generate
    from twinflow.tasks.ingest import IngestParams

    refs = generate(twin.GenerateParams(n_assets=12, seed=4, dataset="synthetic", target="landing", chunk_assets=5))
    assert len(refs) == 3 and all(r.rows_written > 0 for r in refs)
    # Named after the contract's run-to-failure text rule: generated lives end in failure.
    rule = load_contract("cmapss").rule_for(Path(refs[0].path).name)
    assert rule.format == "text" and rule.life_end == "failure"
    result = ingest(IngestParams(landing=str(Path(refs[0].path).parent), dataset="synthetic"))
    assert result.rows_quarantined == 0
    assert result.rows_written == sum(r.rows_written for r in refs)
    model, report = calibrate_twin.fn(twin.TwinParams(), result.snapshots["synthetic"])
    assert report.n_assets == 12


def test_pump_fleet_simulates_in_hours_and_generates_pump_rows(runtime, tmp_path):
    """A timestamped, non-C-MAPSS fleet end to end: calibrate, study, report and generate by its contract."""
    import mlflow
    import pandas as pd

    from twinflow.flows.simulate import generate, simulate
    from twinflow.lake import read_lake, table_contract, write_lake_table

    pumps = load_contract("pumps")
    table, _ = pump_fleet(n_pumps=12, seed=1)
    snap = write_lake_table(table, runtime.settings.lake_path, "pumps", "b1", contract=pumps)
    params = twin.TwinParams(n_scenarios=6, batch_scenarios=3, n_assets=8, horizon=2000, intervals=[150, 300],
                             thresholds=[24.0, 72.0], inspect_every=6, fan_units=50,
                             costs=twin.CostModel(failure_downtime=48, planned_downtime=8))
    result = simulate(params, snapshot=snap)
    run = mlflow.get_run(result.run_id)
    assert run.data.tags["twinflow.contract.name"] == "pumps"
    assert run.data.tags["twinflow.contract.digest"] == pumps.digest
    assert run.data.tags["twinflow.contract.time_unit"] == "h"
    assert run.data.metrics["calibration_assets"] == 12
    client = mlflow.MlflowClient()
    model_json = mlflow.artifacts.load_dict(f"runs:/{result.run_id}/twin/model.json")
    assert model_json["contract_ref"] == pumps.ref.model_dump() and model_json["time_unit"] == "h"
    model = twin.TwinModel.model_validate(model_json)
    assert model.sensors and "casing_temp_c" not in model.sensors
    study = mlflow.artifacts.load_text(f"runs:/{result.run_id}/twin/policy_study.md")
    assert "2000 h" in study and "cycles" not in study
    assert {a.path for a in client.list_artifacts(result.run_id, "plots")} >= {"plots/calibration_lifetimes.png"}

    # The twin generates pump-shaped rows: to the lake under its contract ...
    snap2 = generate(twin.GenerateParams(n_assets=6, seed=3, dataset="pumps_synthetic", chunk_assets=4), model=model)
    assert snap2.contract == pumps and table_contract(runtime.settings.lake_path, "pumps_synthetic") == pumps
    rows = read_lake(snap2)
    assert "cycle" not in rows.column_names and rows.column("vibration_mm_s").null_count == 0
    # ... and as landing files the pumps contract routes to telemetry (CSV with its header, ISO times).
    refs = generate(twin.GenerateParams(n_assets=5, seed=4, dataset="pumpgen", target="landing", chunk_assets=5),
                    model=model)
    path = Path(refs[0].path)
    rule = pumps.rule_for(path.name)
    assert rule is not None and rule.kind == "telemetry"
    landed = pd.read_csv(path)
    assert list(landed.columns) == ["machine", "ts", *pumps.channel_names]
    assert landed["ts"].str.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ").all()
    assert len(landed) == refs[0].rows_written and landed["casing_temp_c"].isna().all()


def test_failures_are_priced_by_the_recorded_mix_of_failure_modes(runtime):
    """Costs per failure mode: the study prices a simulated failure by the modes' shares of the fleet's
    recorded failures (from the life segments), logs each mode's share and says so in the study."""
    import mlflow
    import pyarrow as pa

    from twinflow import lake
    from twinflow.flows.simulate import simulate
    from twinflow.fleets.pumps import PumpFleetParams, generate_pumps
    from twinflow.tasks.ingest.events import build_segments, parse_events, time_ticks

    pumps = load_contract("pumps")
    fleet = generate_pumps(PumpFleetParams(n_pumps=20, days=120, seed=0, interval="1h", sentinel_rate=0.0,
                                           spike_rate=0.0, stuck_rate_per_week=0.0), pumps)
    r = fleet.readings
    table = pa.table({"asset_id": r.column("machine"), "timestamp": r.column("ts").cast(pa.timestamp("us", tz="UTC")),
                      **{c: r.column(c) for c in pumps.channel_names}})
    snap = lake.write_lake_table(table, runtime.settings.lake_path, "pumps_modes", "b1", contract=pumps)
    ticks, ids = time_ticks(table.column("timestamp")), np.array(table.column("asset_id").to_pylist())
    extents = {a: (int(ticks[ids == a].min()), int(ticks[ids == a].max())) for a in np.unique(ids)}
    events, _ = parse_events(fleet.events, pumps, "events.csv")
    version = lake.write_table(snap.lake_path, lake.derived_name("pumps_modes", "segments"),
                               build_segments(extents, events, pumps), overwrite=True)
    snap = snap.model_copy(update={"segments": version})
    by_mode = {"failure_bearing": 150_000.0, "failure_seal": 30_000.0}
    params = twin.TwinParams(n_scenarios=6, batch_scenarios=3, n_assets=8, horizon=1000, intervals=[150, 300],
                             thresholds=[24.0, 72.0], inspect_every=6, fan_units=50, min_lifetime=24,
                             costs=twin.CostModel(failure=1.0, failure_by_mode=by_mode))
    result = simulate(params, snapshot=snap)
    run = mlflow.get_run(result.run_id)
    shares = {m: run.data.metrics[f"mode_{m}_share"] for m in by_mode}
    assert abs(sum(shares.values()) - 1) < 1e-9 and all(0 < s < 1 for s in shares.values())
    expected = sum(shares[m] * by_mode[m] for m in by_mode)
    study = mlflow.artifacts.load_text(f"runs:/{result.run_id}/twin/policy_study.md")
    assert f"failure {expected:,.0f}" in study and "Failure modes: a failure costs" in study
    # The same study with that cost declared flat gives the same costs: every simulated failure was
    # priced at the mix, not at the flat 1.0 declared beside the modes.
    flat = simulate(params.model_copy(update={"costs": twin.CostModel(failure=expected)}), snapshot=snap)
    assert [round(r["expected_cost"], 6) for r in result.policies] == \
        [round(r["expected_cost"], 6) for r in flat.policies]
