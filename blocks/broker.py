"""Broker credentials for the stream bridge as a Prefect block (the password is a ``SecretStr``)."""

from __future__ import annotations

from typing import Optional

from prefect.blocks.core import Block
from pydantic import Field, SecretStr

__all__ = ["BrokerCredentialsBlock"]


class BrokerCredentialsBlock(Block):
    """MQTT broker / OPC UA server credentials, named by a bridge config's ``credentials_block``."""

    _block_type_name = "twinflow-broker-credentials"
    _block_type_slug = "twinflow-broker-credentials"
    _description = "Username and password of an MQTT broker or OPC UA server for `twinflow stream`."

    username: Optional[str] = Field(None, description="User name.")
    password: Optional[SecretStr] = Field(None, description="Password (stored encrypted, masked in the UI).")
