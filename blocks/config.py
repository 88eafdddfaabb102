"""twinflow's configuration as Prefect blocks: configure once, see and edit it in the Prefect UI.

Six block types:

* :class:`DaskClusterBlock` (``twinflow-dask-cluster``): mode, sizes, scheduler address.
* :class:`MlflowTrackingBlock` (``twinflow-mlflow-tracking``): URI, experiment, registered model,
  credentials (the password is a ``SecretStr``).
* :class:`LakeBlock` (``twinflow-lake``): landing/lake/quarantine/features URLs, fsspec options and
  secret fsspec options (a ``SecretDict``).
* :class:`TwinflowConfigBlock` (``twinflow-config``): a named combination of the three (nested
  blocks are saved as references, so one cluster block can serve several configs).
* :class:`~twinflow.blocks.contract.FleetContractBlock` (``twinflow-fleet-contract``): a fleet contract,
  named by settings as ``contract: block:<name>``.
* :class:`~twinflow.blocks.storage.S3CredentialsBlock` (``twinflow-s3-credentials``): an object store's
  endpoint and keys, named by settings as ``lake.credentials: block:<name>``.

:func:`settings_from_blocks` turns saved blocks into :class:`twinflow.settings.Settings`, so every
command that takes settings can take a block name instead. Secrets stay ``SecretStr`` all the way
into ``Settings``: they are masked in ``repr``, in the Prefect UI and API, and
:func:`twinflow.tracking.flatten_params` skips them, so they never reach logs, params or MLflow.
"""

from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import Field, SecretStr
from prefect.blocks.core import Block
from prefect.types import SecretDict

from twinflow.errors import ConfigError, ServiceUnavailable
from twinflow.settings import Settings, get_settings

__all__ = [
    "DaskClusterBlock",
    "MlflowTrackingBlock",
    "LakeBlock",
    "TwinflowConfigBlock",
    "BLOCK_TYPES",
    "register_block_types",
    "load_block",
    "settings_from_blocks",
    "settings_from_block",
]


def _fields(block: Block) -> dict[str, Any]:
    # Field names are the Settings section's own (a test holds them to it), so a block maps onto its
    # section by name; values stay as they are (a SecretStr stays secret).
    return {name: getattr(block, name) for name in type(block).model_fields}


class DaskClusterBlock(Block):
    """Which Dask cluster twinflow runs on (``TWINFLOW_DASK__*`` as a block)."""

    _block_type_name = "twinflow Dask cluster"
    _block_type_slug = "twinflow-dask-cluster"
    _description = "Dask cluster for twinflow: local, cuda (dask-cuda) or an existing scheduler address."

    mode: Literal["auto", "local", "cuda", "address"] = Field("auto", description="auto picks cuda on a GPU machine.")
    address: Optional[str] = Field(None, description="Scheduler address for mode=address, e.g. tcp://10.0.0.5:8786.")
    n_workers: Optional[int] = Field(None, ge=1, description="Workers of a cluster twinflow starts.")
    threads_per_worker: Optional[int] = Field(None, ge=1)
    memory_limit: str = Field("auto", description="Per-worker memory limit of a cluster twinflow starts.")
    connect_timeout: float = Field(10.0, gt=0, description="Seconds to wait for the scheduler.")

    def settings_section(self) -> dict[str, Any]:
        """The ``dask`` section of :class:`~twinflow.settings.Settings` this block describes."""
        return _fields(self)


class MlflowTrackingBlock(Block):
    """Where twinflow tracks experiments and registers models (``TWINFLOW_MLFLOW__*`` as a block)."""

    _block_type_name = "twinflow MLflow tracking"
    _block_type_slug = "twinflow-mlflow-tracking"
    _description = "MLflow tracking server / registry used by twinflow; the password is stored as a secret."

    tracking_uri: Optional[str] = Field(None, description="e.g. http://mlflow.plant.local:5000; empty: SQLite under the home.")
    registry_uri: Optional[str] = None
    artifact_location: Optional[str] = None
    experiment: str = "twinflow"
    registered_model: str = "twinflow-rul"
    username: Optional[str] = None
    password: Optional[SecretStr] = None

    def settings_section(self) -> dict[str, Any]:
        """The ``mlflow`` section of :class:`~twinflow.settings.Settings` this block describes."""
        return _fields(self)


class LakeBlock(Block):
    """Where twinflow's data lives (``TWINFLOW_LAKE__*`` as a block)."""

    _block_type_name = "twinflow lake"
    _block_type_slug = "twinflow-lake"
    _description = "Landing, lake, quarantine and feature locations (fsspec URLs) with their storage options."

    landing: Optional[str] = Field(None, description="Landing folder/URL scanned by ingest.")
    lake: Optional[str] = Field(None, description="Root of the partitioned Parquet lake.")
    quarantine: Optional[str] = None
    features: Optional[str] = None
    storage_options: dict[str, str] = Field(default_factory=dict, description="Non-secret fsspec options.")
    secret_options: Optional[SecretDict] = Field(
        None, description="Secret fsspec options (keys, tokens), e.g. {\"secret\": \"...\"}."
    )
    credentials: Optional[str] = Field(
        None, description="block:<name> of a twinflow-s3-credentials block holding the store's endpoint and keys.")

    def settings_section(self) -> dict[str, Any]:
        """The ``lake`` section of :class:`~twinflow.settings.Settings` this block describes."""
        secrets = self.secret_options.get_secret_value() if self.secret_options is not None else {}
        return {**_fields(self), "storage_options": dict(self.storage_options),
                "secret_options": {k: SecretStr(str(v)) for k, v in secrets.items()}}


