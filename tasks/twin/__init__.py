"""Fleet digital twin: degradation model, synthetic fleets, calibration and policy Monte-Carlo.

Pure functions over an array module ``xp`` (``numpy`` on CPU, ``cupy`` on a GPU worker), one
concept per module; their public names are re-exported here, so ``from twinflow.tasks import twin``
and ``twin.X`` keep working:

- :mod:`~twinflow.tasks.twin.model`: the twin's parameters (``TwinModel``, ``CostModel``,
  ``TwinParams``, ``GenerateParams``) and the degradation model (its equations are there).
- :mod:`~twinflow.tasks.twin.fleet`: synthetic fleets, lifetimes and health trajectories.
- :mod:`~twinflow.tasks.twin.calibration`: fitting the twin to run-to-failure telemetry.
- :mod:`~twinflow.tasks.twin.lives`: the fleet's lives from its segments, the lifetime check with
  suspensions and each failure mode's lives (competing risks).
- :mod:`~twinflow.tasks.twin.rul_error`: the RUL estimate's error model.
- :mod:`~twinflow.tasks.twin.policies`: maintenance policies and the Monte-Carlo kernel.
- :mod:`~twinflow.tasks.twin.fused`: the fused CuPy kernel for GPU workers.
- :mod:`~twinflow.tasks.twin.study`: scenario batches on Dask and their aggregation.
- :mod:`~twinflow.tasks.twin.report`: the study's figures, Markdown table and MLflow run.
- :mod:`~twinflow.tasks.twin.tasks`: the Prefect tasks the ``simulate``/``generate`` flows call
  (not imported here: importing the twin's math does not need Prefect).
"""

from __future__ import annotations

from twinflow.tasks.twin.model import (
    array_module,
    child_seed,
    CostModel,
    damage_growth,
    draw_units,
    failure_age,
    GenerateParams,
    make_rng,
    DegenerateCalibration,
    model_arrays,
    NoRunToFailureData,
    seed_sequence,
    to_numpy,
    TwinModel,
    TwinParams,
    unit_label,
)
from twinflow.tasks.twin.fleet import (
    fleet_contract,
    generate_fleet,
    health_fan,
    sample_lifetimes,
)
from twinflow.tasks.twin.calibration import (
    asset_ages,
    bundled_fd001_model,
    calibrate,
    CalibrationReport,
    default_model,
    ks_statistic,
    read_cmapss_frame,
    read_headerless,
    select_run_to_failure,
)
from twinflow.tasks.twin.rul_error import (
    error_model_from_champion,
    RulErrorModel,
)
from twinflow.tasks.twin.policies import (
    build_policies,
    OUTPUTS,
    Policy,
    simulate_batch,
    simulate_loop,
)
from twinflow.tasks.twin.fused import (
    fused_kernel_args,
    fused_kernel_results,
    simulate_batch_fused,
)
from twinflow.tasks.twin.study import (
    plan_batches,
    prob_best,
    run_batch,
    run_batches,
    summarize,
)

__all__ = [
    "DegenerateCalibration",
    "NoRunToFailureData",
    "TwinModel",
    "CostModel",
    "TwinParams",
    "GenerateParams",
    "unit_label",
    "array_module",
    "to_numpy",
    "seed_sequence",
    "child_seed",
    "make_rng",
    "model_arrays",
    "failure_age",
    "draw_units",
    "damage_growth",
    "sample_lifetimes",
    "health_fan",
    "fleet_contract",
    "generate_fleet",
    "CalibrationReport",
    "ks_statistic",
    "calibrate",
    "asset_ages",
    "select_run_to_failure",
    "read_headerless",
    "bundled_fd001_model",
    "read_cmapss_frame",
    "default_model",
    "RulErrorModel",
    "error_model_from_champion",
    "Policy",
    "build_policies",
    "OUTPUTS",
    "simulate_batch",
    "simulate_loop",
    "fused_kernel_args",
    "fused_kernel_results",
    "simulate_batch_fused",
    "plan_batches",
    "prob_best",
    "run_batch",
    "run_batches",
    "summarize",
]
