"""twinflow's settings: one pydantic-settings model, environment prefix ``TWINFLOW_``.

Nested sections are set with a double underscore, e.g. ``TWINFLOW_DASK__MODE=address`` and
``TWINFLOW_DASK__ADDRESS=tcp://10.0.0.5:8786``. Importing this module reads nothing and writes
nothing; :func:`get_settings` builds the model when it is called.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from twinflow.errors import ConfigError

ENV_PREFIX = "TWINFLOW_"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LakeSettings(_Section):
    """Where data lives. Empty paths default to folders under the twinflow home."""

    landing: str | None = Field(None, description="Landing folder/URL scanned by ingest.")
    lake: str | None = Field(None, description="Root of the partitioned Parquet lake.")
    quarantine: str | None = Field(None, description="Root of quarantined rows and files (default: <home>/quarantine; "
                                     "<lake>/_quarantine for a lake on an object store).")
    features: str | None = Field(None, description="Root of feature datasets.")
    storage_options: dict[str, str] = Field(default_factory=dict, description="fsspec options.")
    secret_options: dict[str, SecretStr] = Field(
        default_factory=dict, description="fsspec options that are secrets (keys, tokens): masked in logs."
    )

    credentials: str | None = Field(
        None, description="block:<name> of a twinflow-s3-credentials Prefect block: its endpoint and keys are "
                          "storage options (those given here win).")

    def fsspec_options(self) -> dict[str, str]:
        """The ``credentials`` block's options, then ``storage_options``, then the revealed
        ``secret_options``: pass this to fsspec or delta-rs, never log it.

        Raises:
            ConfigError: ``credentials`` names no saved block.
            ServiceUnavailable: ``credentials`` is set and the Prefect API does not answer.
        """
        base: dict[str, str] = {}
        if self.credentials:
            from twinflow.blocks.storage import options_from_block

            base = options_from_block(self.credentials)
        return {**base, **self.storage_options,
                **{k: v.get_secret_value() for k, v in self.secret_options.items()}}


class PrefectSettings(_Section):
    """Prefect API. Without an ``api_url`` (and no ``PREFECT_API_URL``) twinflow runs its own."""

    api_url: str | None = None
    host: str = "127.0.0.1"
    port: int = Field(0, ge=0, le=65535, description="0 picks a free port.")
    start_timeout: float = Field(180.0, gt=0)
    server_nice: int = Field(
        5, ge=0, le=19,
        description=(
            "CPU niceness of the local Prefect server twinflow starts (POSIX). Flows only wait for it "
            "at flow-run start and end; during a stage it records task states, logs and events, which "
            "should yield to the Dask workers when they use every core. 0 keeps the default priority."
        ),
    )
    flow_heartbeats: Literal["auto", "on", "off"] = Field(
        "auto",
        description=(
            "Prefect flow-run heartbeats (they let a server automation mark a vanished run crashed). "
            "auto: kept for runs a Prefect runner or worker starts (serve, deployments) and whenever "
            "PREFECT_FLOWS_HEARTBEAT_FREQUENCY is set; off for flows a twinflow command or "
            "runtime.start() runs in its own process, where each flow run would otherwise wait up to "
            "1 s at exit for the heartbeat thread."
        ),
    )


class DaskSettings(_Section):
    """Dask cluster: ``auto`` picks ``cuda`` when a GPU and dask-cuda exist, else ``local``."""

    mode: Literal["auto", "local", "cuda", "address"] = "auto"
    n_workers: int | None = Field(None, ge=1)
    threads_per_worker: int | None = Field(None, ge=1)
    memory_limit: str = "auto"
    address: str | None = Field(None, description="Scheduler address for mode=address.")
    dashboard_address: str = Field(
        "127.0.0.1:0",
        description=(
            "Where the dashboard of a cluster twinflow starts listens (host:port, port 0 picks a free "
            "one). Loopback by default: the dashboard has no authentication. ':8787' listens on every "
            "interface."
        ),
    )
    connect_timeout: float = Field(10.0, gt=0)


class FeaturesSettings(_Section):
    """How the features stage runs (what it computes is its ``FeatureParams``)."""

    hold_bytes: int = Field(
        2 * 2**30, ge=0,
        description=(
            "Largest lake, in Parquet bytes as the Delta log sizes its files, whose partitions the features "
            "stage reads once and holds in the Dask workers' memory between its regime sample, "
            "normalisation and transform passes (in memory they take ~1-1.5x their Parquet bytes). A larger "
            "lake is read again by each pass, so the workers' memory stays flat however large the fleet. "
            "0 always reads again; so does the CuPy backend (GPU workers read their own partitions)."
        ),
    )


class MlflowSettings(_Section):
    """MLflow tracking and registry. Empty URI: SQLite under the twinflow home."""

    tracking_uri: str | None = None
    registry_uri: str | None = None
    artifact_location: str | None = None
    experiment: str = "twinflow"
    registered_model: str = "twinflow-rul"
    username: str | None = None
    password: SecretStr | None = None


class Settings(BaseSettings):
    """All of twinflow's configuration.

    Attributes:
        home: Root for the lake, databases and artifacts unless configured elsewhere.
    """

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        validate_default=True,
    )

    home: Path = Path(".twinflow")
    # The fleet contract of the data ingested without an explicit one: a YAML path, a bundled name
    # (``cmapss``, ``pumps``) or a saved Prefect block (``block:<name>``); see twinflow/contract/.
    contract: str = "cmapss"
    lake: LakeSettings = Field(default_factory=LakeSettings)
    prefect: PrefectSettings = Field(default_factory=PrefectSettings)
    dask: DaskSettings = Field(default_factory=DaskSettings)
    features: FeaturesSettings = Field(default_factory=FeaturesSettings)
    mlflow: MlflowSettings = Field(default_factory=MlflowSettings)

    @field_validator("home")
    @classmethod
    def _absolute_home(cls, v: Path) -> Path:
        # Resolved once so that worker processes with another cwd see the same paths.
        return Path(os.path.expanduser(v)).resolve()

    # Derived locations: computed, never created here (no side effects).
    @property
    def landing_path(self) -> str:
        return self.lake.landing or str(self.home / "landing")

    @property
    def lake_path(self) -> str:
        return self.lake.lake or str(self.home / "lake")

    @property
    def quarantine_path(self) -> str:
        if self.lake.quarantine:
            return self.lake.quarantine
        # An object-store lake quarantines on the same store (every host sees it); a local one at home.
        from twinflow.lake import default_quarantine

        return default_quarantine(self.lake_path) or str(self.home / "quarantine")

    @property
    def features_path(self) -> str:
        return self.lake.features or str(self.home / "features")

    @property
    def prefect_home(self) -> Path:
        return self.home / "prefect"

    @property
    def mlflow_tracking_uri(self) -> str:
        return self.mlflow.tracking_uri or f"sqlite:///{self.home / 'mlflow.db'}"

    @property
    def mlflow_artifact_location(self) -> str:
        return self.mlflow.artifact_location or (self.home / "mlartifacts").as_uri()


def _known_env_keys() -> set[str]:
    keys = set()
    for name, field in Settings.model_fields.items():
        keys.add(f"{ENV_PREFIX}{name}".upper())
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            for sub in ann.model_fields:
                keys.add(f"{ENV_PREFIX}{name}__{sub}".upper())
    return keys


def check_environment(environ: dict[str, str] | None = None) -> None:
    """Reject ``TWINFLOW_*`` variables that name no setting (a typo would otherwise be ignored).

    Raises:
        ConfigError: naming the unknown variable and the closest known one.
    """
    environ = os.environ if environ is None else environ
    known = _known_env_keys()
    for key in environ:
        if key.upper().startswith(ENV_PREFIX) and key.upper() not in known:
            close = difflib.get_close_matches(key.upper(), sorted(known), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ConfigError(f"unknown setting {key}{hint}")


def get_settings(**overrides: object) -> Settings:
    """Build settings from the environment plus keyword overrides.

    Args:
        **overrides: Top-level fields (``home=...``) or sections (``dask={"mode": "local"}``).

    Raises:
        ConfigError: for unknown keys or invalid values, in one line.
    """
    from pydantic import ValidationError

    check_environment()
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        raise ConfigError(f"invalid setting {loc}: {err['msg']}") from exc