class TwinflowConfigBlock(Block):
    """A named twinflow configuration: the three blocks above (each optional) plus the home."""

    _block_type_name = "twinflow config"
    _block_type_slug = "twinflow-config"
    _description = "A complete twinflow configuration: Dask cluster, MLflow tracking and lake blocks."

    home: Optional[str] = Field(None, description="twinflow home on the machines that run flows.")
    dask: Optional[DaskClusterBlock] = None
    mlflow: Optional[MlflowTrackingBlock] = None
    lake: Optional[LakeBlock] = None


def _block_types() -> tuple[type[Block], ...]:
    from twinflow.blocks.contract import FleetContractBlock
    from twinflow.blocks.storage import S3CredentialsBlock

    return (DaskClusterBlock, MlflowTrackingBlock, LakeBlock, TwinflowConfigBlock, FleetContractBlock,
            S3CredentialsBlock)


BLOCK_TYPES: tuple[type[Block], ...] = _block_types()


def check_api() -> str:
    """Return the Prefect API URL, or raise a clear error when it is unset or down."""
    from prefect.settings import PREFECT_API_URL

    from twinflow.prefect_server import api_healthy

    url = PREFECT_API_URL.value()
    if not url:
        raise ServiceUnavailable("blocks live on a Prefect server and PREFECT_API_URL is not set; "
                                 "start one (`prefect server start` or `twinflow server`) and export its URL")
    if not api_healthy(url, timeout=5.0):
        raise ServiceUnavailable(f"the Prefect API at {url} does not answer; start it (`prefect server start`) "
                                 "or point PREFECT_API_URL at a running server")
    return url


def register_block_types() -> list[str]:
    """Register (or update) twinflow's block types on the Prefect server; idempotent.

    Returns:
        The registered block type slugs.

    Raises:
        ServiceUnavailable: the Prefect API is not set or does not answer.
    """
    from twinflow.blocks.broker import BrokerCredentialsBlock

    check_api()
    # Every block a twinflow config can name, the bridge's broker credentials included.
    types = (*BLOCK_TYPES, BrokerCredentialsBlock)
    for block_type in types:
        block_type.register_type_and_schema()
    return [b.get_block_type_slug() for b in types]


def _saved_names(block_type: type[Block]) -> list[str]:
    from prefect.client.orchestration import get_client

    try:
        with get_client(sync_client=True) as client:
            docs = client.read_block_documents_by_type(block_type.get_block_type_slug())
        return sorted(d.name for d in docs if d.name)
    except Exception:  # the type itself may not be registered yet
        return []


def load_block(block_type: type[Block], name: str) -> Block:
    """Load a saved block, with one-line errors for an unknown name or an unreachable server.

    Raises:
        ConfigError: no block of that type has this name (lists the saved ones).
        ServiceUnavailable: the Prefect API is not set or does not answer.
    """
    check_api()
    try:
        return block_type.load(name)
    except ValueError as exc:
        if "Unable to find block document" not in str(exc):
            raise
        slug = block_type.get_block_type_slug()
        saved = _saved_names(block_type)
        known = f"saved {slug} blocks: {', '.join(saved)}" if saved else f"no {slug} block is saved yet"
        raise ConfigError(f"unknown {slug} block {name!r} ({known}); create it in the Prefect UI "
                          f"or with {block_type.__name__}(...).save({name!r})") from None


def _merge(base: Settings, sections: dict[str, dict[str, Any]], home: str | None) -> Settings:
    data = base.model_dump()
    for section, values in sections.items():
        data[section].update(values)
    if home:
        data["home"] = home
    try:
        return Settings.model_validate(data)
    except Exception as exc:  # pydantic.ValidationError: one line, as get_settings does
        errors = getattr(exc, "errors", None)
        if errors is None:
            raise
        err = errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        raise ConfigError(f"invalid value in block for {loc}: {err['msg']}") from None


def settings_from_blocks(
    config: str | None = None,
    *,
    dask: str | None = None,
    mlflow: str | None = None,
    lake: str | None = None,
    base: Settings | None = None,
) -> Settings:
    """Build :class:`~twinflow.settings.Settings` from saved blocks, over the environment's settings.

    Args:
        config: Name of a :class:`TwinflowConfigBlock`; its nested blocks fill the sections.
        dask: Name of a :class:`DaskClusterBlock` (overrides the config's).
        mlflow: Name of a :class:`MlflowTrackingBlock` (overrides the config's).
        lake: Name of a :class:`LakeBlock` (overrides the config's).
        base: Settings the blocks are applied on; default :func:`twinflow.settings.get_settings`.

    Raises:
        ConfigError: an unknown block name or an invalid value in a block.
        ServiceUnavailable: the Prefect API is not set or does not answer.
    """
    base = base or get_settings()
    sections: dict[str, dict[str, Any]] = {}
    home = None
    if config:
        cfg = load_block(TwinflowConfigBlock, config)
        home = cfg.home
        for section in ("dask", "mlflow", "lake"):
            block = getattr(cfg, section)
            if block is not None:
                sections[section] = block.settings_section()
    for section, name, block_type in (("dask", dask, DaskClusterBlock), ("mlflow", mlflow, MlflowTrackingBlock),
                                      ("lake", lake, LakeBlock)):
        if name:
            sections[section] = load_block(block_type, name).settings_section()
    return _merge(base, sections, home)


def settings_from_block(name: str) -> Settings:
    """Settings from one :class:`TwinflowConfigBlock` (the common case: ``--config-block prod``)."""
    return settings_from_blocks(config=name)
