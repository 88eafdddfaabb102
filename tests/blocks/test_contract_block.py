"""The fleet contract as a Prefect block, on the real server: saved, loaded, named by the settings."""

from __future__ import annotations

import os

import pytest
from pydantic import ValidationError

from twinflow.blocks import FleetContractBlock, register_block_types
from twinflow.contract import dump_contract, load_contract, resolve_contract
from twinflow.errors import ConfigError


def test_a_block_holds_exactly_one_valid_source():
    with pytest.raises(ValidationError, match="exactly one of contract_yaml"):
        FleetContractBlock()
    with pytest.raises(ValidationError, match="exactly one of contract_yaml"):
        FleetContractBlock(contract_yaml=dump_contract(load_contract("pumps")), path="pumps")
    with pytest.raises(ValidationError, match="channels.0.range: Value error, range"):
        FleetContractBlock(contract_yaml="name: x\nchannels: [{name: a, range: [2, 1]}]\n")
    assert FleetContractBlock(path="cmapss").contract() == load_contract("cmapss")


def test_saved_blocks_are_named_by_the_settings(prefect_api, tmp_path, monkeypatch):
    assert "twinflow-fleet-contract" in register_block_types()
    suffix = os.urandom(3).hex()
    pumps = load_contract("pumps")
    edited = pumps.model_copy(update={"name": "plant-a", "version": 2})
    FleetContractBlock.from_contract(edited).save(f"plant-a-{suffix}")
    (tmp_path / "fleet.yaml").write_text(dump_contract(pumps))
    FleetContractBlock(path=str(tmp_path / "fleet.yaml")).save(f"by-path-{suffix}")

    loaded = FleetContractBlock.load(f"plant-a-{suffix}")
    assert loaded.contract() == edited and loaded.contract().digest == edited.digest
    assert load_contract(f"block:plant-a-{suffix}") == edited
    assert load_contract(f"block:by-path-{suffix}") == pumps
    monkeypatch.setenv("TWINFLOW_CONTRACT", f"block:plant-a-{suffix}")
    assert resolve_contract() == edited

    with pytest.raises(ConfigError, match=rf"unknown twinflow-fleet-contract block 'nope-{suffix}' "
                                          r"\(saved twinflow-fleet-contract blocks: .*plant-a-"):
        load_contract(f"block:nope-{suffix}")
