"""twinflow.blocks: twinflow's configuration as Prefect blocks (see :mod:`twinflow.blocks.config`).

Importing this package registers nothing on a server; call :func:`register_block_types`
(``twinflow blocks register``) once per Prefect server.
"""

from twinflow.blocks.config import (
    BLOCK_TYPES,
    DaskClusterBlock,
    LakeBlock,
    MlflowTrackingBlock,
    TwinflowConfigBlock,
    load_block,
    register_block_types,
    settings_from_block,
    settings_from_blocks,
)
from twinflow.blocks.contract import FleetContractBlock, contract_from_block
from twinflow.blocks.storage import S3CredentialsBlock

__all__ = [
    "BLOCK_TYPES",
    "DaskClusterBlock",
    "FleetContractBlock",
    "LakeBlock",
    "MlflowTrackingBlock",
    "S3CredentialsBlock",
    "TwinflowConfigBlock",
    "contract_from_block",
    "load_block",
    "register_block_types",
    "settings_from_block",
    "settings_from_blocks",
]
