"""Object-store credentials as a Prefect block: the lake's S3 keys on the server, never in a file or a log.

:class:`S3CredentialsBlock` (``twinflow-s3-credentials``) holds what twinflow needs to reach an
S3-compatible store (endpoint, region, keys, plain-HTTP switch). Settings name a saved one as
``TWINFLOW_LAKE__CREDENTIALS=block:<name>`` (or ``lake.credentials`` in a config block); its options are
then the lake's storage options, under any given in ``storage_options`` / ``secret_options``
(:meth:`twinflow.settings.LakeSettings.fsspec_options`), and reach delta-rs, s3fs and the Dask workers
through the same path as options from settings.
"""

from __future__ import annotations

from typing import Optional

from prefect.blocks.core import Block
from pydantic import Field, SecretStr

__all__ = ["S3CredentialsBlock", "options_from_block"]


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


def options_from_block(ref: str) -> dict[str, str]:
    """The storage options of the saved block ``ref`` (``block:<name>`` or a bare name).

    Raises:
        ConfigError: no such block (the saved ones are listed).
        ServiceUnavailable: the Prefect API is not set or does not answer.
    """
    from twinflow.blocks.config import load_block

    name = ref[len("block:"):] if ref.startswith("block:") else ref
    return load_block(S3CredentialsBlock, name.strip()).storage_options()
