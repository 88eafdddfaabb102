"""Object-store credentials as a Prefect block: the lake's S3 keys on the server, never in a file or a log.

:class:`S3CredentialsBlock` (``twinflow-s3-credentials``) holds what twinflow needs to reach an
S3-compatible store (endpoint, region, keys, plain-HTTP switch). Settings name a saved one as
``TWINFLOW_LAKE__CREDENTIALS=block:<name>`` (or ``lake.credentials`` in a config block); its options are
then the lake's storage options, under any given in ``storage_options`` / ``secret_options``
(:meth:`twinflow.settings.LakeSettings.fsspec_options`), and reach delta-rs, s3fs and the Dask workers
through the same path as options from settings.

Every reader of an object-store lake that was given no options asks the settings for them, many times
per stage, so :func:`options_from_block` keeps what it loaded per process (per Prefect API and block
name) for ``CACHE_TTL_S``: saving the block from this process forgets it at once; a key rotated from
another process is picked up within the TTL.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Optional

from prefect.blocks.core import Block
from pydantic import Field, SecretStr

__all__ = ["CACHE_TTL_S", "S3CredentialsBlock", "forget_cached_options", "options_from_block"]

CACHE_TTL_S = 300.0
_cache: dict[tuple[str, str], tuple[float, dict[str, str]]] = {}
_cache_lock = threading.Lock()


class S3CredentialsBlock(Block):
    """Credentials and endpoint of an S3-compatible object store (AWS S3, MinIO, SeaweedFS, Ceph ...)."""

    _block_type_name = "twinflow S3 credentials"
    _block_type_slug = "twinflow-s3-credentials"
    _description = ("Endpoint and keys of the S3-compatible store that holds the lake; the keys are secrets "
                    "(masked in the UI, the API and logs). Settings name it as lake.credentials=block:<name>.")

    access_key_id: SecretStr = Field(description="AWS_ACCESS_KEY_ID.")
    secret_access_key: SecretStr = Field(description="AWS_SECRET_ACCESS_KEY.")
    session_token: Optional[SecretStr] = Field(None, description="AWS_SESSION_TOKEN, for temporary credentials.")
    endpoint_url: Optional[str] = Field(
        None, description="Endpoint of an S3-compatible store, e.g. http://10.0.0.7:8333; empty: AWS S3.")
    region: str = Field("us-east-1", description="AWS_REGION (S3-compatible stores accept any).")
    allow_http: bool = Field(False, description="Allow a plain-HTTP endpoint (a store on a private network).")

    def storage_options(self) -> dict[str, str]:
        """The options in delta-rs / object_store keys (what ``TWINFLOW_LAKE__STORAGE_OPTIONS`` takes).

        The values are revealed: pass them to a client, never log them.
        """
        out = {"AWS_ACCESS_KEY_ID": self.access_key_id.get_secret_value(),
               "AWS_SECRET_ACCESS_KEY": self.secret_access_key.get_secret_value(),
               "AWS_REGION": self.region}
        if self.session_token is not None:
            out["AWS_SESSION_TOKEN"] = self.session_token.get_secret_value()
        if self.endpoint_url:
            out["AWS_ENDPOINT_URL"] = self.endpoint_url
        if self.allow_http:
            out["AWS_ALLOW_HTTP"] = "true"
        return out

    # Both ways of saving (``save`` in sync code, ``asave`` in async code) end in one of these two.
    def _save_sync(self, name: Optional[str] = None, is_anonymous: bool = False, overwrite: bool = False) -> Any:
        try:
            return super()._save_sync(name=name, is_anonymous=is_anonymous, overwrite=overwrite)
        finally:
            forget_cached_options(name)

    async def _save(self, name: Optional[str] = None, is_anonymous: bool = False, overwrite: bool = False,
                    client: Any = None) -> Any:
        try:
            return await super()._save(name=name, is_anonymous=is_anonymous, overwrite=overwrite, client=client)
        finally:
            forget_cached_options(name)


def _api_url() -> str:
    from prefect.settings import PREFECT_API_URL

    return str(PREFECT_API_URL.value() or "")


def forget_cached_options(name: str | None = None) -> None:
    """Drop the cached options of the block ``name`` (``block:<name>`` or bare; None: every block)."""
    bare = None if name is None else (name[len("block:"):] if name.startswith("block:") else name).strip()
    with _cache_lock:
        for key in [k for k in _cache if bare is None or k[1] == bare]:
            del _cache[key]


def options_from_block(ref: str) -> dict[str, str]:
    """The storage options of the saved block ``ref`` (``block:<name>`` or a bare name).

    Loaded from the Prefect API once per process and ``CACHE_TTL_S`` (module docstring); a copy is
    returned, so a caller's changes stay its own.

    Raises:
        ConfigError: no such block (the saved ones are listed).
        ServiceUnavailable: the Prefect API is not set or does not answer.
    """
    from twinflow.blocks.config import load_block

    name = (ref[len("block:"):] if ref.startswith("block:") else ref).strip()
    key = (_api_url(), name)
    with _cache_lock:
        hit = _cache.get(key)
    if hit is not None and time.monotonic() - hit[0] < CACHE_TTL_S:
        return dict(hit[1])
    options = load_block(S3CredentialsBlock, name).storage_options()
    with _cache_lock:
        _cache[key] = (time.monotonic(), options)
    return dict(options)
