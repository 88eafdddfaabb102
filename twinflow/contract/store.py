"""Reading and writing fleet contracts: YAML files, bundled contracts, and the default one."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from twinflow.contract.model import FleetContract
from twinflow.errors import ConfigError

_BUNDLED = "twinflow.contract.bundled"


def bundled_contracts() -> list[str]:
    """Names of the contracts shipped with twinflow (``cmapss``, ``pumps``)."""
    return sorted(p.name[:-5] for p in resources.files(_BUNDLED).iterdir() if p.name.endswith(".yaml"))


def _format_errors(exc: ValidationError, where: str) -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        lines.append(f"  {loc}: {err['msg']}")
    return f"invalid fleet contract {where}:\n" + "\n".join(lines)


def contract_from_dict(data: Any, where: str = "") -> FleetContract:
    """Validate a parsed contract document.

    Raises:
        ConfigError: listing every problem as ``path.to.field: message``.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"invalid fleet contract {where}: expected a mapping at the top level, got "
                          f"{type(data).__name__}")
    try:
        return FleetContract.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, where)) from None


def contract_from_text(raw: str, where: str = "") -> FleetContract:
    """A contract from YAML (or JSON) text.

    Raises:
        ConfigError: when the text is not YAML or does not validate (every error listed).
    """
    import yaml

    try:
        data = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise ConfigError(f"fleet contract {where} is not valid YAML: {exc}") from None
    return contract_from_dict(data, where)


def load_contract(source: str | Path) -> FleetContract:
    """A contract from a YAML/JSON file path, a bundled name (``cmapss``, ``pumps``) or a saved Prefect
    block (``block:<name>``, a :class:`~twinflow.blocks.contract.FleetContractBlock`).

    Raises:
        ConfigError: when the file is missing, is not YAML, or does not validate (every error listed),
            or names an unknown block.
        ServiceUnavailable: for ``block:<name>`` when the Prefect API is not set or does not answer.
    """
    text = str(source)
    if text.startswith("block:"):
        name = text[len("block:"):].strip()
        if not name:
            raise ConfigError("contract 'block:' names no block: use block:<name>")
        from twinflow.blocks.contract import contract_from_block

        return contract_from_block(name)
    path = Path(text).expanduser()
    if not path.exists() and "/" not in text and not text.endswith((".yaml", ".yml", ".json")):
        if text not in bundled_contracts():
            raise ConfigError(f"no contract file {text!r} and no bundled contract of that name "
                              f"(bundled: {', '.join(bundled_contracts())})")
        raw = resources.files(_BUNDLED).joinpath(f"{text}.yaml").read_text()
        where = f"bundled:{text}"
    else:
        if not path.is_file():
            raise ConfigError(f"fleet contract file {str(path)!r} does not exist")
        raw = path.read_text()
        where = str(path)
    return contract_from_text(raw, where)


def resolve_contract(contract: FleetContract | str | Path | None = None) -> FleetContract:
    """A contract object from an object, a path or bundled name, or (None) the settings' ``contract``."""
    if isinstance(contract, FleetContract):
        return contract
    if contract is None:
        from twinflow.settings import get_settings

        contract = get_settings().contract
    return load_contract(contract)


def dump_contract(contract: FleetContract, path: str | Path | None = None) -> str:
    """The contract as YAML (written to ``path`` when given, atomically); defaults are left out."""
    import os
    import tempfile

    import yaml

    data = contract.model_dump(mode="json", exclude_defaults=True)
    data = {"name": contract.name, "version": contract.version, **data}
    text = yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=110)
    if path is not None:
        path = Path(path)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.replace(tmp, path)
    return text
