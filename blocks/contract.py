"""The fleet contract as a Prefect block: keep a plant's contract on the server, edit it in the UI.

:class:`FleetContractBlock` (``twinflow-fleet-contract``) holds a contract either as YAML text or as a
path (or bundled name) to read it from. Settings name a saved one as ``contract: block:<name>``
(``TWINFLOW_CONTRACT=block:plant-a``); :func:`twinflow.contract.load_contract` resolves it.
"""

from __future__ import annotations

from typing import Optional

from prefect.blocks.core import Block
from pydantic import Field, model_validator

from twinflow.contract.model import FleetContract

__all__ = ["BLOCK_PREFIX", "FleetContractBlock", "contract_from_block"]

# How settings and --contract options name a saved block: ``block:<name>``.
BLOCK_PREFIX = "block:"


class FleetContractBlock(Block):
    """A fleet contract: YAML text, or a path / bundled name to load it from (exactly one)."""

    _block_type_name = "twinflow fleet contract"
    _block_type_slug = "twinflow-fleet-contract"
    _description = ("A fleet contract (asset key, clock, channels with units and ranges, file routing) as YAML "
                    "text or a path; settings name it as block:<name>.")

    contract_yaml: Optional[str] = Field(
        None, description="The contract as YAML (what `twinflow contract init` writes).")
    path: Optional[str] = Field(
        None, description="Or: a contract file path on the machines that run flows, or a bundled name (pumps).")

    @model_validator(mode="after")
    def _one_source(self) -> "FleetContractBlock":
        if bool(self.contract_yaml) == bool(self.path):
            raise ValueError("a fleet contract block holds exactly one of contract_yaml (the YAML text) or path")
        if self.contract_yaml:
            self.contract()  # a block that cannot give its contract is never saved
        return self

    def contract(self) -> FleetContract:
        """The contract this block holds.

        Raises:
            ConfigError: the YAML is invalid (every error listed) or the path does not exist.
        """
        from twinflow.contract.store import contract_from_text, load_contract

        if self.contract_yaml:
            return contract_from_text(self.contract_yaml, "in a twinflow-fleet-contract block")
        return load_contract(self.path)

    @classmethod
    def from_contract(cls, contract: FleetContract) -> "FleetContractBlock":
        """A block holding ``contract`` as YAML text."""
        from twinflow.contract.store import dump_contract

        return cls(contract_yaml=dump_contract(contract))


def contract_from_block(name: str) -> FleetContract:
    """The contract of the saved block ``name``.

    Raises:
        ConfigError: no such block (the saved ones are listed) or an invalid contract in it.
        ServiceUnavailable: the Prefect API is not set or does not answer.
    """
    from twinflow.blocks.config import load_block

    return load_block(FleetContractBlock, name).contract()
