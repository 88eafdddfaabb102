"""The fleet contract: what a fleet's data is (assets, clock, channels, units, ranges, file routing).

* :class:`FleetContract` and its parts (:mod:`.model`): the Pydantic model.
* :func:`load_contract` / :func:`dump_contract` (:mod:`.store`): YAML files and bundled contracts
  (``twinflow/contract/bundled/*.yaml``: ``cmapss`` for NASA's C-MAPSS turbofans, ``pumps`` for the
  generated pump fleet).
* :func:`draft_contract` (:mod:`.draft`): ``twinflow contract init`` — a first draft from sample files.
"""

from twinflow.contract.model import (AssetKey, Channel, Clock, ContractRef, DatasetRule, EventsSpec,
                                     FleetContract, parse_duration, unit_label)
from twinflow.contract.store import (bundled_contracts, contract_from_text, dump_contract, load_contract,
                                     resolve_contract)

__all__ = [
    "AssetKey", "Channel", "Clock", "ContractRef", "DatasetRule", "EventsSpec", "FleetContract",
    "bundled_contracts", "contract_from_text", "dump_contract", "load_contract", "parse_duration", "resolve_contract",
    "unit_label",
]
