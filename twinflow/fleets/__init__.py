"""Generated example fleets that are not turbofans, each matching one of the bundled contracts.

* :mod:`.pumps`: centrifugal pumps (``twinflow generate pumps``), contract ``pumps``.
"""

from twinflow.fleets.pumps import PumpFleet, PumpFleetParams, generate_pumps, write_pumps

__all__ = ["PumpFleet", "PumpFleetParams", "generate_pumps", "write_pumps"]
