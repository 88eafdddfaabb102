"""Object-store options: one dictionary, two dialects.

twinflow takes object-store credentials and endpoints once, in the keys of Rust's ``object_store``
crate that delta-rs reads (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_REGION``, ``AWS_ALLOW_HTTP`` ...), from settings (``TWINFLOW_LAKE__STORAGE_OPTIONS`` /
``SECRET_OPTIONS``) or a Prefect block. Python readers (fsspec's s3fs: the landing folder, Dask
workers reading data files) need the same in s3fs's words; :func:`fsspec_options` translates.
Options that are already fsspec's (``key``, ``secret``, ``client_kwargs``, ``anon`` ...) pass through, so
local and non-S3 URLs keep working as before.
"""

from __future__ import annotations

from typing import Any

__all__ = ["delta_options", "fsspec_options", "is_object_store"]

_TRUE = {"1", "true", "yes", "on"}


def is_object_store(uri: str) -> bool:
    """True for ``s3://``/``s3a://`` URLs (the object stores twinflow writes to)."""
    return uri.split("://", 1)[0].lower() in ("s3", "s3a") if "://" in uri else False


def delta_options(uri: str, options: dict[str, Any] | None) -> dict[str, str] | None:
    """Options for delta-rs: strings, with safe concurrent commits on S3 by default.

    S3-compatible stores get ``conditional_put=etag`` unless a locking provider or another mode is
    configured: delta-rs then commits with conditional puts, so concurrent writers on several hosts
    never overwrite each other's commit (no DynamoDB, no local lock file).
    """
    out = {k: str(v) for k, v in (options or {}).items() if not isinstance(v, dict)}
    if is_object_store(uri):
        keys = {k.lower() for k in out}
        if not keys & {"conditional_put", "aws_conditional_put", "aws_s3_locking_provider",
                       "aws_s3_allow_unsafe_rename"}:
            out["conditional_put"] = "etag"
    return out or None


def fsspec_options(options: dict[str, Any] | None) -> dict[str, Any]:
    """The same options as s3fs keyword arguments (``AWS_*`` keys translated, others kept)."""
    src = dict(options or {})
    out: dict[str, Any] = {}
    client: dict[str, Any] = dict(src.pop("client_kwargs", {}) or {})
    for k, v in src.items():
        key = k.upper()
        if key == "AWS_ACCESS_KEY_ID":
            out["key"] = v
        elif key == "AWS_SECRET_ACCESS_KEY":
            out["secret"] = v
        elif key == "AWS_SESSION_TOKEN":
            out["token"] = v
        elif key in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT"):
            client["endpoint_url"] = v
        elif key in ("AWS_REGION", "AWS_DEFAULT_REGION"):
            client["region_name"] = v
        elif key.startswith("AWS_") or k.lower() in ("conditional_put", "allow_http"):
            continue  # object_store-only switches (allow_http, conditional_put ...) mean nothing to s3fs
        else:
            out[k] = v
    if client:
        out["client_kwargs"] = client
    return out
