"""The features stage: per-asset window features, regime normalisation and the RUL label.

A lake snapshot in, a feature set (Parquet files plus ``_fit.json`` and ``_manifest.json``) out. The
flow is :mod:`twinflow.flows.features`; the stage's logic lives in this package, one concept a module:

- :mod:`.params`: what the stage computes (:class:`FeatureParams`) and the fitted statistics it
  reuses (:class:`FitStats`), the output's file and column names;
- :mod:`.fit`: passes 1-2 over the lake: operating regimes (k-means on the setting channels) and
  per-regime normalisation moments;
- :mod:`.kernels`: the window kernels over an array module (NumPy, or CuPy on GPU workers);
- :mod:`.cpu`: the same kernels compiled with numba (the CPU path);
- :mod:`.transform`: pass 3, the features of one partition (:func:`compute_features`);
- :mod:`.stage`: the I/O edges, the partition jobs, their Dask drivers and the thin Prefect tasks.

This package re-exports their public names, so ``from twinflow.tasks.features import X`` needs no
knowledge of the split.
"""

from __future__ import annotations

from twinflow.tasks.features.fit import (  # noqa: F401
    assign_regimes,
    combine_moments,
    compiled_kernels,
    finalize_fit,
    fit_regimes,
    identity_fit,
    partition_moments,
    sample_operating_settings,
)
from twinflow.tasks.features.kernels import (  # noqa: F401
    array_module,
    asset_shift,
    ewm_mean,
    group_bounds,
    group_ends,
    gstart_from_pos,
    resolve_backend,
    rolling_features,
    time_window_features,
    to_numpy,
    window_starts,
)
from twinflow.tasks.features.params import (  # noqa: F401
    EXECUTION_FIELDS,
    FIT_FILE,
    LABEL,
    MANIFEST_FILE,
    REGIME,
    SINCE_START,
    STATS,
    TIME_SINCE_START,
    FeatureParams,
    FitStats,
    Stat,
    since_start_name,
)
from twinflow.tasks.features.transform import (  # noqa: F401
    compute_features,
    feature_names,
    time_ticks,
)
from twinflow.tasks.features.stage import (  # noqa: F401
    HeldPartitions,
    code_version,
    fit_statistics,
    fit_task,
    held_bytes,
    hold_partitions,
    lake_fingerprint,
    lake_frame,
    list_lake_files,
    load_fit,
    nan_counts,
    new_temp_dir,
    plan_partitions,
    publish,
    read_partition,
    read_partition_counted,
    read_schema_columns,
    sample_job,
    sample_partitions,
    stage_digest,
    summarise,
    transform_and_write,
    transform_job,
    transform_task,
    write_partition,
)
