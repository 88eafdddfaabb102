"""Contract validation: every mistake in a contract file is reported, each in a line that says where."""

from __future__ import annotations

import pytest

from twinflow.contract import FleetContract, dump_contract, load_contract
from twinflow.contract.store import contract_from_dict, contract_from_text
from twinflow.errors import ConfigError


def _doc(**over) -> dict:
    doc = {
        "name": "plant-a",
        "asset": {"column": "machine"},
        "clock": {"kind": "timestamp", "column": "ts", "interval": "10min", "timezone": "Europe/Berlin"},
        "channels": [
            {"name": "flow_m3h", "unit": "m3/h", "range": [0, 600], "aliases": ["flow [m3/h]"]},
            {"name": "casing_temp_c", "unit": "degC", "range": [-20, 160], "aliases": ["casing_temp [degC]"]},
        ],
    }
    doc.update(over)
    return doc


def test_a_valid_contract_loads_and_round_trips(tmp_path):
    c = contract_from_dict(_doc(), "test")
    assert c.canonical_name("Flow [m3/h]") == "flow_m3h" and c.canonical_name("TS") == "timestamp"
    dump_contract(c, tmp_path / "c.yaml")
    assert load_contract(tmp_path / "c.yaml") == c


def test_duplicate_alias_across_channels():
    doc = _doc()
    doc["channels"][1]["aliases"] = ["casing_temp [degC]", "Flow [m3/h]"]
    with pytest.raises(ConfigError, match=r"header name 'flow \[m3/h\]' is claimed by both channel flow_m3h "
                                          r"and channel casing_temp_c"):
        contract_from_dict(doc, "test")


def test_alias_taken_from_the_asset_column():
    doc = _doc()
    doc["channels"][0]["aliases"] = ["Machine"]
    with pytest.raises(ConfigError, match="'machine' is claimed by both asset and channel flow_m3h"):
        contract_from_dict(doc, "test")


def test_bad_range():
    doc = _doc()
    doc["channels"][0]["range"] = [600, 0]
    with pytest.raises(ConfigError) as exc:
        contract_from_dict(doc, "test")
    assert "channels.0.range" in str(exc.value) and "must be [low, high] with low <= high" in str(exc.value)


def test_unknown_clock_unit():
    with pytest.raises(ConfigError) as exc:
        contract_from_dict(_doc(clock={"kind": "timestamp", "column": "ts", "unit": "fortnight"}), "test")
    assert "clock.unit: Input should be 'cycle', 's', 'min', 'h' or 'd'" in str(exc.value)
    with pytest.raises(ConfigError, match="a cycle clock counts in 'cycle'"):
        contract_from_dict(_doc(clock={"kind": "cycle", "unit": "h"}), "test")


def test_bad_timezone_and_interval():
    with pytest.raises(ConfigError, match="'Mars/Olympus' is not a known IANA timezone"):
        contract_from_dict(_doc(clock={"kind": "timestamp", "timezone": "Mars/Olympus"}), "test")
    with pytest.raises(ConfigError, match="duration 'ten minutes' not understood"):
        contract_from_dict(_doc(clock={"kind": "timestamp", "interval": "ten minutes"}), "test")


def test_dataset_columns_naming_nothing():
    rule = {"match": ["*.txt"], "format": "text", "columns": ["machine", "ts", "flow_m3h", "pressure", "_"]}
    with pytest.raises(ConfigError, match=r"names \['pressure'\], which are neither the asset, the clock nor "
                                          r"a channel"):
        contract_from_dict(_doc(datasets=[rule]), "test")


def test_channel_names_must_be_identifiers_and_not_reserved():
    doc = _doc()
    doc["channels"][0]["name"] = "Flow [m3/h]"
    doc["channels"][1]["name"] = "quality"
    with pytest.raises(ConfigError) as exc:
        contract_from_dict(doc, "test")
    text = str(exc.value)
    assert "channels.0.name" in text and "declare the source spelling under aliases" in text
    assert "channels.1.name" in text and "reserved by the lake" in text


def test_every_error_is_listed_with_its_place(tmp_path):
    doc = _doc(version=0, stuck_window=1)
    doc["channels"][0]["range"] = [5, 1]
    doc["channels"][1]["kind"] = "gauge"
    path = tmp_path / "broken.yaml"
    path.write_text(dump_yaml(doc))
    with pytest.raises(ConfigError) as exc:
        load_contract(path)
    lines = str(exc.value).splitlines()
    assert lines[0] == f"invalid fleet contract {path}:"
    places = [line.split(":")[0].strip() for line in lines[1:]]
    assert set(places) == {"version", "stuck_window", "channels.0.range", "channels.1.kind"}


def dump_yaml(doc: dict) -> str:
    import yaml

    return yaml.safe_dump(doc)


def test_load_errors(tmp_path):
    with pytest.raises(ConfigError, match="fleet contract file .*missing.yaml' does not exist"):
        load_contract(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match=r"no contract file 'turbines' and no bundled contract of that name "
                                          r"\(bundled: cmapss, pumps"):
        load_contract("turbines")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nchannels: [\n  - {name: a\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_contract(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="expected a mapping at the top level, got list"):
        load_contract(listy)
    with pytest.raises(ConfigError, match="names no block"):
        load_contract("block:")
    with pytest.raises(ConfigError, match="channels: List should have at least 1 item"):
        contract_from_text("name: x\nchannels: []\n", "inline")


def test_bundled_contracts_are_valid():
    for name in ("cmapss", "pumps"):
        assert isinstance(load_contract(name), FleetContract)
